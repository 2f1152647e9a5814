// virtio-console against our own frontend playing the Linux driver: the MULTIPORT control protocol, hostile control
// messages, and flow control both ways with socket host ends.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BACKLOG_BYTES, consoleDevice, type ConsoleDevice, type ConsoleOptions } from '../../src/devices/console/index.js';
import {
  NO_PORT,
  VIRTIO_CONSOLE_CONSOLE_PORT,
  VIRTIO_CONSOLE_DEVICE_ADD,
  VIRTIO_CONSOLE_DEVICE_READY,
  VIRTIO_CONSOLE_F_MULTIPORT,
  VIRTIO_CONSOLE_PORT_NAME,
  VIRTIO_CONSOLE_PORT_OPEN,
  VIRTIO_CONSOLE_PORT_READY,
  VIRTIO_CONSOLE_RESIZE,
  encodeControl,
} from '../../src/devices/console/spec.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { attach } from '../helpers/socket-client.js';
import { eventfdRead } from '../../src/sys/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';

interface Control {
  id: number;
  event: number;
  value: number;
  extra: Buffer;
}

describe('console device', () => {
  let dir: string;
  let server: VhostUserServer | undefined;
  let fe: VhostUserFrontend | undefined;
  let dev: ConsoleDevice | undefined;
  let logs: string[];
  const clients: Socket[] = [];

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-console-'));
    logs = [];
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.destroy();
    fe?.close();
    await server?.close();
    dev?.close();
    fe = server = dev = undefined;
    rmSync(dir, { recursive: true, force: true });
  });

  /** A device with the console and one named port on sockets, max_nr_ports 3 (port 2 never added). */
  async function start(extra: Partial<ConsoleOptions> = {}, features?: bigint) {
    const log: Logger = { info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m) };
    dev = consoleDevice({
      console: { kind: 'socket', path: join(dir, 'hvc.sock') },
      ports: [{ name: 'org.test.data', backend: { kind: 'socket', path: join(dir, 'data.sock') } }],
      maxPorts: 3,
      cols: 100,
      rows: 40,
      log: (m) => logs.push(m),
      ...extra,
    });
    server = await VhostUserServer.start(dev, { socketPath: join(dir, 'c.sock'), log });
    fe = await VhostUserFrontend.connect(join(dir, 'c.sock'));
    const queues = await fe.start({ queues: Array.from({ length: dev.numQueues }, (_, index) => ({ index, size: 64 })), ...(features !== undefined ? { features } : {}) });
    const [rx0, tx0, crx, ctx, rx1, tx1] = queues;
    // The driver posts its control receive buffers first, one page each.
    for (let i = 0; i < 32; i++) crx.add({ writable: [4096] });
    crx.kick();
    return { rx0, tx0, crx, ctx, rx1, tx1, queues };
  }

  const received: Control[] = [];
  /** The next `n` control messages from the device. */
  async function controls(crx: TestQueue, n: number): Promise<Control[]> {
    const used = await crx.waitForUsed(n);
    const out = used.map((u) => {
      const b = Buffer.from(crx.written(u.chain!, u.len));
      return { id: b.readUInt32LE(0), event: b.readUInt16LE(4), value: b.readUInt16LE(6), extra: b.subarray(8) };
    });
    for (let i = 0; i < n; i++) crx.add({ writable: [4096] });
    crx.kick();
    received.push(...out);
    return out;
  }

  async function send(ctx: TestQueue, msg: Uint8Array): Promise<void> {
    ctx.add({ readable: [msg] });
    ctx.kick();
    await ctx.waitForUsed(1);
  }

  /** DEVICE_READY, then PORT_READY for both ports as Linux does; returns the messages in order. */
  async function bringUp(q: Awaited<ReturnType<typeof start>>): Promise<Control[]> {
    await send(q.ctx, encodeControl(NO_PORT, VIRTIO_CONSOLE_DEVICE_READY, 1));
    const adds = await controls(q.crx, 2);
    await send(q.ctx, encodeControl(0, VIRTIO_CONSOLE_PORT_READY, 1));
    const p0 = await controls(q.crx, 3);
    await send(q.ctx, encodeControl(1, VIRTIO_CONSOLE_PORT_READY, 1));
    const p1 = await controls(q.crx, 2);
    return [...adds, ...p0, ...p1];
  }

  it('speaks the MULTIPORT control protocol: ports added, console, size, name, open state', async () => {
    const q = await start();
    expect(dev!.features & (1n << BigInt(VIRTIO_CONSOLE_F_MULTIPORT))).not.toBe(0n);
    const cfg = Buffer.from(await fe!.getConfig(0, 12));
    expect([cfg.readUInt16LE(0), cfg.readUInt16LE(2), cfg.readUInt32LE(4)]).toEqual([100, 40, 3]);
    const msgs = await bringUp(q);
    expect(msgs.map((m) => [m.id, m.event, m.value])).toEqual([
      [0, VIRTIO_CONSOLE_DEVICE_ADD, 0],
      [1, VIRTIO_CONSOLE_DEVICE_ADD, 0],
      [0, VIRTIO_CONSOLE_CONSOLE_PORT, 1],
      [0, VIRTIO_CONSOLE_RESIZE, 0],
      [0, VIRTIO_CONSOLE_PORT_OPEN, 0], // no client on the console's socket yet
      [1, VIRTIO_CONSOLE_PORT_NAME, 0],
      [1, VIRTIO_CONSOLE_PORT_OPEN, 0],
    ]);
    const resize = msgs[3].extra;
    expect([resize.readUInt16LE(0), resize.readUInt16LE(2)]).toEqual([100, 40]); // cols, rows: the spec's order
    expect(msgs[5].extra.toString()).toBe('org.test.data');

    // A client attaching is PORT_OPEN 1; a resize is RESIZE.
    const c = await attach(join(dir, 'data.sock'));
    clients.push(c.socket);
    const [opened] = await controls(q.crx, 1);
    expect([opened.id, opened.event, opened.value]).toEqual([1, VIRTIO_CONSOLE_PORT_OPEN, 1]);
    dev!.resize(120, 50);
    const [r] = await controls(q.crx, 1);
    expect([r.id, r.event, r.extra.readUInt16LE(0), r.extra.readUInt16LE(2)]).toEqual([0, VIRTIO_CONSOLE_RESIZE, 120, 50]);
    expect(logs.filter((l) => /ignored/.test(l))).toEqual([]);
  });

  it('logs and ignores hostile control messages, and the queue keeps running', async () => {
    const q = await start();
    await send(q.ctx, new Uint8Array(4)); // too short
    await send(q.ctx, new Uint8Array(12)); // too long
    await send(q.ctx, encodeControl(0, 99, 1)); // unknown event
    await send(q.ctx, encodeControl(0, VIRTIO_CONSOLE_PORT_READY, 1)); // before DEVICE_READY: port not added
    await bringUp(q);
    await send(q.ctx, encodeControl(7, VIRTIO_CONSOLE_PORT_READY, 1)); // beyond max_nr_ports 3
    await send(q.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_READY, 1)); // within max, never added
    await send(q.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_OPEN, 1));
    await send(q.ctx, encodeControl(1, VIRTIO_CONSOLE_RESIZE, 0)); // a device-to-driver event
    expect(logs.filter((l) => /^ignored from the guest/.test(l))).toEqual([
      'ignored from the guest: a control message of 4 bytes (want 8)',
      'ignored from the guest: a control message of 12 bytes (want 8)',
      'ignored from the guest: event 99 for port 0, value 1: not an event a driver sends',
      'ignored from the guest: PORT_READY for port 0, value 1: no such port was added',
      'ignored from the guest: PORT_READY for port 7, value 1: beyond max_nr_ports 3',
      'ignored from the guest: PORT_READY for port 2, value 1: no such port was added',
      'ignored from the guest: PORT_OPEN for port 2, value 1: no such port was added',
      'ignored from the guest: RESIZE for port 1, value 0: not an event a driver sends',
    ]);
    // Still serving: the guest opens port 1 and host input reaches it.
    const c = await attach(join(dir, 'data.sock'));
    clients.push(c.socket);
    await controls(q.crx, 1);
    await send(q.ctx, encodeControl(1, VIRTIO_CONSOLE_PORT_OPEN, 1));
    c.socket.write('still here');
    q.rx1.add({ writable: [4096] });
    q.rx1.kick();
    const [u] = await q.rx1.waitForUsed(1);
    expect(Buffer.from(q.rx1.written(u.chain!, u.len)).toString()).toBe('still here');
    for (const t of q.queues) expect(eventfdRead(t.errFd)).toBe(0);
  });

  it('holds host input until the guest opens the port and posts buffers; reads no more than it can hold', async () => {
    const q = await start();
    await bringUp(q);
    const c = await attach(join(dir, 'data.sock'));
    clients.push(c.socket);
    await controls(q.crx, 1);
    // 1 MiB from the host before the guest has opened the port: nothing may be dropped, and the device must stop
    // reading the socket rather than buffer it all.
    const big = Buffer.alloc(1 << 20);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + (i >> 12)) & 0xff;
    c.socket.write(big);
    q.rx1.addWritable(8, 4096);
    q.rx1.kick();
    // Not opened by the guest (Linux would discard what it receives): nothing may arrive. A bounded wait for an
    // absence, long enough for the socket to fill what the device reads ahead.
    await expect(q.rx1.waitForUsed(1, 300)).rejects.toThrow(/0 of 1 used elements/);
    const held = dev!.ports()[1].heldForGuest;
    expect(held).toBeGreaterThan(0);
    expect(held).toBeLessThanOrEqual(BACKLOG_BYTES + 65536); // read ahead by at most one socket chunk past the bound
    await send(q.ctx, encodeControl(1, VIRTIO_CONSOLE_PORT_OPEN, 1));
    const got: Buffer[] = [];
    let total = 0;
    while (total < big.length) {
      const used = await q.rx1.waitForUsed(1);
      for (const u of used) {
        got.push(Buffer.from(q.rx1.written(u.chain!, u.len)));
        total += u.len;
      }
      q.rx1.addWritable(1, 4096);
      q.rx1.kick();
    }
    expect(Buffer.concat(got).equals(big)).toBe(true);
  });

  it('console port: output with no client goes to a bounded backlog, oldest dropped and counted, the rest delivered on attach', async () => {
    const q = await start();
    await bringUp(q);
    const chunk = 4096;
    const n = Math.ceil((BACKLOG_BYTES + 40_000) / chunk);
    let written = 0;
    const all: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      const b = Buffer.alloc(chunk, i & 0xff);
      all.push(b);
      written += chunk;
      q.tx0.add({ readable: [b] });
      if (q.tx0.driver.freeCount === 0 || i === n - 1) {
        q.tx0.kick();
        await q.tx0.waitForUsed(q.tx0.driver.pending);
      }
    }
    const s = dev!.ports()[0];
    expect(s.backlogged).toBe(BACKLOG_BYTES);
    expect(s.dropped).toBe(written - BACKLOG_BYTES);
    const c = await attach(join(dir, 'hvc.sock'));
    clients.push(c.socket);
    const got = await c.until(BACKLOG_BYTES);
    expect(got.equals(Buffer.concat(all).subarray(written - BACKLOG_BYTES))).toBe(true);
    expect(logs.some((l) => l.includes(`${written - BACKLOG_BYTES} older bytes were dropped`))).toBe(true);
  });

  it('named port: with no client the guest output waits in the ring once the backlog is full; nothing is lost', async () => {
    const q = await start();
    await bringUp(q);
    const chunk = 8192;
    const chains = Math.ceil(BACKLOG_BYTES / chunk) + 6;
    const all: Buffer[] = [];
    for (let i = 0; i < chains; i++) {
      const b = Buffer.alloc(chunk, 0x40 + i);
      all.push(b);
      q.tx1.add({ readable: [b] });
    }
    q.tx1.kick();
    await q.tx1.waitForUsed(BACKLOG_BYTES / chunk);
    expect(q.tx1.driver.pending).toBe(chains - BACKLOG_BYTES / chunk); // the rest wait in the ring
    const c = await attach(join(dir, 'data.sock'));
    clients.push(c.socket);
    const got = await c.until(chains * chunk);
    expect(got.equals(Buffer.concat(all))).toBe(true);
    await q.tx1.waitForUsed(chains - BACKLOG_BYTES / chunk);
    expect(dev!.ports()[1].dropped).toBe(0);
  });

  it('without MULTIPORT: port 0 only, its size in config space; a resize is a config change', async () => {
    const q = await start({}, ~(1n << BigInt(VIRTIO_CONSOLE_F_MULTIPORT)));
    const c = await attach(join(dir, 'hvc.sock'));
    clients.push(c.socket);
    q.tx0.add({ readable: [Buffer.from('boot log\n')] });
    q.tx0.kick();
    expect((await c.until(9)).toString()).toBe('boot log\n');
    c.socket.write('typed');
    q.rx0.add({ writable: [64] });
    q.rx0.kick();
    const [u] = await q.rx0.waitForUsed(1);
    expect(Buffer.from(q.rx0.written(u.chain!, u.len)).toString()).toBe('typed');
    const changed = fe!.waitForBackendMessage('CONFIG_CHANGE_MSG');
    dev!.resize(90, 30);
    await changed;
    const cfg = Buffer.from(await fe!.getConfig(0, 4));
    expect([cfg.readUInt16LE(0), cfg.readUInt16LE(2)]).toEqual([90, 30]);
  });

  it('EMERG_WRITE: a config write of emerg_wr is a character on port 0', async () => {
    await start({ console: { kind: 'file', path: join(dir, 'console.log') } });
    const cfg = new Uint8Array(12);
    cfg[8] = 0x21; // '!'
    await fe!.setConfig(0, cfg, 1);
    await fe!.setConfig(8, new Uint8Array([0x3f, 0, 0, 0]), 1);
    await new Promise((r) => setTimeout(r, 50)); // the file stream writes asynchronously
    expect(readFileSync(join(dir, 'console.log'), 'utf8')).toBe('!?');
  });
});
