/**
 * The device side of a split virtqueue (virtio 1.2 §2.7): pops descriptor chains from the avail ring, validates
 * everything the guest controls, and publishes used elements in batches.
 *
 * Ring memory is read through typed arrays laid over guest memory; idx fields go through Atomics so the JIT keeps
 * the orderings the protocol relies on (x86 stores are ordered; Atomics.store is a full barrier, which is what
 * the store-then-load checks of EVENT_IDX need).
 *
 * Every guest-controlled value is checked before use: a bad chain throws VirtqueueError and the queue stays
 * broken until it is reset; nothing outside guest memory is ever touched.
 */
import { DescriptorChain } from './chain.js';
import { VirtqueueError } from './errors.js';
import type { GuestMemory, Location } from './guest-memory.js';
import type { DirtyLog } from './dirty-log.js';
import { SplitInflight } from './inflight-split.js';
import { appendBuffer, claimLines, OUTSIDE_MEMORY, ringView, segmentLimit, tableProblem, tableWord, TOO_MANY_SEGMENTS } from './ring-memory.js';
import type { RingQueue } from './virtqueue.js';

// The code below uses these module-private names: V8 folds a module's own non-exported consts into compiled
// code, but reads an exported binding from its cell, with a TDZ check, at every use.
const F_NEXT = 1;
const F_WRITE = 2;
const F_INDIRECT = 4;
const USED_F_NO_NOTIFY = 1;
const AVAIL_F_NO_INTERRUPT = 1;
const QUEUE_SIZE_MAX = 32768;
const INDIRECT_ENTRIES_MAX = 4096;
const DESC_SIZE = 16;

export const VIRTQ_DESC_F_NEXT = F_NEXT;
export const VIRTQ_DESC_F_WRITE = F_WRITE;
export const VIRTQ_DESC_F_INDIRECT = F_INDIRECT;
export const VIRTQ_USED_F_NO_NOTIFY = USED_F_NO_NOTIFY;
export const VIRTQ_AVAIL_F_NO_INTERRUPT = AVAIL_F_NO_INTERRUPT;
export const MAX_QUEUE_SIZE = QUEUE_SIZE_MAX;
/** Largest indirect table we accept (entries). Linux may exceed the queue size with indirect tables. */
export const MAX_INDIRECT_ENTRIES = INDIRECT_ENTRIES_MAX;

export interface SplitQueueConfig {
  /** Queue index, for error messages. */
  index: number;
  /** Number of descriptors: a power of 2, at most 32768. */
  size: number;
  memory: GuestMemory;
  /** Guest-physical addresses of the three rings. */
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  eventIdx: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated. */
  indirect: boolean;
  /** Where to resume in the avail ring (SET_VRING_BASE). */
  lastAvailIdx: number;
  /** Most segments a chain may have (default: queue size + MAX_INDIRECT_ENTRIES). */
  maxSegments?: number;
  /**
   * Track chains in flight in this region (INFLIGHT_SHMFD; `descNum` entries, at least the queue size), and run
   * again the chains it holds from before a restart, ahead of the avail ring.
   */
  inflight?: { region: Uint8Array; descNum: number } | null;
}

/** A split ring; devices see it as a {@link Virtqueue}. */
export class SplitQueue implements RingQueue {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  /** Set when a chain failed validation; the queue must be reset before it serves again. */
  broken: VirtqueueError | null = null;
  disabled = false;
  popped = 0;
  bytesWritten = 0;
  suppressed = 0;

  /** Next avail ring slot to read. */
  private lastAvailIdx: number;
  /** Next used ring slot to write (our shadow of used->idx). */
  private usedIdx: number;

  private memory: GuestMemory;
  private readonly mask: number;
  private readonly maxSegments: number;
  private readonly descAddr: number;
  private readonly availAddr: number;
  private readonly usedAddr: number;

  // Ring views (rebuilt by setMemory).
  private desc32!: Uint32Array;
  private desc16!: Uint16Array;
  private avail16!: Uint16Array;
  private used16!: Uint16Array;
  private used32!: Uint32Array;

  // Free chains are pool[0 .. poolTop). A stack with its own top rather than Array pop/push: pop() validates
  // into the top chain and only then takes it, so a bad chain needs no try/catch to go back.
  private readonly pool: DescriptorChain[] = [];
  private poolTop = 0;
  private shadowAvailIdx: number;
  private signalledUsed = 0;
  private signalledUsedValid = false;
  private readonly loc: Location = { buffer: 0, offset: 0, span: 0 };
  private inFlightCount = 0;
  private publishedIdx = 0;
  private readonly tracker: SplitInflight | null = null;
  /** Heads the inflight region held at start, served before the avail ring; resubmitPos is the next one. */
  private resubmit: Uint16Array = new Uint16Array(0);
  private resubmitPos = 0;
  /** Chains found in flight at start (from the inflight region), to run again. */
  readonly recovered: number = 0;
  private log: DirtyLog | null = null;
  private usedLogAddr = -1;
  /** VIRTQ_USED_F_NO_NOTIFY is in the used ring's flags (written by disableNotification, cleared by enable). */
  private kicksOff = false;

  constructor(cfg: SplitQueueConfig) {
    this.index = cfg.index;
    if (!(cfg.size > 0 && cfg.size <= QUEUE_SIZE_MAX && (cfg.size & (cfg.size - 1)) === 0)) {
      throw new VirtqueueError('BAD_RING', cfg.index, `queue size ${cfg.size} is not a power of 2 up to ${QUEUE_SIZE_MAX}`);
    }
    this.size = cfg.size;
    this.mask = cfg.size - 1;
    this.eventIdx = cfg.eventIdx;
    this.indirect = cfg.indirect;
    this.maxSegments = segmentLimit(cfg.maxSegments, cfg.size, INDIRECT_ENTRIES_MAX, cfg.index);
    this.descAddr = cfg.descAddr;
    this.availAddr = cfg.availAddr;
    this.usedAddr = cfg.usedAddr;
    this.lastAvailIdx = cfg.lastAvailIdx & 0xffff;
    this.shadowAvailIdx = this.lastAvailIdx;
    this.memory = cfg.memory;
    this.mapRings(cfg.memory);
    this.usedIdx = Atomics.load(this.used16, 1);
    this.publishedIdx = this.usedIdx;
    if (cfg.inflight) {
      this.tracker = new SplitInflight(cfg.inflight.region, cfg.inflight.descNum, cfg.index);
      this.resubmit = this.tracker.recover(this.usedIdx, this.size);
      this.recovered = this.resubmit.length;
      // Every chain taken from the avail ring is either in the used ring or in flight: the avail ring resumes
      // after both, whatever base the frontend sent (QEMU rewinds a crashed backend's ring to used->idx).
      this.lastAvailIdx = (this.usedIdx + this.recovered) & 0xffff;
      this.shadowAvailIdx = this.lastAvailIdx;
    }
  }

  /** Swap in a new memory table (the rings must still be mapped in it). Chains popped earlier keep the old one. */
  setMemory(memory: GuestMemory): void {
    this.mapRings(memory);
    this.memory = memory;
  }

  /** Chains popped and not yet pushed back. */
  get inFlight(): number {
    return this.inFlightCount;
  }

  /** Whether the driver has made chains available that we have not popped. */
  hasAvailable(): boolean {
    if (this.disabled) return false;
    return Atomics.load(this.avail16, 1) !== this.lastAvailIdx || this.resubmitPos !== this.resubmit.length;
  }

  /**
   * The next available chain, or null when the avail ring is empty. Throws VirtqueueError (and marks the queue
   * broken) when the guest broke the rules; the chain's slot is consumed either way.
   */
  pop(): DescriptorChain | null {
    // Kept under V8's inlining limit of 460 bytes of bytecode (the rest is in refill, badHead, newChain and walk),
    // so that pop is inlined into the device's loop: test/virtqueue/inlining.test.ts measures it.
    if (this.disabled || this.broken !== null) return null;
    if (this.resubmitPos !== this.resubmit.length) return this.popResubmitted();
    const last = this.lastAvailIdx;
    if (this.shadowAvailIdx === last && !this.refill(last)) return null;
    const head = this.avail16[2 + (last & this.mask)];
    this.lastAvailIdx = (last + 1) & 0xffff;
    if (head >= this.size) this.badHead(head);
    const top = this.poolTop === 0 ? this.newChain() : this.poolTop;
    const chain = this.pool[top - 1];
    const memory = this.memory;
    const w = 4 * head;
    const flags = this.desc16[2 * w + 6];
    const d32 = this.desc32;
    const len = d32[w + 2];
    const lo = d32[w];
    const hi = d32[w + 1];
    let off = -1;
    if ((flags & (F_NEXT | F_INDIRECT)) === 0 && len > 0 && (off = memory.windowOffset(lo, hi, len)) >= 0) {
      // A lone direct descriptor whose buffer lies in one window (most requests of most devices) skips walk():
      // it cannot loop, be out of order or name another descriptor, and its buffer has just been checked.
      chain.resetOne(memory, head, hi * 4294967296 + lo, memory.lastBuffer, off, len, (flags & F_WRITE) !== 0);
    } else {
      this.walk(chain, head, flags);
    }
    if (this.tracker !== null) this.tracker.fetched(head);
    // Only now is the chain taken from the pool: when validation throws, the pool is left as it was.
    this.poolTop = top - 1;
    chain.inFlight = true;
    this.inFlightCount++;
    this.popped++;
    return chain;
  }

  /** The next chain the inflight region says was in flight before the restart (already marked inflight). */
  private popResubmitted(): DescriptorChain {
    const head = this.resubmit[this.resubmitPos];
    const top = this.poolTop === 0 ? this.newChain() : this.poolTop;
    const chain = this.pool[top - 1];
    this.walk(chain, head, this.desc16[8 * head + 6]);
    this.resubmitPos++;
    chain.resubmitted = true;
    this.poolTop = top - 1;
    chain.inFlight = true;
    this.inFlightCount++;
    this.popped++;
    return chain;
  }

  /** The avail ring looked drained at `last`: read the driver's idx. False when it really is empty. */
  private refill(last: number): boolean {
    const idx = Atomics.load(this.avail16, 1);
    if (idx === last) return false;
    if (((idx - last) & 0xffff) > this.size) {
      this.fail('AVAIL_IDX', `avail idx moved from ${last} to ${idx}, more than the queue size ${this.size}`);
    }
    this.shadowAvailIdx = idx;
    return true;
  }

  private returnedTwice(chain: DescriptorChain): never {
    throw new VirtqueueError('BAD_USED', this.index, `chain ${chain.head} was returned twice`);
  }

  private badHead(head: number): never {
    return this.fail('BAD_HEAD', `avail ring names descriptor ${head}, the table has ${this.size}`);
  }

  /** Grow the pool by one chain (more chains in flight than ever before); returns the new poolTop. */
  private newChain(): number {
    this.pool[this.poolTop++] = new DescriptorChain();
    return this.poolTop;
  }

  /**
   * Return a chain to the driver with `written` bytes written into its writable part. Not visible to the driver
   * until {@link publish}.
   */
  push(chain: DescriptorChain, written: number): void {
    if (!chain.inFlight) this.returnedTwice(chain);
    chain.inFlight = false;
    this.inFlightCount--;
    const used = this.usedIdx;
    const u32 = this.used32;
    const at = 1 + 2 * (used & this.mask);
    u32[at] = chain.head;
    u32[at + 1] = written;
    if (this.tracker !== null) this.tracker.completed(chain.head);
    if (this.log !== null) this.log.chainWrites(chain, written);
    this.bytesWritten += written;
    this.usedIdx = (used + 1) & 0xffff;
    this.pool[this.poolTop++] = chain;
  }

  claimWrites(count: number, bytes: number): void {
    if (this.disabled || this.broken !== null || this.log !== null) return;
    const last = this.lastAvailIdx;
    // Atomics: the avail entries and descriptors read below must be at least as new as this idx (a stale head
    // would name a buffer the driver has since taken back).
    const avail = (Atomics.load(this.avail16, 1) - last) & 0xffff;
    if (avail > this.size) return; // pop() reports the bad idx
    // The used elements the next pushes fill, a store per line (every 8 elements) and the last. Only as many as
    // there are chains in flight or available: a slot further on may still hold an element the driver has not
    // read (a driver lagging behind can only have made that many chains available since).
    const u32 = this.used32;
    const used = this.usedIdx;
    let u = this.inFlightCount + avail;
    if (u > count) u = count;
    for (let k = 0; k < u; k += 8) u32[1 + 2 * ((used + k) & this.mask)] = 0;
    if (u > 0) u32[1 + 2 * ((used + u - 1) & this.mask)] = 0;
    const n = avail < count ? avail : count;
    if (bytes <= 0) return;
    const d32 = this.desc32;
    const d16 = this.desc16;
    for (let k = 0; k < n; k++) {
      const head = this.avail16[2 + ((last + k) & this.mask)];
      if (head >= this.size) return;
      const w = 4 * head;
      if ((d16[2 * w + 6] & (F_NEXT | F_INDIRECT | F_WRITE)) === F_WRITE) claimLines(this.memory, d32[w], d32[w + 1], d32[w + 2], bytes);
    }
  }

  /** Return a chain unused: the driver will not see it; the next pop yields it again (avail slot rewound). */
  unpop(chain: DescriptorChain): void {
    if (!chain.inFlight) this.returnedTwice(chain);
    chain.inFlight = false;
    this.inFlightCount--;
    this.popped--;
    if (chain.resubmitted) this.resubmitPos--;
    else {
      this.lastAvailIdx = (this.lastAvailIdx - 1) & 0xffff;
      if (this.tracker !== null) this.tracker.returned(chain.head);
    }
    this.pool[this.poolTop++] = chain;
  }

  /**
   * Make pushed chains visible (store used idx) and say whether the driver wants a notification for them,
   * honouring EVENT_IDX (used_event) or VIRTQ_AVAIL_F_NO_INTERRUPT.
   */
  publish(): boolean {
    const now = this.usedIdx;
    if (now === this.publishedIdx) return false;
    this.publishedIdx = now;
    Atomics.store(this.used16, 1, now); // full barrier: the reads below see the driver's latest state
    if (this.tracker !== null) this.tracker.published(now);
    if (this.log !== null) this.logRing();
    if (this.wantsNotification(now)) return true;
    this.suppressed++;
    return false;
  }

  private wantsNotification(now: number): boolean {
    if (!this.eventIdx) return (Atomics.load(this.avail16, 0) & AVAIL_F_NO_INTERRUPT) === 0;
    const old = this.signalledUsed;
    const valid = this.signalledUsedValid;
    this.signalledUsed = now;
    this.signalledUsedValid = true;
    if (!valid) return true;
    const usedEvent = Atomics.load(this.avail16, 2 + this.size);
    return ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
  }

  /** Ask the driver not to kick while we are busy (no-op with EVENT_IDX, where avail_event does the job). */
  disableNotification(): void {
    // Once: the runner calls this on every pass, and each store would pull the line of used idx, which a polling
    // driver keeps reading, back to this CPU. A plain store: it is a hint, and orders nothing.
    if (this.eventIdx || this.kicksOff) return;
    this.kicksOff = true;
    this.used16[0] = USED_F_NO_NOTIFY;
  }

  /**
   * Ask the driver to kick for the next chain, then check whether one slipped in meanwhile. Returns true when
   * there is more work: keep processing instead of sleeping, or a kick may be lost.
   */
  enableNotification(): boolean {
    this.kicksOff = false;
    if (this.eventIdx) Atomics.store(this.used16, 2 + 4 * this.size, this.lastAvailIdx);
    else Atomics.store(this.used16, 0, 0);
    return this.hasAvailable();
  }

  setLog(log: DirtyLog | null, usedLogAddr: number): void {
    this.log = log;
    this.usedLogAddr = usedLogAddr;
    this.logRing();
  }

  logRing(): void {
    // The whole used ring (flags, idx, elements, avail_event): a page or two, and what we write between
    // publishes (flags, avail_event) is covered too.
    if (this.log !== null && this.usedLogAddr >= 0) this.log.mark(this.usedLogAddr, 6 + 8 * this.size);
  }

  /** After a guest-memory reconnect: forget what was signalled, so the next publish notifies. */
  resetSignalled(): void {
    this.signalledUsedValid = false;
  }

  /** The next avail index: where a restarted queue resumes (GET_VRING_BASE). */
  vringBase(): number {
    return this.lastAvailIdx;
  }

  private fail(code: VirtqueueError['code'], message: string): never {
    this.broken = new VirtqueueError(code, this.index, message);
    throw this.broken;
  }

  /** Everything but a lone in-window descriptor: walk the chain from `head` (whose flags are `flags`) into `chain`. */
  private walk(chain: DescriptorChain, head: number, flags: number): void {
    chain.reset(this.memory, head);
    if (flags & F_INDIRECT) this.walkIndirect(chain, head);
    else this.walkTable(chain, head, this.desc32, this.desc16, 0, this.size, head, false);
  }

  /** Validate the indirect head descriptor `head` and walk its table into `chain`. */
  private walkIndirect(chain: DescriptorChain, head: number): void {
    // Separate from walkTable so that the table loop has the same type feedback and compiled code whether it
    // walks the ring's table or an indirect one: a program that meets indirect chains only after many direct
    // ones (or the reverse) keeps the loop's code instead of recompiling it around a newly taken branch.
    const d32 = this.desc32;
    const w = 4 * head;
    const flags = this.desc16[2 * w + 6];
    if (!this.indirect) this.fail('BAD_INDIRECT', `chain from head ${head} uses an indirect table, but INDIRECT_DESC was not negotiated`);
    if (flags & F_NEXT) {
      this.fail('BAD_INDIRECT', `chain from head ${head}: an indirect descriptor must be the only one in its chain`);
    }
    const len = d32[w + 2];
    if (len === 0 || (len & (DESC_SIZE - 1)) !== 0 || len > DESC_SIZE * INDIRECT_ENTRIES_MAX) {
      this.fail('BAD_INDIRECT', `chain from head ${head}: indirect table of ${len} bytes (need a multiple of 16, at most ${INDIRECT_ENTRIES_MAX} entries)`);
    }
    const gpa = this.address(d32[w], d32[w + 1], head);
    const memory = this.memory;
    const loc = this.loc;
    const word = tableWord(memory, loc, gpa, len);
    if (word < 0) this.fail('BAD_INDIRECT', `chain from head ${head}: indirect table at 0x${gpa.toString(16)}+${len} ${tableProblem(word)}`);
    this.walkTable(chain, head, memory.words32(loc.buffer), memory.words16(loc.buffer), word, len >>> 4, 0, true);
  }

  /**
   * Walk the chain starting at entry `first` of a descriptor table (entry k at word `base + 4k` of `d32`, with
   * `d16` over the same bytes) into `chain`. `indirect`: the table is an indirect one, where a further indirect
   * descriptor is nesting.
   */
  private walkTable(
    chain: DescriptorChain,
    head: number,
    d32: Uint32Array,
    d16: Uint16Array,
    base: number,
    tableSize: number,
    first: number,
    indirect: boolean,
  ): void {
    const memory = this.memory;
    const maxSegments = this.maxSegments;
    let i = first;
    let visited = 0;
    let seenWritable = false;
    for (;;) {
      if (++visited > tableSize) {
        this.fail('CHAIN_LOOP', `chain from head ${head} visits more than ${tableSize} descriptors: it loops`);
      }
      const w = base + 4 * i;
      const flags = d16[2 * w + 6];
      if (flags & F_INDIRECT) this.misplacedIndirect(head, indirect);
      const writable = (flags & F_WRITE) !== 0;
      if (writable) seenWritable = true;
      else if (seenWritable) {
        this.fail('ORDER', `chain from head ${head}: a device-readable descriptor follows a device-writable one`);
      }
      const len = d32[w + 2];
      if (len > 0) {
        const hi = d32[w + 1];
        const gpa = hi * 4294967296 + d32[w];
        // The buffers of a request are usually in the window of the previous one: an offset, no out-object.
        const off = hi <= 0x1fffff && chain.count < maxSegments ? memory.offsetInLastWindow(gpa, len) : -1;
        if (off >= 0) chain.addSegment(gpa, memory.lastBuffer, off, len, writable);
        // Elsewhere, straddling windows, or bad: addBuffer locates it, splits it, or throws the precise error.
        else this.addBuffer(chain, this.address(d32[w], hi, head), len, writable, head);
      }
      if ((flags & F_NEXT) === 0) {
        if (!indirect) chain.descriptorCount = visited;
        return;
      }
      i = d16[2 * w + 7];
      if (i >= tableSize) this.fail('BAD_NEXT', `chain from head ${head}: next index ${i} is outside the ${tableSize}-entry table`);
    }
  }

  /** An indirect descriptor that is not the head of a chain in the ring's table. */
  private misplacedIndirect(head: number, inIndirect: boolean): never {
    if (inIndirect) this.fail('BAD_INDIRECT', `chain from head ${head}: an indirect table inside an indirect table`);
    if (!this.indirect) this.fail('BAD_INDIRECT', `chain from head ${head} uses an indirect table, but INDIRECT_DESC was not negotiated`);
    return this.fail('BAD_INDIRECT', `chain from head ${head}: an indirect descriptor must be the only one in its chain`);
  }

  private address(lo: number, hi: number, head: number): number {
    if (hi > 0x1fffff) this.fail('BAD_BUFFER', `chain from head ${head}: buffer address beyond 2^53`);
    return hi * 4294967296 + lo;
  }

  private addBuffer(chain: DescriptorChain, gpa: number, len: number, writable: boolean, head: number): void {
    const status = appendBuffer(chain, this.memory, this.loc, gpa, len, writable, this.maxSegments);
    if (status === OUTSIDE_MEMORY) {
      this.fail('BAD_BUFFER', `chain from head ${head}: buffer 0x${gpa.toString(16)}+${len} is outside guest memory or crosses a region boundary`);
    }
    if (status === TOO_MANY_SEGMENTS) this.fail('CHAIN_TOO_LONG', `chain from head ${head} has more than ${this.maxSegments} segments`);
  }

  private mapRings(memory: GuestMemory): void {
    const n = this.size;
    const q = this.index;
    this.desc32 = ringView(memory, q, this.descAddr, DESC_SIZE * n, 16, 'descriptor table', Uint32Array);
    this.desc16 = new Uint16Array(this.desc32.buffer, this.desc32.byteOffset, (DESC_SIZE * n) / 2);
    this.avail16 = ringView(memory, q, this.availAddr, 6 + 2 * n, 2, 'avail ring', Uint16Array);
    const usedBytes = 6 + 8 * n;
    this.used32 = ringView(memory, q, this.usedAddr, usedBytes - 2, 4, 'used ring', Uint32Array);
    this.used16 = new Uint16Array(this.used32.buffer, this.used32.byteOffset, usedBytes / 2);
  }
}
