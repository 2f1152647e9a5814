/**
 * vhost-ts: vhost-user device backends in TypeScript. The public API: the device interface a backend author
 * implements, the server that serves it to QEMU, and the virtqueue types handlers work with.
 */
export * from './vhost/index.js';
export * from './virtqueue/index.js';
export { rngDevice, type RngDevice } from './devices/rng/index.js';
