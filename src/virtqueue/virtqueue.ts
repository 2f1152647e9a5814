/**
 * The one queue type devices see, whatever the ring layout the driver negotiated (split, virtio 1.2 §2.7, or
 * packed, §2.8). It has no ring indices and no publish: making used chains visible and notifying the driver is
 * the framework's job (`ctx.publish()`), so no handler can forget an interrupt or depend on a layout.
 *
 * @example A device that answers every chain with zeros:
 * ```ts
 * const handler: QueueHandler = {
 *   process(queue: Virtqueue) {
 *     for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
 *       queue.push(chain, chain.writer().fill(0));
 *     }
 *   },
 * };
 * ```
 */
import type { DescriptorChain } from './chain.js';
import type { DirtyLog } from './dirty-log.js';
import type { GuestMemory } from './guest-memory.js';
import type { VirtqueueError } from './errors.js';

export interface Virtqueue {
  /** Queue index in the device, for log lines. */
  readonly index: number;
  /** Ring entries (the most chains that can be in flight). */
  readonly size: number;
  /** Chains popped and neither pushed nor unpopped yet. */
  readonly inFlight: number;
  /** Set once the driver broke the ring's rules; the queue serves nothing until the driver resets the device. */
  readonly broken: VirtqueueError | null;
  /** Whether the driver has made chains available that have not been popped. */
  hasAvailable(): boolean;
  /**
   * The next available chain, or null when there is none. Throws VirtqueueError (and the queue is broken) when
   * the guest broke the rules; let it propagate.
   */
  pop(): DescriptorChain | null;
  /**
   * Give a chain back to the driver with `written` bytes written into its writable part. Chains may complete in
   * any order; the framework makes them visible to the driver after `process()` or on `ctx.publish()`.
   */
  push(chain: DescriptorChain, written: number): void;
  /**
   * Give back the most recently popped chain untouched (no room for it now): the next pop yields it again.
   * Several chains go back in the reverse order of their pops.
   */
  unpop(chain: DescriptorChain): void;
  /** Ask the driver not to kick while the device is busy anyway. */
  disableNotification(): void;
  /**
   * Ask the driver to kick for the next chain, then look once more: true when chains arrived meanwhile, which
   * must be served now (the driver will not kick for them).
   */
  enableNotification(): boolean;
  /**
   * A hint, before popping: the device is about to write up to `bytes` bytes into each of the next `count`
   * available chains, and to push `count` chains. A zero is stored into each cache line of those bytes now
   * (chains of one writable descriptor only) and, in a split ring, of the used elements the pushes will fill, so
   * the lines come over from the driver's CPU together instead of one stall per chain. `bytes` 0: the used
   * elements only (a device that reads its chains). Pops nothing and never throws: a bad descriptor is left for
   * pop() to report. Does nothing while writes are logged for migration (a buffer written here may never be
   * pushed).
   *
   * @example
   * // a device that fills receive buffers in bursts of 32 frames of `len` bytes
   * queue.claimWrites(32, len);
   * for (let c = queue.pop(), n = 0; c !== null && n < 32; c = queue.pop(), n++) fill(c);
   */
  claimWrites(count: number, bytes: number): void;
}

/** The framework's side of a queue: what the queue runner drives and devices never see. */
export interface RingQueue extends Virtqueue {
  broken: VirtqueueError | null;
  /**
   * SET_VRING_ENABLE 0: pop() gives nothing, so no device (not even one filling the queue from its own fd, as a
   * tap does) supplies chains the driver no longer expects used.
   */
  disabled: boolean;
  /** Chains taken from the ring so far (unpop takes one back): tells the runner whether a handler took any. */
  readonly popped: number;
  /** Bytes the device reported written, over all pushes. */
  readonly bytesWritten: number;
  /** Publishes the driver did not want to be notified of. */
  readonly suppressed: number;
  /** Make pushed chains visible to the driver; true when the driver asked to be notified of them. */
  publish(): boolean;
  /** Swap in a new memory table (the rings must be mapped in it). Chains popped earlier keep the old one. */
  setMemory(memory: GuestMemory): void;
  /** The ring position as GET_VRING_BASE reports it (split: next avail index; packed: the 32-bit word). */
  vringBase(): number;
  /** Chains the inflight region held at start (before a restart, in flight): they are popped again first. */
  readonly recovered: number;
  /**
   * Log writes into guest memory in `log` (null: stop): what each push wrote, and with `usedLogAddr` >= 0
   * (VHOST_VRING_F_LOG, the ring's log_guest_addr) the ring's own writes.
   */
  setLog(log: DirtyLog | null, usedLogAddr: number): void;
  /** Mark the ring's device-written parts dirty once more (after the last writes, when the queue stops). */
  logRing(): void;
}
