/**
 * Pseudo-terminals, which Node cannot open: the master side for a console backend (the user attaches a terminal
 * program to the slave path), window sizes by ioctl, and whether anyone holds the slave open (poll's POLLHUP).
 */
import koffi from 'koffi';
import { lastError } from './errors.js';
import { close } from './fd.js';
import { libc } from './libc.js';

const O_RDWR = 2;
const O_NOCTTY = 0o400;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const TIOCGWINSZ = 0x5413;
const TIOCSWINSZ = 0x5414;
const POLLHUP = 0x10;

const sysPosixOpenpt = libc.func('int posix_openpt(int flags)') as (flags: number) => number;
const sysGrantpt = libc.func('int grantpt(int fd)') as (fd: number) => number;
const sysUnlockpt = libc.func('int unlockpt(int fd)') as (fd: number) => number;
const sysPtsnameR = libc.func('int ptsname_r(int fd, _Out_ char *buf, size_t len)') as (fd: number, buf: Buffer, len: number) => number;
const sysIoctl = libc.func('int ioctl(int fd, unsigned long request, ...)') as (fd: number, request: number, ...vararg: ['uintptr_t', number]) => number;
const sysPoll = libc.func('int poll(void *fds, unsigned long nfds, int timeout)') as (fds: Buffer, nfds: number, timeout: number) => number;

// struct winsize { unsigned short ws_row, ws_col, ws_xpixel, ws_ypixel; }
const winsize = new Uint16Array(4);
const winsizeAddress = Number(koffi.address(winsize));
// struct pollfd { int fd; short events; short revents; }
const pollfd = Buffer.alloc(8);

export interface Pty {
  /** The master side, non-blocking: what the slave's reader sees is written here, and the reverse. */
  fd: number;
  /** The slave's path, e.g. /dev/pts/3: what a user attaches a terminal program to. */
  path: string;
}

export interface WindowSize {
  cols: number;
  rows: number;
}

/** A new pseudo-terminal (master non-blocking, close-on-exec), its slave unlocked for anyone to open. */
export function openPty(): Pty {
  const fd = sysPosixOpenpt(O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw lastError('posix_openpt');
  try {
    if (sysGrantpt(fd) < 0) throw lastError('grantpt');
    if (sysUnlockpt(fd) < 0) throw lastError('unlockpt');
    const buf = Buffer.alloc(128);
    const err = sysPtsnameR(fd, buf, buf.length);
    if (err !== 0) throw lastError('ptsname_r');
    return { fd, path: buf.toString('utf8', 0, buf.indexOf(0)) };
  } catch (e) {
    close(fd);
    throw e;
  }
}

/** The terminal's window size (TIOCGWINSZ), on either side of a pty or any tty. */
export function windowSize(fd: number): WindowSize {
  if (sysIoctl(fd, TIOCGWINSZ, 'uintptr_t', winsizeAddress) < 0) throw lastError('ioctl(TIOCGWINSZ)');
  return { rows: winsize[0], cols: winsize[1] };
}

/** Set the window size (TIOCSWINSZ); on a pty the kernel sends SIGWINCH to the slave's foreground group. */
export function setWindowSize(fd: number, size: WindowSize): void {
  winsize[0] = size.rows;
  winsize[1] = size.cols;
  winsize[2] = 0;
  winsize[3] = 0;
  if (sysIoctl(fd, TIOCSWINSZ, 'uintptr_t', winsizeAddress) < 0) throw lastError('ioctl(TIOCSWINSZ)');
}

/** Whether the fd reports a hangup now (a pty master whose slave nobody holds open). */
export function hungUp(fd: number): boolean {
  pollfd.writeInt32LE(fd, 0);
  pollfd.writeInt16LE(0, 4);
  pollfd.writeInt16LE(0, 6);
  if (sysPoll(pollfd, 1, 0) < 0) throw lastError('poll');
  return (pollfd.readInt16LE(6) & POLLHUP) !== 0;
}
