export { SysError, errnoName } from './errors.js';
export { close, read, write, dup, fdCount } from './fd.js';
export {
  unixListen,
  unixAccept,
  unixConnect,
  unixSocketPair,
  sendMessage,
  receiveMessage,
  isListeningSocket,
  setNonBlocking,
  shutdown,
} from './socket.js';
export { mmapShared, munmap, viewOf, addressOf, memfdCreate, pageSize } from './memory.js';
export { eventfdCreate, eventfdWrite, eventfdRead, isEventfd } from './eventfd.js';
export { Epoll, EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLET } from './epoll.js';
export {
  pread,
  pwrite,
  IovecArray,
  preadv,
  pwritev,
  readv,
  writev,
  fdatasync,
  fsync,
  fallocate,
  fileSize,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
} from './io.js';
export { watchReadable, type FdWatch } from './poll.js';
export { IoUring } from './io-uring.js';
export {
  openTap,
  tapInfo,
  setTapQueueAttached,
  setTapOffload,
  setTapLinkUp,
  TAP_VNET_HDR_BYTES,
  IFF_TAP,
  IFF_NO_PI,
  IFF_VNET_HDR,
  IFF_MULTI_QUEUE,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  TUN_F_UFO,
  type Tap,
  type TapOptions,
  type TapInfo,
} from './tap.js';
export { openPty, windowSize, setWindowSize, hungUp, type Pty, type WindowSize } from './pty.js';
