// A malicious guest writes whatever it likes into its rings: descriptor tables of random addresses, lengths, flags,
// next indices and buffer ids, random avail entries and indices, indirect tables full of the same. Against both
// ring layouts the device must either hand out chains whose every segment lies inside guest memory, or throw a
// VirtqueueError and stay broken: never another exception, never a hang, never a view outside memory.
import { describe, expect, it } from 'vitest';
import {
  GuestMemory,
  PACKED_INITIAL_BASE,
  PackedQueue,
  SplitQueue,
  VirtqueueError,
  packedRingLayout,
  splitRingLayout,
  type DescriptorChain,
  type RingQueue,
} from '../../src/virtqueue/index.js';

const MEM_BASE = 0x10000;
const MEM_SIZE = 64 * 1024;
const ROUNDS = 3000;

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0);
}

/** An address a hostile guest might write: inside memory, near its ends, far outside, or beyond 2^53. */
function address(r: () => number): [lo: number, hi: number] {
  switch (r() % 6) {
    case 0:
      return [(MEM_BASE + MEM_SIZE - (r() % 64)) >>> 0, 0];
    case 1:
      return [r(), 0];
    case 2:
      return [r(), r()];
    default:
      return [MEM_BASE + (r() % MEM_SIZE), 0];
  }
}

/**
 * Fill the 16-byte descriptor at word `w` of `d32`: two times in three a plausible one (in memory, short, flags a
 * driver would use, an index or id in range, packed: available in the first lap), else anything at all.
 */
function scribble(d32: Uint32Array, w: number, r: () => number, size: number, layout: 'split' | 'packed'): void {
  const plausible = r() % 3 !== 0;
  const [lo, hi] = plausible ? [MEM_BASE + (r() % (MEM_SIZE - 600)), 0] : address(r);
  d32[w] = lo;
  d32[w + 1] = hi;
  d32[w + 2] = plausible ? r() % 600 : r() % 4 === 0 ? r() : r() % 600;
  let flags = plausible ? (r() % 3 === 0 ? 1 : 0) | (r() % 2 === 0 ? 2 : 0) | (r() % 10 === 0 ? 4 : 0) : r() & 0x8087;
  const other = plausible ? r() % size : r() % 3 === 0 ? r() & 0xffff : r() % (size + 2);
  if (layout === 'packed') {
    if (plausible) flags |= 0x80; // AVAIL set, USED clear: available in lap 1
    d32[w + 3] = (other | (flags << 16)) >>> 0; // id, then flags
  } else {
    d32[w + 3] = ((flags & 7) | (other << 16)) >>> 0; // flags, then next
  }
}

function checkChain(c: DescriptorChain): void {
  let readable = 0;
  let writable = 0;
  for (let i = 0; i < c.count; i++) {
    const gpa = c.segAddr[i];
    const len = c.segLength[i];
    expect(gpa >= MEM_BASE && gpa + len <= MEM_BASE + MEM_SIZE, `segment 0x${gpa.toString(16)}+${len}`).toBe(true);
    expect(c.segment(i).length).toBe(len);
    if (i < c.readableCount) readable += len;
    else writable += len;
  }
  expect([readable, writable]).toEqual([c.readableBytes, c.writableBytes]);
}

function run(layout: 'split' | 'packed', seed: number): { chains: number; errors: Map<string, number> } {
  const r = lcg(seed);
  const size = layout === 'split' ? 8 : 5 + (seed % 4);
  const bytes = new Uint8Array(MEM_SIZE);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: MEM_BASE, bytes }]);
  const rings = (layout === 'split' ? splitRingLayout : packedRingLayout)(size, MEM_BASE);
  const words = new Uint32Array(bytes.buffer);
  let chains = 0;
  const errors = new Map<string, number>();
  for (let round = 0; round < ROUNDS; round++) {
    // Random bytes everywhere the guest owns, then descriptors that look almost right.
    for (let i = 0; i < words.length; i += 1 + (r() % 64)) words[i] = r();
    for (let k = 0; k < size; k++) scribble(words, (rings.descAddr - MEM_BASE) / 4 + 4 * k, r, size, layout);
    for (let t = 0; t < 4; t++) {
      const at = MEM_BASE + 16 * (r() % (MEM_SIZE / 16));
      for (let k = 0; k < 4; k++) if (at + 16 * k < MEM_BASE + MEM_SIZE) scribble(words, (at - MEM_BASE) / 4 + 4 * k, r, size, layout);
    }
    const common = { index: 0, size, memory, descAddr: rings.descAddr, eventIdx: r() % 2 === 0, indirect: r() % 4 !== 0 };
    let queue: RingQueue;
    if (layout === 'split') {
      // Plausible avail entries and idx most of the time, so chains get walked rather than refused at the index.
      const avail = new Uint16Array(bytes.buffer, rings.availAddr - MEM_BASE, 3 + size);
      for (let k = 0; k < size; k++) avail[2 + k] = r() % 4 === 0 ? r() & 0xffff : r() % size;
      avail[1] = r() % 4 === 0 ? r() : r() % (size + 1);
      queue = new SplitQueue({ ...common, availAddr: rings.availAddr, usedAddr: rings.usedAddr, lastAvailIdx: 0 });
    } else {
      queue = new PackedQueue({ ...common, driverAddr: rings.availAddr, deviceAddr: rings.usedAddr, base: r() % 4 !== 0 ? PACKED_INITIAL_BASE : r() % size });
    }
    const held: DescriptorChain[] = [];
    for (let step = 0; step < 4 * size; step++) {
      let c: DescriptorChain | null;
      try {
        c = queue.pop();
      } catch (e) {
        if (!(e instanceof VirtqueueError)) throw e;
        errors.set(e.code, (errors.get(e.code) ?? 0) + 1);
        expect(queue.broken).toBe(e);
        expect(queue.pop()).toBeNull();
        break;
      }
      if (c === null) break;
      chains++;
      checkChain(c);
      held.push(c);
      // Give some back at once, in any order; unpop the last one now and then.
      if (r() % 5 === 0) queue.unpop(held.pop()!);
      while (held.length > 0 && r() % 2 === 0) queue.push(held.splice(r() % held.length, 1)[0], r() % 64);
      queue.publish();
      queue.enableNotification();
    }
  }
  return { chains, errors };
}

describe('hostile rings', () => {
  for (const layout of ['split', 'packed'] as const) {
    it(`${layout}: random descriptor tables give chains inside guest memory or a VirtqueueError, nothing else`, () => {
      let chains = 0;
      const codes = new Map<string, number>();
      for (const seed of [1, 2, 3]) {
        const out = run(layout, seed);
        chains += out.chains;
        for (const [k, v] of out.errors) codes.set(k, (codes.get(k) ?? 0) + v);
      }
      // The fuzz reached both outcomes, and a spread of the checks (it is not refusing everything at one gate).
      console.log(`${layout}: ${chains} chains accepted; refusals ${[...codes].map(([k, v]) => `${k} ${v}`).join(', ')}`);
      expect(chains).toBeGreaterThan(500);
      expect(codes.size).toBeGreaterThanOrEqual(5);
      expect(codes.get('BAD_BUFFER')).toBeGreaterThan(0);
    }, 60_000);
  }
});
