// DataPlane.shareThread and thread handlers: devices of one process (each its own socket and frontend) whose
// queues one worker thread serves, one handler seeing them all. The relay device moves what one device's queue 1
// takes into another's queue 0, which only works if both sets of queues meet in one thread's handler; receivers
// are published once per batch (endOfBatch), so a framework that never calls it loses every delivery.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { VIRTIO_RING_F_EVENT_IDX, VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { relayDevice } from './fixtures/relay-device.js';

const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-shared-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const quiet: Logger = { info() {}, warn() {}, error() {} };
const bit = (n: number): bigint => 1n << BigInt(n);

async function pair(shareThread: string | undefined, pollUs = 0, eventIdx = true) {
  const seen = new SharedArrayBuffer(16);
  const servers: VhostUserServer[] = [];
  const fes: VhostUserFrontend[] = [];
  const queues: TestQueue[][] = [];
  for (const slot of [0, 1]) {
    const path = join(dir, `${shareThread ?? 'own'}-${pollUs}-${slot}.sock`);
    servers.push(await VhostUserServer.start(relayDevice({ seen, slot }, { shareThread, pollUs }), { socketPath: path, log: quiet }));
    const fe = await VhostUserFrontend.connect(path);
    fes.push(fe);
    queues.push(await fe.start({ queues: [{ index: 0, size: 64 }, { index: 1, size: 64 }], features: eventIdx ? ~0n : ~bit(VIRTIO_RING_F_EVENT_IDX) }));
  }
  const close = async () => {
    for (const fe of fes) fe.close();
    for (const s of servers) await s.close();
  };
  return { seen: new Int32Array(seen), queues, close };
}

describe('queues of several devices in one thread', () => {
  it('one worker serves both devices, each with its own ctx.device, and frames cross between them', async () => {
    const { seen, queues, close } = await pair('relay-a');
    try {
      const [[, txA], [rxB]] = queues;
      const buffers = rxB.addWritable(8, 64);
      rxB.kick();
      const messages = Array.from({ length: 8 }, (_, i) => new TextEncoder().encode(`frame ${i} from A`));
      for (const m of messages) txA.add({ readable: [m] });
      txA.kick();
      expect((await txA.waitForUsed(8)).length).toBe(8);
      const used = await rxB.waitForUsed(8);
      expect(used.map((u) => u.len)).toEqual(messages.map((m) => m.length));
      for (let i = 0; i < 8; i++) {
        const [gpa] = buffers[i].writable[0];
        expect(new TextDecoder().decode(rxB.memory.read(gpa, used[i].len))).toBe(`frame ${i} from A`);
      }
      // Both in one worker thread (not the main thread, id 0 + 1), told apart by ctx.device.
      expect(seen[0]).toBeGreaterThan(1);
      expect(seen[2]).toBe(seen[0]);
      expect(seen[1]).not.toBe(seen[3]);
    } finally {
      await close();
    }
  });

  it('without shareThread each device gets its own thread (and nothing crosses)', async () => {
    const { seen, queues, close } = await pair(undefined);
    try {
      const [[, txA], [rxB]] = queues;
      rxB.addWritable(1, 64);
      rxB.kick();
      txA.add({ readable: [new Uint8Array([1, 2, 3])] });
      txA.kick();
      await txA.waitForUsed(1);
      expect(seen[0]).toBeGreaterThan(1);
      expect(seen[2]).toBeGreaterThan(1);
      expect(seen[2]).not.toBe(seen[0]);
      expect(rxB.driver.nextUsed()).toBe(-1);
    } finally {
      await close();
    }
  });

  // Polling: the thread looks at both devices' transmit queues on every pass, without kicks; a queue idle past
  // pollUs is re-armed. Many short bursts both ways: a lost re-arm or a pass that skips a device stalls a burst,
  // and every wait is bounded.
  for (const eventIdx of [false, true]) {
    it(`polling (pollUs 100, EVENT_IDX ${eventIdx ? 'on' : 'off'}): 400 bursts each way, none stalls`, async () => {
      const { queues, close } = await pair(`relay-poll-${eventIdx}`, 100, eventIdx);
      try {
        const bursts = 400;
        for (let round = 0; round < bursts; round++) {
          const [from, to] = round % 2 === 0 ? [queues[0], queues[1]] : [queues[1], queues[0]];
          const n = 1 + (round % 7);
          to[0].addWritable(n, 32);
          if (to[0].publish()) to[0].notify();
          for (let i = 0; i < n; i++) from[1].add({ readable: [new Uint8Array([round & 0xff, i])] });
          if (from[1].publish()) from[1].notify();
          // Every other round waits past pollUs, so the queues go back to sleep and must be woken by a kick.
          if (round % 2 === 1) await new Promise<void>((r) => setTimeout(r, 1));
          expect((await to[0].waitForUsed(n, 5000)).length).toBe(n);
          expect((await from[1].waitForUsed(n, 5000)).length).toBe(n);
        }
      } finally {
        await close();
      }
    }, 60_000);
  }
});
