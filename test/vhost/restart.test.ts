/**
 * A backend SIGKILLed with requests in flight, some completed out of ring order, is replaced by a new process on
 * the same socket; the front-end reconnects as QEMU does (same guest memory, rings and inflight region). With
 * inflight tracking the guest gets every request back exactly once; without it, on a split ring, QEMU's rewind
 * to used->idx runs again requests the guest already has and never the ones still missing.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FrontendError, VhostUserFrontend, type TestQueue, type UsedElement } from '../../src/frontend/index.js';
import { listening, startBackend, type BackendProcess } from '../helpers/backend-process.js';
import { MARK } from './fixtures/hold-backend.js';

const fixture = new URL('./fixtures/hold-backend.ts', import.meta.url).pathname;

let dir: string;
const children: BackendProcess[] = [];
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhost-ts-restart-'));
});
afterEach(async () => {
  for (const c of children.splice(0)) await c.kill();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A backend process of the hold device, listening. */
async function backend(socket: string, mode: 'hold-even' | 'in-order', inflight = true): Promise<BackendProcess> {
  const b = await startBackend(['--import', 'tsx', fixture, socket, mode, ...(inflight ? [] : ['--no-inflight'])], listening, 20_000);
  children.push(b);
  return b;
}

function post(q: TestQueue, tags: number[]): void {
  for (const tag of tags) q.add({ readable: [new Uint8Array(new Uint32Array([tag]).buffer)], writable: [8] });
  q.kick();
}

const tagOf = (q: TestQueue, u: UsedElement): number => new DataView(q.memory.read(u.chain!.readable[0][0], 4).buffer).getUint32(0, true);
const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe.each(['split', 'packed'] as const)('backend restart with chains in flight, %s ring', (ring) => {
  it('every chain comes back once: the unfinished ones first, in the order the dead backend took them', async () => {
    const socket = join(dir, `${ring}.sock`);
    const first = await backend(socket, 'hold-even');
    const fe1 = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 20_000 });
    const [q] = await fe1.start({ queues: [{ index: 0, size: 64 }], ring });
    expect(fe1.inflight).not.toBeNull();
    post(q, range(1, 12));
    const done1 = await q.waitForUsed(6, 10_000);
    // Out of ring order: the dead backend's batch came back reversed.
    expect(done1.map((u) => tagOf(q, u))).toEqual([11, 9, 7, 5, 3, 1]);
    await first.kill();
    const handover = fe1.handOver();

    const second = await backend(socket, 'in-order');
    const fe2 = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 20_000 });
    try {
      const [q2] = await fe2.start({ queues: [{ index: 0, size: 64 }], ring, resume: handover.queues, memory: handover.memory, inflight: handover.inflight! });
      post(q2, range(13, 16));
      const done2 = await q2.waitForUsed(10, 10_000);
      expect(done2.map((u) => tagOf(q2, u))).toEqual([2, 4, 6, 8, 10, 12, 13, 14, 15, 16]);
      for (const u of done2) expect(q2.written(u.chain!, u.len)[0]).toBe(MARK['in-order']);
      expect(q2.driver.pending).toBe(0);
      expect(second.log()).toMatch(/6 requests were in flight when the previous backend stopped/);
    } finally {
      fe2.close();
    }
  });
});

describe('without inflight tracking', () => {
  it('the same restart on a split ring runs completed chains again and loses unfinished ones', async () => {
    const socket = join(dir, 'plain.sock');
    const first = await backend(socket, 'hold-even', false);
    const fe1 = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 20_000 });
    const [q] = await fe1.start({ queues: [{ index: 0, size: 64 }], ring: 'split' });
    expect(fe1.inflight).toBeNull();
    post(q, range(1, 12));
    await q.waitForUsed(6, 10_000);
    await first.kill();
    const handover = fe1.handOver();
    await backend(socket, 'in-order', false);
    const fe2 = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 20_000 });
    try {
      const [q2] = await fe2.start({ queues: [{ index: 0, size: 64 }], ring: 'split', resume: handover.queues, memory: handover.memory });
      let used: UsedElement[];
      try {
        used = await q2.waitForUsed(6, 3000);
      } catch (e) {
        used = (e as FrontendError).used ?? [];
      }
      // avail[6..12) again: tags 7 to 12, of which 7, 9 and 11 the guest already had; 2, 4 and 6 never come.
      const tags = used.map((u) => (u.chain ? tagOf(q2, u) : -1));
      expect(tags).not.toContain(2);
      expect(tags.filter((t) => t === -1).length).toBe(3); // used ids the driver no longer had posted
    } finally {
      fe2.close();
    }
  });
});
