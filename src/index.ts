/**
 * vhost-ts: vhost-user device backends in TypeScript. The public API: the device interface a backend author
 * implements, the server that serves it to QEMU, and the virtqueue types handlers work with. The devices are
 * `vhost-ts/devices/{rng,blk,net,console}`; test tooling (our own frontend, the driver model) is `vhost-ts/testing`.
 */
export * from './vhost/index.js';
export * from './virtqueue/errors.js';
export * from './virtqueue/guest-memory.js';
export * from './virtqueue/chain.js';
export * from './virtqueue/virtqueue.js';
export * from './virtqueue/split-queue.js';
export * from './virtqueue/packed-queue.js';
export { rngDevice, type RngDevice } from './devices/rng/index.js';
export { ControlClient, ControlServer } from './control/index.js';
