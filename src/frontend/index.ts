/** Our own front-end: the QEMU side, for tests and benchmarks. */
export * from './errors.js';
export * from './guest.js';
export * from './frontend.js';
export { MessageReader, type RawMessage } from './reader.js';
