/** Shared set-up for the virtqueue benchmarks: one guest region with a ring and a data buffer. */
import { GuestAllocator, GuestMemory, SplitQueue, SplitQueueDriver, splitRingLayout, type RingLayout } from '../src/virtqueue/index.js';

// Loops below use RING: V8 folds a module's non-exported const, but loads an exported one from its cell at every use.
const RING = 256;
export const QUEUE_SIZE = RING;
const BASE = 0x100000;

/** One guest region over `bytes` with a QUEUE_SIZE ring of the given layout at its start. */
export function makeRing(bytes: Uint8Array, layoutOf: (size: number, base: number) => RingLayout = splitRingLayout) {
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: BASE, bytes }]);
  const layout = layoutOf(QUEUE_SIZE, BASE);
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

const MEMORY = 1 << 20;

/*
 * Each case returns one round (driver adds a batch, device serves it, driver reaps it) and the chains the device
 * served. Driver and device loops are separate functions, as they are in a real backend (the device's loop runs
 * in its worker, the driver is the guest): each is compiled on its own instead of the device competing with the
 * driver model for one function's inlining budget. And each case has its own functions rather than closures
 * from one factory, which V8 would compile once with the cases' type feedback merged.
 */
export function rawCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makeDriver(bytes);
  const raw = new RawDevice(bytes);
  const buf = alloc.alloc(64);
  function fill(): void {
    for (let k = 0; k < RING; k++) driver.add1(buf, 64, true);
    driver.publish();
  }
  function reap(): void {
    while (driver.nextUsed() >= 0);
  }
  return () => {
    fill();
    const n = raw.drain();
    reap();
    return n;
  };
}

export function oneDescriptorCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makeDriver(bytes);
  const queue = makeQueue(bytes);
  const buf = alloc.alloc(64);
  function fill(): void {
    for (let k = 0; k < RING; k++) driver.add1(buf, 64, true);
    driver.publish();
  }
  function serve(): number {
    let n = 0;
    let c;
    while ((c = queue.pop()) !== null) {
      queue.push(c, 0);
      n++;
    }
    queue.publish();
    return n;
  }
  function reap(): void {
    while (driver.nextUsed() >= 0);
  }
  return () => {
    fill();
    const n = serve();
    reap();
    return n;
  };
}

// The request of the multi-descriptor cases: 16 device-readable bytes, then 32 + 1 device-writable (a
// virtio-blk-like header, data and status), given to the driver in arrays reused across calls so that adding a
// chain allocates nothing and the case measures the device, not the driver's garbage.
export function threeBuffers(buf: number) {
  return { addr: Float64Array.of(buf, buf + 16, buf + 48), length: Uint32Array.of(16, 32, 1) };
}

export function threeDescriptorCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makeDriver(bytes);
  const queue = makeQueue(bytes);
  const { addr, length } = threeBuffers(alloc.alloc(64));
  const chains = Math.floor(QUEUE_SIZE / 3); // each chain takes 3 of the ring's descriptors
  function fill(): void {
    for (let k = 0; k < chains; k++) driver.addChain(addr, length, 3, 1);
    driver.publish();
  }
  function serve(): number {
    let n = 0;
    let c;
    while ((c = queue.pop()) !== null) {
      queue.push(c, 0);
      n++;
    }
    queue.publish();
    return n;
  }
  function reap(): void {
    while (driver.nextUsed() >= 0);
  }
  return () => {
    fill();
    const n = serve();
    reap();
    return n;
  };
}

export function indirectCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makeDriver(bytes);
  const queue = makeQueue(bytes);
  const { addr, length } = threeBuffers(alloc.alloc(64));
  // A chain takes one ring descriptor (its 3 are in its table), so a round fills the ring.
  const tables = Float64Array.from({ length: QUEUE_SIZE }, () => alloc.alloc(48, 16));
  function fill(): void {
    for (let k = 0; k < RING; k++) driver.addChain(addr, length, 3, 1, tables[k]);
    driver.publish();
  }
  function serve(): number {
    let n = 0;
    let c;
    while ((c = queue.pop()) !== null) {
      queue.push(c, 0);
      n++;
    }
    queue.publish();
    return n;
  }
  function reap(): void {
    while (driver.nextUsed() >= 0);
  }
  return () => {
    fill();
    const n = serve();
    reap();
    return n;
  };
}
