/** Shared set-up for the virtqueue benchmarks: one guest region with a ring and a data buffer. */
import { GuestAllocator, GuestMemory, SplitQueue, SplitQueueDriver, splitRingLayout } from '../src/virtqueue/index.js';

export const QUEUE_SIZE = 256;
const BASE = 0x100000;

export function makeRing(bytes: Uint8Array, opts: { eventIdx?: boolean; indirect?: boolean } = {}) {
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: BASE, bytes }]);
  const layout = splitRingLayout(QUEUE_SIZE, BASE);
  const alloc = new GuestAllocator(layout.end, BASE + bytes.length);
  return { memory, layout, alloc };
}

export function makeDriver(bytes: Uint8Array, eventIdx = false) {
  const { memory, layout, alloc } = makeRing(bytes);
  return { driver: new SplitQueueDriver(memory, layout, eventIdx), memory, layout, alloc };
}

export function makeQueue(bytes: Uint8Array, eventIdx = false) {
  const { memory, layout } = makeRing(bytes);
  return new SplitQueue({ index: 0, memory, ...layout, eventIdx, indirect: true, lastAvailIdx: 0 });
}

/**
 * The reference: the same split-ring protocol walked with bare typed arrays and no validation or abstraction.
 * The distance between it and SplitQueue is the cost of our code.
 */
export class RawDevice {
  private last = 0;
  private used = 0;
  private readonly avail16: Uint16Array;
  private readonly desc32: Uint32Array;
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  private readonly mask = QUEUE_SIZE - 1;
  sum = 0;

  constructor(bytes: Uint8Array) {
    const { memory, layout } = makeRing(bytes);
    const d = memory.slice(layout.descAddr, 16 * QUEUE_SIZE);
    const a = memory.slice(layout.availAddr, 6 + 2 * QUEUE_SIZE);
    const u = memory.slice(layout.usedAddr, 6 + 8 * QUEUE_SIZE);
    this.desc32 = new Uint32Array(d.buffer, d.byteOffset, 4 * QUEUE_SIZE);
    this.avail16 = new Uint16Array(a.buffer, a.byteOffset, 3 + QUEUE_SIZE);
    this.used16 = new Uint16Array(u.buffer, u.byteOffset, 3 + 4 * QUEUE_SIZE);
    this.used32 = new Uint32Array(u.buffer, u.byteOffset, 1 + 2 * QUEUE_SIZE);
  }

  /** Consume every available chain; returns how many. */
  drain(): number {
    const idx = Atomics.load(this.avail16, 1);
    let n = 0;
    while (this.last !== idx) {
      const head = this.avail16[2 + (this.last & this.mask)];
      this.sum += this.desc32[4 * head + 2]; // read the descriptor's length, as a device would
      const slot = this.used & this.mask;
      this.used32[1 + 2 * slot] = head;
      this.used32[2 + 2 * slot] = 0;
      this.used = (this.used + 1) & 0xffff;
      this.last = (this.last + 1) & 0xffff;
      n++;
    }
    Atomics.store(this.used16, 1, this.used);
    return n;
  }
}
