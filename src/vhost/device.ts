/**
 * The public device API: what a device author implements. The built-in devices use exactly this, nothing more.
 *
 * A device has two halves:
 * - the control half ({@link VhostUserDevice}), a plain object on the main thread: identity, feature bits,
 *   config space, queue count and size, reset;
 * - the data half, a module exporting `createQueueHandler` ({@link QueueHandlerFactory}) that the framework loads
 *   in each queue worker (or on the main thread for low-rate devices). Workers cannot receive functions, so the
 *   data half is named by module URL and given structured-cloneable options. A device whose queues work together
 *   (a switch forwarding between the queues of several frontends) exports `createThreadHandler` instead
 *   ({@link ThreadHandlerFactory}): one handler per thread that sees every queue the thread serves.
 *
 * @example A complete device: see src/devices/rng (virtio-rng), about forty lines.
 * ```ts
 * // my-device.ts
 * import type { QueueContext, QueueHandler, VhostUserDevice } from 'vhost-ts';
 *
 * export function createQueueHandler(ctx: QueueContext<{ fill: number }>): QueueHandler {
 *   return {
 *     process(queue) {
 *       for (let chain = queue.pop(); chain; chain = queue.pop()) {
 *         queue.push(chain, chain.writer().fill(ctx.options.fill));
 *       }
 *     },
 *   };
 * }
 *
 * export const device: VhostUserDevice<{ fill: number }> = {
 *   name: 'filler', deviceId: 4, numQueues: 1, maxQueueSize: 256, features: 0n,
 *   dataPlane: { module: new URL(import.meta.url), options: { fill: 0xab } },
 * };
 * ```
 */
import type { Virtqueue } from '../virtqueue/index.js';
import { VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES } from './protocol.js';
import type { PollSetting } from './poll-window.js';

/** Virtio feature bits the framework itself implements and offers for every device. */
export const VIRTIO_F_ANY_LAYOUT = 27;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;
/** Packed virtqueues (virtio 1.2 §2.8): offered for every device; the frontend decides (QEMU: `packed=on`). */
export const VIRTIO_F_RING_PACKED = 34;
/**
 * The device returns every chain of every queue in the order it took them (virtio 1.2 §2.7.9, §2.8.9). Not in
 * FRAMEWORK_FEATURES: a device offers it in its own `features` only when that holds for all its queues (net does;
 * blk, whose requests complete out of order, does not). A driver that knows it takes simpler paths: DPDK's virtio
 * PMD negotiates it by default, as DPDK's own vhost back-end offers it.
 */
export const VIRTIO_F_IN_ORDER = 35;

export const bit = (n: number): bigint => 1n << BigInt(n);

export const FRAMEWORK_FEATURES =
  bit(VIRTIO_F_ANY_LAYOUT) |
  bit(VIRTIO_RING_F_INDIRECT_DESC) |
  bit(VIRTIO_RING_F_EVENT_IDX) |
  bit(VIRTIO_F_VERSION_1) |
  bit(VIRTIO_F_RING_PACKED) |
  // Dirty logging for live migration: the framework logs every device write (LOG_SHMFD).
  bit(VHOST_F_LOG_ALL) |
  bit(VHOST_USER_F_PROTOCOL_FEATURES);

export interface DataPlane<O> {
  /**
   * Module exporting `createQueueHandler` (a {@link QueueHandlerFactory}); usually `new URL(import.meta.url)`.
   * Optional with thread 'main' and `createQueueHandler` given.
   */
  module?: URL;
  /**
   * thread 'main' only: the factory itself, called in this process. The handlers then share state with the
   * control half directly (host-side sockets, terminals), with no module to load and nothing to clone.
   */
  createQueueHandler?(ctx: QueueContext<O>): QueueHandler;
  /** Handed to every queue handler; must survive structured cloning (no functions, no class instances). */
  options: O;
  /**
   * Where the queues run. 'worker' (default): worker threads that block on the kick eventfds, off the main
   * thread. 'main': on the main thread's event loop, for low-rate queues where a thread is not worth it.
   */
  thread?: 'worker' | 'main';
  /** Queues served by one worker together, e.g. [[0, 1], [2, 3]]. Default: one worker per queue. */
  groups?: number[][];
  /**
   * Devices of one process whose data planes give the same key share one worker thread: every queue of each
   * (of whichever frontend connects to it) is served there, by one {@link ThreadHandler}. For devices that move
   * data between each other's queues (the ports of a switch), so that it never crosses threads. Their modules
   * must be the same; the first device's pollUs applies.
   */
  shareThread?: string;
  /** thread 'main' only: the thread handler factory itself (instead of a module exporting createThreadHandler). */
  createThreadHandler?(thread: ThreadContext): ThreadHandler<O>;
  /**
   * Busy-poll: after serving chains, spin up to this many microseconds for more before sleeping on the kick
   * eventfd (default 0: never). Trades a busy CPU for fewer wakeups and kicks; use it on a dedicated core.
   * 'adaptive' polls as QEMU's IOThreads do: a window per queue, up to 32 µs, that grows while the driver keeps
   * coming back within it and drops to 0 once it does not (an idle or slow queue sleeps at once).
   */
  pollUs?: PollSetting;
}

export interface VhostUserDevice<O = unknown> {
  /** Short name for logs and errors. */
  readonly name: string;
  /** Virtio device ID (virtio 1.2 §5): 1 net, 2 block, 3 console, 4 entropy, … */
  readonly deviceId: number;
  /** Queues the device has (GET_QUEUE_NUM answers this). */
  readonly numQueues: number;
  /** Largest queue size the device accepts (a power of 2, at most 32768). */
  readonly maxQueueSize: number;
  /** Device-specific virtio feature bits (the framework adds VERSION_1, EVENT_IDX, INDIRECT_DESC, ANY_LAYOUT). */
  readonly features: bigint;
  readonly dataPlane: DataPlane<O>;
  /**
   * The device's requests may run twice (block reads and writes do): the framework then offers INFLIGHT_SHMFD
   * and records every chain in flight in memory the frontend keeps, so that a backend restarted after a crash
   * gets the chains its predecessor never completed again, before any new ones, in the order they were taken.
   */
  readonly inflightTracking?: boolean;
  /**
   * State a successor needs (live migration through the frontend: DEVICE_STATE; a planned restart: --state-file),
   * as the device's message of proto/vhost_ts/state.proto in plain-object form. With it the framework offers
   * DEVICE_STATE.
   */
  readonly state?: DeviceStateHooks;
  /** vhost-user protocol features the device adds to the framework's (e.g. RARP for net). */
  readonly protocolFeatures?: bigint;
  /** SEND_RARP (protocol feature RARP): after migration, announce the guest's MAC to the network. */
  sendRarp?(mac: Uint8Array): void;
  /** Config space size in bytes; with it the framework offers the CONFIG protocol feature. */
  readonly configSize?: number;
  /** Read config space (GET_CONFIG). */
  readConfig?(offset: number, length: number): Uint8Array;
  /** Write config space (SET_CONFIG), for devices with writable fields. */
  writeConfig?(offset: number, data: Uint8Array): void;
  /** The driver's accepted features, once per SET_FEATURES. */
  featuresNegotiated?(features: bigint): void;
  /** Back to power-on state: the frontend disconnected or reset the device. */
  reset?(): void;
  /**
   * The connected frontend (null when it goes): call `configChanged()` after changing the config space (link
   * status, capacity) so the frontend re-reads it and tells the driver (CONFIG_CHANGE_MSG on the backend channel).
   */
  bindFrontend?(frontend: FrontendLink | null): void;
}

export interface DeviceStateHooks {
  /** Which message of state.proto's DeviceState this is. */
  readonly kind: 'blk' | 'net' | 'console';
  save(): object;
  /** Take a saved state (throw when it cannot be right; the frontend is told the load failed). */
  load(state: object): void;
}

export interface FrontendLink {
  /** Tell the frontend the config space changed; false when it gave us no backend channel to say it on. */
  configChanged(): boolean;
}

/** What a queue handler gets when it is created (in the thread that will run it). */
export interface QueueContext<O = unknown> {
  readonly queueIndex: number;
  /**
   * Which device this queue belongs to among those whose queues this thread serves (DataPlane.shareThread), the
   * same number for every queue of one device for the thread's lifetime; 0 in a thread of one device.
   */
  readonly device: number;
  /** The queue this handler serves (the same object `process` gets), e.g. to fill it from another source. */
  readonly queue: Virtqueue;
  readonly options: O;
  /** Features the driver accepted (control path only; read once, not per chain). */
  readonly features: bigint;
  /**
   * The ring does not start at its beginning: the driver used it before this handler (a backend restarted under
   * a running guest, or a queue stopped and started again). Devices whose driver set them up through a queue
   * earlier (virtio-console's control messages) take that setup as done.
   */
  readonly resumed: boolean;
  /**
   * Publish used chains and notify the driver if it asked to be. The framework does this after each
   * `process()` call; call it yourself when chains complete later (asynchronous I/O).
   */
  publish(): void;
  /** Process the queue again: call after `process()` declined chains for lack of resources and now can take them. */
  resume(): void;
  /**
   * Watch an fd of your own (an io_uring completion eventfd, a tap device) in this queue's thread. A throw from
   * `onReadable` counts as one from `process()`.
   */
  watch(fd: number, onReadable: () => void): { close(): void };
  /** A line in the backend's log, prefixed with the device and queue. For state changes, not per chain. */
  log(message: string): void;
}

export interface QueueHandler {
  /**
   * Serve available chains: pop, do the work, push with the byte count written. Called after kicks until the
   * queue is empty.
   *
   * Throwing means the queue cannot go on: the framework marks it broken and signals the error eventfd, and QEMU
   * sets NEEDS_RESET, so the guest loses the device until it resets it. That is right for what the guest did
   * wrong (the ring's own checks throw a VirtqueueError) and for bugs, and wrong for failures of the backend's
   * own resources, which are not the guest's fault: a tap that is down or gone, a disk that returns EIO, a socket
   * client that went away. Handle those in the device and keep serving: drop the frame and count it, complete the
   * request with an error status (VIRTIO_BLK_S_IOERR), or leave the chains in the ring until the resource is back.
   */
  process(queue: Virtqueue): void;
  /**
   * false: the driver need not kick this queue, as its chains are taken when the device has something for them (a
   * switch port's receive queue), not when they arrive. The framework then keeps the driver's notifications off,
   * which saves the driver a syscall per refill and this thread a wakeup; process() runs once at start and on
   * ctx.resume(). Default true.
   */
  readonly needsKicks?: boolean;
  /**
   * Complete every chain in flight before returning (block on your I/O). Called before the memory table changes:
   * chains popped earlier point into mappings that are about to go away.
   */
  drain?(queue: Virtqueue): void;
  /** The queue is stopping (GET_VRING_BASE, reset, disconnect), after drain(): release what you hold. */
  stop?(queue: Virtqueue): void;
}

export type QueueHandlerFactory<O = unknown> = (ctx: QueueContext<O>) => QueueHandler;

/** What a thread handler gets: the thread's own services, for fds that are not any one queue's. */
export interface ThreadContext {
  /** Watch an fd in this thread (a switch's tap uplink). A throw from `onReadable` is logged, not fatal. */
  watch(fd: number, onReadable: () => void): { close(): void };
  log(message: string): void;
}

/**
 * One per data-plane thread: sees every queue the thread serves, of every device that shares it (like rust-vmm's
 * handle_event over a worker's vrings). A module exporting only `createQueueHandler` gets a thread handler that
 * calls it for each queue.
 *
 * @example Queues of one device paired up without any module-global state:
 * ```ts
 * export function createThreadHandler(thread: ThreadContext): ThreadHandler<Opts> {
 *   const devices = new Map<number, { rx?: Virtqueue }>();
 *   return {
 *     createQueueHandler(ctx) {
 *       const d = devices.get(ctx.device) ?? devices.set(ctx.device, {}).get(ctx.device)!;
 *       if (ctx.queueIndex === 0) d.rx = ctx.queue;
 *       return { process(q) { ... }, stop() { if (ctx.queueIndex === 0) d.rx = undefined; } };
 *     },
 *     endOfBatch() { ... publish what process() calls filled in other queues ... },
 *   };
 * }
 * ```
 */
export interface ThreadHandler<O = unknown> {
  /** A queue starts in this thread (ctx.device tells whose). */
  createQueueHandler(ctx: QueueContext<O>): QueueHandler;
  /**
   * The thread served a batch: the kicks of one wakeup, or one pass over its polled queues. Publish here what
   * the batch's process() calls put into other queues, so each gets one notification per batch, not per frame.
   */
  endOfBatch?(): void;
}

export type ThreadHandlerFactory<O = unknown> = (thread: ThreadContext) => ThreadHandler<O>;
