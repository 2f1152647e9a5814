import { readlinkSync } from 'node:fs';
import koffi from 'koffi';
import { EAGAIN, lastError } from './errors.js';
import { getU64, libc, setU64 } from './libc.js';

const EFD_CLOEXEC = 0o2000000;
const EFD_NONBLOCK = 0o4000;

const sysEventfd = libc.func('int eventfd(unsigned int initval, int flags)') as (
  initval: number,
  flags: number,
) => number;
// Plain read/write on one 8-byte buffer: cheaper than eventfd_read/eventfd_write, and no BigInt.
type CounterCall = (fd: number, buf: number, count: number) => number;
const sysRead = libc.func('long read(int fd, uintptr_t buf, size_t count)') as CounterCall;
const sysWrite = libc.func('long write(int fd, uintptr_t buf, size_t count)') as CounterCall;

const counterBytes = new ArrayBuffer(8);
const counter = new Uint32Array(counterBytes);
const counterAddress = Number(koffi.address(counterBytes));

export function eventfdCreate(initial = 0, nonBlocking = true): number {
  const fd = sysEventfd(initial, EFD_CLOEXEC | (nonBlocking ? EFD_NONBLOCK : 0));
  if (fd < 0) throw lastError('eventfd');
  return fd;
}

/** EAGAIN (the counter would pass 2^64-2) is ignored: the reader is already due to wake. */
export function eventfdWrite(fd: number, value = 1): void {
  setU64(counter, 0, value);
  if (sysWrite(fd, counterAddress, 8) < 0 && koffi.errno() !== EAGAIN) throw lastError('write(eventfd)');
}

/** The counter (which the read resets), or 0 when it was already 0 on a non-blocking eventfd. */
export function eventfdRead(fd: number): number {
  if (sysRead(fd, counterAddress, 8) < 0) {
    if (koffi.errno() === EAGAIN) return 0;
    throw lastError('read(eventfd)');
  }
  return getU64(counter, 0);
}

/**
 * Whether `fd` is an eventfd. Kick, call and error fds come from the frontend: anything else (a pipe, a socket,
 * a file) would be read or polled as if it were one, which libuv and koffi are not ready for.
 */
export function isEventfd(fd: number): boolean {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[eventfd]';
  } catch {
    return false;
  }
}
