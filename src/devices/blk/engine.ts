/**
 * How requests reach the disk. The synchronous engine (preadv/pwritev/fdatasync/fallocate) completes each request
 * before returning; the io_uring engine submits in batches and completes on its eventfd.
 */
import { statfsSync, statSync } from 'node:fs';
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
  fdatasync,
  preadv,
  pwritev,
} from '../../sys/index.js';
import type { DiskFile } from './disk.js';
import type { BlkRequest } from './request.js';
import {
  SECTOR_SIZE,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from './spec.js';

export interface BlockEngine {
  /** Start a request's I/O; `complete(req)` is called when it is done, possibly before submit returns. */
  submit(req: BlkRequest): void;
  /** Whether another request can be submitted now. */
  readonly hasRoom: boolean;
  /** Requests submitted and not yet completed. */
  readonly pending: number;
  /** Push queued submissions to the kernel (batching point). */
  flush(): void;
  /** Block until every submitted request has completed. */
  drain(): void;
  close(): void;
}

export interface EngineHooks {
  complete(req: BlkRequest): void;
  /** Write-through mode (the driver turned the write cache off): writes are durable before they complete. */
  writeThrough(): boolean;
}

/** Mode for fallocate: discard and write-zeroes-with-unmap punch holes; plain write-zeroes zeroes in place. */
export function fallocateMode(type: number, flags: number): number {
  if (type === VIRTIO_BLK_T_DISCARD || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) return FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  return FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
}

export class SyncEngine implements BlockEngine {
  readonly hasRoom = true;
  readonly pending = 0;

  constructor(
    private readonly disk: DiskFile,
    private readonly hooks: EngineHooks,
  ) {}

  submit(req: BlkRequest): void {
    try {
      this.execute(req);
    } catch {
      req.status = VIRTIO_BLK_S_IOERR;
    }
    this.hooks.complete(req);
  }

  flush(): void {}
  drain(): void {}
  close(): void {}

  private execute(req: BlkRequest): void {
    const fd = this.disk.fd;
    const offset = req.sector * SECTOR_SIZE;
    switch (req.type) {
      case VIRTIO_BLK_T_IN:
        if (transfer(preadv, fd, this.disk.bufferedFd, req, offset) !== req.dataBytes) req.status = VIRTIO_BLK_S_IOERR;
        return;
      case VIRTIO_BLK_T_OUT:
        if (transfer(pwritev, fd, this.disk.bufferedFd, req, offset) !== req.dataBytes) req.status = VIRTIO_BLK_S_IOERR;
        else if (this.hooks.writeThrough()) fdatasync(fd);
        return;
      case VIRTIO_BLK_T_FLUSH:
        if (this.disk.syncsOnFlush) fdatasync(fd);
        return;
      default:
        for (let i = 0; i < req.rangeCount; i++) {
          const r = req.ranges;
          zeroRange(fd, fallocateMode(req.type, r[3 * i + 2]), r[3 * i] * SECTOR_SIZE, r[3 * i + 1] * SECTOR_SIZE);
        }
        if (this.hooks.writeThrough()) fdatasync(fd);
    }
  }
}

/** fallocate, falling back from ZERO_RANGE to punching a hole where the filesystem lacks it (same result: zeroes). */
export function zeroRange(fd: number, mode: number, offset: number, length: number): void {
  try {
    fallocate(fd, mode, offset, length);
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (mode & FALLOC_FL_ZERO_RANGE && (code === 'ENOTSUP' || code === 'EOPNOTSUPP')) {
      fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    } else throw e;
  }
}

type Vectored = typeof preadv;
function transfer(op: Vectored, fd: number, bufferedFd: number, req: BlkRequest, offset: number): number {
  const useFd = req.aligned ? fd : bufferedFd;
  let done = op(useFd, req.iov, req.iovCount, offset);
  // Short transfers happen at most at the end of a file that shrank under us: report an error, not a retry loop.
  if (done < 0) done = 0;
  return done;
}

/** No disk: every request completes at once with success (reads leave buffers untouched; QEMU's null-co). */
export class NullEngine implements BlockEngine {
  readonly hasRoom = true;
  readonly pending = 0;
  constructor(private readonly hooks: EngineHooks) {}
  submit(req: BlkRequest): void {
    this.hooks.complete(req);
  }
  flush(): void {}
  drain(): void {}
  close(): void {}
}

/** statfs f_type of file systems whose files live in memory. */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

/**
 * The engine `engine: 'auto'` means for the image at `path`. An image in memory (tmpfs, ramfs) gets the
 * synchronous engine: io_uring hands every tmpfs read and write to a kernel worker thread (it cannot do them
 * without blocking), a thread switch and an eventfd wakeup per batch for what is a memory copy. Measured with
 * qemu-img bench through libblkio, 4 KiB requests at QD32 on tmpfs: reads 3.1 s against 4.6 s for 600k, writes
 * 5.1 against 8.5 s. Anything else (a block device too) gets io_uring where the kernel has it.
 */
export function autoEngine(path: string): 'uring' | 'sync' {
  try {
    // A block device's node lies on devtmpfs, which statfs reports as tmpfs: only regular files qualify.
    if (!statSync(path).isFile()) return 'uring';
    const type = statfsSync(path).type;
    return type === TMPFS_MAGIC || type === RAMFS_MAGIC ? 'sync' : 'uring';
  } catch {
    return 'uring'; // the disk's own open reports what is wrong with the path
  }
}
