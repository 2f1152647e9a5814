/**
 * The hot paths added for throughput: the lone-descriptor fast path of SplitQueue.pop, GuestMemory.locate's
 * window cache, and the driver's allocation-free addChain. Each must give the same answers as the general path.
 */
import { describe, expect, it } from 'vitest';
import {
  GuestAllocator,
  GuestMemory,
  SplitQueue,
  SplitQueueDriver,
  VirtqueueError,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_WRITE,
  WINDOW_SIZE,
  splitRingLayout,
  splitWindows,
  type Location,
} from '../../src/virtqueue/index.js';

const MEM_BASE = 0x10000;
const MEM_SIZE = 1 << 20;

function setup(opts: { size?: number; maxSegments?: number; eventIdx?: boolean } = {}) {
  const size = opts.size ?? 16;
  const bytes = new Uint8Array(MEM_SIZE);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: MEM_BASE, bytes }]);
  const layout = splitRingLayout(size, MEM_BASE);
  const driver = new SplitQueueDriver(memory, layout, opts.eventIdx ?? false);
  const alloc = new GuestAllocator(layout.end, MEM_BASE + MEM_SIZE);
  const queue = new SplitQueue({
    index: 0,
    memory,
    ...layout,
    eventIdx: opts.eventIdx ?? false,
    indirect: true,
    lastAvailIdx: 0,
    ...(opts.maxSegments === undefined ? {} : { maxSegments: opts.maxSegments }),
  });
  return { memory, driver, alloc, queue, bytes };
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(VirtqueueError);
    return (e as VirtqueueError).code;
  }
  throw new Error('expected a VirtqueueError');
}

describe('lone-descriptor fast path', () => {
  it('fills the chain as the general walk does, readable or writable', () => {
    const { driver, alloc, queue, memory } = setup();
    const buf = alloc.alloc(64);
    memory.write(buf, new Uint8Array([5, 6, 7]));
    driver.add1(buf, 3, false);
    driver.add1(buf + 8, 40, true);
    driver.publish();
    const r = queue.pop()!;
    expect([r.count, r.readableCount, r.readableBytes, r.writableBytes, r.writableCount]).toEqual([1, 1, 3, 0, 0]);
    const got = new Uint8Array(3);
    expect(r.reader().read(got)).toBe(3);
    expect([...got]).toEqual([5, 6, 7]);
    const w = queue.pop()!;
    expect([w.count, w.readableCount, w.readableBytes, w.writableBytes, w.writableCount]).toEqual([1, 0, 0, 40, 1]);
    expect(w.segment(0).byteOffset - r.segment(0).byteOffset).toBe(8);
    // Reused chain objects must not keep counts from their previous chain.
    queue.push(r, 0);
    queue.push(w, 0);
    driver.add([[buf, 4], [buf + 4, 4]], [[buf + 8, 8]]);
    driver.add1(buf, 16, true);
    driver.publish();
    const three = queue.pop()!;
    expect([three.count, three.readableCount, three.readableBytes, three.writableBytes]).toEqual([3, 2, 8, 8]);
    queue.push(three, 0);
    const one = queue.pop()!;
    expect([one.count, one.readableCount, one.readableBytes, one.writableBytes]).toEqual([1, 0, 0, 16]);
  });

  it('gives a zero-length descriptor no segment', () => {
    const { driver, alloc, queue } = setup();
    driver.add1(alloc.alloc(8), 0, true);
    driver.publish();
    const c = queue.pop()!;
    expect([c.count, c.readableBytes, c.writableBytes]).toEqual([0, 0, 0]);
  });

  it('still checks bounds after the previous buffer warmed the lookup cache', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(8);
    driver.add1(buf, 8, true);
    driver.add1(MEM_BASE + MEM_SIZE - 4, 8, true); // starts inside the cached window, ends past the region
    driver.publish();
    queue.push(queue.pop()!, 0);
    expect(codeOf(() => queue.pop())).toBe('BAD_BUFFER');
    expect(queue.pop()).toBeNull();
  });

  it('honours maxSegments for a single segment too', () => {
    const { driver, alloc, queue } = setup({ maxSegments: 1 });
    const buf = alloc.alloc(16);
    driver.add1(buf, 16, true);
    driver.add([[buf, 8]], [[buf + 8, 8]]);
    driver.publish();
    expect(queue.pop()!.count).toBe(1);
    expect(codeOf(() => queue.pop())).toBe('CHAIN_TOO_LONG');
  });

  it('refuses a maxSegments below 1 (the lone-descriptor path does not look at it)', () => {
    expect(codeOf(() => setup({ maxSegments: 0 }))).toBe('BAD_RING');
  });

  it('splits a lone buffer that straddles two windows', () => {
    const big = new Uint8Array(WINDOW_SIZE + 0x10000);
    const memory = new GuestMemory([
      { guestPhysAddr: 0, size: big.length, userAddr: 0, mmapOffset: 0, hostAddr: 0, windows: splitWindows(big) },
    ]);
    const layout = splitRingLayout(4, WINDOW_SIZE + 0x1000);
    const driver = new SplitQueueDriver(memory, layout);
    const queue = new SplitQueue({ index: 0, memory, ...layout, eventIdx: false, indirect: false, lastAvailIdx: 0 });
    driver.add1(WINDOW_SIZE + 0x8000, 16, true); // warms the cache on the second window
    driver.add1(WINDOW_SIZE - 8, 16, true);
    driver.add1(WINDOW_SIZE + 0x8000, 16, true);
    driver.publish();
    expect(queue.pop()!.count).toBe(1);
    const split = queue.pop()!;
    expect(split.count).toBe(2);
    expect([split.segBuffer[0], split.segOffset[0], split.segLength[0]]).toEqual([0, WINDOW_SIZE - 8, 8]);
    expect([split.segBuffer[1], split.segOffset[1], split.segLength[1]]).toEqual([1, 0, 8]);
    const after = queue.pop()!;
    expect([after.count, after.segBuffer[0], after.segOffset[0]]).toEqual([1, 1, 0x8000]);
  });

  it('rejects an indirect table that is not 4-byte aligned', () => {
    const { driver, alloc, queue } = setup();
    const table = alloc.alloc(64, 16);
    driver.addRaw([[table + 2, 16, VIRTQ_DESC_F_INDIRECT]]);
    driver.publish();
    expect(codeOf(() => queue.pop())).toBe('BAD_INDIRECT');
  });

  it('walks indirect chains after direct ones and direct after indirect', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(64);
    const table = alloc.alloc(48, 16);
    for (let round = 0; round < 3; round++) {
      driver.add([[buf, 16]], [[buf + 16, 32], [buf + 48, 1]]);
      driver.add([[buf, 16]], [[buf + 16, 32], [buf + 48, 1]], table);
      driver.add1(buf, 64, false);
      driver.publish();
      for (let k = 0; k < 3; k++) {
        const c = queue.pop()!;
        expect(c.readableBytes + c.writableBytes).toBe(k === 2 ? 64 : 49);
        queue.push(c, 0);
      }
      expect(queue.pop()).toBeNull();
      queue.publish();
      while (driver.nextUsed() >= 0);
    }
    expect(driver.freeCount).toBe(16);
  });

  it('unpop rewinds: the next pop yields the same chain again', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(8);
    const head = driver.add1(buf, 8, true);
    driver.publish();
    const c = queue.pop()!;
    queue.unpop(c);
    expect(queue.inFlight).toBe(0);
    expect(codeOf(() => queue.unpop(c))).toBe('BAD_USED');
    const again = queue.pop()!;
    expect(again.head).toBe(head);
    expect(again.writableBytes).toBe(8);
    expect(queue.pop()).toBeNull();
  });
});

describe('GuestMemory.locate window cache', () => {
  it('answers like a fresh table whatever was looked up before', () => {
    const a = new Uint8Array(0x4000);
    const b = new Uint8Array(0x2000);
    const regions = [
      { guestPhysAddr: 0x100000, bytes: b },
      { guestPhysAddr: 0, bytes: a },
    ];
    const warm = GuestMemory.fromBuffers(regions);
    const probes: [number, number][] = [
      [0x10, 16],
      [0x100010, 0x1ff0],
      [0x100010, 0x1ff1],
      [0x3ff0, 0x10],
      [0x3ff0, 0x11],
      [0x4000, 1],
      [0x100000 - 1, 1],
      [0x101fff, 1],
      [0x102000, 1],
      [-1, 1],
      [2 ** 60, 1],
      [0, 0],
    ];
    for (let pass = 0; pass < 3; pass++) {
      for (const [gpa, len] of probes) {
        const cold = GuestMemory.fromBuffers(regions);
        const want: Location = { buffer: -1, offset: -1, span: -1 };
        const got: Location = { buffer: -1, offset: -1, span: -1 };
        expect(warm.locate(gpa, len, got)).toBe(cold.locate(gpa, len, want));
        expect(got).toEqual(want);
      }
      probes.reverse();
    }
  });

  it('exposes byte offsets of buffers for the word views', () => {
    const backing = new Uint8Array(0x3000);
    const m = GuestMemory.fromBuffers([{ guestPhysAddr: 0, bytes: backing.subarray(0x1000) }]);
    expect(m.byteOffsetOf(0)).toBe(0x1000);
    expect(m.words32(0).buffer).toBe(backing.buffer);
  });
});

describe('driver: addChain', () => {
  it('adds direct chains from reused typed arrays, and indirect ones', () => {
    const { driver, alloc, queue, memory } = setup();
    const buf = alloc.alloc(64);
    memory.write(buf, new Uint8Array(16).fill(9));
    const addr = Float64Array.of(buf, buf + 16, buf + 48);
    const length = Uint32Array.of(16, 32, 1);
    const direct = driver.addChain(addr, length, 3, 1);
    expect(driver.freeCount).toBe(13);
    const table = alloc.alloc(48, 16);
    const indirect = driver.addChain(addr, length, 3, 2, table);
    expect(driver.freeCount).toBe(12);
    driver.publish();
    for (const [head, readable, readableBytes] of [
      [direct, 1, 16],
      [indirect, 2, 48],
    ]) {
      const c = queue.pop()!;
      expect(c.head).toBe(head);
      expect([c.count, c.readableCount, c.readableBytes, c.readableBytes + c.writableBytes]).toEqual([3, readable, readableBytes, 49]);
      expect(c.segment(0)[15]).toBe(9);
      queue.push(c, 7);
    }
    queue.publish();
    expect(driver.nextUsed()).toBe(direct);
    expect(driver.lastUsedLen).toBe(7);
    expect(driver.nextUsed()).toBe(indirect);
    expect(driver.nextUsed()).toBe(-1);
    expect(driver.freeCount).toBe(16);
  });

  it('refuses a chain longer than the free descriptors, and an empty one', () => {
    const { driver, alloc } = setup({ size: 2 });
    const buf = alloc.alloc(8);
    expect(driver.addChain([buf, buf, buf], [8, 8, 8], 3, 3)).toBe(-1);
    expect(driver.addChain([], [], 0, 0)).toBe(-1);
    expect(driver.freeCount).toBe(2);
    expect(() => driver.addChain([buf], [8], 1, 1, buf + 2)).toThrow(RangeError); // misaligned table
  });

  it('nextUsed sees used entries published while it was consuming earlier ones', () => {
    const { driver, alloc, queue } = setup({ eventIdx: true });
    const buf = alloc.alloc(8);
    const heads = [0, 1, 2].map(() => driver.add1(buf, 8, true));
    driver.publish();
    queue.push(queue.pop()!, 1);
    queue.push(queue.pop()!, 2);
    queue.publish();
    expect(driver.nextUsed()).toBe(heads[0]);
    queue.push(queue.pop()!, 3);
    queue.publish();
    expect(driver.nextUsed()).toBe(heads[1]);
    expect(driver.nextUsed()).toBe(heads[2]);
    expect(driver.lastUsedLen).toBe(3);
    expect(driver.nextUsed()).toBe(-1);
    expect(driver.lastUsedIdx).toBe(3);
  });

  it('writes descriptors with the flags and next the device expects', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(8);
    driver.writeDescriptor(3, buf, 8, VIRTQ_DESC_F_WRITE, 0);
    driver.pushAvailRaw(3);
    driver.publish();
    const c = queue.pop()!;
    expect([c.head, c.writableBytes, c.readableBytes]).toEqual([3, 8, 0]);
  });
});
