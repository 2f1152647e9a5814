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

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
export const VIRTQ_USED_F_NO_NOTIFY = 1;
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
export const MAX_QUEUE_SIZE = 32768;
/** Largest indirect table we accept (entries). Linux may exceed the queue size with indirect tables. */
export const MAX_INDIRECT_ENTRIES = 4096;

const DESC_SIZE = 16;

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
}

export class SplitQueue {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  /** Next avail ring slot to read. */
  lastAvailIdx: number;
  /** Next used ring slot to write (our shadow of used->idx). */
  usedIdx: number;
  /** Set when a chain failed validation; the queue must be reset before it serves again. */
  broken: VirtqueueError | null = null;

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

  private readonly pool: DescriptorChain[] = [];
  private shadowAvailIdx: number;
  private signalledUsed = 0;
  private signalledUsedValid = false;
  private readonly loc: Location = { buffer: 0, offset: 0, span: 0 };
  private inFlightCount = 0;
  private publishedIdx = 0;

  constructor(cfg: SplitQueueConfig) {
    this.index = cfg.index;
    if (!(cfg.size > 0 && cfg.size <= MAX_QUEUE_SIZE && (cfg.size & (cfg.size - 1)) === 0)) {
      throw new VirtqueueError('BAD_RING', cfg.index, `queue size ${cfg.size} is not a power of 2 up to ${MAX_QUEUE_SIZE}`);
    }
    this.size = cfg.size;
    this.mask = cfg.size - 1;
    this.eventIdx = cfg.eventIdx;
    this.indirect = cfg.indirect;
    this.maxSegments = cfg.maxSegments ?? cfg.size + MAX_INDIRECT_ENTRIES;
    this.descAddr = cfg.descAddr;
    this.availAddr = cfg.availAddr;
    this.usedAddr = cfg.usedAddr;
    this.lastAvailIdx = cfg.lastAvailIdx & 0xffff;
    this.shadowAvailIdx = this.lastAvailIdx;
    this.memory = cfg.memory;
    this.mapRings(cfg.memory);
    this.usedIdx = Atomics.load(this.used16, 1);
    this.publishedIdx = this.usedIdx;
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
    return Atomics.load(this.avail16, 1) !== this.lastAvailIdx;
  }

  /**
   * The next available chain, or null when the avail ring is empty. Throws VirtqueueError (and marks the queue
   * broken) when the guest broke the rules; the chain's slot is consumed either way.
   */
  pop(): DescriptorChain | null {
    if (this.broken) return null;
    if (this.shadowAvailIdx === this.lastAvailIdx) {
      const idx = Atomics.load(this.avail16, 1);
      if (idx === this.lastAvailIdx) return null;
      if (((idx - this.lastAvailIdx) & 0xffff) > this.size) {
        return this.fail('AVAIL_IDX', `avail idx moved from ${this.lastAvailIdx} to ${idx}, more than the queue size ${this.size}`);
      }
      this.shadowAvailIdx = idx;
    }
    const head = this.avail16[2 + (this.lastAvailIdx & this.mask)];
    this.lastAvailIdx = (this.lastAvailIdx + 1) & 0xffff;
    if (head >= this.size) return this.fail('BAD_HEAD', `avail ring names descriptor ${head}, the table has ${this.size}`);
    const chain = this.pool.pop() ?? new DescriptorChain();
    chain.reset(this.memory, head);
    try {
      this.walk(chain, head);
    } catch (e) {
      this.pool.push(chain);
      if (e instanceof VirtqueueError) {
        this.broken = e;
        throw e;
      }
      throw e;
    }
    chain.inFlight = true;
    this.inFlightCount++;
    return chain;
  }

  /**
   * Return a chain to the driver with `written` bytes written into its writable part. Not visible to the driver
   * until {@link publish}.
   */
  push(chain: DescriptorChain, written: number): void {
    if (!chain.inFlight) throw new VirtqueueError('BAD_USED', this.index, `chain ${chain.head} was returned twice`);
    chain.inFlight = false;
    this.inFlightCount--;
    const slot = this.usedIdx & this.mask;
    this.used32[1 + 2 * slot] = chain.head;
    this.used32[2 + 2 * slot] = written;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.pool.push(chain);
  }

  /** Return a chain unused: the driver will not see it; the next pop yields it again (avail slot rewound). */
  unpop(chain: DescriptorChain): void {
    if (!chain.inFlight) throw new VirtqueueError('BAD_USED', this.index, `chain ${chain.head} was returned twice`);
    chain.inFlight = false;
    this.inFlightCount--;
    this.lastAvailIdx = (this.lastAvailIdx - 1) & 0xffff;
    this.pool.push(chain);
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
    if (!this.eventIdx) return (Atomics.load(this.avail16, 0) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
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
    if (!this.eventIdx) Atomics.store(this.used16, 0, VIRTQ_USED_F_NO_NOTIFY);
  }

  /**
   * Ask the driver to kick for the next chain, then check whether one slipped in meanwhile. Returns true when
   * there is more work: keep processing instead of sleeping, or a kick may be lost.
   */
  enableNotification(): boolean {
    if (this.eventIdx) Atomics.store(this.used16, 2 + 4 * this.size, this.lastAvailIdx);
    else Atomics.store(this.used16, 0, 0);
    return this.hasAvailable();
  }

  /** After a guest-memory reconnect: forget what was signalled, so the next publish notifies. */
  resetSignalled(): void {
    this.signalledUsedValid = false;
  }

  private fail(code: VirtqueueError['code'], message: string): never {
    this.broken = new VirtqueueError(code, this.index, message);
    throw this.broken;
  }

  private walk(chain: DescriptorChain, head: number): void {
    // Descriptors are read through 32- and 16-bit views; an indirect table switches the views to the guest
    // memory window holding it (word views cached by GuestMemory), so walking allocates nothing.
    let d32 = this.desc32;
    let d16 = this.desc16;
    let base = 0; // index of the table's first u32 in d32
    let tableSize = this.size;
    let i = head;
    let visited = 0;
    let seenWritable = false;
    let inIndirect = false;
    for (;;) {
      if (++visited > tableSize) {
        this.fail('CHAIN_LOOP', `chain from head ${head} visits more than ${tableSize} descriptors: it loops`);
      }
      const w = base + 4 * i;
      const flags = d16[2 * w + 6];
      const lo = d32[w];
      const hi = d32[w + 1];
      const len = d32[w + 2];
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (inIndirect) this.fail('BAD_INDIRECT', `chain from head ${head}: an indirect table inside an indirect table`);
        if (!this.indirect) this.fail('BAD_INDIRECT', `chain from head ${head} uses an indirect table, but INDIRECT_DESC was not negotiated`);
        if (i !== head || flags & VIRTQ_DESC_F_NEXT) {
          this.fail('BAD_INDIRECT', `chain from head ${head}: an indirect descriptor must be the only one in its chain`);
        }
        if (len === 0 || len % DESC_SIZE !== 0 || len / DESC_SIZE > MAX_INDIRECT_ENTRIES) {
          this.fail('BAD_INDIRECT', `chain from head ${head}: indirect table of ${len} bytes (need a multiple of 16, at most ${MAX_INDIRECT_ENTRIES} entries)`);
        }
        const gpa = this.address(lo, hi, head);
        const loc = this.loc;
        if (!this.memory.locate(gpa, len, loc) || len > loc.span) {
          this.fail('BAD_INDIRECT', `chain from head ${head}: indirect table at 0x${gpa.toString(16)}+${len} is not in one mapped range`);
        }
        const byteOffset = this.memory.buffers[loc.buffer].byteOffset + loc.offset;
        if (byteOffset % 4 !== 0) {
          this.fail('BAD_INDIRECT', `chain from head ${head}: indirect table at 0x${gpa.toString(16)} is not 4-byte aligned`);
        }
        d32 = this.memory.words32(loc.buffer);
        d16 = this.memory.words16(loc.buffer);
        base = byteOffset / 4;
        tableSize = len / DESC_SIZE;
        inIndirect = true;
        i = 0;
        visited = 0;
        continue;
      }
      const writable = (flags & VIRTQ_DESC_F_WRITE) !== 0;
      if (writable) seenWritable = true;
      else if (seenWritable) {
        this.fail('ORDER', `chain from head ${head}: a device-readable descriptor follows a device-writable one`);
      }
      if (len > 0) this.addBuffer(chain, this.address(lo, hi, head), len, writable, head);
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) return;
      i = d16[2 * w + 7];
      if (i >= tableSize) this.fail('BAD_NEXT', `chain from head ${head}: next index ${i} is outside the ${tableSize}-entry table`);
    }
  }

  private address(lo: number, hi: number, head: number): number {
    if (hi > 0x1fffff) this.fail('BAD_BUFFER', `chain from head ${head}: buffer address beyond 2^53`);
    return hi * 4294967296 + lo;
  }

  private addBuffer(chain: DescriptorChain, gpa: number, len: number, writable: boolean, head: number): void {
    const loc = this.loc;
    if (!this.memory.locate(gpa, len, loc)) {
      this.fail('BAD_BUFFER', `chain from head ${head}: buffer 0x${gpa.toString(16)}+${len} is outside guest memory or crosses a region boundary`);
    }
    // A buffer may straddle mapping windows of one region: one segment per window.
    let left = len;
    for (;;) {
      const n = left < loc.span ? left : loc.span;
      if (chain.count >= this.maxSegments) {
        this.fail('CHAIN_TOO_LONG', `chain from head ${head} has more than ${this.maxSegments} segments`);
      }
      chain.addSegment(loc.buffer, loc.offset, n, writable);
      left -= n;
      if (left === 0) return;
      loc.buffer++;
      loc.offset = 0;
      loc.span = this.memory.buffers[loc.buffer].length;
    }
  }

  private mapRings(memory: GuestMemory): void {
    const n = this.size;
    this.desc32 = this.ringView(memory, this.descAddr, DESC_SIZE * n, 16, 'descriptor table', Uint32Array);
    this.desc16 = new Uint16Array(this.desc32.buffer, this.desc32.byteOffset, (DESC_SIZE * n) / 2);
    this.avail16 = this.ringView(memory, this.availAddr, 6 + 2 * n, 2, 'avail ring', Uint16Array);
    const usedBytes = 6 + 8 * n;
    this.used32 = this.ringView(memory, this.usedAddr, usedBytes - 2, 4, 'used ring', Uint32Array);
    this.used16 = new Uint16Array(this.used32.buffer, this.used32.byteOffset, usedBytes / 2);
  }

  private ringView<T extends Uint16Array | Uint32Array>(
    memory: GuestMemory,
    gpa: number,
    bytes: number,
    align: number,
    what: string,
    Ctor: { new (buffer: ArrayBufferLike, byteOffset: number, length: number): T; BYTES_PER_ELEMENT: number },
  ): T {
    if (gpa % align !== 0) {
      throw new VirtqueueError('BAD_RING', this.index, `${what} at 0x${gpa.toString(16)} is not ${align}-byte aligned`);
    }
    let view: Uint8Array;
    try {
      view = memory.slice(gpa, bytes);
    } catch (e) {
      throw new VirtqueueError('BAD_RING', this.index, `${what} at 0x${gpa.toString(16)}+${bytes}: ${(e as Error).message}`);
    }
    if ((view.byteOffset & (Ctor.BYTES_PER_ELEMENT - 1)) !== 0) {
      throw new VirtqueueError('BAD_RING', this.index, `${what} at 0x${gpa.toString(16)} is misaligned in our mapping`);
    }
    return new Ctor(view.buffer, view.byteOffset, Math.floor(bytes / Ctor.BYTES_PER_ELEMENT));
  }
}
