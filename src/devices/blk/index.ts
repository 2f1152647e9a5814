/**
 * virtio-blk (virtio 1.2 §5.2): a raw image file or block device served to QEMU's vhost-user-blk-pci and to
 * libblkio clients. Data moves straight between the file and guest memory (iovecs into the mapping), through
 * io_uring where the kernel allows it and preadv/pwritev otherwise; FLUSH is fdatasync before the status byte.
 *
 * @example
 * ```ts
 * import { VhostUserServer } from 'vhost-ts';
 * import { blkDevice } from 'vhost-ts/devices/blk';
 * await VhostUserServer.start(blkDevice({ path: 'disk.img', numQueues: 2 }), { socketPath: '/tmp/blk.sock' });
 * ```
 */
import { statSync, truncateSync } from 'node:fs';
import { bit, type FrontendLink, type QueueContext, type QueueHandler, type VhostUserDevice } from '../../vhost/device.js';
import { checkPollSetting, type PollSetting } from '../../vhost/poll-window.js';
import type { DescriptorChain, Virtqueue } from '../../virtqueue/index.js';
import { DiskFile, probeDisk } from './disk.js';
import { autoEngine, NullEngine, SyncEngine, type BlockEngine } from './engine.js';
import { createUringEngine } from './engine-uring.js';
import { BlkRequest, parseRequest, writeStatus, type DiskLimits } from './request.js';
import {
  CONFIG,
  CONFIG_SIZE,
  encodeConfig,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_ID_BLOCK,
} from './spec.js';

export interface BlkOptions {
  /** Raw image file or block device; ignored with `nullSize`. */
  path: string;
  /**
   * A null disk of this many bytes instead of an image, like QEMU's null-co: reads leave the guest's buffers as
   * they are, writes are dropped. Measures the queue path alone.
   */
  nullSize?: number;
  readonly?: boolean;
  /** O_DIRECT: bypass the host page cache. */
  direct?: boolean;
  /** Request queues (default 1); each gets its own worker. */
  numQueues?: number;
  /** GET_ID answer, at most 20 bytes (default: none, an empty id). */
  serial?: string;
  /**
   * 'uring', 'sync' (preadv/pwritev), or 'auto' (the default): io_uring where the kernel has it, except for an
   * image in memory (tmpfs, ramfs), which is served synchronously (see autoEngine).
   */
  engine?: 'auto' | 'uring' | 'sync';
  queueSize?: number;
  /**
   * Busy-poll each queue this many microseconds after it served requests, or 'adaptive' (the default: up to 32 µs
   * while the driver keeps coming back within the window, as QEMU's IOThreads poll); 0: never (see DataPlane.pollUs).
   */
  pollUs?: PollSetting;
  /**
   * Record requests in flight in the frontend's inflight region (INFLIGHT_SHMFD; default true), so that a
   * backend restarted after a crash runs the unfinished ones again, whatever order they completed in.
   */
  inflightTracking?: boolean;
  /**
   * A testing aid: 'reverse' completes each batch of requests in the reverse of the order they finished, and
   * holds one of them back until the next batch while others are still running, so the used ring runs out of
   * ring order with older requests in flight behind newer completed ones (default 'ready': as they finish).
   */
  completionOrder?: 'ready' | 'reverse';
}

/** What each queue worker gets (structured-cloneable). */
export interface BlkQueueOptions {
  path: string;
  /** No image: every request completes at once (see BlkOptions.nullSize). */
  nullDisk: boolean;
  readonly: boolean;
  direct: boolean;
  serial: Uint8Array;
  engine: 'auto' | 'uring' | 'sync';
  completionOrder: 'ready' | 'reverse';
  limits: Omit<DiskLimits, 'discard' | 'writeZeroes' | 'capacitySectors'>;
  /** [0] the disk's size in sectors; shared with the control half, which grows it (resize). */
  capacity: SharedArrayBuffer;
  /** [0] write cache on (1) or off (0), set by the driver through the config space; shared with the control half. */
  writeback: SharedArrayBuffer;
  /** Per queue: [requests, bytes read, bytes written, refused, errors]. */
  stats: SharedArrayBuffer;
}

const SEG_MAX = 254; // leaves room for header and status within a 256-entry indirect table
const MAX_DISCARD_SEG = 32;
const MAX_DISCARD_SECTORS = 0x3fffff; // 2 GiB per range
const STATS = 5;

export interface BlkStats {
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  refused: number;
  errors: number;
}

export interface BlkDevice extends VhostUserDevice<BlkQueueOptions> {
  /**
   * Grow the disk to `sizeBytes` (a multiple of 512): an image file is extended, and the guest is told through a
   * config change (it sees the new capacity without a reboot). Throws RangeError for a size it cannot take.
   */
  resize(sizeBytes: number): void;
  /** The disk's size in bytes now. */
  readonly sizeBytes: number;
  /** Totals over all queues since the device was created. */
  stats(): BlkStats;
  /** Per request queue. */
  queueStats(): BlkStats[];
}

export function blkDevice(opts: BlkOptions): BlkDevice {
  const readonly = opts.readonly ?? false;
  const direct = opts.direct ?? false;
  const numQueues = opts.numQueues ?? 1;
  if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 64) throw new RangeError(`num-queues ${numQueues}: 1 to 64`);
  const serial = new TextEncoder().encode(opts.serial ?? '');
  if (serial.length > VIRTIO_BLK_ID_BYTES) throw new RangeError(`serial "${opts.serial}" is longer than ${VIRTIO_BLK_ID_BYTES} bytes`);
  if (opts.nullSize !== undefined && !(Number.isSafeInteger(opts.nullSize) && opts.nullSize >= 512)) {
    throw new RangeError(`null disk size ${opts.nullSize}: at least 512 bytes`);
  }
  const capacity = new Float64Array(new SharedArrayBuffer(8));
  capacity[0] = opts.nullSize !== undefined ? Math.floor(opts.nullSize / 512) : probeDisk({ path: opts.path, readonly, direct });
  let frontend: FrontendLink | null = null;
  const writeback = new SharedArrayBuffer(4);
  new Int32Array(writeback)[0] = 1;
  const stats = new SharedArrayBuffer(8 * STATS * numQueues);
  const limits = { readonly, segMax: SEG_MAX, maxDiscardSectors: MAX_DISCARD_SECTORS, maxDiscardSeg: MAX_DISCARD_SEG };
  let features =
    bit(VIRTIO_BLK_F_SIZE_MAX) |
    bit(VIRTIO_BLK_F_SEG_MAX) |
    bit(VIRTIO_BLK_F_BLK_SIZE) |
    bit(VIRTIO_BLK_F_TOPOLOGY) |
    bit(VIRTIO_BLK_F_FLUSH) |
    bit(VIRTIO_BLK_F_CONFIG_WCE) |
    bit(VIRTIO_BLK_F_MQ);
  if (readonly) features |= bit(VIRTIO_BLK_F_RO);
  else features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
  const config = () =>
    encodeConfig({
      capacitySectors: capacity[0],
      blockSize: 512,
      numQueues,
      segMax: SEG_MAX,
      sizeMax: 1 << 20,
      maxDiscardSectors: MAX_DISCARD_SECTORS,
      maxDiscardSeg: MAX_DISCARD_SEG,
      writeback: Atomics.load(new Int32Array(writeback), 0) === 1,
    });
  return {
    name: 'blk',
    deviceId: VIRTIO_ID_BLOCK,
    numQueues,
    maxQueueSize: opts.queueSize ?? 1024,
    features,
    // Reads and writes of fixed sectors, and flushes: running one twice after a restart does no harm.
    inflightTracking: opts.inflightTracking ?? true,
    configSize: CONFIG_SIZE,
    readConfig: (offset, length) => config().slice(offset, offset + length),
    writeConfig: (offset, data) => {
      // Only the writeback byte is writable (CONFIG_WCE); other writes are ignored as the spec allows.
      if (offset <= CONFIG.writeback && offset + data.length > CONFIG.writeback) {
        Atomics.store(new Int32Array(writeback), 0, data[CONFIG.writeback - offset] ? 1 : 0);
      }
    },
    reset: () => Atomics.store(new Int32Array(writeback), 0, 1),
    // Nothing beyond the config space, which the frontend keeps: requests hold no state between them.
    state: { kind: 'blk', save: () => ({}), load: () => {} },
    bindFrontend: (f) => {
      frontend = f;
    },
    get sizeBytes() {
      return capacity[0] * 512;
    },
    resize(sizeBytes: number) {
      if (!Number.isSafeInteger(sizeBytes) || sizeBytes % 512 !== 0) throw new RangeError(`size ${sizeBytes}: a multiple of 512 bytes`);
      if (sizeBytes < capacity[0] * 512) throw new RangeError(`size ${sizeBytes} is smaller than the disk (${capacity[0] * 512} bytes): only growing is supported`);
      if (readonly && sizeBytes !== capacity[0] * 512) throw new RangeError('the disk is read-only');
      if (opts.nullSize === undefined) {
        // A block device has the size it has; an image file grows (sparse).
        const st = statSync(opts.path);
        if (!st.isFile()) {
          if (probeDisk({ path: opts.path, readonly, direct }) * 512 < sizeBytes) throw new RangeError(`${opts.path} is a block device of ${capacity[0] * 512} bytes`);
        } else if (st.size < sizeBytes) truncateSync(opts.path, sizeBytes);
      }
      capacity[0] = sizeBytes / 512;
      frontend?.configChanged();
    },
    dataPlane: {
      module: new URL(import.meta.url),
      pollUs: checkPollSetting(opts.pollUs ?? 'adaptive', 'blk'),
      options: { path: opts.path, nullDisk: opts.nullSize !== undefined, readonly, direct, serial, engine: opts.engine ?? 'auto', completionOrder: opts.completionOrder ?? 'ready', limits, capacity: capacity.buffer as SharedArrayBuffer, writeback, stats },
    },
    stats() {
      return this.queueStats().reduce((a, b) => ({
        requests: a.requests + b.requests,
        bytesRead: a.bytesRead + b.bytesRead,
        bytesWritten: a.bytesWritten + b.bytesWritten,
        refused: a.refused + b.refused,
        errors: a.errors + b.errors,
      }));
    },
    queueStats: () => {
      const s = new Float64Array(stats);
      return Array.from({ length: numQueues }, (_, q) => {
        const o = q * STATS;
        return { requests: s[o], bytesRead: s[o + 1], bytesWritten: s[o + 2], refused: s[o + 3], errors: s[o + 4] };
      });
    },
  };
}

/** The data half: one per queue, in that queue's worker. */
export function createQueueHandler(ctx: QueueContext<BlkQueueOptions>): QueueHandler {
  const o = ctx.options;
  const disk = o.nullDisk ? null : new DiskFile({ path: o.path, readonly: o.readonly, direct: o.direct });
  const features = ctx.features;
  const capacity = new Float64Array(o.capacity);
  const limits: DiskLimits = {
    ...o.limits,
    // Read per request: the control half may grow the disk while the queue runs.
    get capacitySectors() {
      return capacity[0];
    },
    discard: (features & bit(VIRTIO_BLK_F_DISCARD)) !== 0n,
    writeZeroes: (features & bit(VIRTIO_BLK_F_WRITE_ZEROES)) !== 0n,
  };
  const writeback = new Int32Array(o.writeback);
  const stats = new Float64Array(o.stats, 8 * STATS * ctx.queueIndex, STATS);
  const free: BlkRequest[] = [];
  let queue: Virtqueue | null = null;
  let waitingForRoom = false;

  const finish = (req: BlkRequest) => {
    writeStatus(req);
    if (req.status !== 0) stats[4]++;
    queue!.push(req.chain!, req.written);
    req.chain = null;
    free.push(req);
  };
  const reversed: BlkRequest[] = [];
  let carried: BlkRequest | null = null;
  const complete = o.completionOrder === 'reverse' ? (req: BlkRequest) => void reversed.push(req) : finish;
  const releaseReversed = () => {
    if (reversed.length === 0 && carried === null) return;
    const previous = carried;
    carried = null;
    if (previous) reversed.unshift(previous);
    // Hold the oldest new completion for one more batch, while the engine has more to come.
    if (engine.pending > 0 && reversed.length > (previous ? 1 : 0)) carried = reversed.splice(previous ? 1 : 0, 1)[0];
    while (reversed.length > 0) finish(reversed.pop()!);
  };
  const hooks = { complete, writeThrough: () => Atomics.load(writeback, 0) === 0 };
  const engine: BlockEngine = disk === null ? new NullEngine(hooks) :
    ((o.engine === 'auto' ? autoEngine(o.path) : o.engine) !== 'sync' &&
      createUringEngine(
        disk,
        hooks,
        256,
        o.engine === 'uring',
        () => {
          releaseReversed();
          ctx.publish();
          if (waitingForRoom) {
            waitingForRoom = false;
            ctx.resume();
          }
        },
        ctx.watch,
        MAX_DISCARD_SEG,
      )) ||
    new SyncEngine(disk, hooks);

  const serve = (chain: DescriptorChain) => {
    const req = free.pop() ?? new BlkRequest(SEG_MAX, MAX_DISCARD_SEG);
    stats[0]++;
    const refusal = parseRequest(chain, req, limits);
    if (refusal !== null) {
      stats[3]++;
      complete(req);
      return;
    }
    if (req.type === VIRTIO_BLK_T_GET_ID) {
      // Up to 20 bytes, zero-padded (not terminated when all 20 are used); never the status byte.
      const n = Math.min(VIRTIO_BLK_ID_BYTES, req.dataBytes);
      const w = chain.writer();
      w.write(o.serial.subarray(0, n));
      w.fill(0, n - Math.min(o.serial.length, n));
      req.written = n + 1;
      complete(req);
      return;
    }
    if (req.type === 0) stats[1] += req.dataBytes;
    else if (req.type === 1) stats[2] += req.dataBytes;
    engine.submit(req);
  };

  return {
    process(q) {
      queue = q;
      while (engine.hasRoom) {
        const chain = q.pop();
        if (chain === null) break;
        serve(chain);
      }
      if (!engine.hasRoom) waitingForRoom = true;
      engine.flush();
      releaseReversed();
    },
    drain() {
      engine.drain();
      releaseReversed();
    },
    stop() {
      engine.drain();
      releaseReversed();
      engine.close();
      disk?.close();
    },
  };
}
