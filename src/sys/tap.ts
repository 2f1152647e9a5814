import koffi from 'koffi';
import { SysError, lastError } from './errors.js';
import { close } from './fd.js';
import { libc } from './libc.js';

// Request numbers for x86_64 (and every arch with the generic _IOC layout): _IOW('T', 202, int) and so on.
const TUNSETIFF = 0x400454ca;
const TUNSETOFFLOAD = 0x400454d0;
const TUNGETIFF = 0x800454d2;
const TUNGETVNETHDRSZ = 0x800454d7;
const TUNSETVNETHDRSZ = 0x400454d8;
const TUNSETQUEUE = 0x400454d9;
const IFF_ATTACH_QUEUE = 0x0200;
const IFF_DETACH_QUEUE = 0x0400;
const SIOCGIFFLAGS = 0x8913;
const SIOCSIFFLAGS = 0x8914;

/** TUNSETIFF / TUNGETIFF flags (struct ifreq ifr_flags). */
export const IFF_TAP = 0x0002;
export const IFF_MULTI_QUEUE = 0x0100;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
const IFF_UP = 0x1;

/** TUNSETOFFLOAD flags: what the userspace side accepts in frames the kernel hands it. */
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;
export const TUN_F_UFO = 0x10;

/** struct virtio_net_hdr_v1 (with num_buffers), the header of every virtio 1.x net frame. */
export const TAP_VNET_HDR_BYTES = 12;

const O_RDWR = 2;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const AF_INET = 2;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const ENAMETOOLONG = koffi.os.errno.ENAMETOOLONG;

const sysOpen = libc.func('int open(const char *path, int flags, ...)') as (path: string, flags: number) => number;
// Every argument is passed as an integer: an address for pointer requests, the value itself for TUNSETOFFLOAD.
const sysIoctl = libc.func('int ioctl(int fd, unsigned long request, ...)') as (
  fd: number,
  request: number,
  ...vararg: ['uintptr_t', number]
) => number;
const sysSocket = libc.func('int socket(int domain, int type, int protocol)') as (
  domain: number,
  type: number,
  protocol: number,
) => number;

// struct ifreq: char ifr_name[IFNAMSIZ = 16], then a 24-byte union whose first member here is short ifr_flags.
const IFREQ_BYTES = 40;
const IFNAMSIZ = 16;
const ifreq = new Uint8Array(IFREQ_BYTES);
const ifreqView = new DataView(ifreq.buffer);
const ifreqAddress = Number(koffi.address(ifreq));
const intArg = new Int32Array(1);
const intArgAddress = Number(koffi.address(intArg));
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function fillIfreq(syscall: string, name: string, flags: number): void {
  ifreq.fill(0);
  const { read, written } = encoder.encodeInto(name, ifreq.subarray(0, IFNAMSIZ - 1));
  if (read < name.length) throw new SysError(syscall, ENAMETOOLONG, { subject: name });
  ifreq[written] = 0;
  ifreqView.setUint16(IFNAMSIZ, flags, true);
}

function ifreqName(): string {
  const end = ifreq.indexOf(0);
  return decoder.decode(ifreq.subarray(0, end < 0 || end > IFNAMSIZ ? IFNAMSIZ : end));
}

function closeAndThrow(fd: number, syscall: string, subject: string): never {
  const error = lastError(syscall, subject);
  close(fd);
  throw error;
}

export interface TapOptions {
  /** Frames carry a 12-byte struct virtio_net_hdr_v1 in both directions (IFF_VNET_HDR + TUNSETVNETHDRSZ 12). */
  vnetHdr: boolean;
  /** IFF_MULTI_QUEUE: every openTap of the same name adds a queue; all opens must agree on this flag. */
  multiQueue?: boolean;
}

export interface Tap {
  /** Non-blocking, close-on-exec; closing the last queue's fd deletes the (non-persistent) interface. */
  fd: number;
  /** The interface name the kernel chose or attached to. */
  name: string;
}

/**
 * Opens /dev/net/tun and creates the tap `name` (or a kernel-named tapN for ''), or attaches to an existing
 * tap of that name (a persistent one, or another queue of a multi-queue one). Frames are Ethernet, without
 * the tun packet-info prefix. With vnetHdr each frame is preceded by a 12-byte virtio_net_hdr_v1 in the
 * virtio 1.x (little-endian) layout, so a guest's header passes through unchanged. On frames read from the
 * tap the kernel fills the first 10 bytes (struct virtio_net_hdr); whether it zeroes the trailing
 * num_buffers or skips over it depends on the kernel version, so the device sets num_buffers itself.
 */
export function openTap(name: string, opts: TapOptions): Tap {
  let flags = IFF_TAP | IFF_NO_PI;
  if (opts.vnetHdr) flags |= IFF_VNET_HDR;
  if (opts.multiQueue) flags |= IFF_MULTI_QUEUE;
  fillIfreq('TUNSETIFF', name, flags);

  const fd = sysOpen('/dev/net/tun', O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw lastError('open', '/dev/net/tun');
  if (sysIoctl(fd, TUNSETIFF, 'uintptr_t', ifreqAddress) < 0) closeAndThrow(fd, 'ioctl(TUNSETIFF)', name || 'tap%d');
  const actual = ifreqName();
  if (opts.vnetHdr) {
    intArg[0] = TAP_VNET_HDR_BYTES;
    if (sysIoctl(fd, TUNSETVNETHDRSZ, 'uintptr_t', intArgAddress) < 0) closeAndThrow(fd, 'ioctl(TUNSETVNETHDRSZ)', actual);
  }
  return { fd, name: actual };
}

export interface TapInfo {
  name: string;
  /** IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE ... as the kernel reports them (TUNGETIFF). */
  flags: number;
  /** The header length in use when IFF_VNET_HDR is set (TUNGETVNETHDRSZ). */
  vnetHdrBytes: number;
}

export function tapInfo(fd: number): TapInfo {
  ifreq.fill(0);
  if (sysIoctl(fd, TUNGETIFF, 'uintptr_t', ifreqAddress) < 0) throw lastError('ioctl(TUNGETIFF)');
  const name = ifreqName();
  const flags = ifreqView.getUint16(IFNAMSIZ, true);
  if (sysIoctl(fd, TUNGETVNETHDRSZ, 'uintptr_t', intArgAddress) < 0) throw lastError('ioctl(TUNGETVNETHDRSZ)', name);
  return { name, flags, vnetHdrBytes: intArg[0] };
}

/**
 * TUNSETOFFLOAD: TUN_F_* bits of what frames read from this tap may carry (partial checksums, TSO/UFO
 * super-frames). They must match what the guest negotiated to receive (VIRTIO_NET_F_GUEST_CSUM/TSO4/...).
 */
export function setTapOffload(fd: number, flags: number): void {
  if (sysIoctl(fd, TUNSETOFFLOAD, 'uintptr_t', flags >>> 0) < 0) throw lastError('ioctl(TUNSETOFFLOAD)');
}

/**
 * TUNSETQUEUE: attach or detach one queue of a multi-queue tap. The kernel steers received frames only to
 * attached queues, so a virtio-net pair the driver turned off (VQ_PAIRS_SET) takes its queue out of the way.
 */
export function setTapQueueAttached(fd: number, attached: boolean): void {
  fillIfreq('TUNSETQUEUE', '', attached ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE);
  if (sysIoctl(fd, TUNSETQUEUE, 'uintptr_t', ifreqAddress) < 0) throw lastError('ioctl(TUNSETQUEUE)');
}

/**
 * Sets or clears IFF_UP through SIOCGIFFLAGS/SIOCSIFFLAGS on an AF_INET datagram socket (ioctl, no child
 * process). The name is looked up in the caller's network namespace.
 */
export function setTapLinkUp(name: string, up: boolean): void {
  fillIfreq('SIOCGIFFLAGS', name, 0);
  const sock = sysSocket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sock < 0) throw lastError('socket');
  if (sysIoctl(sock, SIOCGIFFLAGS, 'uintptr_t', ifreqAddress) < 0) closeAndThrow(sock, 'ioctl(SIOCGIFFLAGS)', name);
  const flags = ifreqView.getUint16(IFNAMSIZ, true);
  ifreqView.setUint16(IFNAMSIZ, up ? flags | IFF_UP : flags & ~IFF_UP, true);
  if (sysIoctl(sock, SIOCSIFFLAGS, 'uintptr_t', ifreqAddress) < 0) closeAndThrow(sock, 'ioctl(SIOCSIFFLAGS)', name);
  close(sock);
}

