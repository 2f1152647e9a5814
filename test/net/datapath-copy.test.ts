// The receive side's copy, at every size and relative alignment it chooses a different way for (a byte, 4 or 8
// bytes a store, set() of a view, set() of the sender's own exact view), with frames full of NaN bit patterns: 8
// bytes a store goes through a Float64Array, which must move them unchanged. Enough rounds that V8 optimises the
// copy, as it does in service.
import { randomFillSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { BytesFrame, ChainFrame, RxQueue } from '../../src/devices/net/datapath.js';
import { openPort, sourceFrame, type PortHooks } from '../../src/devices/net/ports.js';
import { NET_HDR_NUM_BUFFERS, NET_HDR_SIZE } from '../../src/devices/net/spec.js';
import { GuestMemory, SplitQueue, SplitQueueDriver, splitRingLayout } from '../../src/virtqueue/index.js';

const RING = 64;
const BASE = 0x100000;
const RX_AREA = 0x10000;
const RX_BUF = 20000;

/** Random bytes where every 8-byte word whose last byte is odd is a NaN (exponent all ones), quiet or signalling. */
function nanHeavy(n: number): Uint8Array {
  const b = randomFillSync(new Uint8Array(n));
  for (let i = 7; i < n; i += 8) {
    if ((b[i] & 1) === 0) continue;
    b[i] = (b[i] & 0x80) | 0x7f;
    b[i - 1] |= 0xf0;
  }
  return b;
}

function receiver() {
  const bytes = new Uint8Array(1 << 20);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: BASE, bytes }]);
  const layout = splitRingLayout(RING, BASE);
  const queue = new SplitQueue({ index: 0, memory, ...layout, eventIdx: false, indirect: false, lastAvailIdx: 0 });
  const driver = new SplitQueueDriver(memory, layout, false);
  return { bytes, queue, driver, rx: new RxQueue(queue, false, true, true) };
}

/** A transmit chain in another guest's memory: the header and frame at `at`, one descriptor. */
function sender(packet: Uint8Array, at: number): ChainFrame {
  const bytes = new Uint8Array(1 << 17);
  bytes.set(packet, at);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: BASE, bytes }]);
  const layout = splitRingLayout(4, BASE);
  const queue = new SplitQueue({ index: 1, memory, ...layout, eventIdx: false, indirect: false, lastAvailIdx: 0 });
  const driver = new SplitQueueDriver(memory, layout, false);
  driver.add1(BASE + at, packet.length, false);
  driver.publish();
  const frame = new ChainFrame();
  if (!frame.reset(queue.pop()!)) throw new Error('not a frame');
  return frame;
}

describe('receive copy', () => {
  it('lands every byte unchanged, NaN patterns included, at every size and relative alignment', () => {
    const r = receiver();
    let slot = 0;
    const check = (packet: Uint8Array, frame: BytesFrame | ChainFrame, header: Uint8Array, headerOff: number, dstSkew: number) => {
      const gpa = BASE + RX_AREA + (slot++ % 40) * RX_BUF + dstSkew;
      r.driver.add1(gpa, RX_BUF - 8, true);
      r.driver.publish();
      // Bytes just past the frame: no copy may touch them.
      const end = gpa - BASE + packet.length;
      r.bytes.fill(0xa5, end, end + 8);
      expect(r.rx.deliver(frame, header, headerOff)).toBe('delivered');
      r.queue.publish();
      expect(r.driver.nextUsed()).toBeGreaterThanOrEqual(0);
      const got = r.bytes.subarray(gpa - BASE, gpa - BASE + packet.length);
      const want = packet.slice();
      want[NET_HDR_NUM_BUFFERS] = 1;
      want[NET_HDR_NUM_BUFFERS + 1] = 0;
      // The first differing byte, to say where a copy went wrong.
      const at = got.findIndex((b, i) => b !== want[i]);
      expect(at, `${packet.length} bytes, skew ${dstSkew}: first wrong byte`).toBe(-1);
      expect(Array.from(r.bytes.subarray(end, end + 8)), `${packet.length} bytes: past the frame`).toEqual(new Array(8).fill(0xa5));
    };
    for (let round = 0; round < 30; round++) {
      for (const size of [60, 64, 76, 200, 250, 300, 600, 700, 1518, 9000]) {
        const packet = nanHeavy(NET_HDR_SIZE + size);
        packet.fill(0, 0, NET_HDR_SIZE);
        for (let srcSkew = 0; srcSkew < 8; srcSkew += 1 + (round % 3)) {
          const dstSkew = (srcSkew + round) & 7;
          // A plain array (a tap read, the source's template) ...
          const backing = new Uint8Array(packet.length + 16);
          backing.set(packet, srcSkew);
          check(packet, new BytesFrame().set(backing, size, srcSkew + NET_HDR_SIZE), backing, srcSkew, dstSkew);
          // ... a view of exactly the header and the frame (the source's packet: one set()) ...
          const exact = backing.subarray(srcSkew, srcSkew + packet.length);
          check(packet, new BytesFrame().set(exact, size, NET_HDR_SIZE), exact, 0, dstSkew);
          // ... and another guest's transmit chain, read in place.
          const chain = sender(packet, 0x8000 + srcSkew);
          check(packet, chain, chain.hdrBuf, chain.hdrOff, dstSkew);
        }
      }
    }
  });

  it('the source hands its frames on every 32 during a long pass, not only at its end', () => {
    const r = receiver();
    const seen: number[] = [];
    const publishRx = () => {
      r.queue.publish();
      seen.push(r.driver.usedIdx());
    };
    const source = openPort({ kind: 'source', frameSize: 64 }, { rx: () => r.rx, stats: new Float64Array(8), publishRx } as unknown as PortHooks);
    for (let i = 0; i < RING; i++) r.driver.add1(BASE + RX_AREA + 128 * i, 128, true);
    r.driver.publish();
    source.rxReady();
    // What the driver could see at each publish: the first 32 frames while the next were still to be filled.
    expect(seen).toEqual([32, 64]);
  });

  it('the source fills buffers at every alignment with the frame whole, and nothing past it', () => {
    const r = receiver();
    const stats = new Float64Array(8);
    const source = openPort({ kind: 'source', frameSize: 64 }, { rx: () => r.rx, stats } as unknown as PortHooks);
    const want = new Uint8Array(NET_HDR_SIZE + 64);
    want.set(sourceFrame(64), NET_HDR_SIZE);
    want[NET_HDR_NUM_BUFFERS] = 1;
    let slot = 0;
    for (const skews of [[4, 4, 4, 4], [0, 0, 3, 3, 7], [1, 2, 3, 4, 5, 6, 7, 0]]) {
      const gpas = skews.map((skew) => BASE + RX_AREA + (slot++ % 40) * RX_BUF + skew);
      for (const gpa of gpas) {
        r.driver.add1(gpa, 2048, true);
        r.bytes.fill(0xa5, gpa - BASE + want.length, gpa - BASE + want.length + 8);
      }
      r.driver.publish();
      source.rxReady();
      r.queue.publish();
      for (const gpa of gpas) {
        expect(r.driver.nextUsed()).toBeGreaterThanOrEqual(0);
        const got = r.bytes.subarray(gpa - BASE, gpa - BASE + want.length + 8);
        expect(got.findIndex((b, i) => b !== (i < want.length ? want[i] : 0xa5)), `buffer ${gpa & 7} past a boundary: first wrong byte`).toBe(-1);
      }
    }
    expect(stats[3]).toBe(17);
  });

  it("the source's batch: chains before one the guest broke are filled and returned, then the error; other headers are left to deliver()", () => {
    const r = receiver();
    const packet = new Uint8Array(NET_HDR_SIZE + 64);
    packet.set(sourceFrame(64), NET_HDR_SIZE);
    r.driver.add1(BASE + RX_AREA, 128, true);
    r.driver.publish();
    // The packet is copied as it is, num_buffers too: only a header saying one buffer, no flags and no GSO goes.
    expect(r.rx.deliverCopies(packet, 32)).toBe(0);
    packet[NET_HDR_NUM_BUFFERS] = 1;
    packet[0] = 1; // NEEDS_CSUM
    expect(r.rx.deliverCopies(packet, 32)).toBe(0);
    expect(r.queue.inFlight).toBe(0);
    packet[0] = 0;
    for (let i = 1; i < 3; i++) r.driver.add1(BASE + RX_AREA + 128 * i, 128, true);
    r.driver.add1(BASE + (1 << 21), 128, true); // past the end of guest memory
    r.driver.publish();
    expect(() => r.rx.deliverCopies(packet, 32)).toThrow(/outside guest memory/);
    // The three good chains went back to the driver, none left in flight, each with the whole packet.
    expect(r.queue.inFlight).toBe(0);
    r.queue.publish();
    const want = packet.slice();
    for (let i = 0; i < 3; i++) {
      expect(r.driver.nextUsed()).toBeGreaterThanOrEqual(0);
      const at = RX_AREA + 128 * i;
      expect(Buffer.compare(r.bytes.subarray(at, at + want.length), want), `chain ${i}`).toBe(0);
    }
    expect(r.driver.nextUsed()).toBe(-1);
  });
});
