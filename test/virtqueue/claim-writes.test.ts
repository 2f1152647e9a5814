/**
 * Virtqueue.claimWrites: a hint that stores into the cache lines of buffers the device is about to fill. It must
 * store only into the first `bytes` of the next `count` lone writable chains, pop nothing, never throw on a
 * hostile ring (pop reports it), and write nothing while migration logs writes.
 */
import { describe, expect, it } from 'vitest';
import {
  DirtyLog,
  GuestAllocator,
  GuestMemory,
  PACKED_INITIAL_BASE,
  PackedQueue,
  PackedQueueDriver,
  SplitQueue,
  SplitQueueDriver,
  VirtqueueError,
  packedRingLayout,
  splitRingLayout,
  type QueueDriver,
  type RingQueue,
} from '../../src/virtqueue/index.js';

const MEM_BASE = 0x10000;
const MEM_SIZE = 1 << 20;
const FILL = 0xaa;

function setup(layout: 'split' | 'packed', size = 16) {
  const bytes = new Uint8Array(MEM_SIZE);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: MEM_BASE, bytes }]);
  let driver: QueueDriver;
  let queue: RingQueue;
  let split: SplitQueueDriver | null = null;
  let end: number;
  let usedAddr = 0;
  if (layout === 'split') {
    const l = splitRingLayout(size, MEM_BASE);
    usedAddr = l.usedAddr;
    driver = split = new SplitQueueDriver(memory, l, false);
    queue = new SplitQueue({ index: 0, memory, ...l, eventIdx: false, indirect: true, lastAvailIdx: 0 });
    end = l.end;
  } else {
    const l = packedRingLayout(size, MEM_BASE);
    driver = new PackedQueueDriver(memory, l, false);
    queue = new PackedQueue({
      index: 0, size, memory, descAddr: l.descAddr, driverAddr: l.availAddr, deviceAddr: l.usedAddr,
      eventIdx: false, indirect: true, base: PACKED_INITIAL_BASE,
    });
    end = l.end;
  }
  const alloc = new GuestAllocator(end, MEM_BASE + MEM_SIZE);
  // Buffers live past the rings; everything there starts as FILL so that any store shows.
  const heap = end - MEM_BASE;
  bytes.fill(FILL, heap);
  /** Offsets (from MEM_BASE) in the buffer area whose byte is no longer FILL. */
  const changed = () => {
    const out: number[] = [];
    for (let i = heap; i < MEM_SIZE; i++) if (bytes[i] !== FILL) out.push(i);
    return out;
  };
  return { memory, driver, split, queue, alloc, bytes, changed, usedAddr };
}

const offsets = (gpa: number, at: number[]) => at.map((i) => gpa - MEM_BASE + i);

describe.each(['split', 'packed'] as const)('claimWrites, %s ring', (layout) => {
  it('stores a zero into each line of the first `bytes` of the next `count` lone writable chains, and pops nothing', () => {
    const { driver, queue, alloc, changed } = setup(layout);
    // 52 bytes into a line, as a DPDK receive buffer's virtio-net header is.
    const a = alloc.alloc(512, 64) + 52;
    const d = alloc.alloc(512, 64);
    const b = alloc.alloc(512, 64);
    const c1 = alloc.alloc(512, 64);
    const c2 = alloc.alloc(512, 64);
    const e = alloc.alloc(512, 64);
    driver.add1(a, 300, true);
    driver.add1(d, 100, true);
    driver.add1(b, 300, false); // readable: the device will not write it
    driver.add([], [[c1, 64], [c2, 64]]); // two descriptors: not a lone one
    driver.add1(e, 300, true);
    driver.publish();

    queue.claimWrites(2, 130);
    // a: lines at +0, +64, +128 and the last byte (+129); d: its whole 100 bytes (+0, +64, +99).
    expect(changed()).toEqual([...offsets(a, [0, 64, 128, 129]), ...offsets(d, [0, 64, 99])]);
    expect(queue.inFlight).toBe(0);
    expect(queue.pop()!.segment(0).byteOffset).toBe(a - MEM_BASE);

    // Past the other chains, never into a readable buffer or a longer chain (a packed ring stops at them, a split
    // ring steps over them to the next lone one).
    queue.claimWrites(16, 8);
    const afterD = layout === 'split' ? offsets(e, [0, 7]) : [];
    expect(changed()).toEqual([...offsets(a, [0, 64, 128, 129]), ...offsets(d, [0, 7, 64, 99]), ...afterD]);
  });

  it('writes nothing while writes are logged for migration', () => {
    const { driver, queue, alloc, changed } = setup(layout);
    driver.add1(alloc.alloc(256, 64), 256, true);
    driver.publish();
    queue.setLog(new DirtyLog(new Uint8Array(64)), -1);
    queue.claimWrites(8, 256);
    expect(changed()).toEqual([]);
    queue.setLog(null, -1);
    queue.claimWrites(8, 256);
    expect(changed().length).toBe(5);
  });

  it('follows the ring across its end', () => {
    const { driver, queue, alloc, changed } = setup(layout, 4);
    const bufs = Array.from({ length: 6 }, () => alloc.alloc(64, 64));
    for (let k = 0; k < 3; k++) driver.add1(bufs[k], 64, true);
    driver.publish();
    for (let k = 0; k < 3; k++) queue.push(queue.pop()!, 0);
    queue.publish();
    while (driver.nextUsed() >= 0);
    // Slots 3, 0 and 1: the packed ring's second lap has the other avail/used bits.
    for (let k = 3; k < 6; k++) driver.add1(bufs[k], 64, true);
    driver.publish();
    queue.claimWrites(8, 64);
    expect(changed()).toEqual(bufs.slice(3).flatMap((g) => offsets(g, [0, 63])));
  });
});

/**
 * A split ring whose driver has `unread` used elements published and not reaped (lengths 1000 + k), then
 * `posted` chains made available: `elems` is the used elements' offset in `bytes`.
 */
function usedThenPosted(unread: number, posted: number) {
  const s = setup('split');
  const g = s.alloc.alloc(64, 64);
  for (let k = 0; k < unread; k++) s.driver.add1(g, 64, false);
  s.driver.publish();
  for (let k = 0; k < unread; k++) s.queue.push(s.queue.pop()!, 1000 + k);
  s.queue.publish();
  for (let k = 0; k < posted; k++) s.driver.add1(g, 64, false);
  s.driver.publish();
  return { ...s, elems: s.usedAddr - MEM_BASE + 4 };
}

describe('claimWrites, the used ring', () => {
  it('stores into the used elements the next pushes fill (a line every 8 and the last), never into idx or published ones', () => {
    // Used idx 3: elements 0-2 are the driver's to read; ten chains available, whose pushes will fill 3-12.
    const { driver, queue, bytes, usedAddr, elems } = usedThenPosted(3, 10);
    const before = bytes.slice(usedAddr - MEM_BASE, elems + 8 * 16);
    bytes.fill(FILL, elems + 8 * 3, elems + 8 * 16);
    queue.claimWrites(12, 0); // more than there are chains: only ten elements
    const zeroed: number[] = [];
    for (let k = 0; k < 16; k++) {
      const id = bytes.subarray(elems + 8 * k, elems + 8 * k + 4);
      if (k >= 3 && id.every((b) => b === 0)) zeroed.push(k);
    }
    expect(zeroed).toEqual([3, 11, 12]); // elements 3 to 12, a store every 8 and one at the end
    expect([...bytes.subarray(usedAddr - MEM_BASE, elems + 8 * 3)]).toEqual([...before.subarray(0, 4 + 8 * 3)]);
    for (let k = 3; k < 16; k++) if (!zeroed.includes(k)) expect([...bytes.subarray(elems + 8 * k, elems + 8 * k + 8)]).toEqual(new Array(8).fill(FILL));
    // The pushes then fill them as usual.
    queue.push(queue.pop()!, 7);
    queue.publish();
    while (driver.nextUsed() >= 0);
    expect(driver.usedIdx()).toBe(4);
  });

  it('of a driver that lags, stores only into the slots of chains in flight or available: the next ones may hold elements not yet read', () => {
    // 14 elements published and none reaped: slots 0-13 hold elements the driver has still to read, and only two
    // descriptors are free, so it can post two more.
    const { driver, queue, bytes, elems } = usedThenPosted(14, 2);
    const unread = bytes.slice(elems, elems + 8 * 14);
    queue.claimWrites(32, 0);
    expect([...bytes.subarray(elems, elems + 8 * 14)]).toEqual([...unread]);
    // The driver reads all 14 as they were pushed.
    const lengths: number[] = [];
    while (driver.nextUsed() >= 0) lengths.push(driver.lastUsedLen);
    expect(lengths).toEqual(Array.from({ length: 14 }, (_, k) => 1000 + k));
  });
});

describe('claimWrites on a hostile split ring', () => {
  function popError(queue: RingQueue): string {
    try {
      queue.pop();
    } catch (e) {
      expect(e).toBeInstanceOf(VirtqueueError);
      return (e as VirtqueueError).code;
    }
    return 'none';
  }

  it('neither throws nor stores for a head outside the table, a buffer outside memory or a wild avail idx; pop reports each', () => {
    const a = setup('split');
    a.split!.pushAvailRaw(999);
    a.driver.publish();
    a.queue.claimWrites(4, 64);
    expect(a.changed()).toEqual([]);
    expect(popError(a.queue)).toBe('BAD_HEAD');

    const b = setup('split');
    b.split!.writeDescriptor(0, MEM_BASE + MEM_SIZE - 16, 4096, 2, 0); // writable, runs off the end of memory
    b.split!.writeDescriptor(1, 2 ** 60, 64, 2, 0); // beyond 2^53
    b.split!.pushAvailRaw(0);
    b.split!.pushAvailRaw(1);
    b.driver.publish();
    // Its first 8 bytes are guest memory, but the descriptor is bad: nothing is written.
    b.queue.claimWrites(4, 8);
    expect(b.changed()).toEqual([]);
    expect(popError(b.queue)).toBe('BAD_BUFFER');

    const c = setup('split');
    c.split!.setAvailIdxRaw(1000);
    c.queue.claimWrites(4, 64);
    expect(c.changed()).toEqual([]);
    expect(popError(c.queue)).toBe('AVAIL_IDX');
  });
});
