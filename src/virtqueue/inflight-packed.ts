/**
 * Inflight tracking for a packed ring (vhost-user.rst, "Inflight I/O tracking"). A packed ring overwrites the
 * descriptors of chains still in flight with used descriptors of chains that completed before them, and QEMU
 * cannot rewind a packed ring after a crash ("we don't have a reference like avail idx in shared memory"), so
 * the region keeps a copy of every descriptor in flight and the ring's used position; the avail position follows
 * (the used index plus the descriptors still in flight).
 *
 * Layout (QueueRegionPacked), little-endian: u64 features, u16 version, u16 desc_num, u16 free_head,
 * u16 old_free_head, u16 used_idx, u16 old_used_idx, u8 used_wrap_counter, u8 old_used_wrap_counter, u8 pad[7],
 * then from byte 32 desc_num × DescStatePacked {u8 inflight, u8 pad, u16 next, u16 last, u16 num, u64 counter,
 * u16 id, u16 flags, u32 len, u64 addr}. Entries are taken from a free list, one per ring descriptor; a chain's
 * head entry holds its count, counter and inflight flag.
 *
 * Crash consistency, as the spec lays it out: taking entries is committed by the store of old_free_head;
 * returning a batch links its entries onto the free list and moves used_idx, then the queue flags the batch's
 * first used descriptor (the commit: from then on the driver owns the batch), then inflight flags are cleared
 * and the old_* fields catch up. On restart, a batch whose first descriptor is still the driver's is rolled back
 * to old_*, and one the driver was given is kept.
 *
 * Our own free list and chain links are kept privately too (the region is only written, except on recovery, when
 * everything read is checked and the free list is rebuilt from what is really in flight).
 */
import { VirtqueueError } from './errors.js';
import { countFlagged } from './inflight-split.js';

const HEADER = 32;
const ENTRY = 32;
const VERSION = 1;
const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;

/** Chains a packed ring's region records as in flight (head entries whose inflight flag is set): for diagnostics. */
export function packedInflightCount(region: Uint8Array, descNum: number): number {
  return countFlagged(region, descNum, HEADER, ENTRY);
}

/** Bytes of one queue's region, 64-byte aligned. */
export function packedInflightSize(queueSize: number): number {
  return Math.ceil((HEADER + ENTRY * queueSize) / 64) * 64;
}

/** Where a recovered ring resumes, and the head entries of the chains to run again, oldest pop first. */
export interface PackedRecovery {
  usedIdx: number;
  usedWrap: number;
  availIdx: number;
  availWrap: number;
  entries: Uint16Array;
}

export class PackedInflight {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  /** Private copies of the free list links (next) and of each head entry's last entry. */
  private readonly next: Uint16Array;
  private readonly lastOf: Uint16Array;
  /** Head entry of the chain in flight under each buffer id. */
  private readonly entryOfId: Uint16Array;
  private freeHead = 0;
  private counterLo = 0;
  private counterHi = 0;
  /** Head entries of the chains pushed since the last publish. */
  private readonly batch: Uint16Array;
  private batchLength = 0;

  constructor(
    region: Uint8Array,
    readonly descNum: number,
    private readonly ringSize: number,
    private readonly queue: number,
  ) {
    if (region.byteLength < packedInflightSize(descNum) || region.byteOffset % 8 !== 0) {
      throw new VirtqueueError('BAD_INFLIGHT', queue, `inflight region of ${region.byteLength} bytes is too small for ${descNum} entries`);
    }
    if (ringSize > descNum) this.fail(`the ring has ${ringSize} descriptors, the region ${descNum}`);
    this.u8 = region;
    this.u16 = new Uint16Array(region.buffer, region.byteOffset, region.byteLength >>> 1);
    this.u32 = new Uint32Array(region.buffer, region.byteOffset, region.byteLength >>> 2);
    this.next = new Uint16Array(descNum);
    this.lastOf = new Uint16Array(descNum);
    this.entryOfId = new Uint16Array(ringSize);
    this.batch = new Uint16Array(descNum);
  }

  /**
   * A fresh region (version 0) is initialised at the ring's position from SET_VRING_BASE and null returned: use
   * that base. A used region is settled (the half-published batch kept or rolled back) and says where to resume,
   * which wins over the frontend's base: after a crash QEMU only has the one from the last clean stop.
   *
   * @param desc16 the descriptor ring (flags of descriptor i at 8i + 7)
   */
  recover(desc16: Uint16Array, baseUsedIdx: number, baseUsedWrap: number): PackedRecovery | null {
    const { u8, u16, descNum, ringSize } = this;
    const version = u16[4];
    if (version === 0) {
      u8.fill(0, HEADER, HEADER + ENTRY * descNum);
      for (let e = 0; e < descNum; e++) this.link(e, e + 1);
      this.freeHead = 0;
      u16[5] = descNum;
      u16[6] = u16[7] = 0;
      u16[8] = u16[9] = baseUsedIdx;
      u8[20] = u8[21] = baseUsedWrap;
      Atomics.store(u16, 4, VERSION);
      return null;
    }
    if (version !== VERSION) this.fail(`region version ${version} (this backend writes version ${VERSION})`);
    if (u16[5] !== descNum) this.fail(`region has ${u16[5]} entries, the frontend said ${descNum}`);
    let freeHead = u16[7];
    let usedIdx = u16[9];
    let usedWrap = u8[21];
    if (u16[8] !== usedIdx || u8[20] !== usedWrap) {
      if (usedIdx >= ringSize || usedWrap > 1) this.fail(`old used index ${usedIdx} (wrap ${usedWrap}) is not in a ring of ${ringSize}`);
      // The batch's first used descriptor goes at old_used_idx. Still in its available form: the driver never got
      // the batch, roll back. Anything else: it did, keep it.
      const form = desc16[8 * usedIdx + 7] & (F_AVAIL | F_USED);
      if (form !== (usedWrap ? F_AVAIL : F_USED)) {
        freeHead = u16[6];
        usedIdx = u16[8];
        usedWrap = u8[20];
      }
    }
    if (usedIdx >= ringSize || usedWrap > 1) this.fail(`used index ${usedIdx} (wrap ${usedWrap}) is not in a ring of ${ringSize}`);
    // Entries on the free list are not in flight, whatever their flag says (a chain taken half-way, a batch
    // returned before the crash).
    for (let e = freeHead, steps = 0; e < descNum && steps < descNum; steps++) {
      u8[HEADER + ENTRY * e] = 0;
      e = u16[(HEADER + ENTRY * e + 2) >>> 1];
    }
    const claimed = new Uint8Array(descNum);
    const idSeen = new Uint8Array(ringSize);
    const heads: number[] = [];
    const counters: number[] = [];
    let descriptors = 0;
    for (let h = 0; h < descNum; h++) {
      const flag = u8[HEADER + ENTRY * h];
      if (flag === 0) continue;
      if (flag !== 1) this.fail(`entry ${h} has inflight flag ${flag}`);
      const num = u16[(HEADER + ENTRY * h + 6) >>> 1];
      if (num === 0 || num > ringSize) this.fail(`entry ${h} heads a chain of ${num} descriptors (ring of ${ringSize})`);
      let e = h;
      for (let k = 0; ; k++) {
        if (e >= descNum || claimed[e]) this.fail(`chain at entry ${h} runs into entry ${e}, outside the region or in another chain`);
        claimed[e] = 1;
        if (k === num - 1) break;
        const n = u16[(HEADER + ENTRY * e + 2) >>> 1];
        this.next[e] = n;
        e = n;
      }
      const id = u16[(HEADER + ENTRY * e + 16) >>> 1];
      if (id >= ringSize || idSeen[id]) this.fail(`chain at entry ${h} has buffer id ${id}, outside the ring or in flight twice`);
      idSeen[id] = 1;
      this.entryOfId[id] = h;
      this.lastOf[h] = e;
      descriptors += num;
      const lo = this.u32[(HEADER + ENTRY * h + 8) >>> 2];
      const hi = this.u32[(HEADER + ENTRY * h + 12) >>> 2];
      if (hi > 0x1fffff) this.fail(`entry ${h} has counter beyond 2^53`);
      heads.push(h);
      counters.push(hi * 4294967296 + lo);
    }
    if (descriptors > ringSize) this.fail(`${descriptors} descriptors in flight, the ring has ${ringSize}`);
    // The free list: every entry no chain in flight holds, in order.
    let first = descNum;
    let prev = -1;
    for (let e = 0; e < descNum; e++) {
      if (claimed[e]) continue;
      if (prev < 0) first = e;
      else this.link(prev, e);
      prev = e;
    }
    if (prev >= 0) this.link(prev, descNum);
    this.freeHead = first;
    u16[6] = u16[7] = first;
    u16[8] = u16[9] = usedIdx;
    u8[20] = u8[21] = usedWrap;
    const order = heads.map((_, i) => i).sort((a, b) => counters[a] - counters[b]);
    const next = order.length === 0 ? 0 : counters[order[order.length - 1]] + 1;
    this.counterLo = next % 4294967296;
    this.counterHi = Math.floor(next / 4294967296);
    let availIdx = usedIdx + descriptors;
    let availWrap = usedWrap;
    if (availIdx >= ringSize) {
      availIdx -= ringSize;
      availWrap ^= 1;
    }
    return { usedIdx, usedWrap, availIdx, availWrap, entries: Uint16Array.from(order, (i) => heads[i]) };
  }

  /**
   * A chain of `count` ring descriptors from `slot` (wrapping), buffer id `id`, taken from the ring: copy its
   * descriptors into free entries, then commit (old_free_head).
   */
  fetched(id: number, d32: Uint32Array, d16: Uint16Array, slot: number, count: number): void {
    const { u8, u16, u32, next } = this;
    const head = this.freeHead;
    const h = HEADER + ENTRY * head;
    u16[(h + 6) >>> 1] = 0;
    u32[(h + 8) >>> 2] = this.counterLo;
    u32[(h + 12) >>> 2] = this.counterHi;
    if (++this.counterLo === 4294967296) {
      this.counterLo = 0;
      this.counterHi++;
    }
    u8[h] = 1;
    let e = head;
    for (let k = 0; k < count; k++) {
      // Cannot run out while the ring holds no more than descNum descriptors; checked all the same.
      if (e >= this.descNum) this.fail('no free entry left: more descriptors in flight than the region has');
      const at = HEADER + ENTRY * e;
      const w = 4 * slot;
      u32[(at + 20) >>> 2] = d32[w + 2];
      u32[(at + 24) >>> 2] = d32[w];
      u32[(at + 28) >>> 2] = d32[w + 1];
      u16[(at + 16) >>> 1] = d16[2 * w + 6];
      u16[(at + 18) >>> 1] = d16[2 * w + 7];
      if (k === count - 1) {
        u16[(h + 4) >>> 1] = e;
        this.lastOf[head] = e;
      }
      u16[(h + 6) >>> 1] = k + 1;
      e = next[e];
      if (++slot === this.ringSize) slot = 0;
    }
    this.entryOfId[id] = head;
    this.freeHead = e;
    u16[6] = e;
    Atomics.store(u16, 7, e);
  }

  /** The chain under buffer id `id` is written to the used ring, not yet flagged. */
  completed(id: number): void {
    this.batch[this.batchLength++] = this.entryOfId[id];
  }

  /** Before the batch's first used descriptor is flagged: return its entries, move used_idx to where the batch ends. */
  beforeCommit(usedIdx: number, usedWrap: number): void {
    const { u8, u16, batch } = this;
    for (let i = 0; i < this.batchLength; i++) {
      const head = batch[i];
      this.link(this.lastOf[head], this.freeHead);
      this.freeHead = head;
    }
    u16[6] = this.freeHead;
    u16[8] = usedIdx;
    Atomics.store(u8, 20, usedWrap);
  }

  /** The batch is the driver's: clear its inflight flags and make the new state the one to roll back to. */
  afterCommit(): void {
    const { u8, u16, batch } = this;
    for (let i = 0; i < this.batchLength; i++) u8[HEADER + ENTRY * batch[i]] = 0;
    this.batchLength = 0;
    u16[7] = this.freeHead;
    u8[21] = u8[20];
    Atomics.store(u16, 9, u16[8]);
  }

  /** The chain under `id` goes back to the ring unused (unpop): its entries are free again. */
  returned(id: number): void {
    const head = this.entryOfId[id];
    this.link(this.lastOf[head], this.freeHead);
    this.freeHead = head;
    this.u16[6] = head;
    Atomics.store(this.u16, 7, head);
    Atomics.store(this.u8, HEADER + ENTRY * head, 0);
  }

  /** Entries of the chain headed by `head`, in order, into `out`; returns the count. */
  chainEntries(head: number, out: Uint16Array): number {
    const num = this.u16[(HEADER + ENTRY * head + 6) >>> 1];
    let e = head;
    for (let k = 0; k < num; k++) {
      out[k] = e;
      e = this.next[e];
    }
    return num;
  }

  /** Fields of entry `e` as the ring descriptor it copies. */
  flagsOf(e: number): number {
    return this.u16[(HEADER + ENTRY * e + 18) >>> 1];
  }
  lenOf(e: number): number {
    return this.u32[(HEADER + ENTRY * e + 20) >>> 2];
  }
  addrLoOf(e: number): number {
    return this.u32[(HEADER + ENTRY * e + 24) >>> 2];
  }
  addrHiOf(e: number): number {
    return this.u32[(HEADER + ENTRY * e + 28) >>> 2];
  }
  idOf(e: number): number {
    return this.u16[(HEADER + ENTRY * e + 16) >>> 1];
  }

  private link(e: number, to: number): void {
    this.next[e] = to;
    this.u16[(HEADER + ENTRY * e + 2) >>> 1] = to;
  }

  private fail(message: string): never {
    throw new VirtqueueError('BAD_INFLIGHT', this.queue, `inflight region: ${message}`);
  }
}
