/**
 * Test tooling, kept off the main entry point: our own vhost-user frontend (the QEMU side, with test guest memory
 * and queues) and driver-side models of split and packed rings, for testing a device without QEMU.
 *
 * @example
 * ```ts
 * import { VhostUserServer } from 'vhost-ts';
 * import { VhostUserFrontend } from 'vhost-ts/testing';
 * const server = await VhostUserServer.start(myDevice, { socketPath: '/tmp/t.sock' });
 * const fe = await VhostUserFrontend.connect('/tmp/t.sock');
 * const [q] = await fe.start({ queues: [{ index: 0, size: 64 }] });
 * q.addWritable(4, 256);
 * q.kick();
 * const used = await q.waitForUsed(4);
 * ```
 */
export * from './frontend/index.js';
export { SplitQueueDriver, GuestAllocator, splitRingLayout, alignUp, type SplitRingLayout, type RingLayout, type QueueDriver, type GuestBuffer } from './virtqueue/driver.js';
export { PackedQueueDriver, packedRingLayout } from './virtqueue/packed-driver.js';
