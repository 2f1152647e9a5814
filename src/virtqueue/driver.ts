/**
 * The driver (guest) side of a split virtqueue: what a guest kernel does, written for tests, benchmarks and the
 * test frontend. It also exposes raw descriptor and ring writes so tests can play a malicious guest.
 *
 * It trusts itself: nothing here validates, because the device side is what is under test.
 */
import type { GuestMemory } from './guest-memory.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY } from './split-queue.js';

export interface SplitRingLayout {
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** First guest address after the rings. */
  end: number;
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

export class SplitQueueDriver {
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
  private readonly free: number[] = [];
  private readonly chainLength: Uint16Array;
  private availIdx = 0;
  private kickedAt = 0;

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
    for (let i = n - 1; i >= 0; i--) this.free.push(i);
  }

  get freeCount(): number {
    return this.free.length;
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
    const total = readable.length + writable.length;
    if (indirectAt !== undefined) {
      const table = this.memory.slice(indirectAt, 16 * total);
      const t32 = new Uint32Array(table.buffer, table.byteOffset, 4 * total);
      const t16 = new Uint16Array(table.buffer, table.byteOffset, 8 * total);
      let k = 0;
      for (const [buffers, flag] of [[readable, 0], [writable, VIRTQ_DESC_F_WRITE]] as const) {
        for (const [gpa, len] of buffers) {
          writeDesc(t32, t16, k, gpa, len, flag | (k < total - 1 ? VIRTQ_DESC_F_NEXT : 0), k + 1 < total ? k + 1 : 0);
          k++;
        }
      }
      return this.addRaw([[indirectAt, 16 * total, VIRTQ_DESC_F_INDIRECT]]);
    }
    const descs: [number, number, number][] = [];
    for (const [gpa, len] of readable) descs.push([gpa, len, 0]);
    for (const [gpa, len] of writable) descs.push([gpa, len, VIRTQ_DESC_F_WRITE]);
    return this.addRaw(descs);
  }

  /** One-descriptor chain without allocating (the benchmark's fast path). Returns the head or -1. */
  add1(gpa: number, length: number, writable: boolean): number {
    const head = this.free.pop();
    if (head === undefined) return -1;
    writeDesc(this.desc32, this.desc16, head, gpa, length, writable ? VIRTQ_DESC_F_WRITE : 0, 0);
    this.chainLength[head] = 1;
    this.avail16[2 + (this.availIdx & (this.size - 1))] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
    return head;
  }

  /** Add descriptors with explicit flags (NEXT is set between them); returns the head or -1. */
  addRaw(descs: readonly (readonly [gpa: number, length: number, flags: number])[]): number {
    if (descs.length === 0 || descs.length > this.free.length) return -1;
    const ids: number[] = [];
    for (let k = 0; k < descs.length; k++) ids.push(this.free.pop()!);
    for (let k = 0; k < descs.length; k++) {
      const [gpa, len, flags] = descs[k];
      const last = k === descs.length - 1;
      writeDesc(this.desc32, this.desc16, ids[k], gpa, len, flags | (last ? 0 : VIRTQ_DESC_F_NEXT), last ? 0 : ids[k + 1]);
    }
    this.chainLength[ids[0]] = descs.length;
    this.avail16[2 + (this.availIdx & (this.size - 1))] = ids[0];
    this.availIdx = (this.availIdx + 1) & 0xffff;
    return ids[0];
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
    return (Atomics.load(this.used16, 0) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** Next used head (its length in lastUsedLen), or -1 when the device has returned nothing new. */
  nextUsed(): number {
    if (Atomics.load(this.used16, 1) === this.lastUsedIdx) return -1;
    const slot = this.lastUsedIdx & (this.size - 1);
    const id = this.used32[1 + 2 * slot];
    this.lastUsedLen = this.used32[2 + 2 * slot];
    this.lastUsedIdx = (this.lastUsedIdx + 1) & 0xffff;
    if (id < this.size) this.release(id);
    if (this.eventIdx) Atomics.store(this.avail16, 2 + this.size, this.lastUsedIdx);
    return id;
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
    writeDesc(this.desc32, this.desc16, i, gpa, length, flags, next);
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
    let i = head;
    for (let k = this.chainLength[head]; k > 0; k--) {
      this.free.push(i);
      i = this.desc16[8 * i + 7];
    }
  }
}

function writeDesc(d32: Uint32Array, d16: Uint16Array, i: number, gpa: number, len: number, flags: number, next: number): void {
  d32[4 * i] = gpa >>> 0;
  d32[4 * i + 1] = Math.floor(gpa / 4294967296);
  d32[4 * i + 2] = len;
  d16[8 * i + 6] = flags;
  d16[8 * i + 7] = next;
}
