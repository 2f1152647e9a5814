import koffi from 'koffi';
import { lastError } from './errors.js';
import { close } from './fd.js';
import { libc } from './libc.js';

const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 1;
const MFD_CLOEXEC = 1;
const _SC_PAGESIZE = 30;
// koffi.view aborts the process (not a JS exception) for views of 2^32 bytes or more.
const MAX_VIEW_BYTES = 0x1_0000_0000;

// intptr_t return: MAP_FAILED comes back as -1 (a Number) instead of 0xffffffffffffffffn.
const sysMmap = libc.func(
  'intptr_t mmap(uintptr_t addr, size_t length, int prot, int flags, int fd, int64_t offset)',
) as (addr: number, length: number, prot: number, flags: number, fd: number, offset: number) => number;
const sysMunmap = libc.func('int munmap(uintptr_t addr, size_t length)') as (addr: number, length: number) => number;
const sysMemfdCreate = libc.func('int memfd_create(const char *name, unsigned int flags)') as (
  name: string,
  flags: number,
) => number;
const sysFtruncate = libc.func('int ftruncate(int fd, int64_t length)') as (fd: number, length: number) => number;
const sysconf = libc.func('long sysconf(int name)') as (name: number) => number;

export const pageSize: number = sysconf(_SC_PAGESIZE);

/** Host address of the mapping. x86_64 user addresses are below 2^47, so a Number holds them exactly. */
export function mmapShared(fd: number, length: number, offset: number): number {
  const address = sysMmap(0, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
  if (address === -1) throw lastError('mmap');
  return address;
}

/** Every view over the range (in every thread) must be dropped first: touching one afterwards is SIGSEGV. */
export function munmap(address: number, length: number): void {
  if (sysMunmap(address, length) < 0) throw lastError('munmap');
}

/** An ArrayBuffer over native memory, no copy. Map regions past 4 GiB as several views. */
export function viewOf(address: number, length: number): ArrayBuffer {
  if (length >= MAX_VIEW_BYTES) throw new RangeError(`view of ${length} bytes: must be below 2^32`);
  return koffi.view(BigInt(address), length);
}

/** Native address of the first byte, byteOffset included. The memory stays put while buf is alive. */
export function addressOf(buf: ArrayBuffer | ArrayBufferView): number {
  return Number(koffi.address(buf));
}

export function memfdCreate(name: string, size: number): number {
  const fd = sysMemfdCreate(name, MFD_CLOEXEC);
  if (fd < 0) throw lastError('memfd_create', name);
  if (sysFtruncate(fd, size) < 0) {
    const error = lastError('ftruncate', name);
    close(fd);
    throw error;
  }
  return fd;
}
