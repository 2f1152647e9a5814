/**
 * Thousands of random and mutated vhost-user messages against a running server: each bad connection gets closed
 * (or answered), the process survives, a well-behaved frontend is served afterwards, and no fd leaks.
 */
import { once } from 'node:events';
import { closeSync, mkdtempSync, openSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rngDevice } from '../../src/devices/rng/index.js';
import * as sys from '../../src/sys/index.js';
import { encodeFrontendMessage, type FrontendMessageInput } from '../../src/vhost/codec.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { RawFrontend } from './raw-frontend.js';
import { rngSession } from './rng-session.js';

const quiet: Logger & { errors: string[] } = {
  errors: [],
  info() {},
  warn(m) {
    if (process.env.ROBUST_DEBUG) console.log("WARN", m);
  },
  error(m) {
    quiet.errors.push(m);
    if (process.env.ROBUST_DEBUG) console.log("ERR", m);
  },
};

function openFds(): string {
  return readdirSync('/proc/self/fd')
    .map((f) => {
      try {
        return `${f}->${readlinkSync(`/proc/self/fd/${f}`)}`;
      } catch {
        return f;
      }
    })
    .join(' ');
}

/** Deterministic PRNG so a failure can be replayed. */
function prng(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('robustness against a hostile frontend', () => {
  let dir: string;
  let path: string;
  let server: VhostUserServer;
  let fdsBefore: number;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-robust-'));
    path = join(dir, 'rng.sock');
    fdsBefore = sys.fdCount();
    server = await VhostUserServer.start(rngDevice(), { socketPath: path, log: quiet });
  });

  afterAll(async () => {
    await server?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('survives thousands of random and mutated messages, then serves a good frontend with no fd leak', async () => {
    const rand = prng(20261121);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)];
    const memfd = sys.memfdCreate('robust', 1 << 20);
    const eventfd = sys.eventfdCreate();
    const templates: FrontendMessageInput[] = [
      { type: 'GET_FEATURES' },
      { type: 'SET_FEATURES', features: 1n << 32n },
      { type: 'SET_FEATURES', features: ~0n & ((1n << 64n) - 1n) },
      { type: 'SET_PROTOCOL_FEATURES', features: 0xfn },
      { type: 'SET_OWNER' },
      { type: 'GET_QUEUE_NUM' },
      { type: 'SET_MEM_TABLE', regions: [{ guestPhysAddr: 0, size: 1 << 20, userAddr: 0x7f0000000000, mmapOffset: 0, fd: memfd }] },
      // A region larger than its memfd: mapping it and touching the end would be SIGBUS.
      { type: 'SET_MEM_TABLE', regions: [{ guestPhysAddr: 0, size: 1 << 30, userAddr: 0x7f0000000000, mmapOffset: 0, fd: memfd }] },
      { type: 'ADD_MEM_REG', region: { guestPhysAddr: 1 << 30, size: 1 << 20, userAddr: 0x7f1000000000, mmapOffset: 4096, fd: memfd } },
      { type: 'REM_MEM_REG', region: { guestPhysAddr: 0, size: 1 << 20, userAddr: 0x7f0000000000, mmapOffset: 0 }, fd: null },
      { type: 'SET_VRING_NUM', index: 0, num: 256 },
      { type: 'SET_VRING_NUM', index: 7, num: 3 },
      { type: 'SET_VRING_BASE', index: 0, num: 5 },
      // Ring addresses outside guest memory, then a kick fd: the queue must not start.
      { type: 'SET_VRING_ADDR', index: 0, ringFlags: 0, descUserAddr: 0x7f00fff00000, availUserAddr: 0x10, usedUserAddr: 0x7f0000000003, logGuestAddr: 0 },
      { type: 'SET_VRING_ADDR', index: 0, ringFlags: 0, descUserAddr: 0x7f0000000000, availUserAddr: 0x7f0000001000, usedUserAddr: 0x7f0000002000, logGuestAddr: 0 },
      { type: 'SET_VRING_KICK', index: 0, fd: memfd },
      { type: 'SET_VRING_KICK', index: 0, fd: eventfd },
      { type: 'SET_VRING_CALL', index: 0, fd: eventfd },
      { type: 'SET_VRING_CALL', index: 0, fd: null },
      { type: 'SET_VRING_ERR', index: 0, fd: memfd },
      { type: 'SET_VRING_ENABLE', index: 0, num: 1 },
      { type: 'GET_VRING_BASE', index: 0, num: 0 },
      { type: 'GET_CONFIG', offset: 0, size: 16, configFlags: 0 },
      { type: 'SET_CONFIG', offset: 250, size: 6, configFlags: 0, data: new Uint8Array(6) },
      { type: 'SET_BACKEND_REQ_FD', fd: memfd },
      { type: 'RESET_DEVICE' },
      { type: 'GET_MAX_MEM_SLOTS' },
      { type: 'SET_STATUS', status: 15 },
      { type: 'GET_STATUS' },
      { type: 'SET_LOG_BASE', mmapSize: 4096, mmapOffset: 0, fd: memfd },
      { type: 'GET_INFLIGHT_FD', mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 256 },
      { type: 'UNKNOWN', request: 999, payload: new Uint8Array(8), fds: [] },
    ];

    // Guest memory the hostile guest scribbles over: rings at the start, random bytes on demand.
    const guestSize = 1 << 20;
    const guestUser = 0x7f0000000000;
    const guest = new Uint8Array(sys.viewOf(sys.mmapShared(memfd, guestSize, 0), guestSize));
    const ring = { desc: 0, avail: 0x1000, used: 0x2000 };
    const startQueue: FrontendMessageInput[] = [
      { type: 'SET_FEATURES', features: (1n << 32n) | (1n << 30n) | (1n << 29n) | (1n << 28n) },
      { type: 'SET_MEM_TABLE', regions: [{ guestPhysAddr: 0, size: guestSize, userAddr: guestUser, mmapOffset: 0, fd: memfd }] },
      { type: 'SET_VRING_NUM', index: 0, num: 256 },
      { type: 'SET_VRING_BASE', index: 0, num: 0 },
      { type: 'SET_VRING_ADDR', index: 0, ringFlags: 0, descUserAddr: guestUser + ring.desc, availUserAddr: guestUser + ring.avail, usedUserAddr: guestUser + ring.used, logGuestAddr: 0 },
      { type: 'SET_VRING_CALL', index: 0, fd: eventfd },
      { type: 'SET_VRING_ERR', index: 0, fd: eventfd },
      { type: 'SET_VRING_KICK', index: 0, fd: eventfd },
      { type: 'SET_VRING_ENABLE', index: 0, num: 1 },
    ];

    let sent = 0;
    let started = 0;
    const connections = 300;
    for (let c = 0; c < connections; c++) {
      const fe = RawFrontend.connect(path);
      const disconnected = once(server, 'disconnected');
      if (rand() < 0.4) {
        // A running queue first (a worker starts), then a guest writing garbage into its rings and kicking.
        guest.fill(0, 0, 0x3000);
        for (const m of startQueue) fe.send(m);
        for (let k = 0; k < 64; k++) guest[Math.floor(rand() * 0x3000)] = Math.floor(rand() * 256);
        new DataView(guest.buffer).setUint16(ring.avail + 2, Math.floor(rand() * 300), true);
        sys.eventfdWrite(eventfd, 1);
        started++;
      }
      const count = 4 + Math.floor(rand() * 16);
      for (let m = 0; m < count; m++) {
        const msg = { ...pick(templates), needReply: rand() < 0.5 } as FrontendMessageInput;
        const { bytes, fds } = encodeFrontendMessage(msg);
        let out = bytes;
        let outFds = fds;
        const mutation = rand();
        if (mutation < 0.06) {
          // flip random bits (header or payload)
          out = bytes.slice();
          for (let k = 0; k < 1 + Math.floor(rand() * 4); k++) out[Math.floor(rand() * out.length)] ^= 1 << Math.floor(rand() * 8);
        } else if (mutation < 0.1) {
          // header size disagrees with the payload
          out = bytes.slice();
          new DataView(out.buffer).setUint32(8, Math.floor(rand() * 300), true);
        } else if (mutation < 0.13) {
          // truncated message
          out = bytes.slice(0, Math.floor(rand() * bytes.length));
        } else if (mutation < 0.16) {
          // too many fds
          outFds = [...fds, memfd, memfd];
        } else if (mutation < 0.18) {
          // too few fds
          outFds = fds.slice(1);
        } else if (mutation < 0.2) {
          // pure noise
          out = new Uint8Array(1 + Math.floor(rand() * 64)).map(() => Math.floor(rand() * 256));
        }
        if (out.length === 0) continue;
        try {
          fe.sendBytes(out, outFds);
          sent++;
        } catch {
          break; // the backend already closed this connection
        }
      }
      fe.close();
      await Promise.race([
        disconnected,
        new Promise((_, reject) => setTimeout(() => reject(new Error(`connection ${c}: server did not finish the session`)), 10_000)),
      ]);
    }
    sys.munmap(sys.addressOf(guest), guestSize);
    sys.close(memfd);
    sys.close(eventfd);
    expect(started).toBeGreaterThan(50);
    expect(sent).toBeGreaterThan(2000);
    expect(quiet.errors.length).toBeGreaterThan(100); // malformed messages were reported, not swallowed

    // Still serving: a well-behaved frontend gets random bytes.
    const bytes = await rngSession(path);
    expect(bytes.some((b) => b !== 0)).toBe(true);
    await server.close();
    expect(sys.fdCount(), `fds now: ${openFds()}`).toBe(fdsBefore);
  }, 120_000);

  it('closes the connection on a malformed message with a clear error and keeps the process serving', async () => {
    const s2path = join(dir, 'rng2.sock');
    const log = { ...quiet, errors: [] as string[], error(m: string) { log.errors.push(m); } };
    const s2 = await VhostUserServer.start(rngDevice(), { socketPath: s2path, log });
    try {
      const fe = RawFrontend.connect(s2path);
      const disconnected = once(s2, 'disconnected');
      const eventfd = sys.eventfdCreate();
      // SET_VRING_KICK with two fds
      const { bytes } = encodeFrontendMessage({ type: 'SET_VRING_KICK', index: 0, fd: eventfd });
      fe.sendBytes(bytes, [eventfd, eventfd]);
      await fe.waitClosed();
      fe.close();
      sys.close(eventfd);
      await disconnected;
      expect(log.errors.join('\n')).toMatch(/SET_VRING_KICK carried 2 fds/);
      expect((await rngSession(s2path)).some((b) => b !== 0)).toBe(true);
    } finally {
      await s2.close();
    }
  });

  it('refuses a kick, call or error fd that is not an eventfd, closes it, and keeps serving', async () => {
    const s3path = join(dir, 'rng3.sock');
    const log = { ...quiet, errors: [] as string[], error(m: string) { log.errors.push(m); } };
    const s3 = await VhostUserServer.start(rngDevice(), { socketPath: s3path, log });
    try {
      for (const type of ['SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ERR'] as const) {
        const before = sys.fdCount();
        const notEventfd = openSync('/dev/null', 'r');
        const fe = RawFrontend.connect(s3path);
        const disconnected = once(s3, 'disconnected');
        const { bytes } = encodeFrontendMessage({ type, index: 0, fd: notEventfd });
        fe.sendBytes(bytes, [notEventfd]);
        await fe.waitClosed();
        fe.close();
        closeSync(notEventfd);
        await disconnected;
        expect(log.errors.join('\n')).toMatch(new RegExp(`${type} failed: queue 0: the (kick|call|error) fd is not an eventfd`));
        // The backend closed its copy: the process has what it had before.
        expect(sys.fdCount(), `${type}: fds now: ${openFds()}`).toBe(before);
      }
      expect((await rngSession(s3path)).some((b) => b !== 0)).toBe(true);
    } finally {
      await s3.close();
    }
  });
});
