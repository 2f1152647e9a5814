/**
 * Guest memory regions as mapped into this process. The session (main thread) maps and unmaps; every thread that
 * serves queues builds its own GuestMemory views over the same addresses, because an ArrayBuffer over native
 * memory cannot be transferred between threads.
 */
import { fstatSync } from 'node:fs';
import { mmapShared, munmap, viewOf } from '../sys/index.js';
import { GuestMemory, WINDOW_SIZE, type GuestRegion } from '../virtqueue/index.js';

/** A region the frontend described (SET_MEM_TABLE / ADD_MEM_REG), before mapping. */
export interface RegionDescription {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

/** A mapped region: plain numbers, so it can be posted to workers. */
export interface MappedRegion extends RegionDescription {
  /** Start of our mapping (the frontend's offset 0). */
  mapAddress: number;
  mapLength: number;
}

/** Map the region's fd. The fd can be closed afterwards; the mapping stays until {@link unmapRegion}. */
export function mapRegion(desc: RegionDescription, fd: number): MappedRegion {
  const mapLength = desc.size + desc.mmapOffset;
  if (!Number.isSafeInteger(mapLength)) throw new RangeError(`region of ${desc.size} bytes at offset ${desc.mmapOffset} cannot be mapped`);
  // Touching a shared mapping past the end of its file is SIGBUS, a crash: the file must hold the whole region.
  const st = fstatSync(fd);
  if (!st.isFile()) throw new RangeError('the memory region fd is not a memfd or regular file');
  if (st.size < mapLength) {
    throw new RangeError(`region needs ${mapLength} bytes (offset ${desc.mmapOffset} + size ${desc.size}) but its file has ${st.size}`);
  }
  // Map from offset 0 like the frontend's own view; mmap_offset need not be page-aligned.
  const mapAddress = mmapShared(fd, mapLength, 0);
  return { ...desc, mapAddress, mapLength };
}

export function unmapRegion(region: MappedRegion): void {
  munmap(region.mapAddress, region.mapLength);
}

/** Views over mapped regions, for the calling thread. */
export function guestMemoryOf(regions: readonly MappedRegion[]): GuestMemory {
  return new GuestMemory(regions.map(viewRegion));
}

function viewRegion(r: MappedRegion): GuestRegion {
  const hostAddr = r.mapAddress + r.mmapOffset;
  const windows: Uint8Array[] = [];
  for (let off = 0; off < r.size; off += WINDOW_SIZE) {
    const len = Math.min(WINDOW_SIZE, r.size - off);
    windows.push(new Uint8Array(viewOf(hostAddr + off, len)));
  }
  return { guestPhysAddr: r.guestPhysAddr, size: r.size, userAddr: r.userAddr, mmapOffset: r.mmapOffset, hostAddr, windows };
}
