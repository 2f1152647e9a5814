import { describe, expect, it } from 'vitest';
import {
  GuestAllocator,
  GuestMemory,
  PACKED_INITIAL_BASE,
  PackedQueue,
  PackedQueueDriver,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  VirtqueueError,
  packedRingLayout,
  type PackedQueueConfig,
} from '../../src/virtqueue/index.js';

const MEM_BASE = 0x10000;
const MEM_SIZE = 1 << 20;

function setup(opts: { size?: number; eventIdx?: boolean; indirect?: boolean } = {}) {
  const size = opts.size ?? 16;
  const bytes = new Uint8Array(MEM_SIZE);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: MEM_BASE, bytes }]);
  const layout = packedRingLayout(size, MEM_BASE);
  const driver = new PackedQueueDriver(memory, layout, opts.eventIdx ?? false);
  const alloc = new GuestAllocator(layout.end, MEM_BASE + MEM_SIZE);
  const cfg: PackedQueueConfig = {
    index: 0,
    size,
    memory,
    descAddr: layout.descAddr,
    driverAddr: layout.availAddr,
    deviceAddr: layout.usedAddr,
    eventIdx: opts.eventIdx ?? false,
    indirect: opts.indirect ?? true,
    base: PACKED_INITIAL_BASE,
  };
  const queue = new PackedQueue(cfg);
  // The two event suppression areas, as the other side sees them: [0] off_wrap, [1] flags.
  const area = (gpa: number) => {
    const v = memory.slice(gpa, 4);
    return new Uint16Array(v.buffer, v.byteOffset, 2);
  };
  return { memory, driver, alloc, queue, cfg, bytes, driverArea: area(layout.availAddr), deviceArea: area(layout.usedAddr) };
}

function expectQueueError(fn: () => unknown, code: string) {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(VirtqueueError);
    expect((e as VirtqueueError).code).toBe(code);
    return;
  }
  throw new Error(`expected VirtqueueError ${code}`);
}

describe('packed queue: chains', () => {
  it('exposes readable then writable segments with guest addresses, and the id and descriptor count', () => {
    const { driver, alloc, queue, memory } = setup();
    const [a, b, c] = [alloc.alloc(4), alloc.alloc(6), alloc.alloc(16)];
    memory.write(a, Uint8Array.of(1, 2, 3, 4));
    const id = driver.add([[a, 4], [b, 6]], [[c, 16]]);
    expect(queue.pop()).toBeNull(); // not published yet: the head is not flagged
    driver.publish();
    const chain = queue.pop()!;
    expect(chain.head).toBe(id);
    expect(chain.descriptorCount).toBe(3);
    expect([chain.count, chain.readableCount, chain.readableBytes, chain.writableBytes]).toEqual([3, 2, 10, 16]);
    expect([...chain.segAddr.subarray(0, 3)]).toEqual([a, b, c]);
    expect([...chain.segment(0)]).toEqual([1, 2, 3, 4]);
    chain.segment(2)[0] = 0xee; // zero-copy: the guest sees it
    expect(memory.slice(c, 1)[0]).toBe(0xee);
    queue.push(chain, 7);
    expect(driver.nextUsed()).toBe(-1); // pushed, not published
    queue.publish();
    expect(driver.nextUsed()).toBe(id);
    expect(driver.lastUsedLen).toBe(7);
    expect(driver.freeCount).toBe(16);
  });

  it('walks indirect tables: one ring descriptor, the id in it, only WRITE counted inside', () => {
    const { driver, alloc, queue } = setup();
    const bufs = [alloc.alloc(10), alloc.alloc(20), alloc.alloc(30)];
    const table = alloc.alloc(48, 16);
    const id = driver.add([[bufs[0], 10]], [[bufs[1], 20], [bufs[2], 30]], table);
    driver.publish();
    const chain = queue.pop()!;
    expect(chain.head).toBe(id);
    expect(chain.descriptorCount).toBe(1);
    expect([chain.readableBytes, chain.writableBytes, chain.count]).toEqual([10, 50, 3]);
    expect([...chain.segAddr.subarray(0, 3)]).toEqual(bufs);
    queue.push(chain, 50);
    queue.publish();
    expect(driver.nextUsed()).toBe(id);
    expect(driver.freeCount).toBe(16);
  });

  it('completes out of order: used descriptors by id, the used index moving by each chain’s count', () => {
    const { driver, alloc, queue } = setup({ size: 8 });
    const buf = alloc.alloc(64);
    const ids = [driver.add([[buf, 8]], [[buf, 8]]), driver.add([[buf, 8]], []), driver.add([], [[buf, 8], [buf + 8, 8], [buf + 16, 8]])];
    driver.publish();
    const chains = [queue.pop()!, queue.pop()!, queue.pop()!];
    expect(chains.map((c) => c.head)).toEqual(ids);
    expect(queue.pop()).toBeNull();
    for (const k of [2, 0, 1]) queue.push(chains[k], 10 + k);
    queue.publish();
    const seen: [number, number][] = [];
    for (let id = driver.nextUsed(); id >= 0; id = driver.nextUsed()) seen.push([id, driver.lastUsedLen]);
    expect(seen).toEqual([[ids[2], 12], [ids[0], 10], [ids[1], 11]]);
    expect(driver.freeCount).toBe(8);
  });

  it('runs many laps of a ring whose size is not a power of 2, chains of mixed length completing in any order', () => {
    const { driver, alloc, queue } = setup({ size: 13 });
    const buf = alloc.alloc(256);
    let s = 12345;
    const rand = () => (s = (Math.imul(s, 1103515245) + 12345) >>> 0) >>> 8;
    const held: ReturnType<PackedQueue['pop']>[] = [];
    let added = 0;
    let returned = 0;
    for (let round = 0; round < 3000; round++) {
      const n = 1 + (rand() % 4);
      if (driver.freeCount >= n) {
        const lens = Array.from({ length: n }, (_, k) => [buf + 16 * k, 16] as const);
        if (driver.add(lens.slice(0, 1), lens.slice(1)) >= 0) added++;
      }
      if (rand() % 3 === 0) driver.publish();
      for (let c = queue.pop(); c !== null; c = queue.pop()) held.push(c);
      // Return a random subset, in random order.
      for (let k = held.length; k > 0 && rand() % 2 === 0; k--) {
        const [c] = held.splice(rand() % held.length, 1);
        queue.push(c!, c!.writableBytes);
      }
      queue.publish();
      while (driver.nextUsed() >= 0) returned++;
    }
    driver.publish();
    for (let c = queue.pop(); c !== null; c = queue.pop()) held.push(c);
    for (const c of held.splice(0)) queue.push(c!, 0);
    queue.publish();
    while (driver.nextUsed() >= 0) returned++;
    expect(returned).toBe(added);
    expect(added).toBeGreaterThan(1000);
    expect(driver.freeCount).toBe(13);
    expect(queue.inFlight).toBe(0);
  });

  it('unpop gives chains back across the wrap; the next pops yield them again', () => {
    const { driver, alloc, queue } = setup({ size: 4 });
    const buf = alloc.alloc(16);
    // Move both sides to slot 3 of the first lap, then add a 2-descriptor chain that wraps.
    for (let k = 0; k < 3; k++) driver.add1(buf, 8, false);
    driver.publish();
    for (let k = 0; k < 3; k++) queue.push(queue.pop()!, 0);
    queue.publish();
    while (driver.nextUsed() >= 0);
    const id = driver.add([[buf, 8]], [[buf + 8, 8]]);
    driver.publish();
    const c = queue.pop()!;
    expect(c.descriptorCount).toBe(2);
    const baseAfterPop = queue.vringBase();
    queue.unpop(c);
    expect(queue.vringBase()).not.toBe(baseAfterPop);
    expect(queue.hasAvailable()).toBe(true);
    const again = queue.pop()!;
    expect(again.head).toBe(id);
    expect(queue.vringBase()).toBe(baseAfterPop);
    queue.push(again, 3);
    queue.publish();
    expect(driver.nextUsed()).toBe(id);
  });

  it('reports its position in the 32-bit vring base, and a queue made from it resumes there', () => {
    const d = setup({ size: 5 });
    const buf = d.alloc.alloc(8);
    expect(d.queue.vringBase()).toBe(PACKED_INITIAL_BASE);
    for (let k = 0; k < 7; k++) {
      d.driver.add1(buf, 8, true);
      d.driver.publish();
      d.queue.push(d.queue.pop()!, 1);
      d.queue.publish();
      d.driver.nextUsed();
    }
    // 7 descriptors into a 5-entry ring: index 2 of the second lap (wrap counter 0) on both sides.
    expect(d.queue.vringBase()).toBe(2 | (2 << 16));
    const resumed = new PackedQueue({ ...d.cfg, base: d.queue.vringBase() });
    d.driver.add1(buf, 8, true);
    d.driver.publish();
    const c = resumed.pop()!;
    resumed.push(c, 8);
    resumed.publish();
    expect(d.driver.nextUsed()).toBe(c.head);
    // A base with no used half (DPDK's virtio-user sends only the avail half) means used = avail.
    expect(new PackedQueue({ ...d.cfg, base: 0x8003 }).vringBase()).toBe(0x80038003);
  });

  it('allocates nothing in steady state: chain objects are pooled', () => {
    const { driver, alloc, queue } = setup({ size: 8 });
    const buf = alloc.alloc(64);
    const seen = new Set<object>();
    for (let i = 0; i < 100; i++) {
      driver.add1(buf, 64, true);
      driver.publish();
      const c = queue.pop()!;
      seen.add(c);
      queue.push(c, 64);
      queue.publish();
      driver.nextUsed();
    }
    expect(seen.size).toBe(1);
  });
});

describe('packed queue: validation of what the guest controls', () => {
  /** Write raw descriptors at the driver's next slots, available in its current lap, the head flagged last. */
  function raw(d: ReturnType<typeof setup>, descs: [gpa: number, len: number, id: number, flags: number][]) {
    const start = d.driver.availSlot;
    const lap = d.driver.lapBits();
    descs.forEach(([gpa, len, id, flags], k) => {
      if (k > 0) d.driver.writeDescriptor((start + k) % d.cfg.size, gpa, len, id, flags | lap);
    });
    const [gpa, len, id, flags] = descs[0];
    d.driver.writeDescriptor(start, gpa, len, id, flags | lap);
  }

  it('rejects buffers outside guest memory, past a region end, or beyond 2^53', () => {
    for (const [gpa, len] of [[MEM_BASE + MEM_SIZE + 4096, 16], [MEM_BASE + MEM_SIZE - 8, 16], [2 ** 60, 16]] as const) {
      const d = setup();
      raw(d, [[gpa, len, 0, 0]]);
      expectQueueError(() => d.queue.pop(), 'BAD_BUFFER');
      expect(d.queue.broken).not.toBeNull();
      expect(d.queue.pop()).toBeNull(); // broken until reset
    }
  });

  it('rejects a buffer id outside the ring, and one still in flight', () => {
    const d = setup();
    const buf = d.alloc.alloc(16);
    raw(d, [[buf, 16, 16, 0]]);
    expectQueueError(() => d.queue.pop(), 'BAD_ID');
    const e = setup();
    const b2 = e.alloc.alloc(16);
    raw(e, [[b2, 16, 3, 0]]);
    expect(e.queue.pop()!.head).toBe(3);
    e.driver.writeDescriptor(1, b2, 16, 3, e.driver.lapBits());
    expectQueueError(() => e.queue.pop(), 'BAD_ID');
  });

  it('rejects a chain that runs into a descriptor the driver has not made available', () => {
    const d = setup();
    const buf = d.alloc.alloc(16);
    // Head says NEXT, but the second descriptor still has the flags of a used one (wrong wrap counter).
    d.driver.writeDescriptor(1, buf, 8, 0, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
    d.driver.writeDescriptor(0, buf, 8, 0, VIRTQ_DESC_F_NEXT | d.driver.lapBits());
    expectQueueError(() => d.queue.pop(), 'NOT_AVAILABLE');
  });

  it('rejects a chain longer than the ring (every descriptor says NEXT)', () => {
    // With every slot available and chained, the walk comes round to the head in the next lap, where it no
    // longer counts as available: the chain is refused one way or the other, never walked forever.
    const d = setup({ size: 4 });
    const buf = d.alloc.alloc(16);
    raw(d, [0, 1, 2, 3].map((k) => [buf, 4, k, VIRTQ_DESC_F_NEXT] as [number, number, number, number]));
    try {
      d.queue.pop();
      throw new Error('accepted a chain around the whole ring');
    } catch (e) {
      expect(e).toBeInstanceOf(VirtqueueError);
      expect(['NOT_AVAILABLE', 'CHAIN_TOO_LONG']).toContain((e as VirtqueueError).code);
    }
  });

  it('rejects a readable descriptor after a writable one, in the ring and in an indirect table', () => {
    const d = setup();
    const buf = d.alloc.alloc(16);
    raw(d, [[buf, 8, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT], [buf, 8, 0, 0]]);
    expectQueueError(() => d.queue.pop(), 'ORDER');
    const e = setup();
    const table = e.alloc.alloc(32, 16);
    const b = e.alloc.alloc(16);
    const t = new PackedQueueDriver(e.memory, packedRingLayout(2, table), false); // reuse its writer for the table
    t.writeDescriptor(0, b, 8, 0, VIRTQ_DESC_F_WRITE);
    t.writeDescriptor(1, b, 8, 0, 0);
    raw(e, [[table, 32, 0, VIRTQ_DESC_F_INDIRECT]]);
    expectQueueError(() => e.queue.pop(), 'ORDER');
  });

  it('rejects nested, chained, empty, misaligned-size, unmapped and unnegotiated indirect tables', () => {
    const cases: [string, (d: ReturnType<typeof setup>) => void][] = [
      ['nested', (d) => {
        const table = d.alloc.alloc(16, 16);
        new PackedQueueDriver(d.memory, packedRingLayout(1, table), false).writeDescriptor(0, table, 16, 0, VIRTQ_DESC_F_INDIRECT);
        raw(d, [[table, 16, 0, VIRTQ_DESC_F_INDIRECT]]);
      }],
      ['with NEXT', (d) => raw(d, [[d.alloc.alloc(16, 16), 16, 0, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT], [d.alloc.alloc(8), 8, 0, 0]])],
      ['after a direct one', (d) => raw(d, [[d.alloc.alloc(8), 8, 0, VIRTQ_DESC_F_NEXT], [d.alloc.alloc(16, 16), 16, 0, VIRTQ_DESC_F_INDIRECT]])],
      ['empty', (d) => raw(d, [[d.alloc.alloc(16, 16), 0, 0, VIRTQ_DESC_F_INDIRECT]])],
      ['odd size', (d) => raw(d, [[d.alloc.alloc(32, 16), 24, 0, VIRTQ_DESC_F_INDIRECT]])],
      ['unmapped', (d) => raw(d, [[MEM_BASE + MEM_SIZE, 16, 0, VIRTQ_DESC_F_INDIRECT]])],
      ['misaligned', (d) => raw(d, [[d.alloc.alloc(32, 16) + 2, 16, 0, VIRTQ_DESC_F_INDIRECT]])],
    ];
    for (const [what, make] of cases) {
      const d = setup();
      make(d);
      try {
        d.queue.pop();
        throw new Error(`accepted an indirect table: ${what}`);
      } catch (e) {
        expect(e, what).toBeInstanceOf(VirtqueueError);
        expect((e as VirtqueueError).code, what).toBe('BAD_INDIRECT');
      }
    }
    const off = setup({ indirect: false });
    raw(off, [[off.alloc.alloc(16, 16), 16, 0, VIRTQ_DESC_F_INDIRECT]]);
    expectQueueError(() => off.queue.pop(), 'BAD_INDIRECT');
  });

  it('rejects chains with more segments than the queue allows', () => {
    const d = setup();
    const q = new PackedQueue({ ...d.cfg, maxSegments: 2 });
    const buf = d.alloc.alloc(16);
    raw(d, [[buf, 4, 0, VIRTQ_DESC_F_NEXT], [buf, 4, 0, VIRTQ_DESC_F_NEXT], [buf, 4, 0, 0]]);
    expectQueueError(() => q.pop(), 'CHAIN_TOO_LONG');
    // Below 1 it is refused: the lone-descriptor path does not look at it.
    expectQueueError(() => new PackedQueue({ ...d.cfg, maxSegments: 0 }), 'BAD_RING');
  });

  it('rejects rings outside memory or misaligned, bad sizes and bases', () => {
    const d = setup();
    expectQueueError(() => new PackedQueue({ ...d.cfg, descAddr: MEM_BASE + MEM_SIZE }), 'BAD_RING');
    expectQueueError(() => new PackedQueue({ ...d.cfg, descAddr: d.cfg.descAddr + 8 }), 'BAD_RING');
    expectQueueError(() => new PackedQueue({ ...d.cfg, driverAddr: d.cfg.driverAddr + 2 }), 'BAD_RING');
    expectQueueError(() => new PackedQueue({ ...d.cfg, size: 0 }), 'BAD_RING');
    expectQueueError(() => new PackedQueue({ ...d.cfg, size: 32769 }), 'BAD_RING');
    expectQueueError(() => new PackedQueue({ ...d.cfg, base: 0x8000 | 16 }), 'BAD_RING'); // avail index past the ring
    expectQueueError(() => new PackedQueue({ ...d.cfg, base: 0x8000 | ((0x8000 | 20) << 16) }), 'BAD_RING');
  });

  it('catches a chain returned twice', () => {
    const { driver, alloc, queue } = setup();
    driver.add1(alloc.alloc(8), 8, false);
    driver.publish();
    const c = queue.pop()!;
    queue.push(c, 0);
    expectQueueError(() => queue.push(c, 0), 'BAD_USED');
  });
});

describe('packed queue: notifications', () => {
  it('publishes a batch whole: its first used descriptor is flagged last', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(8);
    for (let k = 0; k < 3; k++) driver.add1(buf, 8, false);
    driver.publish();
    const cs = [queue.pop()!, queue.pop()!, queue.pop()!];
    for (const c of cs.reverse()) queue.push(c, 0);
    expect(driver.nextUsed()).toBe(-1);
    queue.publish();
    expect([driver.nextUsed(), driver.nextUsed(), driver.nextUsed(), driver.nextUsed()]).toEqual([cs[0].head, cs[1].head, cs[2].head, -1]);
  });

  it('without EVENT_IDX: honours the driver’s DISABLE and ENABLE, and sets DISABLE while busy', () => {
    const { driver, alloc, queue, deviceArea } = setup();
    const buf = alloc.alloc(8);
    const step = () => {
      driver.add1(buf, 8, false);
      driver.publish();
      queue.push(queue.pop()!, 0);
      const notify = queue.publish();
      while (driver.nextUsed() >= 0);
      return notify;
    };
    expect(step()).toBe(true); // the first publish always notifies
    driver.setNoInterrupt(true);
    expect(step()).toBe(false);
    driver.setNoInterrupt(false);
    expect(step()).toBe(true);
    queue.disableNotification();
    expect(deviceArea[1]).toBe(RING_EVENT_FLAGS_DISABLE);
    expect(driver.publish()).toBe(false);
    expect(queue.enableNotification()).toBe(false);
    expect(deviceArea[1]).toBe(RING_EVENT_FLAGS_ENABLE);
    // Off again after an enable; a repeated disable stores nothing (the runner calls it on every pass): flags
    // changed behind its back stay so.
    queue.disableNotification();
    expect(deviceArea[1]).toBe(RING_EVENT_FLAGS_DISABLE);
    deviceArea[1] = RING_EVENT_FLAGS_ENABLE;
    queue.disableNotification();
    expect(deviceArea[1]).toBe(RING_EVENT_FLAGS_ENABLE);
    queue.enableNotification();
    queue.disableNotification();
    expect(deviceArea[1]).toBe(RING_EVENT_FLAGS_DISABLE);
  });

  it('EVENT_IDX: notifies only when the used index passes the driver’s event offset, across the wrap', () => {
    const { driver, alloc, queue, driverArea } = setup({ size: 4, eventIdx: true });
    expect(driverArea[1]).toBe(RING_EVENT_FLAGS_DESC);
    const buf = alloc.alloc(8);
    const post = (n: number) => {
      for (let k = 0; k < n; k++) driver.add1(buf, 8, false);
      driver.publish();
      for (let k = 0; k < n; k++) queue.push(queue.pop()!, 0);
    };
    post(1);
    expect(queue.publish()).toBe(true);
    while (driver.nextUsed() >= 0);
    // Used index is 1 (lap 1). Ask for an interrupt when slot 0 of the next lap is written.
    driver.setUsedEvent(0, 0);
    post(2); // used -> 3
    expect(queue.publish()).toBe(false);
    while (driver.nextUsed() >= 0);
    driver.setUsedEvent(3, 1);
    post(2); // writes slot 3 of lap 1 and slot 0 of lap 2: passes the event, from the lap before the used index
    expect(queue.publish()).toBe(true);
    while (driver.nextUsed() >= 0);
    // An offset of the previous lap that the batch moves past.
    driver.setUsedEvent(3, 1);
    post(1); // used slot 1 of lap 2: the event (slot 3 of lap 1) was passed earlier, not in this batch
    expect(queue.publish()).toBe(false);
  });

  it('EVENT_IDX: enableNotification writes its avail offset and wrap, and reports work that slipped in', () => {
    const { driver, alloc, queue, deviceArea } = setup({ size: 4, eventIdx: true });
    const buf = alloc.alloc(8);
    expect(queue.enableNotification()).toBe(false);
    expect([deviceArea[0], deviceArea[1]]).toEqual([0 | (1 << 15), RING_EVENT_FLAGS_DESC]);
    driver.add1(buf, 8, false);
    expect(driver.publish()).toBe(true); // the driver passed our offset: it kicks
    queue.push(queue.pop()!, 0);
    queue.disableNotification(); // a no-op with EVENT_IDX: the offset stays behind us
    driver.add1(buf, 8, false);
    expect(driver.publish()).toBe(false);
    expect(queue.enableNotification()).toBe(true); // it slipped in while we were not looking
    expect(deviceArea[0]).toBe(1 | (1 << 15));
  });
});
