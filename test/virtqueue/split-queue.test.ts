import { describe, expect, it } from 'vitest';
import {
  GuestAllocator,
  GuestMemory,
  SplitQueue,
  SplitQueueDriver,
  VirtqueueError,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  splitRingLayout,
  type SplitQueueConfig,
} from '../../src/virtqueue/index.js';

const MEM_BASE = 0x10000;
const MEM_SIZE = 1 << 20;

function setup(opts: { size?: number; eventIdx?: boolean; indirect?: boolean } = {}) {
  const size = opts.size ?? 16;
  const bytes = new Uint8Array(MEM_SIZE);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: MEM_BASE, bytes }]);
  const layout = splitRingLayout(size, MEM_BASE);
  const driver = new SplitQueueDriver(memory, layout, opts.eventIdx ?? false);
  const alloc = new GuestAllocator(layout.end, MEM_BASE + MEM_SIZE);
  const cfg: SplitQueueConfig = {
    index: 0,
    size,
    memory,
    descAddr: layout.descAddr,
    availAddr: layout.availAddr,
    usedAddr: layout.usedAddr,
    eventIdx: opts.eventIdx ?? false,
    indirect: opts.indirect ?? true,
    lastAvailIdx: 0,
  };
  const queue = new SplitQueue(cfg);
  return { memory, driver, alloc, queue, cfg, bytes };
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

describe('split queue: chains', () => {
  it('exposes readable then writable segments, zero-copy', () => {
    const { memory, driver, alloc, queue } = setup();
    const req = alloc.alloc(8);
    const resp = alloc.alloc(16);
    memory.write(req, new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]));
    const head = driver.add([[req, 4], [req + 4, 4]], [[resp, 16]]);
    driver.publish();
    const chain = queue.pop()!;
    expect(chain.head).toBe(head);
    expect(chain.count).toBe(3);
    expect(chain.readableCount).toBe(2);
    expect(chain.readableBytes).toBe(8);
    expect(chain.writableBytes).toBe(16);
    const r = chain.reader();
    expect(r.readUint(4)).toBe(0x04030201);
    expect(r.readUint(4)).toBe(0x08070605);
    expect(() => r.readUint(1)).toThrow(RangeError);
    chain.segment(2)[0] = 0xaa; // zero-copy: visible in guest memory
    const out = new Uint8Array(1);
    memory.read(resp, out);
    expect(out[0]).toBe(0xaa);
    const w = chain.writer();
    w.write(new Uint8Array([9, 9, 9]));
    w.writeUint(0x11223344, 4);
    expect(w.written).toBe(7);
    queue.push(chain, w.written);
    expect(queue.publish()).toBe(true);
    expect(driver.nextUsed()).toBe(head);
    expect(driver.lastUsedLen).toBe(7);
    expect(queue.pop()).toBeNull();
  });

  it('reader and writer cross segment boundaries', () => {
    const { memory, driver, alloc, queue } = setup();
    const a = alloc.alloc(3);
    const b = alloc.alloc(5);
    const c = alloc.alloc(2);
    const d = alloc.alloc(6);
    memory.write(a, new Uint8Array([1, 2, 3]));
    memory.write(b, new Uint8Array([4, 5, 6, 7, 8]));
    driver.add([[a, 3], [b, 5]], [[c, 2], [d, 6]]);
    driver.publish();
    const chain = queue.pop()!;
    const r = chain.reader();
    expect(r.skip(2)).toBe(2);
    const got = new Uint8Array(5);
    expect(r.read(got)).toBe(5);
    expect([...got]).toEqual([3, 4, 5, 6, 7]);
    expect(r.remaining).toBe(1);
    const w = chain.writer();
    w.writeUint(0xdeadbeef, 4);
    expect(w.fill(0x55)).toBe(4);
    expect(w.remaining).toBe(0);
    const cc = new Uint8Array(2);
    const dd = new Uint8Array(6);
    memory.read(c, cc);
    memory.read(d, dd);
    expect([...cc, ...dd]).toEqual([0xef, 0xbe, 0xad, 0xde, 0x55, 0x55, 0x55, 0x55]);
  });

  it('walks indirect tables', () => {
    const { memory, driver, alloc, queue } = setup();
    const table = alloc.alloc(16 * 3, 16);
    const bufs = [alloc.alloc(10), alloc.alloc(20), alloc.alloc(30)];
    memory.write(bufs[0], new Uint8Array(10).fill(7));
    const head = driver.add([[bufs[0], 10]], [[bufs[1], 20], [bufs[2], 30]], table);
    driver.publish();
    const chain = queue.pop()!;
    expect(chain.head).toBe(head);
    expect(chain.count).toBe(3);
    expect(chain.readableBytes).toBe(10);
    expect(chain.writableBytes).toBe(50);
    expect(chain.segment(0)[9]).toBe(7);
    queue.push(chain, 50);
    queue.publish();
    expect(driver.nextUsed()).toBe(head);
    expect(driver.freeCount).toBe(16);
  });

  it('allocates nothing in steady state: chain objects are pooled', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(64);
    const seen = new Set<object>();
    for (let round = 0; round < 100; round++) {
      driver.add1(buf, 64, true);
      driver.publish();
      const c = queue.pop()!;
      seen.add(c);
      queue.push(c, 0);
      queue.publish();
      driver.nextUsed();
    }
    expect(seen.size).toBe(1);
  });

  it('runs across the 16-bit index wrap', () => {
    const { driver, alloc, queue } = setup({ size: 8, eventIdx: true });
    const buf = alloc.alloc(8);
    let count = 0;
    for (let round = 0; round < 70000 / 5; round++) {
      for (let k = 0; k < 5; k++) driver.add1(buf, 8, false);
      driver.publish();
      let c;
      while ((c = queue.pop())) {
        queue.push(c, 0);
        count++;
      }
      queue.publish();
      while (driver.nextUsed() >= 0);
    }
    expect(count).toBe(70000);
    expect(queue.vringBase()).toBe(70000 & 0xffff);
    expect(driver.usedIdx()).toBe(70000 & 0xffff);
  });
});

describe('split queue: validation of what the guest controls', () => {
  it('rejects a buffer outside guest memory', () => {
    const { driver, queue } = setup();
    driver.addRaw([[MEM_BASE + MEM_SIZE + 4096, 16, 0]]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_BUFFER');
    expect(queue.broken?.code).toBe('BAD_BUFFER');
    expect(queue.pop()).toBeNull(); // stays broken
  });

  it('rejects a buffer that runs past the end of its region', () => {
    const { driver, queue } = setup();
    driver.addRaw([[MEM_BASE + MEM_SIZE - 8, 16, 0]]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_BUFFER');
  });

  it('rejects a buffer crossing from one region into an adjacent one', () => {
    const a = new Uint8Array(0x10000);
    const b = new Uint8Array(0x10000);
    const memory = GuestMemory.fromBuffers([
      { guestPhysAddr: 0, bytes: a },
      { guestPhysAddr: 0x10000, bytes: b },
    ]);
    const layout = splitRingLayout(4, 0);
    const driver = new SplitQueueDriver(memory, layout);
    const queue = new SplitQueue({ index: 3, memory, ...layout, eventIdx: false, indirect: false, lastAvailIdx: 0 });
    driver.addRaw([[0x10000 - 4, 8, 0]]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_BUFFER');
    expect(queue.broken?.message).toMatch(/^queue 3:/);
  });

  it('rejects addresses beyond 2^53', () => {
    const { driver, queue } = setup();
    driver.writeDescriptor(0, 0, 16, 0, 0);
    // hi word 0xffffffff: the address is not representable as a Number and never valid
    const head = 0;
    driver.writeDescriptor(head, 0xffffffff * 4294967296, 16, 0, 0);
    driver.pushAvailRaw(head);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_BUFFER');
  });

  it('detects a chain that loops', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(8);
    driver.writeDescriptor(0, buf, 8, VIRTQ_DESC_F_NEXT, 1);
    driver.writeDescriptor(1, buf, 8, VIRTQ_DESC_F_NEXT, 0);
    driver.pushAvailRaw(0);
    driver.publish();
    expectQueueError(() => queue.pop(), 'CHAIN_LOOP');
  });

  it('detects a self-loop inside an indirect table', () => {
    const { memory, driver, alloc, queue } = setup();
    const table = alloc.alloc(32, 16);
    const buf = alloc.alloc(8);
    const t = new DataView(memory.slice(table, 32).buffer, memory.slice(table, 32).byteOffset, 32);
    for (let i = 0; i < 2; i++) {
      t.setUint32(16 * i, buf, true);
      t.setUint32(16 * i + 8, 8, true);
      t.setUint16(16 * i + 12, VIRTQ_DESC_F_NEXT, true);
      t.setUint16(16 * i + 14, 1, true); // 0 -> 1 -> 1 -> ...
    }
    driver.addRaw([[table, 32, VIRTQ_DESC_F_INDIRECT]]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'CHAIN_LOOP');
  });

  it('rejects a next index outside the table', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(8);
    driver.writeDescriptor(0, buf, 8, VIRTQ_DESC_F_NEXT, 16);
    driver.pushAvailRaw(0);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_NEXT');
  });

  it('rejects a head outside the table', () => {
    const { driver, queue } = setup();
    driver.pushAvailRaw(16);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_HEAD');
  });

  it('rejects an avail idx that jumps by more than the queue size', () => {
    const { driver, queue } = setup();
    driver.setAvailIdxRaw(17);
    expectQueueError(() => queue.pop(), 'AVAIL_IDX');
  });

  it('rejects a readable descriptor after a writable one', () => {
    const { driver, alloc, queue } = setup();
    const buf = alloc.alloc(8);
    driver.addRaw([
      [buf, 8, VIRTQ_DESC_F_WRITE],
      [buf, 8, 0],
    ]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'ORDER');
  });

  it('rejects nested indirect tables', () => {
    const { memory, driver, alloc, queue } = setup();
    const outer = alloc.alloc(16, 16);
    const inner = alloc.alloc(16, 16);
    const v = memory.slice(outer, 16);
    new DataView(v.buffer, v.byteOffset).setUint32(0, inner, true);
    new DataView(v.buffer, v.byteOffset).setUint32(8, 16, true);
    new DataView(v.buffer, v.byteOffset).setUint16(12, VIRTQ_DESC_F_INDIRECT, true);
    driver.addRaw([[outer, 16, VIRTQ_DESC_F_INDIRECT]]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_INDIRECT');
  });

  it('rejects an indirect descriptor that is not alone in its chain', () => {
    const { driver, alloc, queue } = setup();
    const table = alloc.alloc(16, 16);
    const buf = alloc.alloc(8);
    driver.addRaw([
      [buf, 8, 0],
      [table, 16, VIRTQ_DESC_F_INDIRECT],
    ]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'BAD_INDIRECT');
  });

  it('rejects indirect tables of bad size, outside memory, or not negotiated', () => {
    for (const [addr, len, indirect] of [
      [0x20000, 24, true],
      [0x20000, 0, true],
      [MEM_BASE + MEM_SIZE, 16, true],
      [0x20000, 16, false],
    ] as const) {
      const { driver, queue } = setup({ indirect });
      driver.addRaw([[addr, len, VIRTQ_DESC_F_INDIRECT]]);
      driver.publish();
      expectQueueError(() => queue.pop(), 'BAD_INDIRECT');
    }
  });

  it('rejects chains with more segments than the queue allows', () => {
    const { driver, alloc, cfg } = setup();
    const queue = new SplitQueue({ ...cfg, maxSegments: 2 });
    const buf = alloc.alloc(8);
    driver.addRaw([
      [buf, 8, 0],
      [buf, 8, 0],
      [buf, 8, 0],
    ]);
    driver.publish();
    expectQueueError(() => queue.pop(), 'CHAIN_TOO_LONG');
  });

  it('rejects rings outside memory, misaligned, or of a bad size', () => {
    const { cfg } = setup();
    expectQueueError(() => new SplitQueue({ ...cfg, descAddr: MEM_BASE + MEM_SIZE }), 'BAD_RING');
    expectQueueError(() => new SplitQueue({ ...cfg, usedAddr: cfg.usedAddr + 2 }), 'BAD_RING');
    expectQueueError(() => new SplitQueue({ ...cfg, size: 12 }), 'BAD_RING');
    expectQueueError(() => new SplitQueue({ ...cfg, size: 65536 }), 'BAD_RING');
  });

  it('catches a chain returned twice', () => {
    const { driver, alloc, queue } = setup();
    driver.add1(alloc.alloc(8), 8, true);
    driver.publish();
    const c = queue.pop()!;
    queue.push(c, 0);
    expectQueueError(() => queue.push(c, 0), 'BAD_USED');
  });
});

describe('split queue: notifications', () => {
  it('EVENT_IDX: notifies only when used idx passes used_event, across the 16-bit wrap', () => {
    const { driver, alloc, queue } = setup({ eventIdx: true });
    const buf = alloc.alloc(8);
    const step = (n: number) => {
      for (let k = 0; k < n; k++) driver.add1(buf, 8, false);
      driver.publish();
      for (let k = 0; k < n; k++) queue.push(queue.pop()!, 0);
    };
    step(1);
    expect(queue.publish()).toBe(true); // first publish always notifies
    while (driver.nextUsed() >= 0);
    // Driver wants an interrupt only after 3 more used elements.
    driver.setUsedEvent(driver.usedIdx() + 2);
    step(2);
    expect(queue.publish()).toBe(false);
    step(1);
    expect(queue.publish()).toBe(true);
    expect(queue.publish()).toBe(false); // nothing new

    // Near the wrap: resume from an index just below 65536.
    const d = setup({ eventIdx: true, size: 16 });
    const base = 65534;
    d.driver.setAvailIdxRaw(base);
    (d.driver as unknown as { lastUsedIdx: number }).lastUsedIdx = base;
    const usedIdxView = new Uint16Array(d.memory.slice(d.driver.layout.usedAddr, 4).buffer, d.memory.slice(d.driver.layout.usedAddr, 4).byteOffset, 2);
    usedIdxView[1] = base;
    const q = new SplitQueue({ ...d.cfg, lastAvailIdx: base, eventIdx: true });
    const b = d.alloc.alloc(8);
    d.driver.add1(b, 8, false);
    d.driver.publish();
    q.push(q.pop()!, 0);
    expect(q.publish()).toBe(true); // first
    d.driver.setUsedEvent(65535 + 2); // wraps to 1: notify once used passes 1
    for (let k = 0; k < 2; k++) d.driver.add1(b, 8, false);
    d.driver.publish();
    q.push(q.pop()!, 0); // used -> 0
    expect(q.publish()).toBe(false);
    q.push(q.pop()!, 0); // used -> 1
    expect(q.publish()).toBe(false); // used_event is 1: notify when used passes 1, i.e. reaches 2
    d.driver.add1(b, 8, false);
    d.driver.publish();
    q.push(q.pop()!, 0); // used -> 2
    expect(q.publish()).toBe(true);
    expect(d.driver.usedIdx()).toBe(2);
  });

  it('EVENT_IDX: enableNotification writes avail_event and reports work that slipped in', () => {
    const { driver, alloc, queue } = setup({ eventIdx: true });
    const buf = alloc.alloc(8);
    expect(queue.enableNotification()).toBe(false);
    // avail_event = 0: the driver's next publish (0 -> 1) must kick
    driver.add1(buf, 8, false);
    expect(driver.publish()).toBe(true);
    expect(queue.enableNotification()).toBe(true);
    queue.push(queue.pop()!, 0);
    expect(queue.enableNotification()).toBe(false);
    // avail_event = 1 now: publishing 1 -> 3 crosses it, one kick; 3 -> 4 does not
    driver.add1(buf, 8, false);
    driver.add1(buf, 8, false);
    expect(driver.publish()).toBe(true);
    driver.add1(buf, 8, false);
    expect(driver.publish()).toBe(false);
  });

  it('without EVENT_IDX: honours NO_INTERRUPT and sets NO_NOTIFY while busy', () => {
    const { driver, alloc, queue, cfg, bytes } = setup();
    const buf = alloc.alloc(8);
    driver.add1(buf, 8, false);
    driver.publish();
    queue.push(queue.pop()!, 0);
    driver.setNoInterrupt(true);
    expect(queue.publish()).toBe(false);
    driver.setNoInterrupt(false);
    driver.add1(buf, 8, false);
    queue.disableNotification();
    expect(driver.publish()).toBe(false); // the device said it is busy
    queue.push(queue.pop()!, 0);
    expect(queue.publish()).toBe(true);
    expect(queue.enableNotification()).toBe(false);
    driver.add1(buf, 8, false);
    expect(driver.publish()).toBe(true);
    // Off again after an enable; and a repeated disable stores nothing (the runner calls it on every pass): the
    // flags cleared behind its back stay cleared, which shows no second store pulled the line over.
    queue.disableNotification();
    expect(driver.publish()).toBe(false);
    const usedFlags = new Uint16Array(bytes.buffer, cfg.usedAddr - MEM_BASE, 1);
    usedFlags[0] = 0;
    queue.disableNotification();
    expect(usedFlags[0]).toBe(0);
    expect(queue.enableNotification()).toBe(true); // the chain added above is there
    queue.disableNotification();
    expect(usedFlags[0]).toBe(1);
  });
});
