import koffi from 'koffi';
import { EAGAIN, lastError } from './errors.js';
import { libc, setU64 } from './libc.js';

type PositionalCall = (fd: number, address: number, length: number, offset: number) => number;
const sysPread = libc.func('long pread(int fd, uintptr_t buf, size_t count, int64_t offset)') as PositionalCall;
const sysPwrite = libc.func('long pwrite(int fd, uintptr_t buf, size_t count, int64_t offset)') as PositionalCall;
const sysPreadv = libc.func('long preadv(int fd, uintptr_t iov, int iovcnt, int64_t offset)') as PositionalCall;
const sysPwritev = libc.func('long pwritev(int fd, uintptr_t iov, int iovcnt, int64_t offset)') as PositionalCall;
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

export function fdatasync(fd: number): void {
  if (sysFdatasync(fd) < 0) throw lastError('fdatasync');
}

export function fsync(fd: number): void {
  if (sysFsync(fd) < 0) throw lastError('fsync');
}
