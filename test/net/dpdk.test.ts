// virtio-net against DPDK's virtio-user PMD (dpdk-testpmd), a frontend nobody here wrote: frames it sends reach
// our sink byte for byte; frames our source generates reach it intact.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { netDevice, type NetDevice } from '../../src/devices/net/index.js';
import { parseMac } from '../../src/devices/net/spec.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';

const TESTPMD = '/usr/bin/dpdk-testpmd';
const quiet: Logger = { info() {}, warn() {}, error() {} };

interface TestpmdRun {
  output: string;
  /** Output up to the moment `stop` was typed: after it, testpmd's echo of the typed command interleaves with packet dumps. */
  beforeStop: string;
  code: number | null;
}

/**
 * testpmd in interactive mode on a virtio-user port: `before` goes in on stdin at once (testpmd reads it line by
 * line), then once `done(output)` holds (checked as output arrives and every 100 ms, bounded) `stop` and `quit`.
 */
type Ring = 'split' | 'packed';

/**
 * testpmd's EAL and application arguments: a virtio-user port per socket (packed_vq=1 for packed rings), then
 * `app` (default: interactive).
 */
function testpmdArgs(sockets: string | string[], prefix: string, ring: Ring, app = ['-i', '--total-num-mbufs=8192', '--no-mlockall']): string[] {
  const vdevs = [sockets].flat().flatMap((socket, i) => ['--vdev', `net_virtio_user${i},path=${socket},queues=1${ring === 'packed' ? ',packed_vq=1' : ''}`]);
  // init:debug makes the PMD say which ring layout it drives ("using packed ring ... path").
  return ['--no-pci', '--no-huge', '-m', '512', `--file-prefix=${prefix}`, '--log-level=pmd.net.virtio.init:debug', ...vdevs, '--', ...app];
}

function testpmd(socket: string, prefix: string, ring: Ring, before: string[], done: (out: string) => boolean, timeoutMs = 60_000): Promise<TestpmdRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(TESTPMD, testpmdArgs(socket, prefix, ring), { stdio: ['pipe', 'pipe', 'pipe'] });
    let output = '';
    let beforeStop = '';
    let stopping = false;
    const check = () => {
      if (stopping || !done(output)) return;
      stopping = true;
      beforeStop = output;
      child.stdin.write('stop\nquit\n');
    };
    const recheck = setInterval(check, 100);
    const timer = setTimeout(() => {
      clearInterval(recheck);
      child.kill('SIGKILL');
      reject(new Error(`testpmd did not finish within ${timeoutMs} ms:\n${output.slice(-4000)}`));
    }, timeoutMs);
    child.stdout.on('data', (d) => {
      output += d;
      check();
    });
    child.stderr.on('data', (d) => (output += d));
    child.once('exit', (code) => {
      clearTimeout(timer);
      clearInterval(recheck);
      rmSync(`/var/run/dpdk/${prefix}`, { recursive: true, force: true });
      resolve({ output, beforeStop, code });
    });
    child.stdin.write(before.map((c) => `${c}\n`).join(''));
  });
}

/**
 * testpmd in interactive mode, driven a command at a time: `send` writes a line; `close` quits it (SIGKILL after
 * a bound) and resolves with its output.
 */
function interactiveTestpmd(socket: string, prefix: string, ring: Ring) {
  const child = spawn(TESTPMD, testpmdArgs(socket, prefix, ring), { stdio: ['pipe', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  child.stderr.on('data', (d) => (output += d));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    get output() {
      return output;
    },
    send: (line: string) => child.stdin.write(`${line}\n`),
    async close(): Promise<string> {
      child.stdin.write('quit\n');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
      rmSync(`/var/run/dpdk/${prefix}`, { recursive: true, force: true });
      return output;
    },
  };
}

/** Resolves once cond() holds (checked every 10 ms), rejects with why() after timeoutMs. */
async function until(cond: () => boolean, timeoutMs: number, why: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(why());
    await new Promise((r) => setTimeout(r, 10));
  }
}

if (!existsSync(TESTPMD)) console.warn(`SKIPPED: DPDK virtio-user tests: ${TESTPMD} missing (apt-get install dpdk-dev)`);

describe.skipIf(!existsSync(TESTPMD))('net device with DPDK virtio-user (dpdk-testpmd)', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-dpdk-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  async function withDevice<T>(dev: NetDevice, f: (socket: string) => Promise<T>): Promise<T> {
    const socket = join(dir, `${dev.name.replace(/\W/g, '')}.sock`);
    const server = await VhostUserServer.start(dev, { socketPath: socket, log: quiet });
    try {
      return await f(socket);
    } finally {
      await server.close();
    }
  }

  for (const ring of ['split', 'packed'] as const) {
    it(`${ring} ring: txonly: every frame testpmd sends reaches the sink, identical to the first`, async () => {
      const dev = netDevice({ backend: { kind: 'sink', verify: true } });
      await withDevice(dev, async (socket) => {
        const run = await testpmd(socket, `vts-tx-${ring}-${process.pid}`, ring, ['set fwd txonly', 'set txpkts 64', 'start'], () => dev.stats().txFrames > 100_000);
        expect(run.output).toMatch(/TX-packets: *[1-9]/);
        expect(run.output).toMatch(ring === 'packed' ? /using packed ring/ : /using (?!packed)/);
        const s = dev.stats();
        expect(s.txFrames).toBeGreaterThan(100_000);
        expect(s.txBytes).toBe(s.txFrames * 64);
        expect(s.txDropped).toBe(0);
        expect(s.sinkMismatches).toBe(0);
      });
    }, 90_000);

    it(`${ring} ring: rxonly: frames from the source arrive whole, as Ethernet/IPv4/UDP of the configured size`, async () => {
      const dev = netDevice({ backend: { kind: 'source', frameSize: 128 } });
      await withDevice(dev, async (socket) => {
        const run = await testpmd(
          socket,
          `vts-rx-${ring}-${process.pid}`,
          ring,
          ['set fwd rxonly', 'set verbose 1', 'start'],
          (out) => (out.match(/length=\d+ - nb_segs/g)?.length ?? 0) >= 20,
        );
        // Whole packet lines only (stop may cut the last one off).
        const packets = run.beforeStop.split('\n').filter((l) => /^\s*src=.*Receive queue/.test(l));
        expect(packets.length, run.output.slice(-3000)).toBeGreaterThanOrEqual(20);
        for (const p of packets) {
          expect(p).toMatch(/src=52:54:00:AA:BB:CC - dst=FF:FF:FF:FF:FF:FF - .*type=0x0800 - length=128 - nb_segs=1 - sw ptype: L2_ETHER L3_IPV4 L4_UDP/i);
        }
        expect(dev.stats().rxFrames).toBeGreaterThanOrEqual(20);
        expect(run.output).toMatch(ring === 'packed' ? /using packed ring/ : /using (?!packed)/);
      });
    }, 90_000);

    // testpmd's virtio PMD negotiates no EVENT_IDX: it kicks only while VRING_USED_F_NO_NOTIFY is clear, and a ring
    // it filled while the flag was set is never kicked again. Each start is a burst into an idle queue: the
    // transitions are what can lose a wakeup, so many short bursts rather than a few long ones.
    const BURSTS = 200;
    for (const dir of ['tx', 'rx'] as const) {
      it(`${ring} ring: ${dir === 'tx' ? 'txonly into the sink' : 'rxonly from the source'}: ${BURSTS} start/stop bursts, none stalls`, async () => {
        const dev = netDevice({ backend: dir === 'tx' ? { kind: 'sink' } : { kind: 'source', frameSize: 64 } });
        await withDevice(dev, async (socket) => {
          const pmd = interactiveTestpmd(socket, `vts-burst-${dir}-${ring}-${process.pid}`, ring);
          const count = () => (dir === 'tx' ? dev.stats().txFrames : dev.stats().rxFrames);
          try {
            await until(() => /testpmd> /.test(pmd.output), 30_000, () => `testpmd did not come up:\n${pmd.output.slice(-3000)}`);
            pmd.send(`set fwd ${dir === 'tx' ? 'txonly' : 'rxonly'}`);
            for (let burst = 0; burst < BURSTS; burst++) {
              const from = count();
              pmd.send('start');
              await until(() => count() - from >= 5_000, 15_000, () => `burst ${burst}: the queue stalled at ${count() - from} frames`);
              pmd.send('stop');
            }
          } finally {
            await pmd.close();
          }
        });
      }, 120_000);
    }

    // Guest to guest is what the switch is for: one testpmd forwarding between two virtio-user ports on two
    // ports of one switch (io mode, a first burst on each), so every frame goes round and round.
    it(`${ring} ring: a two-port io-forward loop through the switch circulates`, async () => {
      const devs = [1, 2].map((i) => netDevice({ backend: { kind: 'switch', name: `loop-${ring}` }, mac: parseMac(`52:54:00:00:cc:0${i}`) }));
      const sockets = devs.map((_, i) => join(dir, `loop-${ring}-${i}.sock`));
      const servers = await Promise.all(devs.map((d, i) => VhostUserServer.start(d, { socketPath: sockets[i], log: quiet })));
      const prefix = `vts-loop-${ring}-${process.pid}`;
      const app = ['--no-mlockall', '--forward-mode=io', '--tx-first', '--auto-start', '--total-num-mbufs=16384', '--stats-period', '1'];
      const child = spawn(TESTPMD, testpmdArgs(sockets, prefix, ring, app), { stdio: ['ignore', 'pipe', 'pipe'] });
      let output = '';
      child.stdout.on('data', (d) => (output += d));
      child.stderr.on('data', (d) => (output += d));
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      try {
        await until(() => devs.every((d) => d.stats().txFrames > 100_000 && d.stats().rxFrames > 100_000), 30_000,
          () => `the loop did not circulate: ${JSON.stringify(devs.map((d) => d.stats()))}\n${output.slice(-2000)}`);
        expect(output).toMatch(ring === 'packed' ? /using packed ring/ : /using (?!packed)/);
        for (const d of devs) expect(d.stats().txDropped).toBe(0);
      } finally {
        child.kill('SIGINT');
        const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(timer);
        rmSync(`/var/run/dpdk/${prefix}`, { recursive: true, force: true });
        for (const s of servers) await s.close();
      }
    }, 60_000);
  }
});
