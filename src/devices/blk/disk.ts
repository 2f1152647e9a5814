/**
 * The image behind a virtio-blk device: a raw file or block device, opened in each queue worker (fds are
 * per process, but each worker keeps its own for clarity of ownership). With O_DIRECT, requests whose buffers
 * are not sector-aligned go through a second, buffered fd instead of failing with EINVAL.
 */
import { closeSync, constants, openSync } from 'node:fs';
import { fileSize } from '../../sys/index.js';
import { faultInjected } from '../../vhost/faults.js';
import { SECTOR_SIZE } from './spec.js';

export interface DiskOptions {
  path: string;
  readonly: boolean;
  direct: boolean;
}

export class DiskFile {
  readonly fd: number;
  /** Buffered fd for unaligned requests when the main fd is O_DIRECT; else the same fd. */
  readonly bufferedFd: number;
  readonly sizeBytes: number;
  /** Whether FLUSH syncs the image: not when read-only, nor under the test fault that proves the durability test. */
  readonly syncsOnFlush: boolean;

  constructor(readonly opts: DiskOptions) {
    this.syncsOnFlush = !opts.readonly && !faultInjected('skip-flush');
    const mode = opts.readonly ? constants.O_RDONLY : constants.O_RDWR;
    this.fd = openSync(opts.path, mode | (opts.direct ? constants.O_DIRECT : 0));
    try {
      this.bufferedFd = opts.direct ? openSync(opts.path, mode) : this.fd;
      this.sizeBytes = fileSize(this.fd);
    } catch (e) {
      closeSync(this.fd);
      throw e;
    }
  }

  get capacitySectors(): number {
    return Math.floor(this.sizeBytes / SECTOR_SIZE);
  }

  close(): void {
    closeSync(this.fd);
    if (this.bufferedFd !== this.fd) closeSync(this.bufferedFd);
  }
}

/** Open the image once on the control side to learn its size (and fail early with a clear message). */
export function probeDisk(opts: DiskOptions): number {
  let disk: DiskFile;
  try {
    disk = new DiskFile(opts);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const what = err.code === 'EINVAL' && opts.direct ? ' (the filesystem does not support O_DIRECT; drop --direct)' : '';
    throw new Error(`cannot open disk image ${opts.path}: ${err.message}${what}`);
  }
  const sectors = disk.capacitySectors;
  disk.close();
  if (sectors === 0) throw new Error(`disk image ${opts.path} is smaller than one sector`);
  return sectors;
}
