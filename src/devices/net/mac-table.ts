/**
 * A switch's learned addresses: an open-addressing hash table in typed arrays over a SharedArrayBuffer. The
 * switch's thread is its only writer and looks up every frame's destination in it without allocating (a Map with
 * 48-bit keys would box each key); the main thread reads the same memory for the control API's MAC table.
 */

/** Slots; at most 3/4 of them hold addresses (beyond that new addresses are flooded to, not learned). */
export const MAC_TABLE_SLOTS = 4096;
const MASK = MAC_TABLE_SLOTS - 1;
const MAX_USED = (MAC_TABLE_SLOTS * 3) >> 2;
const EMPTY = -1;
const DELETED = -2;

/** Bytes of the shared memory a table needs. */
export const MAC_TABLE_BYTES = MAC_TABLE_SLOTS * (4 + 4 + 4 + 8) + 8;

export class MacTable {
  /** Low 32 bits of the address (bytes 2..5). */
  private readonly lo: Uint32Array;
  /** High 16 bits (bytes 0..1), or EMPTY / DELETED. */
  private readonly hi: Int32Array;
  /** The switch port it was last seen on. */
  readonly port: Int32Array;
  /** When, in Date.now() milliseconds. */
  readonly seen: Float64Array;
  /** [0] slots in use (addresses and DELETED marks). */
  private readonly count: Int32Array;

  constructor(readonly shared: SharedArrayBuffer) {
    if (shared.byteLength < MAC_TABLE_BYTES) throw new RangeError(`a MAC table needs ${MAC_TABLE_BYTES} bytes`);
    let at = 0;
    this.seen = new Float64Array(shared, at, MAC_TABLE_SLOTS);
    at += 8 * MAC_TABLE_SLOTS;
    this.lo = new Uint32Array(shared, at, MAC_TABLE_SLOTS);
    at += 4 * MAC_TABLE_SLOTS;
    this.hi = new Int32Array(shared, at, MAC_TABLE_SLOTS);
    at += 4 * MAC_TABLE_SLOTS;
    this.port = new Int32Array(shared, at, MAC_TABLE_SLOTS);
    at += 4 * MAC_TABLE_SLOTS;
    this.count = new Int32Array(shared, at, 2);
  }

  /** A fresh table (all slots empty), in new shared memory. */
  static create(): MacTable {
    const t = new MacTable(new SharedArrayBuffer(MAC_TABLE_BYTES));
    t.hi.fill(EMPTY);
    return t;
  }

  /** The slot holding the address, or -1. `hi`: bytes 0..1, `lo`: bytes 2..5 (as an unsigned 32-bit number). */
  find(hi: number, lo: number): number {
    for (let i = hash(hi, lo), n = 0; n < MAC_TABLE_SLOTS; i = (i + 1) & MASK, n++) {
      const h = this.hi[i];
      if (h === EMPTY) return -1;
      if (h === hi && this.lo[i] === lo) return i;
    }
    return -1;
  }

  /** Record that the address was seen on `port` at `now`; false when the table is full (not learned). */
  learn(hi: number, lo: number, port: number, now: number): boolean {
    let free = -1;
    let i = hash(hi, lo);
    for (let n = 0; n < MAC_TABLE_SLOTS; i = (i + 1) & MASK, n++) {
      const h = this.hi[i];
      if (h === hi && this.lo[i] === lo) {
        if (this.port[i] !== port) this.port[i] = port;
        if (this.seen[i] !== now) this.seen[i] = now;
        return true;
      }
      if (h === DELETED && free < 0) free = i;
      if (h === EMPTY) break;
    }
    if (free < 0) {
      if (this.count[0] >= MAX_USED) return this.compact() && this.learn(hi, lo, port, now);
      free = i;
      this.count[0]++;
    }
    this.lo[free] = lo;
    this.port[free] = port;
    this.seen[free] = now;
    this.hi[free] = hi;
    return true;
  }

  forget(slot: number): void {
    this.hi[slot] = DELETED;
  }

  /** Copy the addresses on `port` seen at or after `since` into `out` (6 bytes each, at most `max`); how many. */
  copyPort(port: number, since: number, out: Uint8Array, max: number): number {
    let n = 0;
    for (let i = 0; i < MAC_TABLE_SLOTS && n < max; i++) {
      if (this.hi[i] < 0 || this.port[i] !== port || this.seen[i] < since) continue;
      const h = this.hi[i];
      const l = this.lo[i];
      out.set([h >>> 8, h & 0xff, l >>> 24, (l >>> 16) & 0xff, (l >>> 8) & 0xff, l & 0xff], 6 * n++);
    }
    return n;
  }

  /** Forget every address learned on `port` (it left the switch). */
  forgetPort(port: number): void {
    for (let i = 0; i < MAC_TABLE_SLOTS; i++) if (this.hi[i] >= 0 && this.port[i] === port) this.hi[i] = DELETED;
  }

  /** Forget addresses not seen since `before`, and rebuild without DELETED marks; false when nothing was freed. */
  compact(before = Date.now() - 300_000): boolean {
    const live: [number, number, number, number][] = [];
    for (let i = 0; i < MAC_TABLE_SLOTS; i++) {
      if (this.hi[i] >= 0 && this.seen[i] >= before) live.push([this.hi[i], this.lo[i], this.port[i], this.seen[i]]);
    }
    if (live.length >= MAX_USED) return false;
    this.hi.fill(EMPTY);
    this.count[0] = 0;
    for (const [h, l, p, s] of live) this.learn(h, l, p, s);
    return true;
  }

  /** Every address held: [address as 12 hex digits, port, seen]. For the control API, not the data path. */
  entries(): { mac: string; port: number; seen: number }[] {
    const out: { mac: string; port: number; seen: number }[] = [];
    for (let i = 0; i < MAC_TABLE_SLOTS; i++) {
      const h = this.hi[i];
      if (h < 0) continue;
      const hex = h.toString(16).padStart(4, '0') + this.lo[i].toString(16).padStart(8, '0');
      out.push({ mac: hex.match(/../g)!.join(':'), port: this.port[i], seen: this.seen[i] });
    }
    return out;
  }

  get size(): number {
    let n = 0;
    for (let i = 0; i < MAC_TABLE_SLOTS; i++) if (this.hi[i] >= 0) n++;
    return n;
  }
}

function hash(hi: number, lo: number): number {
  return (Math.imul(lo ^ (hi << 16) ^ hi, 0x9e3779b1) >>> 20) & MASK;
}
