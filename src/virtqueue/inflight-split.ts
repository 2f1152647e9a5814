/**
 * Inflight tracking for a split ring (vhost-user.rst, "Inflight I/O tracking"): a record, in memory the frontend
 * keeps across backend restarts, of which heads were popped and not yet returned, so a restarted backend can run
 * them again in the order it first took them, even when they completed out of ring order.
 *
 * Layout (QueueRegionSplit), little-endian: u64 features, u16 version, u16 desc_num, u16 last_batch_head,
 * u16 used_idx, then desc_num × DescStateSplit {u8 inflight, u8 pad[5], u16 next, u64 counter} from byte 16.
 *
 * Writes follow the spec's order so that a crash between any two of them is recoverable: a head is marked
 * inflight only once its counter is set; a batch of returned heads is linked through `next` from
 * last_batch_head before used->idx moves, and used_idx follows used->idx only after the batch's flags are
 * cleared, so a used_idx behind used->idx says exactly how many heads of the last batch to clear.
 *
 * The region is the frontend's memory: everything read from it is bounds-checked, and a region that cannot be
 * right throws VirtqueueError('BAD_INFLIGHT'), never an out-of-range access.
 */
import { VirtqueueError } from './errors.js';

const HEADER = 16;
const ENTRY = 16;
const VERSION = 1;

/** Bytes of one queue's region: 64-byte aligned, as DPDK and libvhost-user size theirs. */
export function splitInflightSize(queueSize: number): number {
  return Math.ceil((HEADER + ENTRY * queueSize) / 64) * 64;
}

/** Chains a split ring's region records as in flight (heads whose inflight flag is set): for diagnostics. */
export function splitInflightCount(region: Uint8Array, descNum: number): number {
  return countFlagged(region, descNum, HEADER, ENTRY);
}

/** Entries whose first byte (the inflight flag of both layouts) is set, within the region's bounds. */
export function countFlagged(region: Uint8Array, descNum: number, header: number, entry: number): number {
  let n = 0;
  for (let i = 0, at = header; i < descNum && at < region.byteLength; i++, at += entry) if (region[at] !== 0) n++;
  return n;
}

export class SplitInflight {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private counterLo = 0;
  private counterHi = 0;
  private lastBatchHead = 0;
  /** Heads pushed since the last publish: their inflight flags are cleared once used->idx covers them. */
  private readonly batch: Uint16Array;
  private batchLength = 0;

  /**
   * @param region this queue's region (at least {@link splitInflightSize}(descNum) bytes, 8-byte aligned)
   * @param descNum the region's entry count: the queue size the frontend gave GET/SET_INFLIGHT_FD
   */
  constructor(
    region: Uint8Array,
    readonly descNum: number,
    private readonly queue: number,
  ) {
    if (region.byteLength < splitInflightSize(descNum) || region.byteOffset % 8 !== 0) {
      throw new VirtqueueError('BAD_INFLIGHT', queue, `inflight region of ${region.byteLength} bytes is too small for ${descNum} entries`);
    }
    this.u8 = region;
    this.u16 = new Uint16Array(region.buffer, region.byteOffset, region.byteLength >>> 1);
    this.u32 = new Uint32Array(region.buffer, region.byteOffset, region.byteLength >>> 2);
    this.batch = new Uint16Array(descNum);
  }

  /**
   * Make the region describe the ring as it is now, and say what must run again. A fresh region (version 0) is
   * initialised with used_idx = `usedIdx`, so that a crash before the first completion finds no "unfinished
   * batch" to clear (spdk #3766: a region left at used_idx 0 under a used ring at 5 lost a request). A used
   * region has its half-published batch settled, and returns its inflight heads, oldest pop first.
   *
   * @param usedIdx the used ring's idx as the driver sees it now
   * @param ringSize the ring's size (at most descNum)
   */
  recover(usedIdx: number, ringSize: number): Uint16Array {
    const { u8, u16, u32, descNum } = this;
    if (ringSize > descNum) this.fail(`the ring has ${ringSize} entries, the region ${descNum}`);
    const version = u16[4];
    if (version === 0) {
      u8.fill(0, HEADER, HEADER + ENTRY * descNum);
      u16[5] = descNum;
      u16[6] = 0;
      u16[7] = usedIdx;
      Atomics.store(u16, 4, VERSION);
      return new Uint16Array(0);
    }
    if (version !== VERSION) this.fail(`region version ${version} (this backend writes version ${VERSION})`);
    if (u16[5] !== descNum) this.fail(`region has ${u16[5]} entries, the frontend said ${descNum}`);
    let recorded = u16[7];
    if (recorded !== usedIdx) {
      // Died after moving used->idx and before used_idx caught up: the batch's heads were delivered.
      const batch = (usedIdx - recorded) & 0xffff;
      if (batch > ringSize) this.fail(`used_idx ${recorded} is ${batch} behind the used ring's ${usedIdx}, more than the ring holds`);
      let head = u16[6];
      for (let k = 0; k < batch; k++) {
        if (head >= ringSize) this.fail(`last batch names head ${head}, the ring has ${ringSize}`);
        u8[HEADER + ENTRY * head] = 0;
        head = u16[(HEADER + ENTRY * head + 6) >>> 1];
      }
      recorded = usedIdx;
      Atomics.store(u16, 7, usedIdx);
    }
    const heads: number[] = [];
    const counters: number[] = [];
    for (let h = 0; h < descNum; h++) {
      const flag = u8[HEADER + ENTRY * h];
      if (flag === 0) continue;
      if (flag !== 1 || h >= ringSize) this.fail(`entry ${h} has inflight flag ${flag} (ring of ${ringSize})`);
      const lo = u32[(HEADER + ENTRY * h + 8) >>> 2];
      const hi = u32[(HEADER + ENTRY * h + 12) >>> 2];
      if (hi > 0x1fffff) this.fail(`entry ${h} has counter beyond 2^53`);
      heads.push(h);
      counters.push(hi * 4294967296 + lo);
    }
    const order = heads.map((_, i) => i).sort((a, b) => counters[a] - counters[b]);
    const next = order.length === 0 ? 0 : counters[order[order.length - 1]] + 1;
    this.counterLo = next % 4294967296;
    this.counterHi = Math.floor(next / 4294967296);
    this.lastBatchHead = u16[6] < ringSize ? u16[6] : 0;
    return Uint16Array.from(order, (i) => heads[i]);
  }

  /** A head taken from the avail ring: give it the next counter, then mark it inflight. */
  fetched(head: number): void {
    const at = HEADER + ENTRY * head;
    this.u32[(at + 8) >>> 2] = this.counterLo;
    this.u32[(at + 12) >>> 2] = this.counterHi;
    if (++this.counterLo === 4294967296) {
      this.counterLo = 0;
      this.counterHi++;
    }
    Atomics.store(this.u8, at, 1);
  }

  /** A head written to the used ring (not yet visible): link it into the batch list. */
  completed(head: number): void {
    this.u16[(HEADER + ENTRY * head + 6) >>> 1] = this.lastBatchHead;
    this.lastBatchHead = head;
    Atomics.store(this.u16, 6, head);
    this.batch[this.batchLength++] = head;
  }

  /** used->idx is now `usedIdx`, covering the batch: clear its heads, then record the index. */
  published(usedIdx: number): void {
    const u8 = this.u8;
    const batch = this.batch;
    for (let i = 0; i < this.batchLength; i++) u8[HEADER + ENTRY * batch[i]] = 0;
    this.batchLength = 0;
    Atomics.store(this.u16, 7, usedIdx);
  }

  /** A head given back unused (unpop): the avail ring has it again, so it is not inflight. */
  returned(head: number): void {
    Atomics.store(this.u8, HEADER + ENTRY * head, 0);
  }

  private fail(message: string): never {
    throw new VirtqueueError('BAD_INFLIGHT', this.queue, `inflight region: ${message}`);
  }
}
