/**
 * Moving frames in and out of a virtio-net device's queues. A transmitted chain is a 12-byte virtio-net header
 * then the frame; a received frame goes into one receive chain, or across several with MRG_RXBUF (num_buffers in
 * the first header). Frames are copied at most once: straight from their source (another guest's transmit chain,
 * a tap read, a generator) into the receive chains.
 */
import type { DescriptorChain, Virtqueue } from '../../virtqueue/index.js';
import { ETH_HEADER, MAX_FRAME, NET_HDR_NUM_BUFFERS, NET_HDR_SIZE, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE } from './spec.js';

/** Where a frame's bytes come from: a chain's readable part (after its header) or a plain byte array. */
export interface FrameSource {
  length: number;
  /**
   * Where the frame starts, contiguous for `headLen` bytes: frame byte i (i < headLen) is headBuf[headOff + i].
   * For reading the Ethernet header in place.
   */
  readonly headBuf: Uint8Array;
  readonly headOff: number;
  readonly headLen: number;
  /** headBuf's ArrayBuffer as 32- and 64-bit words (null: none), and headBuf's byte offset in it: for word copies. */
  readonly headWords: Uint32Array | null;
  readonly headDoubles: Float64Array | null;
  readonly headBase: number;
  /** Copy `n` frame bytes starting at frame offset `from` into dst at `at`. */
  copyTo(dst: Uint8Array, at: number, from: number, n: number): void;
  /** Frame byte at `i` (for checksums and filtering). */
  byteAt(i: number): number;
}

/** A transmit chain's frame, read in place (no copy until it lands in a receive chain). */
export class ChainFrame implements FrameSource {
  chain!: DescriptorChain;
  length = 0;
  headBuf: Uint8Array = EMPTY;
  headOff = 0;
  headLen = 0;
  headWords: Uint32Array | null = null;
  headDoubles: Float64Array | null = null;
  headBase = 0;
  /** The sender's virtio-net header: hdrBuf[hdrOff..hdrOff+12), in place in the chain when it is contiguous. */
  hdrBuf: Uint8Array = EMPTY;
  hdrOff = 0;
  private readonly headerBytes = new Uint8Array(NET_HDR_SIZE);
  private headerRead = false;
  private seg = 0;
  private segStart = 0; // frame offset of segment `seg`'s first frame byte
  private segSkip = 0; // bytes of segment `seg` before the frame (header bytes)

  /** Point at `chain`; returns false when it cannot be a frame (shorter than a header + Ethernet header, or over MAX_FRAME). */
  reset(chain: DescriptorChain): boolean {
    this.chain = chain;
    this.length = chain.readableBytes - NET_HDR_SIZE;
    if (this.length < ETH_HEADER || this.length > MAX_FRAME) return false;
    this.headerRead = false;
    this.rewind();
    const b = chain.segBuffer[this.seg];
    const memory = chain.memory;
    const buf = memory.buffers[b];
    // Frames mostly come from one window: the views change rarely, and a compare costs less than a store of an
    // object with its write barrier.
    if (buf !== this.headBuf) {
      this.headBuf = buf;
      this.headWords = memory.words32(b);
      this.headDoubles = memory.doubles(b);
      this.headBase = memory.byteOffsetOf(b);
    }
    this.headOff = chain.segOffset[this.seg] + this.segSkip;
    const inSeg = chain.segLength[this.seg] - this.segSkip;
    this.headLen = inSeg < this.length ? inSeg : this.length;
    if (chain.segLength[0] >= NET_HDR_SIZE) {
      const hb = this.seg === 0 ? buf : memory.buffers[chain.segBuffer[0]];
      if (hb !== this.hdrBuf) this.hdrBuf = hb;
      this.hdrOff = chain.segOffset[0];
    } else {
      this.hdrBuf = this.header;
      this.hdrOff = 0;
    }
    return true;
  }

  /** The sender's virtio-net header (offload instructions for a receiver), read on first use. */
  get header(): Uint8Array {
    if (!this.headerRead) {
      this.chain.reader().read(this.headerBytes);
      this.headerRead = true;
    }
    return this.headerBytes;
  }

  copyTo(dst: Uint8Array, at: number, from: number, n: number): void {
    this.seek(from);
    const c = this.chain;
    while (n > 0) {
      const segOff = this.segSkip + (from - this.segStart);
      const avail = c.segLength[this.seg] - segOff;
      const take = n < avail ? n : avail;
      copyBytes(dst, at, c.memory.buffers[c.segBuffer[this.seg]], c.segOffset[this.seg] + segOff, take);
      at += take;
      from += take;
      n -= take;
      if (n > 0) this.next();
    }
  }

  byteAt(i: number): number {
    this.seek(i);
    const c = this.chain;
    return c.memory.buffers[c.segBuffer[this.seg]][c.segOffset[this.seg] + this.segSkip + (i - this.segStart)];
  }

  private rewind(): void {
    // Skip the header, which may span segments.
    let skip = NET_HDR_SIZE;
    this.seg = 0;
    while (skip >= this.chain.segLength[this.seg]) skip -= this.chain.segLength[this.seg++];
    this.segSkip = skip;
    this.segStart = 0;
  }

  private next(): void {
    this.segStart += this.chain.segLength[this.seg] - this.segSkip;
    this.seg++;
    this.segSkip = 0;
  }

  private seek(i: number): void {
    if (i < this.segStart) this.rewind();
    while (i >= this.segStart + this.chain.segLength[this.seg] - this.segSkip) this.next();
  }
}

/** Frame bytes in a plain array (generated frames, tap reads). */
export class BytesFrame implements FrameSource {
  headBuf: Uint8Array = EMPTY;
  headOff = 0;
  headLen = 0;
  headWords: Uint32Array | null = null;
  headDoubles: Float64Array | null = null;
  headBase = 0;
  length = 0;
  /** The frame is `length` bytes of `bytes` from `start`. */
  set(bytes: Uint8Array, length = bytes.length, start = 0): this {
    if (bytes !== this.headBuf) {
      this.headWords = new Uint32Array(bytes.buffer, 0, bytes.buffer.byteLength >>> 2);
      this.headDoubles = new Float64Array(bytes.buffer, 0, bytes.buffer.byteLength >>> 3);
      this.headBase = bytes.byteOffset;
    }
    this.headBuf = bytes;
    this.headOff = start;
    this.headLen = length;
    this.length = length;
    return this;
  }
  get bytes(): Uint8Array {
    return this.headBuf;
  }
  copyTo(dst: Uint8Array, at: number, from: number, n: number): void {
    copyBytes(dst, at, this.headBuf, this.headOff + from, n);
  }
  byteAt(i: number): number {
    return this.headBuf[this.headOff + i];
  }
}

const EMPTY = new Uint8Array(0);

/*
 * Copies between two buffers, each way best at its own sizes (measured on Node 20, 76 bytes: a byte a store 64 ns,
 * 4 bytes 19 ns, 8 bytes 11 ns, set() of a subarray 48 ns, most of it making the view; 1530 bytes: 4 bytes 230 ns,
 * 8 bytes 110 ns, set() 60 ns).
 */
/** Up to this many bytes a run goes a byte at a time; beyond, through set() of a view. */
const BYTE_COPY_MAX = 48;
/** Up to this many bytes, 8 bytes a store when both ends share their offset modulo 8 ... */
const DOUBLE_COPY_MAX = 640;
/** ... or 4 bytes a store when both are 4-aligned. */
const WORD_COPY_MAX = 256;

/** dst[at..at+n) = src[from..from+n) in 32-bit words, between different buffers. */
function copyWords(dst: Uint32Array, at: number, src: Uint32Array, from: number, n: number): void {
  for (let i = 0; i < n; i++) dst[at + i] = src[from + i];
}

/**
 * d8[dOff..dOff+n) = s8[sOff..sOff+n), 8 bytes a store: dAbs and sAbs are those offsets from the start of each
 * ArrayBuffer (d64 and s64 view the whole buffers) and are equal modulo 8.
 */
function copyDoubles(d8: Uint8Array, dOff: number, d64: Float64Array, dAbs: number, s8: Uint8Array, sOff: number, s64: Float64Array, sAbs: number, n: number): void {
  let lead = (8 - (dAbs & 7)) & 7;
  if (lead > n) lead = n;
  for (let i = 0; i < lead; i++) d8[dOff + i] = s8[sOff + i];
  const words = (n - lead) >>> 3;
  const d = (dAbs + lead) >>> 3;
  const s = (sAbs + lead) >>> 3;
  for (let i = 0; i < words; i++) d64[d + i] = s64[s + i];
  for (let i = lead + 8 * words; i < n; i++) d8[dOff + i] = s8[sOff + i];
}

/**
 * dst[at..at+n) = src[from..from+n) between different buffers. Small copies go byte by byte: a typed array's
 * set() needs a view of exactly the source bytes, an allocation that costs more than copying a few bytes.
 */
export function copyBytes(dst: Uint8Array, at: number, src: Uint8Array, from: number, n: number): void {
  if (n <= BYTE_COPY_MAX) {
    for (let i = 0; i < n; i++) dst[at + i] = src[from + i];
  } else dst.set(src.subarray(from, from + n), at);
}

export type DeliverResult = 'delivered' | 'no-buffers' | 'too-big';

const ZERO_HEADER = new Uint8Array(NET_HDR_SIZE);

/**
 * The receive side of one queue. `deliver` puts a frame into the ring or says why not: 'no-buffers' (the driver
 * has not posted enough; nothing consumed, try again after its next kick) or 'too-big' (it can never fit: drop it).
 */
export class RxQueue {
  private readonly popped: DescriptorChain[] = [];
  private readonly used: number[] = [];

  constructor(
    readonly queue: Virtqueue,
    /** MRG_RXBUF negotiated: a frame may span receive chains. */
    private readonly mergeable: boolean,
    /** GUEST_CSUM negotiated: partial checksums may be left for the guest. */
    private readonly guestCsum: boolean,
    /** GUEST_TSO4/6 negotiated: GSO frames may be passed up whole. */
    private readonly guestGso: boolean,
  ) {}

  /**
   * Copy a frame (with the sender's virtio-net header, or none) into receive chains. Call queue.publish (or let
   * the framework) afterwards; pushes are batched.
   */
  deliver(frame: FrameSource, header: Uint8Array | null, headerOff = 0): DeliverResult {
    const hb = header ?? ZERO_HEADER;
    const ho = header === null ? 0 : headerOff;
    const gso = hb[ho + 1] !== VIRTIO_NET_HDR_GSO_NONE;
    if (gso && !this.guestGso) return 'too-big'; // no software segmentation: a GSO frame to a non-GSO guest is dropped
    const total = NET_HDR_SIZE + frame.length;
    const q = this.queue;
    if (!(hb[ho] & VIRTIO_NET_HDR_F_NEEDS_CSUM) || this.guestCsum) {
      // The common case: the whole frame fits the first writable buffer of one chain.
      const c = q.pop();
      if (c === null) return 'no-buffers';
      const s = c.readableCount;
      if (s < c.count && c.segLength[s] >= total) {
        const buf = c.memory.buffers[c.segBuffer[s]];
        const off = c.segOffset[s];
        // Header and frame one contiguous run in the sender's buffer: one copy for both, the widest way.
        const oneRun = hb === frame.headBuf && ho + NET_HDR_SIZE === frame.headOff && frame.headLen === frame.length;
        if (oneRun && ho === 0 && hb.length === total) {
          // The sender handed a view of exactly the header and the frame (the source's packet): one set(), a
          // memmove with a few wide stores. The stores into the guest's buffers are what the receive loop waits
          // on (in the DPDK loop with testpmd rxonly, leaving the frame's bytes out made it 40 to 50% faster), and
          // memmove needs fewer than our 8-byte loop: against it, in one process, +15 to +19%. Other senders would
          // need a view made per frame, which costs more than it saves (the switch: -11 to -15%).
          buf.set(hb, off);
        } else if (oneRun) {
          const b = c.segBuffer[s];
          const dAbs = c.memory.byteOffsetOf(b) + off;
          const sAbs = frame.headBase + ho;
          const doubles = frame.headDoubles;
          const words = frame.headWords;
          if (doubles !== null && total <= DOUBLE_COPY_MAX && ((dAbs ^ sAbs) & 7) === 0) {
            copyDoubles(buf, off, c.memory.doubles(b), dAbs, hb, ho, doubles, sAbs, total);
          } else if (words !== null && total <= WORD_COPY_MAX && ((dAbs | sAbs) & 3) === 0) {
            copyWords(c.memory.words32(b), dAbs >>> 2, words, sAbs >>> 2, total >>> 2);
            const tail = total & ~3;
            copyBytes(buf, off + tail, hb, ho + tail, total - tail);
          } else copyBytes(buf, off, hb, ho, total);
        } else {
          copyBytes(buf, off, hb, ho, NET_HDR_SIZE);
          frame.copyTo(buf, off + NET_HDR_SIZE, 0, frame.length);
        }
        buf[off + NET_HDR_NUM_BUFFERS] = 1;
        buf[off + NET_HDR_NUM_BUFFERS + 1] = 0;
        q.push(c, total);
        return 'delivered';
      }
      q.unpop(c);
    }
    const hdr = ho === 0 && hb.length === NET_HDR_SIZE ? hb : this.headerCopy(hb, ho);
    const popped = this.popped;
    const used = this.used;
    popped.length = 0;
    used.length = 0;
    let left = total;
    while (left > 0) {
      const c = q.pop();
      if (c === null) return this.giveBack('no-buffers');
      popped.push(c);
      const room = c.writableBytes;
      if (room < (popped.length === 1 ? NET_HDR_SIZE : 1)) return this.giveBack('too-big');
      const take = room < left ? room : left;
      used.push(take);
      left -= take;
      if (left > 0 && !this.mergeable) return this.giveBack('too-big');
    }
    // Write: the header (then num_buffers, and a computed checksum where the guest cannot take a partial one), then data.
    let from = 0;
    for (let k = 0; k < popped.length; k++) {
      const c = popped[k];
      let pos = 0;
      if (k === 0) {
        for (let i = 0; i < NET_HDR_SIZE; i++) this.setU8InChain(c, i, hdr[i]);
        pos = NET_HDR_SIZE;
      }
      const n = used[k] - pos;
      copyIntoChain(c, pos, frame, from, n);
      from += n;
    }
    const first = popped[0];
    this.setU16InChain(first, NET_HDR_NUM_BUFFERS, popped.length);
    if (hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM && !this.guestCsum) {
      this.finishChecksum(first, hdr, frame);
      this.setU8InChain(first, 0, hdr[0] & ~VIRTIO_NET_HDR_F_NEEDS_CSUM);
    }
    for (let k = 0; k < popped.length; k++) q.push(popped[k], used[k]);
    return 'delivered';
  }

  private readonly burst: DescriptorChain[] = [];

  /**
   * Up to `max` copies of `packet` (a virtio-net header with no flags, no GSO and num_buffers = 1, then the frame:
   * the source's packet), each into the first writable buffer of a chain. All chains are popped first, then all
   * copies made in one loop, then all pushed, as DPDK's vhost batches its small copies: the stores into the guest's
   * buffers wait for cache lines the guest's CPU holds, and back to back their waits can overlap. In the DPDK loop
   * (testpmd rxonly), against deliver() per frame in one process, ten runs of 40 paired 100 ms slices: medians +0
   * to +7%, about +3% in all. Fewer stores into those lines count too: num_buffers comes with the packet's one
   * set() instead of two stores of its own after it (+1 to +12%, ten runs; 8 bytes a store instead of set(): -20%).
   * Returns how many were delivered: fewer than `max` when the ring ran dry or the next chain's first writable
   * buffer is too short (it stays in the ring for {@link deliver}, which can spread a frame over chains).
   */
  deliverCopies(packet: Uint8Array, max: number): number {
    const total = packet.length;
    const oneBuffer = packet[NET_HDR_NUM_BUFFERS] === 1 && packet[NET_HDR_NUM_BUFFERS + 1] === 0;
    if (packet[0] !== 0 || packet[1] !== VIRTIO_NET_HDR_GSO_NONE || !oneBuffer) return 0;
    const q = this.queue;
    const chains = this.burst;
    let n = 0;
    let bad: unknown = null;
    try {
      while (n < max) {
        const c = q.pop();
        if (c === null) break;
        const s = c.readableCount;
        if (!(s < c.count && c.segLength[s] >= total)) {
          q.unpop(c);
          break;
        }
        chains[n++] = c;
      }
    } catch (e) {
      // The guest broke the ring after these chains: they are filled and returned before the queue stops.
      bad = e;
    }
    for (let i = 0; i < n; i++) {
      const c = chains[i];
      const s = c.readableCount;
      c.memory.buffers[c.segBuffer[s]].set(packet, c.segOffset[s]);
    }
    for (let i = 0; i < n; i++) q.push(chains[i], total);
    if (bad !== null) throw bad;
    return n;
  }

  private readonly scratchHeader = new Uint8Array(NET_HDR_SIZE);

  private headerCopy(hb: Uint8Array, ho: number): Uint8Array {
    copyBytes(this.scratchHeader, 0, hb, ho, NET_HDR_SIZE);
    return this.scratchHeader;
  }

  private giveBack(why: DeliverResult): DeliverResult {
    for (let k = this.popped.length - 1; k >= 0; k--) this.queue.unpop(this.popped[k]);
    this.popped.length = 0;
    return why;
  }

  /**
   * The sender asked for a checksum (csum_start, csum_offset) that this guest will not compute: compute the
   * Internet checksum over [csum_start, end) of the frame and store it at csum_start + csum_offset.
   */
  private finishChecksum(chain: DescriptorChain, hdr: Uint8Array, frame: FrameSource): void {
    const start = hdr[6] | (hdr[7] << 8);
    const offset = hdr[8] | (hdr[9] << 8);
    if (start + offset + 2 > frame.length) return;
    let sum = 0;
    const end = frame.length;
    for (let i = start; i < end; i += 2) {
      // The checksum field itself holds the pseudo-header sum the sender seeded it with: include it.
      const hi = frame.byteAt(i);
      const lo = i + 1 < end ? frame.byteAt(i + 1) : 0;
      sum += (hi << 8) | lo;
    }
    while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
    const csum = ~sum & 0xffff;
    const at = NET_HDR_SIZE + start + offset;
    this.setU8InChain(chain, at, csum >>> 8);
    this.setU8InChain(chain, at + 1, csum & 0xff);
  }

  private setU16InChain(c: DescriptorChain, pos: number, v: number): void {
    this.setU8InChain(c, pos, v & 0xff);
    this.setU8InChain(c, pos + 1, v >>> 8);
  }

  /** Write one byte at writable offset `pos` of a chain (cold path: headers and checksums). */
  private setU8InChain(c: DescriptorChain, pos: number, v: number): void {
    for (let s = c.readableCount; s < c.count; s++) {
      if (pos < c.segLength[s]) {
        c.memory.buffers[c.segBuffer[s]][c.segOffset[s] + pos] = v;
        return;
      }
      pos -= c.segLength[s];
    }
  }
}

/** Copy `n` frame bytes from frame offset `from` into a chain's writable part at byte position `pos`. */
function copyIntoChain(c: DescriptorChain, pos: number, frame: FrameSource, from: number, n: number): void {
  let s = c.readableCount;
  while (s < c.count && pos >= c.segLength[s]) pos -= c.segLength[s++];
  while (n > 0 && s < c.count) {
    const room = c.segLength[s] - pos;
    const take = room < n ? room : n;
    frame.copyTo(c.memory.buffers[c.segBuffer[s]], c.segOffset[s] + pos, from, take);
    from += take;
    n -= take;
    pos = 0;
    s++;
  }
}
