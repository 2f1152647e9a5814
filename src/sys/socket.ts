import koffi from 'koffi';
import { EAGAIN, SysError, lastError } from './errors.js';
import { checkRange, close, fcntl } from './fd.js';
import { getU64, libc, setU64 } from './libc.js';

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOCKET_TYPE = SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC;
const SOL_SOCKET = 1;
const SO_ACCEPTCONN = 30;
const SCM_RIGHTS = 1;
const MSG_CTRUNC = 0x8;
const MSG_NOSIGNAL = 0x4000;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SHUT_RDWR = 2;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0o4000;
const ENAMETOOLONG = koffi.os.errno.ENAMETOOLONG;

const sysSocket = libc.func('int socket(int domain, int type, int protocol)') as (
  domain: number,
  type: number,
  protocol: number,
) => number;
type AddressCall = (fd: number, addr: Uint8Array, addrlen: number) => number;
const sysBind = libc.func('int bind(int fd, void *addr, uint32_t addrlen)') as AddressCall;
const sysConnect = libc.func('int connect(int fd, void *addr, uint32_t addrlen)') as AddressCall;
const sysListen = libc.func('int listen(int fd, int backlog)') as (fd: number, backlog: number) => number;
const sysAccept4 = libc.func('int accept4(int fd, uintptr_t addr, uintptr_t addrlen, int flags)') as (
  fd: number,
  addr: number,
  addrlen: number,
  flags: number,
) => number;
const sysSocketpair = libc.func('int socketpair(int domain, int type, int protocol, void *sv)') as (
  domain: number,
  type: number,
  protocol: number,
  sv: Int32Array,
) => number;
type MessageCall = (fd: number, msg: number, flags: number) => number;
const sysSendmsg = libc.func('long sendmsg(int fd, uintptr_t msg, int flags)') as MessageCall;
const sysRecvmsg = libc.func('long recvmsg(int fd, uintptr_t msg, int flags)') as MessageCall;
const sysGetsockopt = libc.func(
  'int getsockopt(int fd, int level, int optname, void *optval, void *optlen)',
) as (fd: number, level: number, optname: number, optval: Int32Array, optlen: Uint32Array) => number;
const sysShutdown = libc.func('int shutdown(int fd, int how)') as (fd: number, how: number) => number;

// struct sockaddr_un: sa_family_t (u16) then a 108-byte NUL-terminated path.
const SUN_PATH_MAX = 108;
const sockaddr = new Uint8Array(2 + SUN_PATH_MAX);
new DataView(sockaddr.buffer).setUint16(0, AF_UNIX, true);
const encoder = new TextEncoder();

/** Fills the shared sockaddr_un and returns its length. */
function unixAddress(syscall: string, path: string): number {
  const { read, written } = encoder.encodeInto(path, sockaddr.subarray(2, 2 + SUN_PATH_MAX - 1));
  if (read < path.length) throw new SysError(syscall, ENAMETOOLONG, { subject: path });
  sockaddr[2 + written] = 0;
  return 2 + written + 1;
}

function unixSocket(): number {
  const fd = sysSocket(AF_UNIX, SOCKET_TYPE, 0);
  if (fd < 0) throw lastError('socket');
  return fd;
}

function closeAndThrow(fd: number, syscall: string, subject: string): never {
  const error = lastError(syscall, subject);
  close(fd);
  throw error;
}

export function unixListen(path: string, backlog = 16): number {
  const length = unixAddress('bind', path);
  const fd = unixSocket();
  if (sysBind(fd, sockaddr, length) < 0) closeAndThrow(fd, 'bind', path);
  if (sysListen(fd, backlog) < 0) closeAndThrow(fd, 'listen', path);
  return fd;
}

/** A non-blocking, close-on-exec connection, or -1 when none is pending. */
export function unixAccept(listenFd: number): number {
  const fd = sysAccept4(listenFd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd >= 0) return fd;
  if (koffi.errno() === EAGAIN) return -1;
  throw lastError('accept4');
}

/**
 * A unix stream connect never waits for the peer to accept, so a non-blocking connect completes at once;
 * it fails with EAGAIN only when the listener's backlog is full (where a blocking one would hang this thread).
 */
export function unixConnect(path: string): number {
  const length = unixAddress('connect', path);
  const fd = unixSocket();
  if (sysConnect(fd, sockaddr, length) < 0) closeAndThrow(fd, 'connect', path);
  return fd;
}

const pair = new Int32Array(2);

export function unixSocketPair(): [number, number] {
  if (sysSocketpair(AF_UNIX, SOCKET_TYPE, 0, pair) < 0) throw lastError('socketpair');
  return [pair[0], pair[1]];
}

// struct msghdr (56 bytes), as u32 words: name@0 namelen@2 iov@4 iovlen@6 control@8 controllen@10 flags@12.
// struct iovec (16 bytes): base@0 len@2. struct cmsghdr: len (u64)@0 level@2 type@3, data from byte 16.
const MSGHDR_BYTES = 56;
const IOVEC_BYTES = 16;
const CMSG_HEADER_BYTES = 16;
const MAX_RECEIVE_FDS = 32;
const SCM_MAX_FD = 253; // the kernel's per-message limit; sized for it so oversized sends reach the kernel
const cmsgSpace = (fdCount: number) => CMSG_HEADER_BYTES + ((fdCount * 4 + 7) & ~7);

function messageBuffers(maxFds: number) {
  const bytes = new ArrayBuffer(MSGHDR_BYTES + IOVEC_BYTES + cmsgSpace(maxFds));
  const words = new Uint32Array(bytes);
  const address = Number(koffi.address(bytes));
  setU64(words, 4, address + MSGHDR_BYTES);
  words[6] = 1;
  return {
    words,
    address,
    iovWord: MSGHDR_BYTES / 4,
    controlAddress: address + MSGHDR_BYTES + IOVEC_BYTES,
    controlWord: (MSGHDR_BYTES + IOVEC_BYTES) / 4,
    controlWords: new Int32Array(bytes, MSGHDR_BYTES + IOVEC_BYTES),
  };
}

const send = messageBuffers(SCM_MAX_FD);
const receive = messageBuffers(MAX_RECEIVE_FDS);
const receivedFds = new Int32Array(MAX_RECEIVE_FDS);

/** Bytes sent, or -1 when the socket is full (EAGAIN). The fds ride along with the first byte. */
export function sendMessage(fd: number, data: Uint8Array, length: number, fds: readonly number[]): number {
  checkRange(data, 0, length);
  if (fds.length > SCM_MAX_FD) throw new RangeError(`at most ${SCM_MAX_FD} fds per message`);
  const { words, iovWord, controlWord, controlWords } = send;
  setU64(words, iovWord, Number(koffi.address(data)));
  setU64(words, iovWord + 2, length);
  if (fds.length > 0) {
    setU64(words, 8, send.controlAddress);
    setU64(words, 10, cmsgSpace(fds.length));
    setU64(words, controlWord, CMSG_HEADER_BYTES + fds.length * 4);
    controlWords[2] = SOL_SOCKET;
    controlWords[3] = SCM_RIGHTS;
    for (let i = 0; i < fds.length; i++) controlWords[4 + i] = fds[i];
  } else {
    setU64(words, 8, 0);
    setU64(words, 10, 0);
  }
  const n = sysSendmsg(fd, send.address, MSG_NOSIGNAL);
  if (n >= 0) return n;
  if (koffi.errno() === EAGAIN) return -1;
  throw lastError('sendmsg');
}

/**
 * Bytes received into buf[offset, offset+length), 0 at EOF, -1 when nothing is pending (EAGAIN).
 * Received fds (close-on-exec) are appended to fdsOut; the caller owns them.
 */
export function receiveMessage(
  fd: number,
  buf: Uint8Array,
  offset: number,
  length: number,
  fdsOut: number[],
): number {
  checkRange(buf, offset, length);
  const { words, iovWord, controlWords } = receive;
  setU64(words, iovWord, Number(koffi.address(buf)) + offset);
  setU64(words, iovWord + 2, length);
  setU64(words, 8, receive.controlAddress);
  setU64(words, 10, cmsgSpace(MAX_RECEIVE_FDS));
  words[12] = 0;
  const n = sysRecvmsg(fd, receive.address, MSG_CMSG_CLOEXEC);
  if (n < 0) {
    if (koffi.errno() === EAGAIN) return -1;
    throw lastError('recvmsg');
  }

  let count = 0;
  const controlBytes = getU64(words, 10);
  for (let at = 0; at + CMSG_HEADER_BYTES <= controlBytes; ) {
    const cmsgBytes = getU64(words, receive.controlWord + at / 4);
    if (cmsgBytes < CMSG_HEADER_BYTES) break;
    if (controlWords[at / 4 + 2] === SOL_SOCKET && controlWords[at / 4 + 3] === SCM_RIGHTS) {
      const fdsHere = (cmsgBytes - CMSG_HEADER_BYTES) / 4;
      for (let i = 0; i < fdsHere && count < MAX_RECEIVE_FDS; i++) {
        receivedFds[count++] = controlWords[at / 4 + 4 + i];
      }
    }
    at += (cmsgBytes + 7) & ~7;
  }

  if (words[12] & MSG_CTRUNC) {
    // The kernel already dropped the fds that did not fit; the ones that did are ours to close.
    for (let i = 0; i < count; i++) close(receivedFds[i]);
    throw new SysError('recvmsg', 0, {
      code: 'ECTRUNC',
      description: `more than ${MAX_RECEIVE_FDS} fds in one message; received fds closed`,
    });
  }
  for (let i = 0; i < count; i++) fdsOut.push(receivedFds[i]);
  return n;
}

const optval = new Int32Array(1);
const optlen = new Uint32Array(1);

/** Throws SysError ENOTSOCK when fd is not a socket. */
export function isListeningSocket(fd: number): boolean {
  optlen[0] = 4;
  if (sysGetsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, optval, optlen) < 0) throw lastError('getsockopt');
  return optval[0] !== 0;
}

export function setNonBlocking(fd: number): void {
  const flags = fcntl(fd, F_GETFL);
  if (flags < 0) throw lastError('fcntl(F_GETFL)');
  if (flags & O_NONBLOCK) return;
  if (fcntl(fd, F_SETFL, 'int', flags | O_NONBLOCK) < 0) throw lastError('fcntl(F_SETFL)');
}

export function shutdown(fd: number): void {
  if (sysShutdown(fd, SHUT_RDWR) < 0) throw lastError('shutdown');
}
