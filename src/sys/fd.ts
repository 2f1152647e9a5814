import { readdirSync } from 'node:fs';
import koffi from 'koffi';
import { EAGAIN, EINTR, SysError, lastError } from './errors.js';
import { libc } from './libc.js';

type BufferCall = (fd: number, buf: Uint8Array, count: number) => number;

const sysClose = libc.func('int close(int fd)') as (fd: number) => number;
const sysRead = libc.func('long read(int fd, void *buf, size_t count)') as BufferCall;
const sysWrite = libc.func('long write(int fd, void *buf, size_t count)') as BufferCall;
export const fcntl = libc.func('int fcntl(int fd, int cmd, ...)') as (
  fd: number,
  cmd: number,
  ...vararg: [] | ['int', number]
) => number;

const F_DUPFD_CLOEXEC = 1030;

export function checkRange(buf: Uint8Array, offset: number, length: number): void {
  if (offset < 0 || length < 0 || offset + length > buf.length) {
    throw new RangeError(`range ${offset}+${length} outside buffer of ${buf.length} bytes`);
  }
}

export function close(fd: number): void {
  // Linux releases the fd even when close reports EINTR; retrying could close someone else's fd.
  if (sysClose(fd) < 0) {
    const errno = koffi.errno();
    if (errno !== EINTR) throw new SysError('close', errno);
  }
}

/** Bytes read, 0 at EOF, -1 when a non-blocking fd has nothing (EAGAIN). */
export function read(fd: number, buf: Uint8Array, length: number = buf.length): number {
  checkRange(buf, 0, length);
  const n = sysRead(fd, buf, length);
  if (n >= 0) return n;
  if (koffi.errno() === EAGAIN) return -1;
  throw lastError('read');
}

/** Bytes written, -1 when a non-blocking fd is full (EAGAIN). */
export function write(fd: number, buf: Uint8Array, length: number = buf.length): number {
  checkRange(buf, 0, length);
  const n = sysWrite(fd, buf, length);
  if (n >= 0) return n;
  if (koffi.errno() === EAGAIN) return -1;
  throw lastError('write');
}

export function dup(fd: number): number {
  const copy = fcntl(fd, F_DUPFD_CLOEXEC, 'int', 0);
  if (copy < 0) throw lastError('fcntl(F_DUPFD_CLOEXEC)');
  return copy;
}

/** Open descriptors of this process, for leak tests. */
export function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}
