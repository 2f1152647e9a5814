/**
 * The device side of a packed virtqueue (VIRTIO_F_RING_PACKED, virtio 1.2 §2.8): one descriptor ring that the
 * driver fills and the device overwrites with used descriptors, told apart by the AVAIL and USED flag bits
 * against each side's wrap counter, plus two 4-byte event suppression areas.
 *
 * Chains are consecutive descriptors linked by NEXT; the buffer id is in the last one. Chains complete in any
 * order: the device writes each used descriptor at its own used index, which then moves on by the chain's
 * descriptor count. Used descriptors are written at push time, all but the batch's first flagged too; publish
 * flags that first one, so the driver sees the batch whole.
 *
 * As in the split ring, every guest-controlled value is checked before use; a bad ring throws VirtqueueError
 * and the queue stays broken until reset.
 */
import { DescriptorChain } from './chain.js';
import { VirtqueueError } from './errors.js';
import type { GuestMemory, Location } from './guest-memory.js';
import type { DirtyLog } from './dirty-log.js';
import { PackedInflight } from './inflight-packed.js';
import { appendBuffer, claimLines, OUTSIDE_MEMORY, ringView, segmentLimit, tableProblem, tableWord, TOO_MANY_SEGMENTS } from './ring-memory.js';
import type { RingQueue } from './virtqueue.js';

// Module-private copies (see split-queue.ts: V8 folds a module's own consts, not imported bindings).
const F_NEXT = 1;
const F_WRITE = 2;
const F_INDIRECT = 4;
const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;
const AVAIL_USED = F_AVAIL | F_USED;
const EVENT_ENABLE = 0;
const EVENT_DISABLE = 1;
const EVENT_DESC = 2;
const QUEUE_SIZE_MAX = 32768;
const INDIRECT_ENTRIES_MAX = 4096;
const DESC_SIZE = 16;

export const VIRTQ_DESC_F_AVAIL = F_AVAIL;
export const VIRTQ_DESC_F_USED = F_USED;
export const RING_EVENT_FLAGS_ENABLE = EVENT_ENABLE;
export const RING_EVENT_FLAGS_DISABLE = EVENT_DISABLE;
export const RING_EVENT_FLAGS_DESC = EVENT_DESC;
/** The vring base of a packed queue that has never run: both indices 0, both wrap counters 1. */
export const PACKED_INITIAL_BASE = 0x80008000;

export interface PackedQueueConfig {
  /** Queue index, for error messages. */
  index: number;
  /** Number of descriptors: 1 to 32768 (need not be a power of 2). */
  size: number;
  memory: GuestMemory;
  /** Guest-physical address of the descriptor ring. */
  descAddr: number;
  /** The Driver Area (driver event suppression; vhost-user's "avail" address). */
  driverAddr: number;
  /** The Device Area (device event suppression; vhost-user's "used" address). */
  deviceAddr: number;
  eventIdx: boolean;
  indirect: boolean;
  /**
   * Where to resume (SET_VRING_BASE): avail index in bits 0–14, driver wrap counter in bit 15, used index in
   * bits 16–30, device wrap counter in bit 31. Bits 16–31 all zero: used = avail.
   */
  base: number;
  /** Most segments a chain may have (default: queue size + the largest indirect table). */
  maxSegments?: number;
  /**
   * Track chains in flight in this region (INFLIGHT_SHMFD; `descNum` entries, at least the queue size). A region
   * in use says where the ring resumes (it wins over `base`) and which chains run again, ahead of the ring.
   */
  inflight?: { region: Uint8Array; descNum: number } | null;
}

/** A packed ring; devices see it as a {@link Virtqueue}. */
export class PackedQueue implements RingQueue {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  broken: VirtqueueError | null = null;
  disabled = false;
  popped = 0;
  bytesWritten = 0;
  suppressed = 0;

  private memory: GuestMemory;
  private readonly maxSegments: number;
  private readonly descAddr: number;
  private readonly driverAddr: number;
  private readonly deviceAddr: number;

  private desc32!: Uint32Array;
  private desc16!: Uint16Array;
  /** Driver event suppression: [0] off_wrap, [1] flags. */
  private driver16!: Uint16Array;
  /** Device event suppression, ours to write. */
  private device16!: Uint16Array;

  /** Next descriptor to read, and the driver's wrap counter there. */
  private lastAvail: number;
  private availWrap: number;
  /** AVAIL/USED bits of an available descriptor in the current lap. */
  private availFlags: number;
  /** Next used descriptor to write, and our wrap counter there. */
  private usedIdx: number;
  private usedWrap: number;

  /**
   * The batch's first used descriptor, written but not yet flagged: the driver reads used descriptors in order, so
   * while this one is unflagged it sees none of the batch, and the rest are flagged as they are pushed.
   */
  private firstSlot = 0;
  private firstFlags = 0;
  private pendingCount = 0;
  /** Descriptors the pending batch moves the used index by (for the event check). */
  private pendingAdvance = 0;
  private signalledValid = false;
  private eventFlagsWritten = false;
  /** EVENT_DISABLE is in the device event suppression area's flags (written by disableNotification, cleared by enable). */
  private kicksOff = false;

  /** 1 for each buffer id popped and not yet returned: a driver reusing one breaks the ring. */
  private readonly idInFlight: Uint8Array;
  private readonly pool: DescriptorChain[] = [];
  private poolTop = 0;
  private inFlightCount = 0;
  private readonly loc: Location = { buffer: 0, offset: 0, span: 0 };
  private readonly tracker: PackedInflight | null = null;
  /** Head entries (of the inflight region) of chains to run again, served before the ring. */
  private resubmit: Uint16Array = new Uint16Array(0);
  private resubmitPos = 0;
  private savedEntries: Uint16Array = new Uint16Array(0);
  /** Chains found in flight at start (from the inflight region), to run again. */
  readonly recovered: number = 0;
  private log: DirtyLog | null = null;
  private usedLogAddr = -1;

  constructor(cfg: PackedQueueConfig) {
    this.index = cfg.index;
    if (!(Number.isInteger(cfg.size) && cfg.size > 0 && cfg.size <= QUEUE_SIZE_MAX)) {
      throw new VirtqueueError('BAD_RING', cfg.index, `packed queue size ${cfg.size} is not between 1 and ${QUEUE_SIZE_MAX}`);
    }
    this.size = cfg.size;
    this.eventIdx = cfg.eventIdx;
    this.indirect = cfg.indirect;
    this.maxSegments = segmentLimit(cfg.maxSegments, cfg.size, INDIRECT_ENTRIES_MAX, cfg.index);
    this.descAddr = cfg.descAddr;
    this.driverAddr = cfg.driverAddr;
    this.deviceAddr = cfg.deviceAddr;
    const base = cfg.base >>> 0;
    this.lastAvail = base & 0x7fff;
    this.availWrap = (base >>> 15) & 1;
    // Frontends modelled on DPDK's vhost library (which sets used = avail on SET_VRING_BASE) send the avail half
    // only: DPDK virtio-user sends 0x8000 for a new ring. An empty used half is taken the same way; the one full
    // state it misreads (used index 0 in an odd lap with chains in flight) loses nothing inflight tracking keeps.
    const usedHalf = base >>> 16 === 0 ? base & 0xffff : base >>> 16;
    this.usedIdx = usedHalf & 0x7fff;
    this.usedWrap = usedHalf >>> 15;
    if (this.lastAvail >= cfg.size || this.usedIdx >= cfg.size) {
      throw new VirtqueueError(
        'BAD_RING',
        cfg.index,
        `vring base 0x${base.toString(16)} names avail index ${this.lastAvail} and used index ${this.usedIdx}, the ring has ${cfg.size} descriptors`,
      );
    }
    this.availFlags = this.availWrap ? F_AVAIL : F_USED;
    this.idInFlight = new Uint8Array(cfg.size);
    this.memory = cfg.memory;
    this.mapRings(cfg.memory);
    if (cfg.inflight) {
      this.tracker = new PackedInflight(cfg.inflight.region, cfg.inflight.descNum, cfg.size, cfg.index);
      const at = this.tracker.recover(this.desc16, this.usedIdx, this.usedWrap);
      if (at !== null) {
        this.usedIdx = at.usedIdx;
        this.usedWrap = at.usedWrap;
        this.lastAvail = at.availIdx;
        this.availWrap = at.availWrap;
        this.availFlags = this.availWrap ? F_AVAIL : F_USED;
        this.resubmit = at.entries;
        this.recovered = at.entries.length;
        this.savedEntries = new Uint16Array(cfg.size);
      }
    }
  }

  setMemory(memory: GuestMemory): void {
    this.mapRings(memory);
    this.memory = memory;
  }

  get inFlight(): number {
    return this.inFlightCount;
  }

  hasAvailable(): boolean {
    if (this.disabled) return false;
    return (Atomics.load(this.desc16, 8 * this.lastAvail + 7) & AVAIL_USED) === this.availFlags || this.resubmitPos !== this.resubmit.length;
  }

  pop(): DescriptorChain | null {
    // Kept under V8's inlining limit (460 bytes of bytecode), as SplitQueue.pop: see test/virtqueue/inlining.test.ts.
    if (this.disabled || this.broken !== null) return null;
    if (this.resubmitPos !== this.resubmit.length) return this.popResubmitted();
    const slot = this.lastAvail;
    const w = 4 * slot;
    // The acquire: the flags are what the driver writes last; everything else of the chain is read after them.
    const flags = Atomics.load(this.desc16, 2 * w + 7);
    if ((flags & AVAIL_USED) !== this.availFlags) return null;
    const top = this.poolTop === 0 ? this.newChain() : this.poolTop;
    const chain = this.pool[top - 1];
    const memory = this.memory;
    const d32 = this.desc32;
    const len = d32[w + 2];
    const lo = d32[w];
    const hi = d32[w + 1];
    const id = this.desc16[2 * w + 6];
    let off = -1;
    if (
      (flags & (F_NEXT | F_INDIRECT)) === 0 &&
      len > 0 &&
      id < this.size &&
      this.idInFlight[id] === 0 &&
      (off = memory.windowOffset(lo, hi, len)) >= 0
    ) {
      // A lone direct descriptor in one window: nothing to walk, everything already checked.
      chain.resetOne(memory, id, hi * 4294967296 + lo, memory.lastBuffer, off, len, (flags & F_WRITE) !== 0);
      this.advanceAvail(1);
    } else {
      this.walk(chain, slot, flags);
    }
    if (this.tracker !== null) this.tracker.fetched(chain.head, d32, this.desc16, slot, chain.descriptorCount);
    return this.take(chain, top);
  }

  claimWrites(count: number, bytes: number): void {
    // Used elements are written over the descriptors, which are the driver's until popped: only buffers here.
    if (this.disabled || this.broken !== null || this.log !== null || bytes <= 0) return;
    let slot = this.lastAvail;
    let expect = this.availFlags;
    const d32 = this.desc32;
    const d16 = this.desc16;
    for (let k = 0; k < count; k++) {
      const w = 4 * slot;
      const flags = Atomics.load(d16, 2 * w + 7);
      if ((flags & AVAIL_USED) !== expect) return;
      // A longer chain's other descriptors would have to be walked to find the next chain: stop there.
      if ((flags & (F_NEXT | F_INDIRECT | F_WRITE)) !== F_WRITE) return;
      claimLines(this.memory, d32[w], d32[w + 1], d32[w + 2], bytes);
      if (++slot === this.size) {
        slot = 0;
        expect ^= AVAIL_USED;
      }
    }
  }

  /** A validated chain leaves the pool (slot `top` - 1) for the device. */
  private take(chain: DescriptorChain, top: number): DescriptorChain {
    this.idInFlight[chain.head] = 1;
    this.poolTop = top - 1;
    chain.inFlight = true;
    this.inFlightCount++;
    this.popped++;
    return chain;
  }

  push(chain: DescriptorChain, written: number): void {
    if (!chain.inFlight) this.returnedTwice(chain);
    chain.inFlight = false;
    this.inFlightCount--;
    const id = chain.head;
    this.idInFlight[id] = 0;
    if (this.tracker !== null) this.tracker.completed(id);
    if (this.log !== null) this.log.chainWrites(chain, written);
    this.bytesWritten += written;
    const slot = this.usedIdx;
    const w = 4 * slot;
    this.desc16[2 * w + 6] = id;
    this.desc32[w + 2] = written;
    const flags = (this.usedWrap ? AVAIL_USED : 0) | (written > 0 ? F_WRITE : 0);
    if (this.pendingCount++ === 0) {
      this.firstSlot = slot;
      this.firstFlags = flags;
    } else {
      this.desc16[2 * w + 7] = flags;
    }
    const n = chain.descriptorCount;
    this.pendingAdvance += n;
    let next = slot + n;
    if (next >= this.size) {
      next -= this.size;
      this.usedWrap ^= 1;
    }
    this.usedIdx = next;
    this.pool[this.poolTop++] = chain;
  }

  unpop(chain: DescriptorChain): void {
    if (!chain.inFlight) this.returnedTwice(chain);
    chain.inFlight = false;
    this.inFlightCount--;
    this.popped--;
    this.idInFlight[chain.head] = 0;
    if (chain.resubmitted) {
      this.resubmitPos--;
      this.pool[this.poolTop++] = chain;
      return;
    }
    if (this.tracker !== null) this.tracker.returned(chain.head);
    let back = this.lastAvail - chain.descriptorCount;
    if (back < 0) {
      back += this.size;
      this.availWrap ^= 1;
      this.availFlags = this.availWrap ? F_AVAIL : F_USED;
    }
    this.lastAvail = back;
    this.pool[this.poolTop++] = chain;
  }

  publish(): boolean {
    if (this.pendingCount === 0) return false;
    // The batch's first descriptor last, as a full barrier: until this store the driver sees none of the batch,
    // after it all of it.
    if (this.tracker !== null) this.tracker.beforeCommit(this.usedIdx, this.usedWrap);
    Atomics.store(this.desc16, 8 * this.firstSlot + 7, this.firstFlags);
    if (this.tracker !== null) this.tracker.afterCommit();
    if (this.log !== null) this.logRing();
    this.pendingCount = 0;
    const advance = this.pendingAdvance;
    this.pendingAdvance = 0;
    if (this.wantsNotification(advance)) return true;
    this.suppressed++;
    return false;
  }

  /** Whether the driver asked to be notified of a batch that moved the used index by `advance`. */
  private wantsNotification(advance: number): boolean {
    if (!this.signalledValid) {
      // Nothing known of what was signalled before (a new queue, a reconnect): a spurious interrupt is harmless,
      // a missing one stalls the driver.
      this.signalledValid = true;
      return true;
    }
    const mode = Atomics.load(this.driver16, 1);
    if (mode !== EVENT_DESC || !this.eventIdx) return mode !== EVENT_DISABLE;
    // EVENT_IDX: notify when the used index moved past the driver's event offset in this batch. Offsets of the
    // previous lap are taken as negative, so that new - old and new - event compare within one 16-bit window.
    const offWrap = Atomics.load(this.driver16, 0);
    let event = offWrap & 0x7fff;
    if (offWrap >>> 15 !== this.usedWrap) event -= this.size;
    const now = this.usedIdx;
    return ((now - event - 1) & 0xffff) < (advance & 0xffff);
  }

  disableNotification(): void {
    // With EVENT_IDX the driver kicks only when it passes the offset we gave it, which it already has. Otherwise
    // once, with a plain store (a hint, ordering nothing): the runner calls this on every pass.
    if (this.eventIdx || this.kicksOff) return;
    this.kicksOff = true;
    this.device16[1] = EVENT_DISABLE;
  }

  enableNotification(): boolean {
    this.kicksOff = false;
    if (this.eventIdx) {
      Atomics.store(this.device16, 0, this.lastAvail | (this.availWrap << 15));
      if (!this.eventFlagsWritten) {
        Atomics.store(this.device16, 1, EVENT_DESC);
        this.eventFlagsWritten = true;
      }
    } else {
      Atomics.store(this.device16, 1, EVENT_ENABLE);
    }
    return this.hasAvailable();
  }

  setLog(log: DirtyLog | null, usedLogAddr: number): void {
    this.log = log;
    this.usedLogAddr = usedLogAddr;
    this.logRing();
  }

  logRing(): void {
    if (this.log === null || this.usedLogAddr < 0) return;
    // Used descriptors go into the descriptor ring: logged by their own address, not log_guest_addr (which is
    // the Device Area's, where our event suppression writes go).
    this.log.mark(this.descAddr, DESC_SIZE * this.size);
    this.log.mark(this.usedLogAddr, 4);
  }

  vringBase(): number {
    return (this.lastAvail | (this.availWrap << 15) | (this.usedIdx << 16) | (this.usedWrap << 31)) >>> 0;
  }

  private advanceAvail(n: number): void {
    let next = this.lastAvail + n;
    if (next >= this.size) {
      next -= this.size;
      this.availWrap ^= 1;
      this.availFlags = this.availWrap ? F_AVAIL : F_USED;
    }
    this.lastAvail = next;
  }

  /** Walk the chain whose first descriptor is at `first` (its flags `flags`, already seen available). */
  private walk(chain: DescriptorChain, first: number, flags: number): void {
    const size = this.size;
    const d32 = this.desc32;
    const d16 = this.desc16;
    const maxSegments = this.maxSegments;
    chain.reset(this.memory, 0);
    let slot = first;
    let expect = this.availFlags;
    let count = 0;
    let seenWritable = false;
    for (;;) {
      if (++count > size) this.fail('CHAIN_TOO_LONG', `chain at descriptor ${first} is longer than the ${size}-entry ring`);
      const w = 4 * slot;
      if (count > 1) {
        flags = d16[2 * w + 7];
        if ((flags & AVAIL_USED) !== expect) {
          this.fail('NOT_AVAILABLE', `chain at descriptor ${first}: descriptor ${slot} is not available (flags 0x${flags.toString(16)}, wrap counter ${expect === F_AVAIL ? 1 : 0})`);
        }
      }
      if (flags & F_INDIRECT) {
        if (count > 1 || (flags & F_NEXT) !== 0) {
          this.fail('BAD_INDIRECT', `chain at descriptor ${first}: an indirect descriptor must be the only one in its chain`);
        }
        this.walkIndirect(chain, first, d32[w], d32[w + 1], d32[w + 2]);
      } else {
        const writable = (flags & F_WRITE) !== 0;
        if (writable) seenWritable = true;
        else if (seenWritable) this.fail('ORDER', `chain at descriptor ${first}: a device-readable descriptor follows a device-writable one`);
        const len = d32[w + 2];
        if (len > 0) this.addBuffer(chain, this.address(d32[w], d32[w + 1], first), len, writable, first, maxSegments);
      }
      if (++slot === size) {
        slot = 0;
        expect ^= AVAIL_USED;
      }
      if ((flags & F_NEXT) === 0) break;
    }
    const id = d16[2 * (4 * (slot === 0 ? size - 1 : slot - 1)) + 6];
    if (id >= size) this.fail('BAD_ID', `chain at descriptor ${first} has buffer id ${id}, the ring has ${size}`);
    if (this.idInFlight[id] !== 0) this.fail('BAD_ID', `chain at descriptor ${first} reuses buffer id ${id}, which is still in flight`);
    chain.head = id;
    chain.descriptorCount = count;
    // Only now: a chain that fails leaves the ring where it was (it is broken anyway, but GET_VRING_BASE says so).
    this.advanceAvail(count);
  }

  /** The next chain the inflight region held at start: walked from the region's copies of its descriptors. */
  private popResubmitted(): DescriptorChain {
    const tracker = this.tracker!;
    const head = this.resubmit[this.resubmitPos];
    const top = this.poolTop === 0 ? this.newChain() : this.poolTop;
    const chain = this.pool[top - 1];
    const entries = this.savedEntries;
    const n = tracker.chainEntries(head, entries);
    chain.reset(this.memory, 0);
    let seenWritable = false;
    for (let k = 0; k < n; k++) {
      const e = entries[k];
      const flags = tracker.flagsOf(e);
      if (flags & F_INDIRECT) {
        if (n > 1) this.fail('BAD_INDIRECT', `resubmitted chain at inflight entry ${head}: an indirect descriptor must be the only one in its chain`);
        this.walkIndirect(chain, head, tracker.addrLoOf(e), tracker.addrHiOf(e), tracker.lenOf(e));
        continue;
      }
      const writable = (flags & F_WRITE) !== 0;
      if (writable) seenWritable = true;
      else if (seenWritable) this.fail('ORDER', `resubmitted chain at inflight entry ${head}: a device-readable descriptor follows a device-writable one`);
      const len = tracker.lenOf(e);
      if (len > 0) this.addBuffer(chain, this.address(tracker.addrLoOf(e), tracker.addrHiOf(e), head), len, writable, head, this.maxSegments);
    }
    chain.head = tracker.idOf(entries[n - 1]);
    chain.descriptorCount = n;
    chain.resubmitted = true;
    this.resubmitPos++;
    return this.take(chain, top);
  }

  /** The table of a packed indirect descriptor: consecutive entries, of whose flags only WRITE counts. */
  private walkIndirect(chain: DescriptorChain, first: number, lo: number, hi: number, len: number): void {
    if (!this.indirect) this.fail('BAD_INDIRECT', `chain at descriptor ${first} uses an indirect table, but INDIRECT_DESC was not negotiated`);
    if (len === 0 || (len & (DESC_SIZE - 1)) !== 0 || len > DESC_SIZE * INDIRECT_ENTRIES_MAX) {
      this.fail('BAD_INDIRECT', `chain at descriptor ${first}: indirect table of ${len} bytes (need a multiple of 16, at most ${INDIRECT_ENTRIES_MAX} entries)`);
    }
    const gpa = this.address(lo, hi, first);
    const memory = this.memory;
    const loc = this.loc;
    const base = tableWord(memory, loc, gpa, len);
    if (base < 0) this.fail('BAD_INDIRECT', `chain at descriptor ${first}: indirect table at 0x${gpa.toString(16)}+${len} ${tableProblem(base)}`);
    const t32 = memory.words32(loc.buffer);
    const t16 = memory.words16(loc.buffer);
    const maxSegments = this.maxSegments;
    const entries = len >>> 4;
    let seenWritable = false;
    for (let k = 0; k < entries; k++) {
      const w = base + 4 * k;
      const flags = t16[2 * w + 7];
      if (flags & F_INDIRECT) this.fail('BAD_INDIRECT', `chain at descriptor ${first}: an indirect table inside an indirect table`);
      const writable = (flags & F_WRITE) !== 0;
      if (writable) seenWritable = true;
      else if (seenWritable) this.fail('ORDER', `chain at descriptor ${first}: a device-readable descriptor follows a device-writable one`);
      const n = t32[w + 2];
      if (n > 0) this.addBuffer(chain, this.address(t32[w], t32[w + 1], first), n, writable, first, maxSegments);
    }
  }

  private addBuffer(chain: DescriptorChain, gpa: number, len: number, writable: boolean, first: number, maxSegments: number): void {
    const status = appendBuffer(chain, this.memory, this.loc, gpa, len, writable, maxSegments);
    if (status === OUTSIDE_MEMORY) {
      this.fail('BAD_BUFFER', `chain at descriptor ${first}: buffer 0x${gpa.toString(16)}+${len} is outside guest memory or crosses a region boundary`);
    }
    if (status === TOO_MANY_SEGMENTS) this.fail('CHAIN_TOO_LONG', `chain at descriptor ${first} has more than ${maxSegments} segments`);
  }

  private address(lo: number, hi: number, first: number): number {
    if (hi > 0x1fffff) this.fail('BAD_BUFFER', `chain at descriptor ${first}: buffer address beyond 2^53`);
    return hi * 4294967296 + lo;
  }

  private newChain(): number {
    this.pool[this.poolTop++] = new DescriptorChain();
    return this.poolTop;
  }

  private returnedTwice(chain: DescriptorChain): never {
    throw new VirtqueueError('BAD_USED', this.index, `chain with buffer id ${chain.head} was returned twice`);
  }

  private fail(code: VirtqueueError['code'], message: string): never {
    this.broken = new VirtqueueError(code, this.index, message);
    throw this.broken;
  }

  private mapRings(memory: GuestMemory): void {
    const q = this.index;
    this.desc32 = ringView(memory, q, this.descAddr, DESC_SIZE * this.size, 16, 'descriptor ring', Uint32Array);
    this.desc16 = new Uint16Array(this.desc32.buffer, this.desc32.byteOffset, 8 * this.size);
    this.driver16 = ringView(memory, q, this.driverAddr, 4, 4, 'driver event suppression area', Uint16Array);
    this.device16 = ringView(memory, q, this.deviceAddr, 4, 4, 'device event suppression area', Uint16Array);
  }
}
