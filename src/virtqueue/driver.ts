/**
 * The driver (guest) side of a split virtqueue: what a guest kernel does, written for tests, benchmarks and the
 * test frontend. It also exposes raw descriptor and ring writes so tests can play a malicious guest.
 *
 * It trusts itself: nothing here validates, because the device side is what is under test.
 */
import type { GuestMemory, Location } from './guest-memory.js';
import { tableProblem, tableWord } from './ring-memory.js';

// Local copies of split-queue.ts's flags: an imported binding is read from its module cell, with a TDZ check, at
// every use in compiled code; a module's own consts are folded.
const F_NEXT = 1;
const F_WRITE = 2;
const F_INDIRECT = 4;
const USED_F_NO_NOTIFY = 1;

/** Where a queue's rings are in guest memory, named as SET_VRING_ADDR names them. */
export interface RingLayout {
  size: number;
  /** Descriptor table (split) or ring (packed). */
  descAddr: number;
  /** Avail ring (split) or Driver Area (packed). */
  availAddr: number;
  /** Used ring (split) or Device Area (packed). */
  usedAddr: number;
  /** First guest address after the rings. */
  end: number;
}

export type SplitRingLayout = RingLayout;

/** What a driver model offers, whatever its ring layout: TestQueue and the benchmarks drive either through it. */
export interface QueueDriver {
  readonly size: number;
  readonly layout: RingLayout;
  /** `len` of the used element returned by the last {@link nextUsed}. */
  readonly lastUsedLen: number;
  /** Free descriptors. */
  readonly freeCount: number;
  /** Chains with the device. */
  readonly pending: number;
  /** Add a chain (readable buffers then writable ones), in an indirect table at `indirectAt` if given; its id or -1. */
  add(readable: readonly GuestBuffer[], writable: readonly GuestBuffer[], indirectAt?: number): number;
  /** {@link add} from parallel arrays, without allocating. */
  addChain(addr: ArrayLike<number>, length: ArrayLike<number>, count: number, readableCount: number, indirectAt?: number): number;
  /** A one-descriptor chain, without allocating. */
  add1(gpa: number, length: number, writable: boolean): number;
  /** A chain of descriptors with explicit flags (NEXT is set between them). */
  addRaw(descs: readonly (readonly [gpa: number, length: number, flags: number])[]): number;
  /** Make added chains visible; true when the device asked to be kicked. */
  publish(): boolean;
  /** The next used id, or -1. */
  nextUsed(): number;
  /** The used position as the device last published it (diagnostics). */
  usedIdx(): number;
  /** Ask for no interrupts, or for them again. */
  setNoInterrupt(on: boolean): void;
}

/** Place the three rings of a `size`-entry queue from `base` (16-byte aligned), each aligned as the spec asks. */
export function splitRingLayout(size: number, base: number): SplitRingLayout {
  const descAddr = alignUp(base, 16);
  const availAddr = descAddr + 16 * size;
  const usedAddr = alignUp(availAddr + 6 + 2 * size, 4096);
  return { size, descAddr, availAddr, usedAddr, end: alignUp(usedAddr + 6 + 8 * size, 4096) };
}

export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/** A bump allocator over a range of guest-physical addresses. */
export class GuestAllocator {
  constructor(
    private next: number,
    private readonly end: number,
  ) {}

  alloc(length: number, align = 8): number {
    const at = alignUp(this.next, align);
    if (at + length > this.end) throw new RangeError(`guest allocator exhausted: ${length} bytes wanted`);
    this.next = at + length;
    return at;
  }
}

/** A buffer in guest memory: [guest address, length]. */
export type GuestBuffer = readonly [gpa: number, length: number];

export class SplitQueueDriver implements QueueDriver {
  readonly size: number;
  readonly layout: SplitRingLayout;
  /** Total used elements consumed. */
  lastUsedIdx = 0;
  /** `len` of the used element returned by the last {@link nextUsed}. */
  lastUsedLen = 0;

  private readonly desc32: Uint32Array;
  private readonly desc16: Uint16Array;
  private readonly avail16: Uint16Array;
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  // Free descriptor ids are free[0 .. freeTop): a typed stack, so adding and releasing never touch a JS array.
  private readonly free: Uint16Array;
  private freeTop = 0;
  private readonly chainLength: Uint16Array;
  private availIdx = 0;
  private kickedAt = 0;
  // Used entries known to be published and not yet consumed: nextUsed() reads used idx (an Atomics.load, which
  // V8 does not inline) only when these run out, not once per entry.
  private usedAhead = 0;
  // Scratch for add(), so its tuples go through the same allocation-free path as addChain().
  private readonly scratch = new ChainArrays();
  private readonly loc: Location = { buffer: 0, offset: 0, span: 0 };

  constructor(
    private readonly memory: GuestMemory,
    layout: SplitRingLayout,
    private readonly eventIdx = false,
  ) {
    const n = layout.size;
    this.size = n;
    this.layout = layout;
    const d = memory.slice(layout.descAddr, 16 * n);
    const a = memory.slice(layout.availAddr, 6 + 2 * n);
    const u = memory.slice(layout.usedAddr, 6 + 8 * n);
    d.fill(0);
    a.fill(0);
    u.fill(0);
    this.desc32 = new Uint32Array(d.buffer, d.byteOffset, 4 * n);
    this.desc16 = new Uint16Array(d.buffer, d.byteOffset, 8 * n);
    this.avail16 = new Uint16Array(a.buffer, a.byteOffset, 3 + n);
    this.used16 = new Uint16Array(u.buffer, u.byteOffset, 3 + 4 * n);
    this.used32 = new Uint32Array(u.buffer, u.byteOffset, 1 + 2 * n);
    this.chainLength = new Uint16Array(n);
    this.free = new Uint16Array(n);
    for (let i = n - 1; i >= 0; i--) this.free[this.freeTop++] = i;
  }

  get freeCount(): number {
    return this.freeTop;
  }

  /** Descriptors available to the device and not yet used. */
  get pending(): number {
    return (this.availIdx - this.lastUsedIdx) & 0xffff;
  }

  /**
   * Add a chain of device-readable then device-writable buffers; returns its head, or -1 when the table is full.
   * With `indirectAt`, the chain goes into an indirect table written at that guest address (one descriptor used).
   */
  add(readable: readonly GuestBuffer[], writable: readonly GuestBuffer[], indirectAt?: number): number {
    const total = this.scratch.fill(readable, writable);
    return this.addChain(this.scratch.addr, this.scratch.length, total, readable.length, indirectAt ?? -1);
  }

  /**
   * Add a chain of `count` buffers, the first `readableCount` device-readable, from parallel arrays of guest
   * addresses and lengths, without allocating (reuse the arrays). With `indirectAt` >= 0 the chain goes into an
   * indirect table written at that guest address (16-byte entries, 4-byte aligned) and takes one descriptor.
   * Returns the head, or -1 when the table is full.
   */
  addChain(addr: ArrayLike<number>, length: ArrayLike<number>, count: number, readableCount: number, indirectAt = -1): number {
    // Two methods, not two branches: each gets its own type feedback and compiled code, so a program adding both
    // kinds (the benchmark, one case after the other) does not run one loop compiled around the other.
    return indirectAt >= 0
      ? this.addIndirect(addr, length, count, readableCount, indirectAt)
      : this.addDirect(addr, length, count, readableCount);
  }

  private addDirect(addr: ArrayLike<number>, length: ArrayLike<number>, count: number, readableCount: number): number {
    if (count === 0 || count > this.freeTop) return -1;
    const free = this.free;
    const d32 = this.desc32;
    let top = this.freeTop;
    const head = free[--top];
    let id = head;
    for (let k = 0; k < count; k++) {
      const last = k === count - 1;
      const next = last ? 0 : free[--top];
      const flags = (k < readableCount ? 0 : F_WRITE) | (last ? 0 : F_NEXT);
      writeDesc(d32, 4 * id, addr[k], length[k], flags, next);
      id = next;
    }
    this.freeTop = top;
    return this.publishHead(head, count);
  }

  private addIndirect(addr: ArrayLike<number>, length: ArrayLike<number>, count: number, readableCount: number, at: number): number {
    const base = indirectTableWord(this.memory, this.loc, at, count);
    const t32 = this.memory.words32(this.loc.buffer);
    for (let k = 0; k < count; k++) {
      const last = k === count - 1;
      const flags = (k < readableCount ? 0 : F_WRITE) | (last ? 0 : F_NEXT);
      writeDesc(t32, base + 4 * k, addr[k], length[k], flags, last ? 0 : k + 1);
    }
    return this.add1Raw(at, 16 * count, F_INDIRECT);
  }

  private add1Raw(gpa: number, length: number, flags: number): number {
    if (this.freeTop === 0) return -1;
    const head = this.free[--this.freeTop];
    writeDesc(this.desc32, 4 * head, gpa, length, flags, 0);
    return this.publishHead(head, 1);
  }

  private publishHead(head: number, count: number): number {
    this.chainLength[head] = count;
    this.avail16[2 + (this.availIdx & (this.size - 1))] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
    return head;
  }

  /** One-descriptor chain without allocating (the benchmark's fast path). Returns the head or -1. */
  add1(gpa: number, length: number, writable: boolean): number {
    // Flat rather than through add1Raw: the benchmarks' driver calls this once per chain, and one small body
    // inlines whole into their loops.
    const top = this.freeTop;
    if (top === 0) return -1;
    const head = this.free[top - 1];
    this.freeTop = top - 1;
    const d32 = this.desc32;
    const w = 4 * head;
    const lo = gpa >>> 0;
    d32[w] = lo;
    d32[w + 1] = (gpa - lo) / 4294967296;
    d32[w + 2] = length;
    d32[w + 3] = writable ? F_WRITE : 0; // flags, and next = 0
    this.chainLength[head] = 1;
    const avail = this.availIdx;
    this.avail16[2 + (avail & (this.size - 1))] = head;
    this.availIdx = (avail + 1) & 0xffff;
    return head;
  }

  /** Add descriptors with explicit flags (NEXT is set between them); returns the head or -1. */
  addRaw(descs: readonly (readonly [gpa: number, length: number, flags: number])[]): number {
    const count = descs.length;
    if (count === 0 || count > this.freeTop) return -1;
    const free = this.free;
    let top = this.freeTop;
    const head = free[--top];
    let id = head;
    for (let k = 0; k < count; k++) {
      const [gpa, len, flags] = descs[k];
      const last = k === count - 1;
      const next = last ? 0 : free[--top];
      writeDesc(this.desc32, 4 * id, gpa, len, flags | (last ? 0 : F_NEXT), next);
      id = next;
    }
    this.freeTop = top;
    return this.publishHead(head, count);
  }

  /** Make added chains visible; returns whether the device asked to be kicked. */
  publish(): boolean {
    const old = this.kickedAt;
    const now = this.availIdx;
    Atomics.store(this.avail16, 1, now);
    this.kickedAt = now;
    if (this.eventIdx) {
      const availEvent = Atomics.load(this.used16, 2 + 4 * this.size);
      return ((now - availEvent - 1) & 0xffff) < ((now - old) & 0xffff);
    }
    return (Atomics.load(this.used16, 0) & USED_F_NO_NOTIFY) === 0;
  }

  /** Next used head (its length in lastUsedLen), or -1 when the device has returned nothing new. */
  nextUsed(): number {
    if (this.usedAhead === 0 && !this.refillUsed()) return -1;
    this.usedAhead--;
    const last = this.lastUsedIdx;
    const at = 1 + 2 * (last & (this.size - 1));
    const id = this.used32[at];
    this.lastUsedLen = this.used32[at + 1];
    this.lastUsedIdx = (last + 1) & 0xffff;
    if (id < this.size) this.release(id);
    if (this.eventIdx) Atomics.store(this.avail16, 2 + this.size, this.lastUsedIdx);
    return id;
  }

  private refillUsed(): boolean {
    this.usedAhead = (Atomics.load(this.used16, 1) - this.lastUsedIdx) & 0xffff;
    return this.usedAhead !== 0;
  }

  /** Used idx as the device last published it. */
  usedIdx(): number {
    return Atomics.load(this.used16, 1);
  }

  /** Ask for no interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT) or for them again. */
  setNoInterrupt(on: boolean): void {
    Atomics.store(this.avail16, 0, on ? 1 : 0);
  }

  /** With EVENT_IDX: ask to be notified once the used idx passes `idx`. */
  setUsedEvent(idx: number): void {
    Atomics.store(this.avail16, 2 + this.size, idx & 0xffff);
  }

  // Raw writes for tests that play a malicious guest.
  writeDescriptor(i: number, gpa: number, length: number, flags: number, next: number): void {
    writeDesc(this.desc32, 4 * i, gpa, length, flags, next);
  }

  /** Put `head` in the next avail slot without touching the free list; publish() makes it visible. */
  pushAvailRaw(head: number): void {
    this.avail16[2 + (this.availIdx & (this.size - 1))] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }

  /** Overwrite avail idx directly. */
  setAvailIdxRaw(idx: number): void {
    this.availIdx = idx & 0xffff;
    Atomics.store(this.avail16, 1, this.availIdx);
  }

  private release(head: number): void {
    const free = this.free;
    let top = this.freeTop;
    let i = head;
    // Bounded by the stack: a misbehaving device returning a chain twice must not push ids past its end.
    for (let k = this.chainLength[head]; k > 0 && top < free.length; k--) {
      free[top++] = i;
      i = this.desc16[8 * i + 7];
    }
    this.freeTop = top;
  }
}

/**
 * Reusable parallel arrays of a chain's buffer addresses and lengths, for the drivers' add(): grown when a chain is
 * longer than any before, so adding allocates nothing in steady state.
 */
export class ChainArrays {
  addr = new Float64Array(8);
  length = new Uint32Array(8);

  /** Readable buffers then writable ones, into the arrays; returns how many. */
  fill(readable: readonly GuestBuffer[], writable: readonly GuestBuffer[]): number {
    const total = readable.length + writable.length;
    if (total > this.addr.length) {
      this.addr = new Float64Array(total);
      this.length = new Uint32Array(total);
    }
    for (let k = 0; k < readable.length; k++) {
      this.addr[k] = readable[k][0];
      this.length[k] = readable[k][1];
    }
    for (let k = 0; k < writable.length; k++) {
      this.addr[readable.length + k] = writable[k][0];
      this.length[readable.length + k] = writable[k][1];
    }
    return total;
  }
}

/** Word index of the `count`-entry indirect table the driver writes at `at` (in `memory.words32(loc.buffer)`). */
export function indirectTableWord(memory: GuestMemory, loc: Location, at: number, count: number): number {
  const word = tableWord(memory, loc, at, 16 * count);
  if (word < 0) throw new RangeError(`indirect table at 0x${at.toString(16)} ${tableProblem(word)}`);
  return word;
}

/** Write the descriptor whose first 32-bit word is `w` in `d32`. */
function writeDesc(d32: Uint32Array, w: number, gpa: number, len: number, flags: number, next: number): void {
  const lo = gpa >>> 0;
  d32[w] = lo;
  d32[w + 1] = (gpa - lo) / 4294967296; // exact: gpa - lo is a multiple of 2^32
  d32[w + 2] = len;
  d32[w + 3] = (flags & 0xffff) | (next << 16); // u16 flags then u16 next, little-endian like every view here
}
