// `vhost-ts console` SIGKILLed while the driver streams into a named port, and started again on the same socket;
// the front-end reconnects as QEMU's vhost-user-blk does (same memory and rings, split rings rewound to used).
// (QEMU 11.1's generic vhost-user device itself cannot reconnect: its vub_connect starts the vhost device that
// vub_disconnect cleaned up, and aborts; so this plays the driver with our test front-end.)
// The new backend takes up the running driver: it adds the ports again, the driver answers PORT_READY, the host
// side is announced closed then open; and between the old client and the new one, every byte the driver wrote
// arrives (some may come twice, at the restart).
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  NO_PORT,
  VIRTIO_CONSOLE_DEVICE_ADD,
  VIRTIO_CONSOLE_DEVICE_READY,
  VIRTIO_CONSOLE_PORT_OPEN,
  VIRTIO_CONSOLE_PORT_READY,
  encodeControl,
} from '../../src/devices/console/spec.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { listening, startBackend, vhostTsBin } from '../helpers/backend-process.js';

const CHUNKS = 120;
// Larger than a Unix socket's buffer takes in a few chunks: a client that stops reading backs the backend up.
const CHUNK = 16384;

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhost-ts-console-restart-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function client(path: string): Promise<{ socket: Socket; data: () => Buffer; ended: Promise<unknown> }> {
  const socket = connect(path);
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  socket.on('error', () => {});
  const chunks: Buffer[] = [];
  socket.on('data', (d: Buffer) => chunks.push(d));
  return { socket, data: () => Buffer.concat(chunks), ended: once(socket, 'close') };
}

async function until(what: string, pred: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Control messages the device sent, as [id, event, value]. */
async function controls(crx: TestQueue, n: number): Promise<number[][]> {
  const used = await crx.waitForUsed(n, 10_000);
  for (let i = 0; i < n; i++) crx.add({ writable: [4096] });
  crx.kick();
  return used.map((u) => {
    const b = Buffer.from(crx.written(u.chain!, u.len));
    return [b.readUInt32LE(0), b.readUInt16LE(4), b.readUInt16LE(6)];
  });
}

async function send(ctx: TestQueue, msg: Uint8Array): Promise<void> {
  ctx.add({ readable: [msg] });
  ctx.kick();
  await ctx.waitForUsed(1, 10_000);
}

const chunkOf = (i: number): Buffer => Buffer.from(`chunk ${String(i).padStart(6, '0')} `.padEnd(CHUNK, '.'));

describe('console backend restart', () => {
  it('--state-file: output waiting for an absent client survives a planned restart (SIGTERM, start again)', async () => {
    const sock = join(dir, 's.sock');
    const data = join(dir, 's-data.sock');
    const stateFile = join(dir, 'console.state');
    const args = ['console', '--socket-path', sock, '--console', `file:${join(dir, 's-hvc0.log')}`, '--port', `org.test.data=socket:${data}`, '--state-file', stateFile];
    const first = await startBackend([vhostTsBin, ...args], listening, 20_000);
    try {
      const fe = await VhostUserFrontend.connect(sock, { connectTimeoutMs: 20_000 });
      const [, , crx, ctx, , tx1] = await fe.start({ queues: Array.from({ length: 6 }, (_, index) => ({ index, size: 64 })), ring: 'split' });
      for (let i = 0; i < 16; i++) crx.add({ writable: [4096] });
      crx.kick();
      await send(ctx, encodeControl(NO_PORT, VIRTIO_CONSOLE_DEVICE_READY, 1));
      await send(ctx, encodeControl(1, VIRTIO_CONSOLE_PORT_READY, 1));
      // No client on the named port: this waits in the backlog.
      tx1.add({ readable: [Buffer.from('kept across the restart\n')] });
      tx1.kick();
      await tx1.waitForUsed(1, 10_000);
      fe.close();
      const exited = once(first.child, 'exit');
      first.child.kill('SIGTERM');
      await exited;
      expect(first.log()).toMatch(/device state saved/);
    } finally {
      await first.kill();
    }
    const second = await startBackend([vhostTsBin, ...args], listening, 20_000);
    try {
      expect(second.log()).toMatch(/device state loaded/);
      const c = await client(data);
      await until('the backlog at the new client', () => c.data().toString().includes('kept across the restart\n'));
      c.socket.destroy();
    } finally {
      await second.kill();
    }
  }, 60_000);

  it('a restarted backend takes up the running driver and every byte of the stream reaches a client', async () => {
    const sock = join(dir, 'c.sock');
    const data = join(dir, 'data.sock');
    const args = ['console', '--socket-path', sock, '--console', `file:${join(dir, 'hvc0.log')}`, '--port', `org.test.data=socket:${data}`];
    const start = () => startBackend([vhostTsBin, ...args], listening, 20_000);
    let b = await start();
    const children = [b];
    try {
      const first = await client(data);
      const fe1 = await VhostUserFrontend.connect(sock, { connectTimeoutMs: 20_000 });
      const queues = await fe1.start({ queues: Array.from({ length: 6 }, (_, index) => ({ index, size: 64 })), ring: 'split' });
      const [, , crx, ctx, , tx1] = queues;
      for (let i = 0; i < 32; i++) crx.add({ writable: [4096] });
      crx.kick();
      await send(ctx, encodeControl(NO_PORT, VIRTIO_CONSOLE_DEVICE_READY, 1));
      await controls(crx, 2);
      await send(ctx, encodeControl(0, VIRTIO_CONSOLE_PORT_READY, 1));
      await controls(crx, 3);
      await send(ctx, encodeControl(1, VIRTIO_CONSOLE_PORT_READY, 1));
      const opened = await controls(crx, 2);
      expect(opened[1]).toEqual([1, VIRTIO_CONSOLE_PORT_OPEN, 1]); // the client was attached
      await send(ctx, encodeControl(1, VIRTIO_CONSOLE_PORT_OPEN, 1));

      // The driver streams 60 chunks to a client that stops reading after the first: the socket fills, the
      // backend holds output in the process, then in the ring, and dies so.
      first.socket.once('data', () => first.socket.pause());
      let next = 0;
      for (; next < 60; next++) tx1.add({ readable: [chunkOf(next)] });
      tx1.kick();
      // Backed up: the backend has stopped taking chains (none taken for 300 ms), with many still in the ring.
      let taken = -1;
      await until('the backend backing up', () => {
        const now = tx1.driver.pending;
        const still = now === taken;
        taken = now;
        return still && now > 0;
      }, 20_000).catch(() => {});
      await new Promise((r) => setTimeout(r, 300));
      expect(tx1.driver.pending).toBeGreaterThan(0);
      await b.kill();
      const handover = fe1.handOver();
      // What the dead backend handed the kernel is still the old client's to read.
      first.socket.resume();
      await first.ended;

      b = await start();
      children.push(b);
      const second = await client(data);
      const fe2 = await VhostUserFrontend.connect(sock, { connectTimeoutMs: 20_000 });
      try {
        const resumed = await fe2.start({
          queues: Array.from({ length: 6 }, (_, index) => ({ index, size: 64 })),
          ring: 'split',
          resume: handover.queues,
          memory: handover.memory,
        });
        const [, , crx2, ctx2, , tx2] = resumed;
        // No DEVICE_READY from the driver this time: the backend re-adds the ports by itself.
        const again = await controls(crx2, 4);
        expect(again).toEqual([
          [0, VIRTIO_CONSOLE_PORT_OPEN, 0],
          [0, VIRTIO_CONSOLE_DEVICE_ADD, 0],
          [1, VIRTIO_CONSOLE_PORT_OPEN, 0],
          [1, VIRTIO_CONSOLE_DEVICE_ADD, 0],
        ]);
        expect(b.log()).toMatch(/adding its ports again/);
        // Linux answers an add of a port it has with PORT_READY; the host side then opens again.
        await send(ctx2, encodeControl(1, VIRTIO_CONSOLE_PORT_READY, 1));
        const reopened = await controls(crx2, 2);
        expect(reopened).toContainEqual([1, VIRTIO_CONSOLE_PORT_OPEN, 1]);
        // The stream goes on.
        for (; next < CHUNKS; next++) {
          while (tx2.driver.freeCount === 0) {
            tx2.kick();
            await tx2.waitForUsed(1, 10_000);
          }
          tx2.add({ readable: [chunkOf(next)] });
        }
        tx2.kick();
        await until('the last chunk at the new client', () => second.data().includes(chunkOf(CHUNKS - 1)));
        const all = Buffer.concat([first.data(), second.data()]).toString();
        const seen = [...all.matchAll(/chunk (\d{6}) /g)].map((m) => Number(m[1]));
        const missing = Array.from({ length: CHUNKS }, (_, i) => i).filter((i) => !seen.includes(i));
        expect(missing, `old client ${first.data().length} bytes, new ${second.data().length}`).toEqual([]);
        let backs = 0;
        for (let i = 1; i < seen.length; i++) if (seen[i] !== seen[i - 1] + 1) backs++;
        expect(backs).toBeLessThanOrEqual(1);
      } finally {
        fe2.close();
        first.socket.destroy();
        second.socket.destroy();
      }
    } finally {
      for (const c of children) await c.kill();
    }
  }, 60_000);
});
