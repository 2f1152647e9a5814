import { describe, expect, it } from 'vitest';
import {
  GuestMemory,
  GuestMemoryError,
  SplitQueue,
  SplitQueueDriver,
  WINDOW_SIZE,
  splitRingLayout,
  splitWindows,
  type Location,
} from '../../src/virtqueue/index.js';

const loc = (): Location => ({ buffer: 0, offset: 0, span: 0 });

describe('GuestMemory', () => {
  const a = new Uint8Array(0x4000);
  const b = new Uint8Array(0x2000);
  const mem = GuestMemory.fromBuffers([
    { guestPhysAddr: 0x100000, bytes: b, userAddr: 0x7f0000100000 },
    { guestPhysAddr: 0, bytes: a, userAddr: 0x7f0000000000 },
  ]);

  it('finds the region of any address among 509, as a linear scan would', () => {
    // Regions of 1 to 3 pages with gaps of 0 to 2 pages, so neighbours touch sometimes.
    let s = 99;
    const r = () => (s = (Math.imul(s, 1103515245) + 12345) >>> 0) >>> 8;
    const regions: { guestPhysAddr: number; bytes: Uint8Array }[] = [];
    let at = 0x1000;
    for (let i = 0; i < 509; i++) {
      const size = 4096 * (1 + (r() % 3));
      regions.push({ guestPhysAddr: at, bytes: new Uint8Array(size) });
      at += size + 4096 * (r() % 3);
    }
    const many = GuestMemory.fromBuffers(regions);
    const linear = (gpa: number) => regions.findIndex((x) => gpa >= x.guestPhysAddr && gpa < x.guestPhysAddr + x.bytes.length);
    for (let k = 0; k < 20_000; k++) {
      const gpa = r() % (at + 8192);
      expect(many.findRegion(gpa), `0x${gpa.toString(16)}`).toBe(linear(gpa));
    }
    for (const x of [regions[0], regions[508]]) {
      expect(many.findRegion(x.guestPhysAddr)).toBe(regions.indexOf(x));
      expect(many.findRegion(x.guestPhysAddr - 1)).toBe(linear(x.guestPhysAddr - 1));
      expect(many.findRegion(x.guestPhysAddr + x.bytes.length)).toBe(linear(x.guestPhysAddr + x.bytes.length));
    }
  });

  it('locates addresses in any region and refuses the gaps and region ends', () => {
    const l = loc();
    expect(mem.locate(0x10, 16, l)).toBe(true);
    expect(mem.buffers[l.buffer]).toBe(mem.buffers[0]);
    expect(l.offset).toBe(0x10);
    expect(mem.locate(0x100010, 0x1ff0, l)).toBe(true);
    expect(l.offset).toBe(0x10);
    expect(mem.locate(0x100010, 0x1ff1, l)).toBe(false); // one byte past the region
    expect(mem.locate(0x4000, 1, l)).toBe(false); // gap
    expect(mem.locate(-1, 1, l)).toBe(false);
    expect(mem.locate(2 ** 60, 1, l)).toBe(false);
  });

  it('gives a window offset from an address as descriptor words, only for ranges inside one window', () => {
    // A region just under 4 GiB reaching past it, and one at 0: the cached window's low word is 0xfffff000, so
    // an address 4 GiB below it (same high word, low word 0x100) is 0x1100 after it modulo 2^32, and must not be
    // taken for an address in it.
    const low = new Uint8Array(0x2000);
    const high = new Uint8Array(0x2000);
    const m = GuestMemory.fromBuffers([
      { guestPhysAddr: 0, bytes: low },
      { guestPhysAddr: 0xfffff000, bytes: high },
    ]);
    const at = (lo: number, hi: number, len: number) => {
      const off = m.windowOffset(lo, hi, len);
      return off < 0 ? null : { bytes: m.buffers[m.lastBuffer], off };
    };
    expect(at(0xfffff010, 0, 16)).toEqual({ bytes: high, off: 0x10 });
    expect(at(0x100, 0, 16)).toEqual({ bytes: low, off: 0x100 }); // found in its own region, cache moved
    expect(at(0xfffff010, 0, 16)).toEqual({ bytes: high, off: 0x10 });
    expect(at(0x100, 1, 16)).toEqual({ bytes: high, off: 0x1100 }); // past 4 GiB, still the high region
    expect(at(0x1000, 1, 1)).toBeNull(); // one byte past its end
    expect(at(0xfff, 1, 2)).toBeNull(); // straddles its end
    expect(at(0xffffe000, 0, 16)).toBeNull(); // the gap below it
    expect(at(0x100, 0x200000, 16)).toBeNull(); // beyond 2^53
    expect(at(0x1ff0, 0, 0x10)).toEqual({ bytes: low, off: 0x1ff0 });
    expect(at(0x1ff0, 0, 0x11)).toBeNull();
  });

  it('translates frontend virtual addresses', () => {
    expect(mem.userToGuest(0x7f0000100020)).toBe(0x100020);
    expect(mem.userToGuest(0x7f0000000000 + 0x3fff)).toBe(0x3fff);
    expect(mem.userToGuest(0x7f0000004000)).toBe(-1);
  });

  it('reads and writes through slices; refuses ranges outside one region', () => {
    mem.write(0x100, new Uint8Array([1, 2, 3]));
    expect([...a.subarray(0x100, 0x103)]).toEqual([1, 2, 3]);
    expect(() => mem.slice(0x3ff0, 0x20)).toThrow(GuestMemoryError);
    expect(() => mem.slice(0x5000, 1)).toThrow(/not inside one memory region/);
  });

  it('rejects overlapping and impossible regions', () => {
    const bytes = new Uint8Array(0x2000);
    expect(() =>
      GuestMemory.fromBuffers([
        { guestPhysAddr: 0, bytes },
        { guestPhysAddr: 0x1000, bytes },
      ]),
    ).toThrow(/overlaps/);
    expect(() => GuestMemory.fromBuffers([{ guestPhysAddr: 2 ** 53 - 8, bytes }])).toThrow(/2\^53/);
    expect(() => GuestMemory.fromBuffers([{ guestPhysAddr: 0, bytes: new Uint8Array(0) }])).toThrow(/size 0/);
  });

  it('adds and removes regions as new tables', () => {
    const more = mem.withRegion({
      guestPhysAddr: 0x200000,
      size: 0x1000,
      userAddr: 0x7f0000200000,
      mmapOffset: 0,
      hostAddr: 0,
      windows: [new Uint8Array(0x1000)],
    });
    expect(more.regions.length).toBe(3);
    expect(mem.regions.length).toBe(2);
    const { memory, removed } = more.withoutRegion({ guestPhysAddr: 0x100000, size: 0x2000, userAddr: 0x7f0000100000 });
    expect(removed.guestPhysAddr).toBe(0x100000);
    expect(memory.findRegion(0x100000)).toBe(-1);
    expect(() => memory.withoutRegion({ guestPhysAddr: 0x100000, size: 0x2000, userAddr: 0 })).toThrow(GuestMemoryError);
  });

  it('splits a region larger than a window and walks a buffer straddling two windows', () => {
    // Lazily committed: only the touched pages cost memory.
    const big = new Uint8Array(WINDOW_SIZE + 0x10000);
    const windows = splitWindows(big);
    expect(windows.length).toBe(2);
    const m = new GuestMemory([{ guestPhysAddr: 0, size: big.length, userAddr: 0, mmapOffset: 0, hostAddr: 0x10000000, windows }]);
    expect(m.bufferHostAddr).toEqual([0x10000000, 0x10000000 + WINDOW_SIZE]);
    const layout = splitRingLayout(4, WINDOW_SIZE + 0x1000);
    const driver = new SplitQueueDriver(m, layout);
    const q = new SplitQueue({ index: 0, memory: m, ...layout, eventIdx: false, indirect: false, lastAvailIdx: 0 });
    big[WINDOW_SIZE - 2] = 0xaa;
    big[WINDOW_SIZE] = 0xbb;
    driver.add([[WINDOW_SIZE - 2, 4]], []);
    driver.publish();
    const chain = q.pop()!;
    expect(chain.count).toBe(2);
    expect(chain.segLength[0]).toBe(2);
    expect(chain.segLength[1]).toBe(2);
    expect(chain.hostAddress(1)).toBe(0x10000000 + WINDOW_SIZE);
    const got = new Uint8Array(4);
    chain.reader().read(got);
    expect([...got]).toEqual([0xaa, 0, 0xbb, 0]);
  });
});
