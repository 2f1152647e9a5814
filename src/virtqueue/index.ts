/** Guest memory and virtqueues: pure logic over ArrayBuffers, no I/O. */
export * from './errors.js';
export * from './guest-memory.js';
export * from './chain.js';
export * from './virtqueue.js';
export * from './split-queue.js';
export * from './packed-queue.js';
export * from './inflight-split.js';
export * from './inflight-packed.js';
export * from './dirty-log.js';
export * from './driver.js';
export * from './packed-driver.js';
