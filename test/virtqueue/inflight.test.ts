/**
 * Inflight tracking (INFLIGHT_SHMFD) on both ring layouts: a backend that dies with chains in flight, at any
 * point of a pop, a push or a publish, is replaced by one that runs exactly the chains the driver has not had
 * back, oldest first, and then goes on with the ring. "Dying" is dropping the queue object: the ring and the
 * region are shared memory that outlive it, as they outlive a SIGKILLed process.
 */
import { describe, expect, it } from 'vitest';
import {
  GuestAllocator,
  GuestMemory,
  PACKED_INITIAL_BASE,
  PackedQueue,
  PackedQueueDriver,
  SplitQueue,
  SplitQueueDriver,
  VirtqueueError,
  packedInflightCount,
  packedInflightSize,
  packedRingLayout,
  splitInflightCount,
  splitInflightSize,
  splitRingLayout,
  type DescriptorChain,
  type QueueDriver,
  type RingQueue,
} from '../../src/virtqueue/index.js';

const MEM_BASE = 0x10000;
const MEM_SIZE = 1 << 20;

type Layout = 'split' | 'packed';

/** A driver, a ring, an inflight region, and a way to start a (new) device-side queue over them. */
function rig(layout: Layout, size = 16, opts: { descNum?: number; indirect?: boolean } = {}) {
  const bytes = new Uint8Array(MEM_SIZE);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: MEM_BASE, bytes }]);
  const ring = (layout === 'split' ? splitRingLayout : packedRingLayout)(size, MEM_BASE);
  const driver: QueueDriver =
    layout === 'split' ? new SplitQueueDriver(memory, ring, false) : new PackedQueueDriver(memory, ring, false);
  const alloc = new GuestAllocator(ring.end, MEM_BASE + MEM_SIZE);
  const descNum = opts.descNum ?? size;
  const region = new Uint8Array((layout === 'split' ? splitInflightSize : packedInflightSize)(descNum));
  /** What a frontend would send as the base: QEMU rewinds a dead split backend to used->idx, and has nothing for packed. */
  const base = (): number => (layout === 'split' ? (driver as SplitQueueDriver).usedIdx() : PACKED_INITIAL_BASE);
  const start = (withRegion = true, at = base()): RingQueue => {
    const common = { index: 0, size, memory, descAddr: ring.descAddr, eventIdx: false, indirect: opts.indirect ?? true };
    const inflight = withRegion ? { region, descNum } : null;
    return layout === 'split'
      ? new SplitQueue({ ...common, availAddr: ring.availAddr, usedAddr: ring.usedAddr, lastAvailIdx: at, inflight })
      : new PackedQueue({ ...common, driverAddr: ring.availAddr, deviceAddr: ring.usedAddr, base: at, inflight });
  };
  // Each chain carries a tag in its readable buffer; the driver maps buffer ids back to tags.
  const tagOfId = new Map<number, number>();
  let nextTag = 1;
  const post = (n: number, indirect = false): number[] => {
    const tags: number[] = [];
    for (let i = 0; i < n; i++) {
      const tag = nextTag++;
      const rd = alloc.alloc(4);
      memory.write(rd, new Uint8Array(new Uint32Array([tag]).buffer));
      const wr = alloc.alloc(8);
      const id = driver.add([[rd, 4]], [[wr, 8]], indirect ? alloc.alloc(32, 16) : undefined);
      if (id < 0) throw new Error('ring full');
      tagOfId.set(id, tag);
      tags.push(tag);
    }
    driver.publish();
    return tags;
  };
  /** Tags the driver has got back, in used order. */
  const reap = (): number[] => {
    const out: number[] = [];
    for (let id = driver.nextUsed(); id >= 0; id = driver.nextUsed()) {
      const tag = tagOfId.get(id);
      if (tag === undefined) throw new Error(`used id ${id} was never posted`);
      tagOfId.delete(id);
      out.push(tag);
    }
    return out;
  };
  return { memory, driver, region, start, post, reap, size };
}

const tagOf = (c: DescriptorChain): number => c.reader().readUint(4);

function popAll(q: RingQueue): DescriptorChain[] {
  const out: DescriptorChain[] = [];
  for (let c = q.pop(); c !== null; c = q.pop()) out.push(c);
  return out;
}

function inflightError(fn: () => unknown): VirtqueueError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(VirtqueueError);
    return e as VirtqueueError;
  }
  throw new Error('expected a VirtqueueError');
}

describe.each<Layout>(['split', 'packed'])('inflight tracking, %s ring', (layout) => {
  it('a restarted queue runs again exactly the chains not returned, in pop order, before new ones', () => {
    const r = rig(layout);
    const tags = r.post(6);
    const q1 = r.start();
    expect(q1.recovered).toBe(0);
    const popped = popAll(q1);
    expect(popped.map(tagOf)).toEqual(tags);
    // Out of ring order: 5, then 1 and 3 in one batch; 0, 2, 4 stay with the device.
    q1.push(popped[5], 8);
    q1.publish();
    q1.push(popped[3], 8);
    q1.push(popped[1], 8);
    q1.publish();
    expect(r.reap()).toEqual([tags[5], tags[3], tags[1]]);
    const later = r.post(2);

    const q2 = r.start(); // the old backend is gone
    expect(q2.recovered).toBe(3);
    const again = popAll(q2);
    expect(again.map(tagOf)).toEqual([tags[0], tags[2], tags[4], ...later]);
    for (const c of again) q2.push(c, 8);
    q2.publish();
    expect(r.reap().sort()).toEqual([tags[0], tags[2], tags[4], ...later].sort());
    expect(r.driver.pending).toBe(0);
  });

  it('counts the chains the region records in flight (the device state\'s summary): popped, less published', () => {
    const r = rig(layout);
    const count = () => (layout === 'split' ? splitInflightCount : packedInflightCount)(r.region, r.size);
    expect(count()).toBe(0);
    r.post(5);
    const q = r.start();
    const popped = popAll(q);
    expect(count()).toBe(5);
    q.push(popped[3], 8);
    q.push(popped[0], 8);
    expect(count(), 'pushed, not yet published: still the device\'s').toBe(5);
    q.publish();
    expect(count()).toBe(3);
  });

  it('chains pushed but not published when the backend died run again (the driver never saw them)', () => {
    const r = rig(layout);
    const tags = r.post(3);
    const q1 = r.start();
    const [a, b, c] = popAll(q1);
    q1.push(b, 8);
    q1.push(a, 8); // no publish
    expect(r.reap()).toEqual([]);
    const q2 = r.start();
    expect(popAll(q2).map(tagOf)).toEqual(tags);
    void c;
  });

  it('a region initialised while the used ring is already on sees no unfinished batch (spdk #3766)', () => {
    const r = rig(layout);
    // A first run without tracking moves the used ring on; then tracking starts on a fresh region.
    r.post(5, true);
    const plain = r.start(false);
    // In reverse, so that the driver hands out head 0 next: the entry a zeroed region's last_batch_head names.
    for (const c of popAll(plain).reverse()) plain.push(c, 8);
    plain.publish();
    expect(r.reap()).toHaveLength(5);
    const tags = r.post(3, true);
    const q1 = r.start(true, plain.vringBase()); // a clean stop's base
    const popped = popAll(q1);
    expect(popped.map((c) => c.head)).toContain(0);
    expect(popped.map(tagOf)).toEqual(tags); // popped, none completed: the crash of spdk #3766
    const q2 = r.start();
    expect(popAll(q2).map(tagOf)).toEqual(tags);
  });

  it('a chain given back unused (unpop) is not run twice: the ring has it again', () => {
    const r = rig(layout);
    const tags = r.post(2);
    const q1 = r.start();
    const a = q1.pop()!;
    const b = q1.pop()!;
    q1.unpop(b);
    expect(tagOf(a)).toBe(tags[0]);
    const q2 = r.start();
    expect(q2.recovered).toBe(1);
    const again = popAll(q2);
    expect(again.map(tagOf)).toEqual(tags);
    // A resubmitted chain given back comes again from the region, not from the ring.
    const q3 = r.start();
    const first = q3.pop()!;
    q3.unpop(first);
    expect(popAll(q3).map(tagOf)).toEqual(tags);
  });

  it('indirect chains are recorded and run again whole', () => {
    const r = rig(layout);
    const tags = r.post(2, true);
    const q1 = r.start();
    const [a, b] = popAll(q1);
    expect(a.writableBytes).toBe(8);
    q1.push(b, 8);
    q1.publish();
    expect(r.reap()).toEqual([tags[1]]);
    const q2 = r.start();
    const [again] = popAll(q2);
    expect(tagOf(again)).toBe(tags[0]);
    expect([again.readableBytes, again.writableBytes, again.descriptorCount]).toEqual([4, 8, 1]);
  });

  it('survives a crash at every step of a publish', () => {
    // Split: used->idx moved, the batch's flags not yet cleared. Packed: the region moved on before the batch's
    // first used descriptor was flagged (roll back), and after (keep).
    const steps = layout === 'split' ? ['after-idx'] : ['before-flag', 'after-flag'];
    for (const step of steps) {
      const r = rig(layout);
      const tags = r.post(4);
      const q1 = r.start();
      const popped = popAll(q1);
      q1.push(popped[2], 8);
      q1.push(popped[0], 8);
      const p = q1 as unknown as Record<string, never>;
      if (layout === 'split') {
        Atomics.store(p.used16 as Uint16Array, 1, p.usedIdx as number); // the used->idx store, and nothing after it
      } else {
        (p.tracker as unknown as { beforeCommit(i: number, w: number): void }).beforeCommit(p.usedIdx, p.usedWrap);
        if (step === 'after-flag') Atomics.store(p.desc16 as Uint16Array, 8 * (p.firstSlot as number) + 7, p.firstFlags as number);
      }
      const seen = r.reap();
      const q2 = r.start();
      const again = popAll(q2).map(tagOf);
      if (seen.length > 0) {
        expect(seen).toEqual([tags[2], tags[0]]);
        expect(again, step).toEqual([tags[1], tags[3]]);
      } else {
        expect(again, step).toEqual(tags);
      }
      for (const c of popAll(q2)) q2.push(c, 8);
    }
  });

  it('random pops, out-of-order completions and crashes: every chain comes back to the driver exactly once', () => {
    let seed = 12345;
    const rand = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const r = rig(layout, 16);
    const returned = new Map<number, number>();
    let posted = 0;
    let q = r.start();
    let held: DescriptorChain[] = [];
    let crashes = 0;
    for (let round = 0; round < 400; round++) {
      const room = r.driver.freeCount >> 1; // chains of two descriptors (or one, indirect)
      if (room > 0) posted += r.post(1 + rand(Math.min(room, 4)), rand(4) === 0).length;
      const take = rand(5);
      for (let i = 0; i < take; i++) {
        const c = q.pop();
        if (c === null) break;
        if (held.some((h) => tagOf(h) === tagOf(c))) throw new Error(`tag ${tagOf(c)} popped while in flight`);
        held.push(c);
      }
      for (let i = rand(held.length + 1); i > 0; i--) q.push(held.splice(rand(held.length), 1)[0], 8);
      if (rand(2) === 0) q.publish();
      for (const tag of r.reap()) returned.set(tag, (returned.get(tag) ?? 0) + 1);
      if (rand(8) === 0) {
        q = r.start();
        held = [];
        crashes++;
      }
    }
    for (let i = 0; i < 10; i++) {
      for (const c of [...held, ...popAll(q)]) q.push(c, 8);
      held = [];
      q.publish();
      for (const tag of r.reap()) returned.set(tag, (returned.get(tag) ?? 0) + 1);
    }
    expect(crashes).toBeGreaterThan(20);
    expect(returned.size).toBe(posted);
    expect([...returned.values()].every((n) => n === 1)).toBe(true);
    expect(r.driver.pending).toBe(0);
  });

  it('writes the layout of vhost-user.rst, field by field', () => {
    const r = rig(layout);
    const tags = r.post(3);
    const q = r.start();
    const popped = popAll(q);
    q.push(popped[1], 8);
    q.publish();
    const v = new DataView(r.region.buffer);
    expect(v.getBigUint64(0, true)).toBe(0n); // features
    expect(v.getUint16(8, true)).toBe(1); // version
    expect(v.getUint16(10, true)).toBe(r.size); // desc_num
    const inflight = popped.filter((_, i) => i !== 1);
    if (layout === 'split') {
      expect(v.getUint16(12, true)).toBe(popped[1].head); // last_batch_head
      expect(v.getUint16(14, true)).toBe(1); // used_idx
      const entry = (h: number) => ({ inflight: v.getUint8(16 + 16 * h), counter: Number(v.getBigUint64(16 + 16 * h + 8, true)) });
      expect(entry(popped[1].head).inflight).toBe(0);
      expect(inflight.map((c) => entry(c.head))).toEqual([{ inflight: 1, counter: 0 }, { inflight: 1, counter: 2 }]);
    } else {
      // free_head = old_free_head, used_idx = old_used_idx = 2 (the used descriptor of a 2-descriptor chain),
      // both wrap counters 1.
      expect([12, 14, 16, 18].map((o) => v.getUint16(o, true))).toEqual([v.getUint16(14, true), v.getUint16(12, true), 2, 2]);
      expect([v.getUint8(20), v.getUint8(21)]).toEqual([1, 1]);
      const heads: { num: number; counter: number; id: number; descs: [number, number, number][] }[] = [];
      for (let e = 0; e < r.size; e++) {
        const at = 32 + 32 * e;
        if (v.getUint8(at) !== 1) continue;
        const num = v.getUint16(at + 6, true);
        const descs: [number, number, number][] = [];
        for (let k = 0, f = e; k < num; k++, f = v.getUint16(32 + 32 * f + 2, true)) {
          const d = 32 + 32 * f;
          descs.push([Number(v.getBigUint64(d + 24, true)), v.getUint32(d + 20, true), v.getUint16(d + 18, true) & 0x7fff]);
          if (k === num - 1) {
            expect(v.getUint16(at + 4, true)).toBe(f); // last
            heads.push({ num, counter: Number(v.getBigUint64(at + 8, true)), id: v.getUint16(d + 16, true), descs });
          }
        }
      }
      heads.sort((a, b) => a.counter - b.counter);
      expect(heads.map((h) => [h.num, h.counter, h.id])).toEqual([
        [2, 0, inflight[0].head],
        [2, 2, inflight[1].head],
      ]);
      // Each entry copies its ring descriptor: the readable tag buffer (NEXT), then the writable one (WRITE).
      for (const [h, c] of heads.map((h, i) => [h, inflight[i]] as const)) {
        expect(h.descs).toEqual([
          [c.segAddr[0], 4, 1 | 0x80],
          [c.segAddr[1], 8, 2 | 0x80],
        ]);
      }
    }
    void tags;
  });

  it('refuses a region that cannot be right, and never reads outside it', () => {
    const r = rig(layout);
    r.post(4);
    r.start(); // initialises the region
    const u16 = new Uint16Array(r.region.buffer);
    u16[4] = 7;
    expect(inflightError(() => r.start()).code).toBe('BAD_INFLIGHT');
    u16[4] = 1;
    u16[5] = 99;
    expect(inflightError(() => r.start()).message).toMatch(/99 entries/);
    // Random garbage in a version-1 region: a queue or a BAD_INFLIGHT error, nothing else.
    let seed = 7;
    for (let i = 0; i < 300; i++) {
      for (let k = 0; k < r.region.length; k++) {
        seed = (seed * 1103515245 + 12345) & 0x7fffffff;
        r.region[k] = seed >>> 16;
      }
      u16[4] = 1;
      u16[5] = r.size;
      let q: RingQueue;
      try {
        q = r.start();
      } catch (e) {
        expect((e as VirtqueueError).code).toBe('BAD_INFLIGHT');
        continue;
      }
      try {
        popAll(q);
      } catch (e) {
        expect(e).toBeInstanceOf(VirtqueueError);
      }
    }
  });

  it('takes a region larger than the ring, and refuses one smaller', () => {
    const big = rig(layout, 8, { descNum: 64 });
    const tags = big.post(3);
    popAll(big.start());
    expect(popAll(big.start()).map(tagOf)).toEqual(tags);
    const small = rig(layout, 16, { descNum: 8 });
    expect(inflightError(() => small.start()).code).toBe('BAD_INFLIGHT');
  });
});
