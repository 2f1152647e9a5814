/**
 * A descriptor chain as the device sees it: device-readable segments first, then device-writable ones, each a
 * zero-copy range of guest memory. Chain objects are pooled by their queue (at most queue-size chains can be in
 * flight), and segments live in typed arrays that grow rarely, so popping a chain allocates nothing.
 *
 * Read a request with {@link ChainReader} and write a response with {@link ChainWriter}: they cross segment
 * boundaries so devices never do index arithmetic over segments.
 */
import type { GuestMemory } from './guest-memory.js';

export class DescriptorChain {
  /** The id the used ring returns: the head descriptor's index (split ring) or the buffer id (packed ring). */
  head = 0;
  /**
   * Descriptors the chain takes in the ring's table (an indirect table counts as one, the one pointing to it).
   * A packed ring's used index moves on by this much.
   */
  descriptorCount = 0;
  /** Number of segments; the first `readableCount` are device-readable, the rest device-writable. */
  count = 0;
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** Guest memory the segments point into (the queue's memory when the chain was popped). */
  memory!: GuestMemory;
  /** Index into `memory.buffers` per segment. */
  segBuffer = new Uint32Array(8);
  segOffset = new Uint32Array(8);
  segLength = new Uint32Array(8);
  /** Guest-physical address per segment (dirty logging, inflight records). */
  segAddr = new Float64Array(8);
  /** The queue's pool slot; used to catch a chain returned twice. */
  inFlight = false;
  /** @internal popped again from the inflight region after a restart, not from the ring. */
  resubmitted = false;

  private readerObj: ChainReader | undefined;
  private writerObj: ChainWriter | undefined;

  get writableCount(): number {
    return this.count - this.readableCount;
  }

  /** A view of segment `i` (allocates a Uint8Array: fine per request, avoid per byte). */
  segment(i: number): Uint8Array {
    const off = this.segOffset[i];
    return this.memory.buffers[this.segBuffer[i]].subarray(off, off + this.segLength[i]);
  }

  /** Host address of segment `i` for I/O straight into guest memory (0 when the memory has none). */
  hostAddress(i: number): number {
    const base = this.memory.bufferHostAddr[this.segBuffer[i]];
    return base === 0 ? 0 : base + this.segOffset[i];
  }

  /** A reader over the readable part, rewound to its start. Reused: one per chain object. */
  reader(): ChainReader {
    const r = (this.readerObj ??= new ChainReader(this));
    r.rewind();
    return r;
  }

  /** A writer over the writable part, rewound to its start. Reused: one per chain object. */
  writer(): ChainWriter {
    const w = (this.writerObj ??= new ChainWriter(this));
    w.rewind();
    return w;
  }

  /** @internal used by the queue while walking descriptors. */
  reset(memory: GuestMemory, head: number): void {
    if (this.memory !== memory) this.memory = memory; // a compare is cheaper than a store with its write barrier
    this.head = head;
    this.descriptorCount = 1;
    this.resubmitted = false;
    this.count = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
  }

  /**
   * @internal reset() then addSegment() for a chain of one segment, in one go: the queue's fast path for a lone
   * descriptor. Segment arrays never shrink below their initial 8 entries, so slot 0 needs no capacity check.
   */
  resetOne(memory: GuestMemory, head: number, gpa: number, buffer: number, offset: number, length: number, writable: boolean): void {
    if (this.memory !== memory) this.memory = memory;
    this.head = head;
    this.descriptorCount = 1;
    this.resubmitted = false;
    this.count = 1;
    this.segAddr[0] = gpa;
    this.segBuffer[0] = buffer;
    this.segOffset[0] = offset;
    this.segLength[0] = length;
    if (writable) {
      this.readableCount = 0;
      this.readableBytes = 0;
      this.writableBytes = length;
    } else {
      this.readableCount = 1;
      this.readableBytes = length;
      this.writableBytes = 0;
    }
  }

  /** @internal */
  addSegment(gpa: number, buffer: number, offset: number, length: number, writable: boolean): void {
    const n = this.count;
    if (n === this.segBuffer.length) this.grow();
    this.segAddr[n] = gpa;
    this.segBuffer[n] = buffer;
    this.segOffset[n] = offset;
    this.segLength[n] = length;
    this.count = n + 1;
    if (writable) this.writableBytes += length;
    else {
      this.readableCount = n + 1;
      this.readableBytes += length;
    }
  }

  private grow(): void {
    const cap = this.segBuffer.length * 2;
    const b = new Uint32Array(cap);
    const o = new Uint32Array(cap);
    const l = new Uint32Array(cap);
    const a = new Float64Array(cap);
    a.set(this.segAddr);
    b.set(this.segBuffer);
    o.set(this.segOffset);
    l.set(this.segLength);
    this.segBuffer = b;
    this.segOffset = o;
    this.segLength = l;
    this.segAddr = a;
  }
}

/** Sequential access to a chain's readable bytes. */
export class ChainReader {
  private seg = 0;
  private off = 0;
  /** Bytes consumed so far. */
  position = 0;

  constructor(private readonly chain: DescriptorChain) {}

  rewind(): void {
    this.seg = 0;
    this.off = 0;
    this.position = 0;
  }

  get remaining(): number {
    return this.chain.readableBytes - this.position;
  }

  /** Copy up to dst.length bytes; returns how many were copied. */
  read(dst: Uint8Array): number {
    const c = this.chain;
    let done = 0;
    while (done < dst.length && this.seg < c.readableCount) {
      const len = c.segLength[this.seg];
      const n = Math.min(dst.length - done, len - this.off);
      const start = c.segOffset[this.seg] + this.off;
      dst.set(c.memory.buffers[c.segBuffer[this.seg]].subarray(start, start + n), done);
      done += n;
      this.advance(n, len);
    }
    this.position += done;
    return done;
  }

  /** Skip `n` bytes (or to the end); returns how many were skipped. */
  skip(n: number): number {
    const c = this.chain;
    let done = 0;
    while (done < n && this.seg < c.readableCount) {
      const len = c.segLength[this.seg];
      const step = Math.min(n - done, len - this.off);
      done += step;
      this.advance(step, len);
    }
    this.position += done;
    return done;
  }

  /** Read a little-endian integer of 1, 2 or 4 bytes; throws RangeError when the chain is too short. */
  readUint(bytes: 1 | 2 | 4): number {
    let v = 0;
    for (let i = 0; i < bytes; i++) v += this.readByte() * 2 ** (8 * i);
    return v;
  }

  /** Read a little-endian u64 as a Number (exact below 2^53). */
  readUint64(): number {
    const lo = this.readUint(4);
    return this.readUint(4) * 2 ** 32 + lo;
  }

  private readByte(): number {
    const c = this.chain;
    while (this.seg < c.readableCount && this.off === c.segLength[this.seg]) this.advance(0, c.segLength[this.seg]);
    if (this.seg >= c.readableCount) throw new RangeError('descriptor chain has fewer readable bytes than the request needs');
    const v = c.memory.buffers[c.segBuffer[this.seg]][c.segOffset[this.seg] + this.off];
    this.advance(1, c.segLength[this.seg]);
    this.position++;
    return v;
  }

  private advance(n: number, segLen: number): void {
    this.off += n;
    if (this.off >= segLen) {
      this.seg++;
      this.off = 0;
    }
  }
}

/** Sequential access to a chain's writable bytes. `written` is the length to report in the used ring. */
export class ChainWriter {
  private seg = 0;
  private off = 0;
  written = 0;

  constructor(private readonly chain: DescriptorChain) {}

  rewind(): void {
    this.seg = this.chain.readableCount;
    this.off = 0;
    this.written = 0;
  }

  get remaining(): number {
    return this.chain.writableBytes - this.written;
  }

  /** Copy up to src.length bytes in; returns how many fitted. */
  write(src: Uint8Array): number {
    const c = this.chain;
    let done = 0;
    while (done < src.length && this.seg < c.count) {
      const len = c.segLength[this.seg];
      const n = Math.min(src.length - done, len - this.off);
      c.memory.buffers[c.segBuffer[this.seg]].set(src.subarray(done, done + n), c.segOffset[this.seg] + this.off);
      done += n;
      this.advance(n, len);
    }
    this.written += done;
    return done;
  }

  /** Write a little-endian integer of 1, 2 or 4 bytes; throws RangeError when the chain is too short. */
  writeUint(value: number, bytes: 1 | 2 | 4): void {
    if (this.remaining < bytes) throw new RangeError('descriptor chain has fewer writable bytes than the reply needs');
    const c = this.chain;
    for (let i = 0; i < bytes; i++) {
      while (this.off === c.segLength[this.seg]) this.advance(0, c.segLength[this.seg]);
      c.memory.buffers[c.segBuffer[this.seg]][c.segOffset[this.seg] + this.off] = (value >>> (8 * i)) & 0xff;
      this.advance(1, c.segLength[this.seg]);
    }
    this.written += bytes;
  }

  /** Fill up to `n` bytes with `byte`; returns how many were written. */
  fill(byte: number, n: number = this.remaining): number {
    const c = this.chain;
    let done = 0;
    while (done < n && this.seg < c.count) {
      const len = c.segLength[this.seg];
      const step = Math.min(n - done, len - this.off);
      const start = c.segOffset[this.seg] + this.off;
      c.memory.buffers[c.segBuffer[this.seg]].fill(byte, start, start + step);
      done += step;
      this.advance(step, len);
    }
    this.written += done;
    return done;
  }

  private advance(n: number, segLen: number): void {
    this.off += n;
    if (this.off >= segLen) {
      this.seg++;
      this.off = 0;
    }
  }
}
