// Lost wakeups under stress: a driver that kicks only when the device asked for it (as Linux and DPDK do) pushes
// many short bursts through a queue served in a worker thread, while the queue is stopped and started hundreds of
// times. A device that goes to sleep with chains in the ring stalls for good: every wait here is bounded, so a
// stall fails the test instead of hanging it.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { VIRTIO_RING_F_EVENT_IDX, VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { fillDevice } from './fixtures/fill-device.js';

const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-stress-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const quiet: Logger = { info() {}, warn() {}, error() {} };
const bit = (n: number): bigint => 1n << BigInt(n);
const SIZE = 16;
const CYCLES = 1000;
const CHAINS_PER_CYCLE = 64;
const STALL_MS = 5000;

/** Deterministic burst sizes (a fixed LCG), so a failure replays the same sequence. */
function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0);
}

/** Post `total` one-buffer chains in bursts of 1..SIZE, kicking only when asked; reap as they come back. */
async function bursts(q: TestQueue, total: number, rand: () => number, buffers: readonly (readonly [number, number])[]): Promise<number> {
  let posted = 0;
  let done = 0;
  let kicks = 0;
  while (done < total) {
    const room = Math.min(q.driver.freeCount, total - posted);
    const n = room === 0 ? 0 : 1 + (rand() % room);
    for (let i = 0; i < n; i++) q.add({ writable: [buffers[(posted + i) % buffers.length]] });
    posted += n;
    if (n > 0 && q.publish()) {
      q.notify();
      kicks++;
    }
    // Wait only for what we must: one element when the ring is full or everything is posted, none otherwise,
    // so the next burst often lands while the worker is still serving the last.
    const want = q.driver.freeCount === 0 || posted === total ? 1 : 0;
    if (want === 0 && rand() % 2 === 0) continue;
    done += (await q.waitForUsed(Math.max(want, 0), STALL_MS)).length;
    for (let id = q.driver.nextUsed(); id >= 0; id = q.driver.nextUsed()) done++;
  }
  return kicks;
}

describe('notifications under many short bursts and queue restarts', () => {
  // The packed ring gets a size that is not a power of 2 (allowed there), so its wrap is exercised off the
  // 16-bit boundaries the split ring's indices use.
  // Polled: the worker keeps notifications off while it looks at the ring on each pass, and re-arms them once
  // the queue stayed idle for pollUs; a burst published around the re-arm must still be served.
  for (const [ring, size] of [['split', SIZE], ['packed', 13]] as const)
  for (const [eventIdx, pollUs] of [[false, 0], [true, 0], [true, 20], [true, 'adaptive']] as const) {
    it(`never stalls (${ring} ring, EVENT_IDX ${eventIdx ? 'on' : 'off'}${pollUs === 0 ? '' : pollUs === 'adaptive' ? ', polled adaptively' : `, polled ${pollUs} us`}, ${CYCLES} stop/start cycles)`, async () => {
      const path = join(dir, `rng-${ring}-${eventIdx}-${pollUs}.sock`);
      const server = await VhostUserServer.start(fillDevice(0x5a, 'worker', undefined, 30, pollUs), { socketPath: path, log: quiet });
      const fe = await VhostUserFrontend.connect(path);
      try {
        const [q] = await fe.start({ queues: [{ index: 0, size }], ring, features: eventIdx ? ~0n : ~bit(VIRTIO_RING_F_EVENT_IDX) });
        expect(q.eventIdx).toBe(eventIdx);
        expect(q.packed).toBe(ring === 'packed');
        const buffers = Array.from({ length: size }, () => q.alloc(16));
        const rand = lcg(eventIdx ? 7 : 3);
        let kicks = 0;
        for (let cycle = 0; cycle < CYCLES; cycle++) {
          try {
            kicks += await bursts(q, CHAINS_PER_CYCLE, rand, buffers);
          } catch (e) {
            throw new Error(`cycle ${cycle}: ${(e as Error).message}`);
          }
          // QEMU's stop and start of one ring: disable, GET_VRING_BASE, then the ring again from that base.
          await fe.setVringEnable(0, false);
          const base = await fe.getVringBase(0);
          // Everything came back, so the device resumes where the driver's used position is (packed: the same
          // position and wrap counter for avail and used).
          const used = q.driver.usedIdx();
          expect(base).toBe(ring === 'packed' ? (used | (used << 16)) >>> 0 : used);
          await fe.setVringNum(0, size);
          await fe.setVringBase(0, base);
          await fe.setVringAddr(q);
          await fe.setVringKick(0, q.kickFd);
          await fe.setVringCall(0, q.callFd);
          await fe.setVringEnable(0, true);
        }
        // The driver honoured suppression: far fewer kicks than chains means the device did turn them off.
        expect(kicks).toBeLessThan(CYCLES * CHAINS_PER_CYCLE);
      } finally {
        fe.close();
        await server.close();
      }
    }, 120_000);
  }
});
