import koffi from 'koffi';
import { EINTR, lastError } from './errors.js';
import { close } from './fd.js';
import { libc } from './libc.js';

export const EPOLLIN = 0x001;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
/**
 * Edge-triggered. On an eventfd every write is an edge, whatever its counter holds: a watcher that never reads
 * the counter still gets one event per write (the kernel wakes the fd's waiters on each write). Kick fds are
 * watched this way, which saves a read() per kick.
 */
export const EPOLLET = 0x80000000;

const EPOLL_CLOEXEC = 0o2000000;
const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_DEL = 2;
const EPOLL_CTL_MOD = 3;
// struct epoll_event is packed on x86_64: u32 events, u64 data = 12 bytes = 3 u32 words.
// The token lives in the low word of data; every field is 4-aligned, so one Uint32Array reads them all.
const EVENT_WORDS = 3;

const sysEpollCreate1 = libc.func('int epoll_create1(int flags)') as (flags: number) => number;
const sysEpollCtl = libc.func('int epoll_ctl(int epfd, int op, int fd, uintptr_t event)') as (
  epfd: number,
  op: number,
  fd: number,
  event: number,
) => number;
const sysEpollWait = libc.func('int epoll_wait(int epfd, uintptr_t events, int maxevents, int timeout)') as (
  epfd: number,
  events: number,
  maxevents: number,
  timeout: number,
) => number;

export class Epoll {
  private fd: number;
  private readonly maxEvents: number;
  private readonly ready: Uint32Array;
  private readonly readyAddress: number;
  private readonly request = new Uint32Array(EVENT_WORDS);
  private readonly requestAddress = Number(koffi.address(this.request));

  constructor(maxEvents = 64) {
    const bytes = new ArrayBuffer(maxEvents * EVENT_WORDS * 4);
    this.maxEvents = maxEvents;
    this.ready = new Uint32Array(bytes);
    this.readyAddress = Number(koffi.address(bytes));
    this.fd = sysEpollCreate1(EPOLL_CLOEXEC);
    if (this.fd < 0) throw lastError('epoll_create1');
  }

  add(fd: number, token: number, events: number = EPOLLIN): void {
    this.control(EPOLL_CTL_ADD, fd, token, events, 'epoll_ctl(ADD)');
  }

  modify(fd: number, token: number, events: number): void {
    this.control(EPOLL_CTL_MOD, fd, token, events, 'epoll_ctl(MOD)');
  }

  remove(fd: number): void {
    if (sysEpollCtl(this.fd, EPOLL_CTL_DEL, fd, 0) < 0) throw lastError('epoll_ctl(DEL)');
  }

  /** Ready count; 0 on timeout or when a signal interrupted the wait. Results stay valid until the next wait. */
  wait(timeoutMs: number): number {
    const n = sysEpollWait(this.fd, this.readyAddress, this.maxEvents, timeoutMs);
    if (n >= 0) return n;
    if (koffi.errno() === EINTR) return 0;
    throw lastError('epoll_wait');
  }

  token(i: number): number {
    return this.ready[i * EVENT_WORDS + 1];
  }

  events(i: number): number {
    return this.ready[i * EVENT_WORDS];
  }

  close(): void {
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    close(fd);
  }

  private control(op: number, fd: number, token: number, events: number, syscall: string): void {
    this.request[0] = events;
    this.request[1] = token;
    this.request[2] = 0;
    if (sysEpollCtl(this.fd, op, fd, this.requestAddress) < 0) throw lastError(syscall);
  }
}
