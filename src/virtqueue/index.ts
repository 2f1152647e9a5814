/** Guest memory and virtqueues: pure logic over ArrayBuffers, no I/O. */
export * from './errors.js';
export * from './guest-memory.js';
export * from './chain.js';
export * from './split-queue.js';
export * from './driver.js';
