/**
 * virtio-rng (virtio 1.2 §5.4), served to QEMU's `vhost-user-rng-pci`: the driver posts writable buffers on its
 * one queue and we fill them with random bytes. The whole device, written only against the public device API,
 * and the example to copy when writing your own.
 *
 * @example
 * ```ts
 * import { VhostUserServer } from 'vhost-ts';
 * import { rngDevice } from 'vhost-ts/devices/rng';
 * const rng = rngDevice();
 * await VhostUserServer.start(rng, { socketPath: '/tmp/rng.sock' });
 * // later: rng.bytesServed()
 * ```
 */
import { randomFillSync } from 'node:crypto';
import type { QueueContext, QueueHandler, VhostUserDevice } from '../../vhost/device.js';

export const VIRTIO_ID_ENTROPY = 4;

export interface RngOptions {
  /** Shared counter of bytes served ([0], a Float64 so it never wraps in practice); one writer: the one queue. */
  counter: SharedArrayBuffer;
}

/** The data half: runs in the queue's worker thread. */
export function createQueueHandler(ctx: QueueContext<RngOptions>): QueueHandler {
  const served = new Float64Array(ctx.options.counter);
  return {
    process(queue) {
      for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
        // Fill every writable segment in place: zero-copy into guest memory.
        for (let i = chain.readableCount; i < chain.count; i++) randomFillSync(chain.segment(i));
        served[0] += chain.writableBytes;
        queue.push(chain, chain.writableBytes);
      }
    },
  };
}

export interface RngDevice extends VhostUserDevice<RngOptions> {
  /** Random bytes handed to the guest since the device was created. */
  bytesServed(): number;
}

/** The control half: identity and queues. virtio-rng has no feature bits and no config space. */
export function rngDevice(): RngDevice {
  const counter = new SharedArrayBuffer(8);
  const served = new Float64Array(counter);
  return {
    name: 'rng',
    deviceId: VIRTIO_ID_ENTROPY,
    numQueues: 1,
    maxQueueSize: 1024,
    features: 0n,
    dataPlane: { module: new URL(import.meta.url), options: { counter } },
    bytesServed: () => served[0],
  };
}
