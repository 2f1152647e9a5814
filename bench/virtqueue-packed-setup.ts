/**
 * The packed-ring cases of the virtqueue benchmark, beside the split ones in virtqueue-setup.ts and shaped the
 * same. They are separate functions, not the split cases with a parameter: V8 keeps type feedback per function
 * literal, so one literal serving both layouts would run each compiled around the other's queue class.
 */
import { PACKED_INITIAL_BASE, PackedQueue, PackedQueueDriver, packedRingLayout } from '../src/virtqueue/index.js';
import { makeRing as makeSharedRing, QUEUE_SIZE, threeBuffers } from './virtqueue-setup.js';

// The ring size of virtqueue-setup.ts, as this module's own const: V8 folds it (an imported binding it loads).
const RING = 256;
if (RING !== QUEUE_SIZE) throw new Error(`packed cases use ${RING} entries, the split ones ${QUEUE_SIZE}`);
const MEMORY = 1 << 20;
const F_AVAIL = 1 << 7;
const AVAIL_USED = F_AVAIL | (1 << 15);

const makeRing = (bytes: Uint8Array) => makeSharedRing(bytes, packedRingLayout);

export function makePackedDriver(bytes: Uint8Array, eventIdx = false) {
  const { memory, layout, alloc } = makeRing(bytes);
  return { driver: new PackedQueueDriver(memory, layout, eventIdx), memory, layout, alloc };
}

export function makePackedQueue(bytes: Uint8Array, eventIdx = false): PackedQueue {
  const { memory, layout } = makeRing(bytes);
  return new PackedQueue({
    index: 0,
    size: RING,
    memory,
    descAddr: layout.descAddr,
    driverAddr: layout.availAddr,
    deviceAddr: layout.usedAddr,
    eventIdx,
    indirect: true,
    base: PACKED_INITIAL_BASE,
  });
}

/**
 * The reference: the packed-ring protocol walked with bare typed arrays, one-descriptor chains only, no
 * validation, each used descriptor flagged as it is written. The distance to PackedQueue is the cost of our code.
 */
export class RawPackedDevice {
  private next = 0;
  private wrap = 1;
  private readonly desc16: Uint16Array;
  private readonly desc32: Uint32Array;
  sum = 0;

  constructor(bytes: Uint8Array) {
    const { memory, layout } = makeRing(bytes);
    const d = memory.slice(layout.descAddr, 16 * RING);
    this.desc32 = new Uint32Array(d.buffer, d.byteOffset, 4 * RING);
    this.desc16 = new Uint16Array(d.buffer, d.byteOffset, 8 * RING);
  }

  drain(): number {
    let n = 0;
    for (;;) {
      const i = this.next;
      const avail = this.wrap ? F_AVAIL : 1 << 15;
      if ((Atomics.load(this.desc16, 8 * i + 7) & AVAIL_USED) !== avail) return n;
      this.sum += this.desc32[4 * i + 2];
      this.desc32[4 * i + 2] = 0;
      // Used in place: the id stays where the driver put it (one-descriptor chains complete in order here).
      Atomics.store(this.desc16, 8 * i + 7, this.wrap ? AVAIL_USED : 0);
      if (++this.next === RING) {
        this.next = 0;
        this.wrap ^= 1;
      }
      n++;
    }
  }
}

export function packedRawCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makePackedDriver(bytes);
  const raw = new RawPackedDevice(bytes);
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

export function packedOneDescriptorCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makePackedDriver(bytes);
  const queue = makePackedQueue(bytes);
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


export function packedThreeDescriptorCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makePackedDriver(bytes);
  const queue = makePackedQueue(bytes);
  const { addr, length } = threeBuffers(alloc.alloc(64));
  const chains = Math.floor(RING / 3);
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

export function packedIndirectCase(): () => number {
  const bytes = new Uint8Array(MEMORY);
  const { driver, alloc } = makePackedDriver(bytes);
  const queue = makePackedQueue(bytes);
  const { addr, length } = threeBuffers(alloc.alloc(64));
  const tables = Float64Array.from({ length: RING }, () => alloc.alloc(48, 16));
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
