import koffi from 'koffi';
import { EAGAIN, lastError } from './errors.js';
import { libc, setU64 } from './libc.js';

type PositionalCall = (fd: number, address: number, length: number, offset: number) => number;
const sysPread = libc.func('long pread(int fd, uintptr_t buf, size_t count, int64_t offset)') as PositionalCall;
const sysPwrite = libc.func('long pwrite(int fd, uintptr_t buf, size_t count, int64_t offset)') as PositionalCall;
const sysPreadv = libc.func('long preadv(int fd, uintptr_t iov, int iovcnt, int64_t offset)') as PositionalCall;
const sysPwritev = libc.func('long pwritev(int fd, uintptr_t iov, int iovcnt, int64_t offset)') as PositionalCall;
type VectorCall = (fd: number, iov: number, count: number) => number;
const sysReadv = libc.func('long readv(int fd, uintptr_t iov, int iovcnt)') as VectorCall;
const sysWritev = libc.func('long writev(int fd, uintptr_t iov, int iovcnt)') as VectorCall;
const sysFdatasync = libc.func('int fdatasync(int fd)') as (fd: number) => number;
const sysFsync = libc.func('int fsync(int fd)') as (fd: number) => number;

// struct iovec: u64 base, u64 length = 4 u32 words.
const IOVEC_WORDS = 4;

/** A preallocated struct iovec table, filled in place for each request. */
export class IovecArray {
  readonly capacity: number;
  readonly address: number;
  private readonly words: Uint32Array;

  constructor(capacity: number) {
    this.capacity = capacity;
    this.words = new Uint32Array(capacity * IOVEC_WORDS);
    this.address = Number(koffi.address(this.words));
  }

  set(i: number, address: number, length: number): void {
    if (i >= this.capacity) throw new RangeError(`iovec ${i} past capacity ${this.capacity}`);
    setU64(this.words, i * IOVEC_WORDS, address);
    setU64(this.words, i * IOVEC_WORDS + 2, length);
  }
}

function result(n: number, syscall: string): number {
  if (n >= 0) return n;
  if (koffi.errno() === EAGAIN) return -1;
  throw lastError(syscall);
}

function checkCount(iov: IovecArray, count: number): void {
  if (count > iov.capacity) throw new RangeError(`${count} iovecs past capacity ${iov.capacity}`);
}

export function pread(fd: number, address: number, length: number, offset: number): number {
  return result(sysPread(fd, address, length, offset), 'pread');
}

export function pwrite(fd: number, address: number, length: number, offset: number): number {
  return result(sysPwrite(fd, address, length, offset), 'pwrite');
}

export function preadv(fd: number, iov: IovecArray, count: number, offset: number): number {
  checkCount(iov, count);
  return result(sysPreadv(fd, iov.address, count, offset), 'preadv');
}

export function pwritev(fd: number, iov: IovecArray, count: number, offset: number): number {
  checkCount(iov, count);
  return result(sysPwritev(fd, iov.address, count, offset), 'pwritev');
}

/** Scatter read from the fd's current position (a tap: one frame); -1 on EAGAIN. */
export function readv(fd: number, iov: IovecArray, count: number): number {
  checkCount(iov, count);
  return result(sysReadv(fd, iov.address, count), 'readv');
}

/** Gather write (a tap: one frame); -1 on EAGAIN. */
export function writev(fd: number, iov: IovecArray, count: number): number {
  checkCount(iov, count);
  return result(sysWritev(fd, iov.address, count), 'writev');
}

export function fdatasync(fd: number): void {
  if (sysFdatasync(fd) < 0) throw lastError('fdatasync');
}

export function fsync(fd: number): void {
  if (sysFsync(fd) < 0) throw lastError('fsync');
}

const sysFallocate = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)') as (
  fd: number,
  mode: number,
  offset: number,
  length: number,
) => number;
const sysLseek = libc.func('int64_t lseek(int fd, int64_t offset, int whence)') as (fd: number, offset: number, whence: number) => number;
const SEEK_END = 2;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  if (sysFallocate(fd, mode, offset, length) < 0) throw lastError('fallocate');
}

/** Size in bytes of a regular file or a block device (fstat reports 0 for the latter; lseek does not). */
export function fileSize(fd: number): number {
  const n = sysLseek(fd, 0, SEEK_END);
  if (n < 0) throw lastError('lseek');
  return n;
}
