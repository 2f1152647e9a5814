/**
 * Guest memory as the backend sees it: the frontend's region table, each region reachable through one or more
 * windows (Uint8Arrays) of at most WINDOW_SIZE bytes. A view over 2^32 bytes aborts the process under koffi
 * (DESIGN §2), and smaller windows also keep every in-window offset a small integer.
 *
 * Translation is pure arithmetic on Numbers: guest addresses above 2^53 are never valid (no region reaches there),
 * so no BigInt is needed. A GuestMemory is immutable; a changed table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG)
 * is a new instance, so a worker swaps the reference and never sees a half-updated table.
 */
import { GuestMemoryError } from './errors.js';

/** Bytes per window. Regions are split into windows of this size (the last one may be shorter). */
export const WINDOW_SIZE = 2 ** 30;
const MAX_ADDRESS = Number.MAX_SAFE_INTEGER;

export interface GuestRegion {
  /** Guest-physical address of the first byte. */
  readonly guestPhysAddr: number;
  readonly size: number;
  /** The frontend's virtual address of the first byte (vring addresses arrive in this space). */
  readonly userAddr: number;
  /** The frontend's mmap offset (kept so the region can be reported back and matched on REM_MEM_REG). */
  readonly mmapOffset: number;
  /** Host (our process) address of the first byte, or 0 where the memory has no stable native address. */
  readonly hostAddr: number;
  /** Views over the region's bytes in order; every window but the last is exactly WINDOW_SIZE long. */
  readonly windows: readonly Uint8Array[];
}

/** Where a guest address lives: set by {@link GuestMemory.locate}. */
export interface Location {
  /** Index into {@link GuestMemory.buffers}. */
  buffer: number;
  /** Byte offset within that buffer. */
  offset: number;
  /** Bytes from offset to the end of the buffer (the end of the window, or of the region). */
  span: number;
}

export class GuestMemory {
  /** Every window of every region, flattened: chain segments refer to these by index. */
  readonly buffers: readonly Uint8Array[];
  /** Host address of each buffer's first byte (0 when unknown). */
  readonly bufferHostAddr: readonly number[];
  readonly regions: readonly GuestRegion[];

  // Parallel arrays per region (start, end exclusive, first buffer index) and per buffer, for the lookup.
  private readonly starts: Float64Array;
  private readonly ends: Float64Array;
  private readonly firstBuffer: Uint32Array;
  private readonly bufferLength: Uint32Array;
  private readonly bufferByteOffset: Float64Array;
  // The window of the last successful lookup: guest address of its first byte, its length, its buffer, and the
  // end of its region. Buffers of one request sit close together, so most lookups are a subtraction and two
  // compares against these, with no region search and no array loads.
  private hitStart = 0;
  private hitLength = 0;
  private hitBuffer = 0;
  private hitEnd = 0;
  /**
   * The cached window again for windowOffset: its start's low and high 32-bit words and its length. Typed-array
   * elements stay integers at any size (a field over 2^30 would hold a boxed double).
   */
  private readonly hit32 = new Uint32Array(3);
  private readonly w32: (Uint32Array | undefined)[] = [];
  private readonly w16: (Uint16Array | undefined)[] = [];
  private readonly f64: (Float64Array | undefined)[] = [];

  constructor(regions: readonly GuestRegion[]) {
    const sorted = [...regions].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
    const buffers: Uint8Array[] = [];
    const hostAddr: number[] = [];
    const n = sorted.length;
    this.starts = new Float64Array(n);
    this.ends = new Float64Array(n);
    this.firstBuffer = new Uint32Array(n);
    for (let i = 0; i < n; i++) {
      const r = sorted[i];
      checkRegion(r);
      if (i > 0 && r.guestPhysAddr < this.ends[i - 1]) {
        throw new GuestMemoryError(
          'BAD_REGION',
          `memory region at guest address 0x${r.guestPhysAddr.toString(16)} overlaps the region before it`,
        );
      }
      this.starts[i] = r.guestPhysAddr;
      this.ends[i] = r.guestPhysAddr + r.size;
      this.firstBuffer[i] = buffers.length;
      for (let w = 0; w < r.windows.length; w++) {
        buffers.push(r.windows[w]);
        hostAddr.push(r.hostAddr === 0 ? 0 : r.hostAddr + w * WINDOW_SIZE);
      }
    }
    this.regions = sorted;
    this.buffers = buffers;
    this.bufferHostAddr = hostAddr;
    this.bufferLength = Uint32Array.from(buffers, (b) => b.length);
    this.bufferByteOffset = Float64Array.from(buffers, (b) => b.byteOffset);
  }

  /** An empty address space: every access fails. */
  static empty(): GuestMemory {
    return new GuestMemory([]);
  }

  /** Memory backed by plain ArrayBuffers, for tests and in-process drivers. */
  static fromBuffers(regions: readonly { guestPhysAddr: number; bytes: Uint8Array; userAddr?: number }[]): GuestMemory {
    return new GuestMemory(
      regions.map((r) => ({
        guestPhysAddr: r.guestPhysAddr,
        size: r.bytes.length,
        userAddr: r.userAddr ?? r.guestPhysAddr,
        mmapOffset: 0,
        hostAddr: 0,
        windows: splitWindows(r.bytes),
      })),
    );
  }

  withRegion(region: GuestRegion): GuestMemory {
    return new GuestMemory([...this.regions, region]);
  }

  /** The table without the region matching `guestPhysAddr`, `size` and `userAddr` (REM_MEM_REG semantics). */
  withoutRegion(match: { guestPhysAddr: number; size: number; userAddr: number }): {
    memory: GuestMemory;
    removed: GuestRegion;
  } {
    const i = this.regions.findIndex(
      (r) => r.guestPhysAddr === match.guestPhysAddr && r.size === match.size && r.userAddr === match.userAddr,
    );
    if (i < 0) {
      throw new GuestMemoryError(
        'NO_SUCH_REGION',
        `no memory region at guest address 0x${match.guestPhysAddr.toString(16)} of size ${match.size}`,
      );
    }
    const rest = this.regions.filter((_, j) => j !== i);
    return { memory: new GuestMemory(rest), removed: this.regions[i] };
  }

  /**
   * Locate `length` bytes at guest address `gpa`. Returns false when the range is not wholly inside one region.
   * On success `out` names the buffer and offset of the first byte; the range may continue into the next
   * buffer (window) of the same region when `length > out.span`.
   */
  locate(gpa: number, length: number, out: Location): boolean {
    const rel = gpa - this.hitStart;
    if (!(rel >= 0 && rel < this.hitLength)) return this.locateSlow(gpa, length, out);
    if (length > this.hitEnd - gpa) return false;
    out.buffer = this.hitBuffer;
    out.offset = rel;
    out.span = this.hitLength - rel;
    return true;
  }

  /**
   * {@link locate} for a caller that only needs an offset, without writing an out-object: the offset of `gpa` in
   * buffer {@link lastBuffer} when all `length` bytes lie in the window the last successful lookup landed in,
   * else -1 (then ask locate, which also moves the cache). The ring walker's per-descriptor lookup.
   */
  offsetInLastWindow(gpa: number, length: number): number {
    const rel = gpa - this.hitStart;
    // A window lies inside its region, so a range that fits the window fits the region.
    return rel >= 0 && rel < this.hitLength && length <= this.hitLength - rel ? rel : -1;
  }

  /**
   * {@link offsetInLastWindow} for an address given as its two 32-bit words (as descriptors hold it), in integer
   * arithmetic; outside the cached window it asks locate, which moves the cache. The offset of the range in buffer
   * {@link lastBuffer}, or -1 when the range is not wholly inside one window of guest memory.
   */
  windowOffset(lo: number, hi: number, length: number): number {
    // No modular shortcut: lo - start wrapped to 32 bits would take an address 4 GiB below the window for one in it.
    const h = this.hit32;
    const start = h[0];
    if (hi === h[1] && lo >= start) {
      const rel = lo - start;
      const n = h[2];
      if (rel < n && length <= n - rel) return rel;
    }
    return this.windowOffsetSlow(lo, hi, length);
  }

  private windowOffsetSlow(lo: number, hi: number, length: number): number {
    const loc = this.scratch;
    if (hi > 0x1fffff || !this.locate(hi * 4294967296 + lo, length, loc) || length > loc.span) return -1;
    return loc.offset;
  }

  private readonly scratch: Location = { buffer: 0, offset: 0, span: 0 };

  /** Index into {@link buffers} of the window the last successful lookup landed in. */
  get lastBuffer(): number {
    return this.hitBuffer;
  }

  // Outside the cached window: find the region and window and cache them. Out of line so that locate stays small
  // enough for V8 to inline into the ring walker.
  private locateSlow(gpa: number, length: number, out: Location): boolean {
    const r = this.findRegion(gpa);
    if (r < 0) return false;
    const rel = gpa - this.starts[r];
    const w = rel >= WINDOW_SIZE ? Math.floor(rel / WINDOW_SIZE) : 0;
    const buffer = this.firstBuffer[r] + w;
    this.hitStart = this.starts[r] + w * WINDOW_SIZE;
    this.hitLength = this.bufferLength[buffer];
    this.hit32[0] = this.hitStart % 4294967296;
    this.hit32[1] = Math.floor(this.hitStart / 4294967296);
    this.hit32[2] = this.hitLength;
    this.hitBuffer = buffer;
    this.hitEnd = this.ends[r];
    if (length > this.hitEnd - gpa) return false;
    const offset = rel - w * WINDOW_SIZE;
    out.buffer = buffer;
    out.offset = offset;
    out.span = this.hitLength - offset;
    return true;
  }

  /**
   * A 32-bit view over the whole ArrayBuffer behind buffer `i` (index it by (byteOffset + offset) / 4). Cached:
   * the ring walker reads indirect tables through it without allocating.
   */
  words32(i: number): Uint32Array {
    return (this.w32[i] ??= new Uint32Array(this.buffers[i].buffer, 0, this.buffers[i].buffer.byteLength >>> 2));
  }

  /**
   * `buffers[i].byteOffset`, from a typed array: the walker needs it per indirect table, and a load from here
   * is cheaper than the accessor on a view fetched from a JS array.
   */
  byteOffsetOf(i: number): number {
    return this.bufferByteOffset[i];
  }

  /**
   * As {@link words32}, 64-bit: for copies 8 bytes a store. A Float64Array moves bits unchanged, NaN payloads
   * included (V8 never canonicalises a double it only loads and stores; test/net/datapath-copy.test.ts checks).
   */
  doubles(i: number): Float64Array {
    return (this.f64[i] ??= new Float64Array(this.buffers[i].buffer, 0, this.buffers[i].buffer.byteLength >>> 3));
  }

  /** As {@link words32}, 16-bit. */
  words16(i: number): Uint16Array {
    return (this.w16[i] ??= new Uint16Array(this.buffers[i].buffer, 0, this.buffers[i].buffer.byteLength >>> 1));
  }

  /** Index of the region holding `gpa`, or -1: a binary search over the sorted, disjoint regions. */
  findRegion(gpa: number): number {
    const starts = this.starts;
    let lo = 0;
    let hi = starts.length - 1;
    // The last region starting at or below gpa is the only one that can hold it.
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (starts[mid] <= gpa) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi >= 0 && gpa < this.ends[hi] ? hi : -1;
  }

  /** Translate a frontend virtual address to a guest-physical one; -1 when no region maps it. */
  userToGuest(userAddr: number): number {
    for (const r of this.regions) {
      if (userAddr >= r.userAddr && userAddr - r.userAddr < r.size) return r.guestPhysAddr + (userAddr - r.userAddr);
    }
    return -1;
  }

  /**
   * A contiguous view of `length` bytes at `gpa` (for rings and headers, not for the data path). Throws when the
   * range is unmapped, crosses a region boundary, or straddles two windows.
   */
  slice(gpa: number, length: number): Uint8Array {
    const loc: Location = { buffer: 0, offset: 0, span: 0 };
    if (!this.locate(gpa, length, loc)) {
      const code = this.findRegion(gpa) < 0 ? 'NOT_MAPPED' : 'CROSSES_REGION';
      throw new GuestMemoryError(code, `guest range 0x${gpa.toString(16)}+${length} is not inside one memory region`);
    }
    if (length > loc.span) {
      throw new GuestMemoryError(
        'CROSSES_REGION',
        `guest range 0x${gpa.toString(16)}+${length} straddles a ${WINDOW_SIZE}-byte mapping window`,
      );
    }
    const b = this.buffers[loc.buffer];
    return b.subarray(loc.offset, loc.offset + length);
  }

  /** Copy guest bytes out (ranges may span windows but not regions). */
  read(gpa: number, dst: Uint8Array): void {
    this.copy(gpa, dst, false);
  }

  /** Copy bytes into guest memory (ranges may span windows but not regions). */
  write(gpa: number, src: Uint8Array): void {
    this.copy(gpa, src, true);
  }

  private copy(gpa: number, bytes: Uint8Array, toGuest: boolean): void {
    const loc: Location = { buffer: 0, offset: 0, span: 0 };
    if (!this.locate(gpa, bytes.length, loc)) {
      throw new GuestMemoryError('NOT_MAPPED', `guest range 0x${gpa.toString(16)}+${bytes.length} is not mapped`);
    }
    let done = 0;
    while (done < bytes.length) {
      const buf = this.buffers[loc.buffer];
      const n = Math.min(bytes.length - done, buf.length - loc.offset);
      if (toGuest) buf.set(bytes.subarray(done, done + n), loc.offset);
      else bytes.set(buf.subarray(loc.offset, loc.offset + n), done);
      done += n;
      loc.buffer++;
      loc.offset = 0;
    }
  }
}

function checkRegion(r: GuestRegion): void {
  const where = `memory region at guest address 0x${r.guestPhysAddr.toString(16)}`;
  if (!(r.size > 0) || !Number.isSafeInteger(r.size)) throw new GuestMemoryError('BAD_REGION', `${where} has size ${r.size}`);
  if (!Number.isSafeInteger(r.guestPhysAddr) || r.guestPhysAddr < 0 || r.guestPhysAddr + r.size > MAX_ADDRESS) {
    throw new GuestMemoryError('BAD_REGION', `${where} reaches beyond 2^53`);
  }
  if (!Number.isSafeInteger(r.userAddr) || r.userAddr < 0 || r.userAddr + r.size > MAX_ADDRESS) {
    throw new GuestMemoryError('BAD_REGION', `${where} has frontend address 0x${r.userAddr.toString(16)} beyond 2^53`);
  }
  const expected = Math.ceil(r.size / WINDOW_SIZE);
  let total = 0;
  for (let w = 0; w < r.windows.length; w++) {
    const len = r.windows[w].length;
    if (w < r.windows.length - 1 && len !== WINDOW_SIZE) {
      throw new GuestMemoryError('BAD_REGION', `${where}: window ${w} is ${len} bytes, expected ${WINDOW_SIZE}`);
    }
    total += len;
  }
  if (r.windows.length !== expected || total !== r.size) {
    throw new GuestMemoryError('BAD_REGION', `${where}: windows cover ${total} of ${r.size} bytes`);
  }
}

/** Cut a byte range into WINDOW_SIZE windows. */
export function splitWindows(bytes: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let off = 0; off < bytes.length; off += WINDOW_SIZE) {
    out.push(bytes.subarray(off, Math.min(bytes.length, off + WINDOW_SIZE)));
  }
  return out;
}
