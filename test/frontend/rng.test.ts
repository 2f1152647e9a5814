import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { rngDevice } from '../../src/devices/rng/index.js';
import {
  FRONTEND_PROTOCOL_FEATURES,
  TestGuestMemory,
  TestQueue,
  VIRTIO_RING_F_EVENT_IDX,
  VhostUserFrontend,
  testRing,
} from '../../src/frontend/index.js';
import { fdCount } from '../../src/sys/index.js';
import { packedRingLayout, splitRingLayout } from '../../src/virtqueue/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { ProtocolFeature } from '../../src/vhost/protocol.js';

const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-rng-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const quiet: Logger = { info: () => {}, warn: () => {}, error: () => {} };
const BUFFERS = 8;
const LENGTH = 256;

const bit = (n: number): bigint => 1n << BigInt(n);

/** Post `BUFFERS` writable buffers, kick, and return what the device wrote in each. */
async function draw(q: TestQueue): Promise<Uint8Array[]> {
  const chains = q.addWritable(BUFFERS, LENGTH);
  if (q.memory.regions.length > 1) for (const ch of chains) expect(ch.writable[0][0]).toBeGreaterThanOrEqual(0x1_0000_0000);
  q.kick();
  const used = await q.waitForUsed(BUFFERS, 5000);
  return used.map((u) => {
    expect(u.len).toBe(LENGTH);
    return q.written(u.chain!, u.len);
  });
}

function isRandomLooking(bytes: Uint8Array): boolean {
  // 256 random bytes: zero is one of 256 values, and a run of identical bytes is vanishingly unlikely.
  return bytes.some((b) => b !== 0) && new Set(bytes).size > 64;
}

describe('rng device through the test front-end', () => {
  it('serves random bytes, survives a reconnect, and leaks no fds', async () => {
    const before = fdCount();
    const rng = rngDevice();
    const path = join(dir, 'rng.sock');
    const server = await VhostUserServer.start(rng, { socketPath: path, log: quiet });

    const first = await VhostUserFrontend.connect(path);
    const [q] = await first.start({ queues: [{ index: 0, size: 256 }] });
    expect(first.has(ProtocolFeature.REPLY_ACK)).toBe(true);
    expect(first.queueNum).toBe(1);

    const a = await draw(q);
    const b = await draw(q);
    for (const bytes of [...a, ...b]) expect(isRandomLooking(bytes)).toBe(true);
    const all = [...a, ...b].map((x) => Buffer.from(x).toString('hex'));
    expect(new Set(all).size).toBe(all.length);
    expect(rng.bytesServed()).toBe(2 * BUFFERS * LENGTH);

    // One chain of two buffers through an indirect table (INDIRECT_DESC is on by default).
    const chain = q.add({ writable: [LENGTH, LENGTH], indirect: true });
    q.kick();
    const [u] = await q.waitForUsed(1, 5000);
    expect(u.chain).toBe(chain);
    expect(u.len).toBe(2 * LENGTH);
    const both = q.written(chain, u.len);
    expect(isRandomLooking(both.subarray(0, LENGTH)) && isRandomLooking(both.subarray(LENGTH))).toBe(true);

    // Stopping hands back where the device got to in the avail ring (packed: and the used position, each with
    // its wrap counter, still 1 in the first lap).
    const at = 2 * BUFFERS + 1;
    await expect(first.stop()).resolves.toEqual([q.packed ? ((at | 0x8000) * 0x10001) : at]);

    const gone = once(server, 'disconnected');
    first.close();
    await gone;
    expect(server.connected).toBe(false);

    // A second front-end gets a fresh session on the same socket. This one takes the other paths: SET_MEM_TABLE
    // rather than ADD_MEM_REG, no EVENT_IDX, and two regions in one file where the first holds just the ring,
    // so the buffers land in the second region, at a non-zero mmap offset, above 4 GiB.
    // A first region that holds the rings exactly (nothing is placed at guest address 0), so every buffer lands
    // above 4 GiB.
    const ringsEnd = (testRing() === 'packed' ? packedRingLayout : splitRingLayout)(256, 4096).end;
    const memory = new TestGuestMemory({
      regions: [
        { guestPhysAddr: 0, size: ringsEnd },
        { guestPhysAddr: 0x1_0000_0000, size: 1024 * 1024 },
      ],
      singleFile: true,
    });
    const second = await VhostUserFrontend.connect(path);
    const [q2] = await second.start({
      queues: [{ index: 0, size: 256 }],
      memory,
      features: ~bit(VIRTIO_RING_F_EVENT_IDX),
      protocolFeatures: FRONTEND_PROTOCOL_FEATURES & ~bit(ProtocolFeature.CONFIGURE_MEM_SLOTS),
    });
    expect(q2.eventIdx).toBe(false);
    const c = await draw(q2);
    expect(q2.layout.end).toBeLessThanOrEqual(ringsEnd);
    for (const bytes of c) expect(isRandomLooking(bytes)).toBe(true);
    expect(Buffer.from(c[0]).equals(Buffer.from(a[0]))).toBe(false);
    expect(rng.bytesServed()).toBe((3 * BUFFERS + 2) * LENGTH);

    const gone2 = once(server, 'disconnected');
    second.close();
    await gone2;
    memory.close();
    await server.close();
    expect(fdCount()).toBe(before);
  }, 20000);
});
