/**
 * The io_uring engine: requests become SQEs (readv/writev straight into guest memory, fsync, fallocate), submitted
 * once per batch of chains, completed on the ring's eventfd in the queue's own thread. A write in write-through
 * mode is followed by an fdatasync before its status is written; a discard or write-zeroes is one fallocate per
 * range.
 */
import { IoUring, type FdWatch } from '../../sys/index.js';
import type { DiskFile } from './disk.js';
import { fallocateMode, zeroRange, type BlockEngine, type EngineHooks } from './engine.js';
import type { BlkRequest } from './request.js';
import {
  SECTOR_SIZE,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from './spec.js';

const EOPNOTSUPP = 95;

class UringEngine implements BlockEngine {
  private readonly inflight: (BlkRequest | undefined)[];
  private readonly freeIds: number[] = [];
  /** Requests whose data op is done and whose fdatasync is in flight. */
  private readonly syncing: Uint8Array;
  private readonly watch: FdWatch;
  private readonly onCompletion = (id: number, result: number) => this.completed(id, result);

  constructor(
    private readonly ring: IoUring,
    private readonly disk: DiskFile,
    private readonly hooks: EngineHooks,
    private readonly maxOpsPerRequest: number,
    private readonly onBatch: () => void,
    watch: (fd: number, cb: () => void) => FdWatch,
  ) {
    const slots = ring.entries;
    this.inflight = new Array(slots);
    this.syncing = new Uint8Array(slots);
    for (let i = slots - 1; i >= 0; i--) this.freeIds.push(i);
    this.watch = watch(ring.eventFd, () => this.reap());
  }

  get pending(): number {
    return this.ring.pending;
  }

  get hasRoom(): boolean {
    return this.freeIds.length > 0 && this.ring.sqSpace >= this.maxOpsPerRequest;
  }

  submit(req: BlkRequest): void {
    const id = this.freeIds.pop()!;
    this.inflight[id] = req;
    this.syncing[id] = 0;
    const fd = req.aligned ? this.disk.fd : this.disk.bufferedFd;
    const offset = req.sector * SECTOR_SIZE;
    const ring = this.ring;
    switch (req.type) {
      case VIRTIO_BLK_T_IN:
        req.pending = 1;
        ring.prepReadv(fd, req.iov.address, req.iovCount, offset, id);
        return;
      case VIRTIO_BLK_T_OUT:
        req.pending = 1;
        ring.prepWritev(fd, req.iov.address, req.iovCount, offset, id);
        return;
      case VIRTIO_BLK_T_FLUSH:
        if (!this.disk.syncsOnFlush) return this.finish(id, req);
        req.pending = 1;
        ring.prepFsync(this.disk.fd, true, id);
        return;
      default: {
        const r = req.ranges;
        req.pending = req.rangeCount;
        for (let i = 0; i < req.rangeCount; i++) {
          ring.prepFallocate(this.disk.fd, fallocateMode(req.type, r[3 * i + 2]), r[3 * i] * SECTOR_SIZE, r[3 * i + 1] * SECTOR_SIZE, id);
        }
      }
    }
  }

  flush(): void {
    if (this.ring.unsubmitted === 0) return;
    this.ring.submit();
    // Page-cache hits complete inside io_uring_enter: reap them now, so they are published with this batch
    // instead of after another trip through epoll and a second notification.
    this.ring.reap(this.onCompletion);
    if (this.ring.unsubmitted > 0) this.ring.submit(); // follow-up fdatasyncs
  }

  drain(): void {
    this.flush();
    while (this.ring.pending > 0) {
      this.ring.submitAndWait(1);
      this.ring.reap(this.onCompletion);
      this.flush(); // follow-up fdatasyncs
    }
    // No onBatch(): it may resume the queue, and drain() runs right before the memory table changes.
  }

  close(): void {
    this.watch.close();
    this.ring.close();
  }

  private reap(): void {
    this.ring.reap(this.onCompletion);
    this.flush();
    this.onBatch();
  }

  private completed(id: number, result: number): void {
    const req = this.inflight[id];
    if (!req) return;
    if (this.syncing[id]) {
      if (result < 0) req.status = VIRTIO_BLK_S_IOERR;
      return this.finish(id, req);
    }
    switch (req.type) {
      case VIRTIO_BLK_T_IN:
      case VIRTIO_BLK_T_OUT:
        // A short transfer inside the disk means the file shrank under us: an error, not a retry.
        if (result !== req.dataBytes) req.status = VIRTIO_BLK_S_IOERR;
        break;
      case VIRTIO_BLK_T_FLUSH:
        if (result < 0) req.status = VIRTIO_BLK_S_IOERR;
        break;
      default:
        if (result === -EOPNOTSUPP) this.zeroRangesSync(req);
        else if (result < 0) req.status = VIRTIO_BLK_S_IOERR;
    }
    if (--req.pending > 0) return;
    if (req.type !== VIRTIO_BLK_T_IN && req.type !== VIRTIO_BLK_T_FLUSH && req.status === 0 && this.hooks.writeThrough()) {
      this.syncing[id] = 1;
      this.ring.prepFsync(this.disk.fd, true, id);
      return;
    }
    this.finish(id, req);
  }

  /** Filesystems without FALLOC_FL_ZERO_RANGE: punch holes instead (once per request, synchronously; rare). */
  private zeroRangesSync(req: BlkRequest): void {
    if (req.status !== 0) return;
    try {
      for (let i = 0; i < req.rangeCount; i++) {
        const r = req.ranges;
        zeroRange(this.disk.fd, fallocateMode(req.type, r[3 * i + 2]), r[3 * i] * SECTOR_SIZE, r[3 * i + 1] * SECTOR_SIZE);
      }
      req.pending = 1; // the remaining range completions are now redundant: finish on this one
    } catch {
      req.status = VIRTIO_BLK_S_IOERR;
    }
  }

  private finish(id: number, req: BlkRequest): void {
    this.inflight[id] = undefined;
    this.freeIds.push(id);
    this.hooks.complete(req);
  }
}

/**
 * An io_uring engine, or null where the kernel does not offer io_uring (then the caller uses the synchronous
 * engine). With `required`, unavailability is an error instead.
 */
export function createUringEngine(
  disk: DiskFile,
  hooks: EngineHooks,
  depth: number,
  required: boolean,
  onBatch: () => void,
  watch: (fd: number, cb: () => void) => FdWatch,
  maxOpsPerRequest: number,
): BlockEngine | null {
  if (!IoUring.available()) {
    if (required) throw new Error('io_uring is not available on this kernel (or is disabled): use --engine sync');
    return null;
  }
  return new UringEngine(IoUring.create(depth), disk, hooks, maxOpsPerRequest + 1, onBatch, watch);
}
