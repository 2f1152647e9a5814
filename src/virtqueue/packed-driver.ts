/**
 * The driver (guest) side of a packed virtqueue, as a guest kernel drives one: for tests, benchmarks and the test
 * frontend, with the same surface as {@link SplitQueueDriver} so that either can sit under a TestQueue. Raw
 * descriptor writes let tests play a malicious guest. Like the split driver it trusts itself.
 *
 * Chains added are not visible until {@link publish}, which flags their heads (the first one last), so a test
 * adds a batch and the device sees it whole, as with a split ring's avail idx.
 */
import type { GuestBuffer, QueueDriver, RingLayout } from './driver.js';
import { alignUp, ChainArrays, indirectTableWord } from './driver.js';
import type { GuestMemory, Location } from './guest-memory.js';

const F_NEXT = 1;
const F_WRITE = 2;
const F_INDIRECT = 4;
const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;
const AVAIL_USED = F_AVAIL | F_USED;
const EVENT_ENABLE = 0;
const EVENT_DISABLE = 1;
const EVENT_DESC = 2;

/** Descriptor ring, then the Driver Area and the Device Area (4 bytes each, 4-byte aligned). */
export function packedRingLayout(size: number, base: number): RingLayout {
  const descAddr = alignUp(base, 16);
  const availAddr = descAddr + 16 * size;
  const usedAddr = availAddr + 4;
  return { size, descAddr, availAddr, usedAddr, end: alignUp(usedAddr + 4, 4096) };
}

export class PackedQueueDriver implements QueueDriver {
  readonly size: number;
  readonly layout: RingLayout;
  lastUsedLen = 0;

  private readonly desc32: Uint32Array;
  private readonly desc16: Uint16Array;
  /** Ours: [0] off_wrap, [1] flags. */
  private readonly driver16: Uint16Array;
  /** The device's. */
  private readonly device16: Uint16Array;
  private nextAvail = 0;
  private availWrap = 1;
  private nextUsedSlot = 0;
  private usedWrap = 1;
  private freeSlots: number;
  private readonly freeIds: Uint16Array;
  private freeIdTop = 0;
  /** Ring descriptors per buffer id in flight. */
  private readonly idDescs: Uint16Array;
  private outstanding = 0;
  /** Heads added since the last publish: slot and flags, flagged at publish. */
  private readonly headSlot: Uint16Array;
  private readonly headFlags: Uint16Array;
  private heads = 0;
  /** Descriptors added since the last publish, for the device's event check. */
  private addedSincePublish = 0;
  private readonly scratch = new ChainArrays();
  private readonly loc: Location = { buffer: 0, offset: 0, span: 0 };

  constructor(
    private readonly memory: GuestMemory,
    layout: RingLayout,
    private readonly eventIdx = false,
  ) {
    const n = layout.size;
    this.size = n;
    this.layout = layout;
    const d = memory.slice(layout.descAddr, 16 * n);
    const drv = memory.slice(layout.availAddr, 4);
    const dev = memory.slice(layout.usedAddr, 4);
    d.fill(0);
    drv.fill(0);
    dev.fill(0);
    this.desc32 = new Uint32Array(d.buffer, d.byteOffset, 4 * n);
    this.desc16 = new Uint16Array(d.buffer, d.byteOffset, 8 * n);
    this.driver16 = new Uint16Array(drv.buffer, drv.byteOffset, 2);
    this.device16 = new Uint16Array(dev.buffer, dev.byteOffset, 2);
    this.freeSlots = n;
    this.freeIds = new Uint16Array(n);
    for (let i = n - 1; i >= 0; i--) this.freeIds[this.freeIdTop++] = i;
    this.idDescs = new Uint16Array(n);
    this.headSlot = new Uint16Array(n);
    this.headFlags = new Uint16Array(n);
    if (eventIdx) {
      this.driver16[0] = 1 << 15; // used index 0 in lap 1: notify for the first used descriptor
      this.driver16[1] = EVENT_DESC;
    }
  }

  /** Free ring descriptors. */
  get freeCount(): number {
    return this.freeSlots;
  }

  /** Chains with the device (added and not yet used). */
  get pending(): number {
    return this.outstanding;
  }

  add(readable: readonly GuestBuffer[], writable: readonly GuestBuffer[], indirectAt?: number): number {
    const total = this.scratch.fill(readable, writable);
    return this.addChain(this.scratch.addr, this.scratch.length, total, readable.length, indirectAt ?? -1);
  }

  addChain(addr: ArrayLike<number>, length: ArrayLike<number>, count: number, readableCount: number, indirectAt = -1): number {
    if (indirectAt >= 0) {
      if (count === 0) return -1;
      const base = indirectTableWord(this.memory, this.loc, indirectAt, count);
      const t32 = this.memory.words32(this.loc.buffer);
      for (let k = 0; k < count; k++) writeDesc(t32, base + 4 * k, addr[k], length[k], 0, k < readableCount ? 0 : F_WRITE);
      const id = this.begin(1);
      if (id >= 0) this.put(0, indirectAt, 16 * count, F_INDIRECT, id);
      return id;
    }
    const id = this.begin(count);
    if (id < 0) return -1;
    for (let k = 0; k < count; k++) {
      this.put(k, addr[k], length[k], (k < readableCount ? 0 : F_WRITE) | (k < count - 1 ? F_NEXT : 0), id);
    }
    return id;
  }

  /** One device-readable or device-writable descriptor, without allocating. Returns the buffer id or -1. */
  add1(gpa: number, length: number, writable: boolean): number {
    if (this.freeSlots === 0 || this.freeIdTop === 0) return -1;
    const id = this.freeIds[--this.freeIdTop];
    this.freeSlots--;
    this.idDescs[id] = 1;
    this.outstanding++;
    const slot = this.nextAvail;
    writeDesc(this.desc32, 4 * slot, gpa, length, id, this.desc16[8 * slot + 7]);
    this.queueHead(slot, (writable ? F_WRITE : 0) | this.lapBits());
    this.advance(1);
    return id;
  }

  /** Consecutive descriptors with explicit flags (NEXT set between them), as one chain. Returns the id or -1. */
  addRaw(descs: readonly (readonly [gpa: number, length: number, flags: number])[]): number {
    const id = this.begin(descs.length);
    if (id < 0) return -1;
    for (let k = 0; k < descs.length; k++) {
      this.put(k, descs[k][0], descs[k][1], descs[k][2] | (k < descs.length - 1 ? F_NEXT : 0), id);
    }
    return id;
  }

  publish(): boolean {
    const n = this.heads;
    if (n > 0) {
      const d16 = this.desc16;
      for (let k = n - 1; k > 0; k--) d16[8 * this.headSlot[k] + 7] = this.headFlags[k];
      Atomics.store(d16, 8 * this.headSlot[0] + 7, this.headFlags[0]);
      this.heads = 0;
    }
    const added = this.addedSincePublish;
    this.addedSincePublish = 0;
    const mode = Atomics.load(this.device16, 1);
    if (mode !== EVENT_DESC || !this.eventIdx) return mode !== EVENT_DISABLE;
    const offWrap = Atomics.load(this.device16, 0);
    let event = offWrap & 0x7fff;
    if (offWrap >>> 15 !== this.availWrap) event -= this.size;
    return ((this.nextAvail - event - 1) & 0xffff) < (added & 0xffff);
  }

  /** Next used buffer id (its length in lastUsedLen), or -1 when the device has returned nothing new. */
  nextUsed(): number {
    const slot = this.nextUsedSlot;
    const w = 4 * slot;
    const flags = Atomics.load(this.desc16, 2 * w + 7);
    if ((flags & AVAIL_USED) !== (this.usedWrap ? AVAIL_USED : 0)) return -1;
    const id = this.desc16[2 * w + 6];
    this.lastUsedLen = this.desc32[w + 2];
    // A misbehaving device naming an id that is not out must not corrupt our free lists.
    const n = id < this.size ? this.idDescs[id] : 0;
    let next = slot + (n === 0 ? 1 : n);
    if (next >= this.size) {
      next -= this.size;
      this.usedWrap ^= 1;
    }
    this.nextUsedSlot = next;
    if (n > 0) {
      this.idDescs[id] = 0;
      this.freeIds[this.freeIdTop++] = id;
      this.freeSlots += n;
      this.outstanding--;
    }
    if (this.eventIdx) Atomics.store(this.driver16, 0, next | (this.usedWrap << 15));
    return id;
  }

  /** The next used slot and our used wrap counter (bit 15), for diagnostics. */
  usedIdx(): number {
    return this.nextUsedSlot | (this.usedWrap << 15);
  }

  /** Ask for no interrupts, or for them again. */
  setNoInterrupt(on: boolean): void {
    Atomics.store(this.driver16, 1, on ? EVENT_DISABLE : this.eventIdx ? EVENT_DESC : EVENT_ENABLE);
  }

  /** With EVENT_IDX: ask to be notified once the device writes the used descriptor at `slot` of lap `wrap`. */
  setUsedEvent(slot: number, wrap = this.usedWrap): void {
    Atomics.store(this.driver16, 0, slot | (wrap << 15));
  }

  /** The AVAIL/USED bits that make a descriptor available in the lap being filled now. */
  lapBits(): number {
    return this.availWrap ? F_AVAIL : F_USED;
  }

  /** Where the next chain goes. */
  get availSlot(): number {
    return this.nextAvail;
  }

  // Raw writes for tests that play a malicious guest: no free-list bookkeeping, visible at once.
  writeDescriptor(slot: number, gpa: number, length: number, id: number, flags: number): void {
    writeDesc(this.desc32, 4 * slot, gpa, length, id, flags);
  }

  /** Reserve an id and `count` ring descriptors for a chain; -1 when the ring is full. */
  private begin(count: number): number {
    if (count === 0 || count > this.freeSlots || this.freeIdTop === 0) return -1;
    const id = this.freeIds[--this.freeIdTop];
    this.freeSlots -= count;
    this.idDescs[id] = count;
    this.outstanding++;
    return id;
  }

  /** Write descriptor `k` of the chain being added at the next slot. */
  private put(k: number, gpa: number, len: number, flags: number, id: number): void {
    const slot = this.nextAvail;
    const withLap = flags | this.lapBits();
    if (k === 0) {
      // The head keeps its old (not available) flags until publish.
      writeDesc(this.desc32, 4 * slot, gpa, len, id, this.desc16[8 * slot + 7]);
      this.queueHead(slot, withLap);
    } else {
      // The rest are flagged now: the device reads them only after it has seen the head.
      writeDesc(this.desc32, 4 * slot, gpa, len, id, withLap);
    }
    this.advance(1);
  }

  private queueHead(slot: number, flags: number): void {
    this.headSlot[this.heads] = slot;
    this.headFlags[this.heads++] = flags;
  }

  private advance(n: number): void {
    this.addedSincePublish += n;
    this.nextAvail += n;
    if (this.nextAvail >= this.size) {
      this.nextAvail -= this.size;
      this.availWrap ^= 1;
    }
  }
}

/** Write the packed descriptor whose first 32-bit word is `w`: addr, len, then u16 id and u16 flags. */
function writeDesc(d32: Uint32Array, w: number, gpa: number, len: number, id: number, flags: number): void {
  const lo = gpa >>> 0;
  d32[w] = lo;
  d32[w + 1] = (gpa - lo) / 4294967296;
  d32[w + 2] = len;
  d32[w + 3] = (id & 0xffff) | ((flags & 0xffff) << 16);
}
