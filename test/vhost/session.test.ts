/** The backend session and server, driven over a real Unix socket by a raw frontend. */
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { rngDevice } from '../../src/devices/rng/index.js';
import * as sys from '../../src/sys/index.js';
import { MAX_MEM_SLOTS, VhostUserServer, type Logger, type VhostUserDevice } from '../../src/vhost/index.js';
import { FrontendRequest, ProtocolFeature } from '../../src/vhost/protocol.js';
import { VIRTQ_DESC_F_WRITE } from '../../src/virtqueue/index.js';
import { fillDevice } from './fixtures/fill-device.js';
import { RawFrontend } from './raw-frontend.js';
import { BUF_ADDR, openQueue, rngSession } from './rng-session.js';
import { VhostUserFrontend } from '../../src/frontend/index.js';

const logs: string[] = [];
const log: Logger = { info: (m) => logs.push(m), warn: (m) => logs.push(m), error: (m) => logs.push(m) };

let dir: string;
let path: string;
const servers: VhostUserServer[] = [];
async function serve(device: VhostUserDevice, opts: Partial<Parameters<typeof VhostUserServer.start>[1]> = { socketPath: path }) {
  const s = await VhostUserServer.start(device, { ...opts, log });
  servers.push(s);
  return s;
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhost-ts-session-'));
  path = join(dir, 'dev.sock');
  logs.length = 0;
});
afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('negotiation and simple requests', () => {
  it('offers the framework features and protocol features, answers queue count, slots and status', async () => {
    await serve(rngDevice());
    const fe = RawFrontend.connect(path);
    try {
      const f = await fe.request({ type: 'GET_FEATURES' }, FrontendRequest.GET_FEATURES);
      expect(f.kind === 'features' && f.features).toBe((1n << 34n) | (1n << 32n) | (1n << 30n) | (1n << 29n) | (1n << 28n) | (1n << 27n) | (1n << 26n));
      const p = await fe.request({ type: 'GET_PROTOCOL_FEATURES' }, FrontendRequest.GET_PROTOCOL_FEATURES);
      const offered = p.kind === 'features' ? p.features : 0n;
      for (const bit of [ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ, ProtocolFeature.RESET_DEVICE, ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.STATUS, ProtocolFeature.LOG_SHMFD]) {
        expect(offered & (1n << BigInt(bit))).not.toBe(0n);
      }
      expect(offered & (1n << BigInt(ProtocolFeature.CONFIG))).toBe(0n); // rng has no config space
      fe.send({ type: 'SET_PROTOCOL_FEATURES', features: 1n << BigInt(ProtocolFeature.REPLY_ACK) });
      expect(await fe.request({ type: 'GET_QUEUE_NUM' }, FrontendRequest.GET_QUEUE_NUM)).toMatchObject({ value: 1 });
      expect(await fe.request({ type: 'GET_MAX_MEM_SLOTS' }, FrontendRequest.GET_MAX_MEM_SLOTS)).toMatchObject({ value: 509 });
      expect(await fe.request({ type: 'SET_STATUS', status: 0xf, needReply: true }, FrontendRequest.SET_STATUS)).toMatchObject({ status: 0 });
      expect(await fe.request({ type: 'GET_STATUS' }, FrontendRequest.GET_STATUS)).toMatchObject({ value: 0xf });
      // Unsupported and unknown requests: a REPLY_ACK failure, and the connection stays up.
      const logFd = sys.eventfdCreate();
      expect(await fe.request({ type: 'SET_LOG_FD', fd: logFd, needReply: true } as never, FrontendRequest.SET_LOG_FD)).toMatchObject({ status: 0 });
      sys.close(logFd);
      expect(await fe.request({ type: 'SET_VRING_ENDIAN', index: 0, num: 0, needReply: true } as never, FrontendRequest.SET_VRING_ENDIAN)).toMatchObject({ status: 1 });
      expect(await fe.request({ type: 'UNKNOWN', request: 77, payload: new Uint8Array(0), fds: [], needReply: true }, 77 as FrontendRequest)).toMatchObject({ status: 1 });
      expect(await fe.request({ type: 'SET_FEATURES', features: 1n << 40n, needReply: true }, FrontendRequest.SET_FEATURES)).toMatchObject({ status: 1 });
      expect(await fe.request({ type: 'GET_QUEUE_NUM' }, FrontendRequest.GET_QUEUE_NUM)).toMatchObject({ value: 1 });
      expect(logs.join('\n')).toMatch(/SET_VRING_ENDIAN is not supported/);
    } finally {
      fe.close();
    }
  });

  it('reads and writes the config space of a device that has one', async () => {
    await serve(fillDevice(1, 'worker', new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8])));
    const fe = RawFrontend.connect(path);
    try {
      const p = await fe.request({ type: 'GET_PROTOCOL_FEATURES' }, FrontendRequest.GET_PROTOCOL_FEATURES);
      expect(p.kind === 'features' && p.features & (1n << BigInt(ProtocolFeature.CONFIG))).toBeTruthy();
      fe.send({ type: 'SET_CONFIG', offset: 2, size: 2, configFlags: 0, data: new Uint8Array([9, 9]) });
      const c = await fe.request({ type: 'GET_CONFIG', offset: 0, size: 8, configFlags: 0 }, FrontendRequest.GET_CONFIG);
      expect(c.kind === 'config' && [...c.data]).toEqual([1, 2, 9, 9, 5, 6, 7, 8]);
      const bad = await fe.request({ type: 'GET_CONFIG', offset: 4, size: 8, configFlags: 0 }, FrontendRequest.GET_CONFIG);
      expect(bad.kind).toBe('config-error');
    } finally {
      fe.close();
    }
  });
});

describe('queues', () => {
  it('serves the rng device, then a second frontend after the first disconnects', async () => {
    const rng = rngDevice();
    const server = await serve(rng);
    const a = await rngSession(path);
    await once(server, 'disconnected');
    const b = await rngSession(path);
    expect(a.some((x) => x !== 0)).toBe(true);
    expect(Buffer.compare(a, b)).not.toBe(0);
    expect(rng.bytesServed()).toBe(16384);
  });

  for (const thread of ['worker', 'main'] as const) {
    it(`runs a device's queues ${thread === 'main' ? 'on the main thread' : 'in a worker'}`, async () => {
      await serve(fillDevice(0x5a, thread));
      const q = await openQueue(path);
      try {
        q.driver.add([], [[BUF_ADDR, 100]]);
        if (q.driver.publish()) sys.eventfdWrite(q.kick, 1);
        expect(await q.waitUsed(1)).toBe(100);
        const out = new Uint8Array(101);
        q.mem.read(BUF_ADDR, out);
        expect(out[0]).toBe(0x5a);
        expect(out[99]).toBe(0x5a);
        expect(out[100]).toBe(0);
      } finally {
        q.close();
      }
    });
  }

  it('stops a queue on a malicious chain and signals its error eventfd; the session goes on', async () => {
    await serve(rngDevice());
    const q = await openQueue(path);
    try {
      q.driver.addRaw([[0x7fff_0000_0000, 4096, VIRTQ_DESC_F_WRITE]]); // far outside guest memory
      const errFired = q.waitFd(q.err);
      if (q.driver.publish()) sys.eventfdWrite(q.kick, 1);
      await errFired;
      expect(logs.join('\n')).toMatch(/outside guest memory.*queue stopped/);
      // The queue stays stopped: a good chain is not served until the device is reset.
      q.driver.add([], [[BUF_ADDR, 64]]);
      q.driver.publish();
      sys.eventfdWrite(q.kick, 1);
      const base = await q.fe.request({ type: 'GET_VRING_BASE', index: 0, num: 0 }, FrontendRequest.GET_VRING_BASE);
      expect(base).toMatchObject({ kind: 'vring-state', num: 1 }); // consumed the bad chain only
      expect(q.driver.usedIdx()).toBe(0);
      // The connection still answers.
      expect(await q.fe.request({ type: 'GET_QUEUE_NUM' }, FrontendRequest.GET_QUEUE_NUM)).toMatchObject({ value: 1 });
    } finally {
      q.close();
    }
  });

  it('adds and removes memory regions while a queue runs (CONFIGURE_MEM_SLOTS)', async () => {
    await serve(rngDevice());
    const q = await openQueue(path);
    const size = 1 << 20;
    const memfd = sys.memfdCreate('hotplug', size);
    const addr = sys.mmapShared(memfd, size, 0);
    const gpa = 0x4000_0000;
    try {
      await q.ack({ type: 'ADD_MEM_REG', region: { guestPhysAddr: gpa, size, userAddr: addr, mmapOffset: 0, fd: memfd } });
      q.driver.add([], [[gpa + 0x1000, 256]]);
      if (q.driver.publish()) sys.eventfdWrite(q.kick, 1);
      expect(await q.waitUsed(1)).toBe(256);
      const view = new Uint8Array(sys.viewOf(addr, size));
      expect(view.subarray(0x1000, 0x1100).some((b) => b !== 0)).toBe(true);
      await q.ack({ type: 'REM_MEM_REG', region: { guestPhysAddr: gpa, size, userAddr: addr, mmapOffset: 0 }, fd: null });
      // The region is gone: a chain pointing there now breaks the queue instead of touching unmapped memory.
      const errFired = q.waitFd(q.err);
      q.driver.add([], [[gpa + 0x1000, 256]]);
      if (q.driver.publish()) sys.eventfdWrite(q.kick, 1);
      await errFired;
    } finally {
      sys.munmap(addr, size);
      sys.close(memfd);
      q.close();
    }
  });

  it('takes 509 memory slots under a running queue (QEMU caps at 512), refuses the 510th, and serves from each end', async () => {
    await serve(rngDevice());
    const q = await openQueue(path); // its ring and buffers are slot 1
    const page = 4096;
    const extra = MAX_MEM_SLOTS - 1;
    const memfd = sys.memfdCreate('slots', extra * page);
    const addr = sys.mmapShared(memfd, extra * page, 0);
    // Every other page of guest address space, so each region is its own slot with a hole after it.
    const gpaOf = (k: number) => 0x4000_0000 + 2 * k * page;
    const region = (k: number) => ({ guestPhysAddr: gpaOf(k), size: page, userAddr: addr + k * page, mmapOffset: k * page });
    try {
      for (let k = 0; k < extra; k++) await q.ack({ type: 'ADD_MEM_REG', region: { ...region(k), fd: memfd } });
      const refused = await q.fe.request({ type: 'ADD_MEM_REG', region: { guestPhysAddr: 0x8000_0000, size: page, userAddr: addr, mmapOffset: 0, fd: memfd }, needReply: true }, FrontendRequest.ADD_MEM_REG);
      expect(refused).toMatchObject({ status: 1 });
      // Buffers in the first, a middle and the last of the added slots: the lookup finds each one.
      for (const k of [0, 254, extra - 1]) q.driver.add([], [[gpaOf(k) + 16, 64]]);
      if (q.driver.publish()) sys.eventfdWrite(q.kick, 1);
      expect(await q.waitUsed(3)).toBe(3 * 64);
      const view = new Uint8Array(sys.viewOf(addr, extra * page));
      for (const k of [0, 254, extra - 1]) expect(view.subarray(k * page + 16, k * page + 80).some((b) => b !== 0), `slot ${k}`).toBe(true);
      for (let k = extra - 1; k >= 0; k--) await q.ack({ type: 'REM_MEM_REG', region: region(k), fd: null });
      // Back to the one region: the queue still serves from it.
      q.driver.add([], [[BUF_ADDR, 64]]);
      if (q.driver.publish()) sys.eventfdWrite(q.kick, 1);
      expect(await q.waitUsed(1)).toBe(64);
    } finally {
      sys.munmap(addr, extra * page);
      sys.close(memfd);
      q.close();
    }
  }, 60_000);

  it('closes the fds of kick, call and err requests for a queue the device does not have', async () => {
    await serve(rngDevice());
    const q = await openQueue(path);
    try {
      const before = sys.fdCount();
      for (let round = 0; round < 10; round++) {
        for (const type of ['SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ERR'] as const) {
          const fd = sys.eventfdCreate();
          const reply = await q.fe.request({ type, index: 99, fd, needReply: true } as never, FrontendRequest[type]);
          sys.close(fd); // ours; the backend got its own copy
          expect(reply).toMatchObject({ status: 1 });
        }
      }
      expect(sys.fdCount()).toBe(before);
    } finally {
      q.close();
    }
  });

  it('RESET_DEVICE stops the queues; the frontend can set them up again', async () => {
    await serve(rngDevice());
    const q = await openQueue(path);
    try {
      await q.ack({ type: 'RESET_DEVICE' });
      const base = await q.fe.request({ type: 'GET_VRING_BASE', index: 0, num: 0 }, FrontendRequest.GET_VRING_BASE);
      expect(base).toMatchObject({ num: 0 });
    } finally {
      q.close();
    }
  });
});

/** The backend's connection to a frontend listening on `listener` (client mode), within 10 s. */
function acceptOnce(listener: number): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('backend never connected')), 10_000);
    const w = sys.watchReadable(listener, () => {
      const fd = sys.unixAccept(listener);
      if (fd < 0) return;
      clearTimeout(timer);
      w.close();
      resolve(fd);
    });
  });
}

describe('server', () => {
  it('replaces a stale socket file, refuses a live one and a non-socket file', async () => {
    // A stale socket: bound, then its listener closed without unlinking.
    const stale = sys.unixListen(path);
    sys.close(stale);
    const server = await serve(rngDevice());
    await expect(VhostUserServer.start(rngDevice(), { socketPath: path, log })).rejects.toThrow(/in use by a running backend/);
    const file = join(dir, 'plain');
    writeFileSync(file, 'x');
    await expect(VhostUserServer.start(rngDevice(), { socketPath: file, log })).rejects.toThrow(/not a socket/);
    expect(server.connected).toBe(false);
    expect((await rngSession(path)).some((b) => b !== 0)).toBe(true);
  });

  it('adopts an inherited listening socket (--fd)', async () => {
    const fd = sys.unixListen(path);
    await serve(rngDevice(), { fd });
    expect((await rngSession(path)).some((b) => b !== 0)).toBe(true);
  });

  it('connects to a frontend that listens (client mode), retrying until it is there', async () => {
    const server = await serve(rngDevice(), { connectPath: path, retryMs: 20 });
    const listener = sys.unixListen(path);
    try {
      const accepted = await acceptOnce(listener);
      expect(server.connected).toBe(true);
      sys.close(accepted);
      await once(server, 'disconnected');
    } finally {
      sys.close(listener);
    }
  });

  it('client mode: when the frontend goes away and comes back, the backend reconnects by itself and serves it', async () => {
    const server = await serve(fillDevice(0x5a, 'worker'), { connectPath: path, retryMs: 10, maxRetryMs: 80 });
    for (let generation = 0; generation < 3; generation++) {
      // QEMU with server=on: it listens, we connect; then it is killed (socket gone) and started again later.
      const listener = sys.unixListen(path);
      const fe = new VhostUserFrontend(await acceptOnce(listener));
      try {
        const [q] = await fe.start({ queues: [{ index: 0, size: 16 }] });
        const chain = q.add({ writable: [32] });
        q.kick();
        const [used] = await q.waitForUsed(1);
        expect(used.len).toBe(32);
        expect([...q.written(chain, 4)]).toEqual([0x5a, 0x5a, 0x5a, 0x5a]);
      } finally {
        const gone = once(server, 'disconnected');
        fe.close();
        sys.close(listener);
        rmSync(path);
        await gone;
      }
      // While nobody listens, the backend keeps trying (and says so once, not per attempt).
      await new Promise((r) => setTimeout(r, 300));
    }
    // Before the first frontend, and after each one went.
    const waits = logs.filter((l) => /cannot connect to the frontend at .*not listening yet/.test(l));
    expect(waits.length).toBe(4);
    expect(logs.filter((l) => /reconnecting to the frontend at/.test(l)).length).toBe(3);
    expect(logs.filter((l) => /connected to frontend at/.test(l)).length).toBe(3);
  });
});
