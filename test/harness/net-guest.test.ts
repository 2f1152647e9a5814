// virtio-net in booted guests: two guests on the built-in switch (ping, ARP, iperf3 both ways), and a guest on a
// tap inside a network namespace the test creates (ping and iperf3 to the host side, with TSO negotiated).
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { iperfMbits, netGuestScript } from '../../harness/net-guest-script.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { netDevice } from '../../src/devices/net/index.js';
import { parseMac } from '../../src/devices/net/spec.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { createNetns, netnsUnavailable } from '../net/netns.js';

const bin = new URL('../../bin/vhost-ts.mjs', import.meta.url).pathname;
const noNetns = process.env.VHOST_TS_SKIP_VM === '1' ? 'skipped' : await netnsUnavailable();

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('net device in guests', () => {
  let setup: HarnessSetup;
  let dir: string;
  const logs: string[] = [];
  const log: Logger = { info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m) };

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-net-guest-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  for (const ring of ['split', 'packed'] as const)
  it(`${ring} rings: two guests on the built-in switch: ping both ways, ARP resolves, iperf3 10 s each direction`, async () => {
    const macs = ['52:54:00:00:aa:01', '52:54:00:00:aa:02'];
    const ips = ['10.214.0.1', '10.214.0.2'];
    const devs = macs.map((m) => netDevice({ backend: { kind: 'switch', name: `guest-sw-${ring}` }, mac: parseMac(m) }));
    const sockets = macs.map((_, i) => join(dir, `sw${i}-${ring}.sock`));
    const servers = await Promise.all(devs.map((d, i) => VhostUserServer.start(d, { socketPath: sockets[i], log })));
    try {
      const [a, b] = await Promise.all(
        [0, 1].map((i) =>
          runGuest({
            setup,
            timeoutMs: 240_000,
            memoryMiB: 384,
            cpus: 1,
            devices: [{ kind: 'net', socket: sockets[i], mac: macs[i], packed: ring === 'packed' }],
            script: netGuestScript(ips[i], ips[1 - i], i === 0 ? 'server' : 'client'),
          }),
        ),
      );
      for (const run of [a, b]) {
        expect(run.exitCode).toBe(0);
        expect(run.results.find((r) => r.startsWith('ping '))).toMatch(/3 packets transmitted, 3 (packets )?received/);
        expect(run.results).toContain('arp 1');
        expect(run.results).toContain(`packed ${ring === 'packed' ? 1 : 0}`);
      }
      const up = iperfMbits(b.results, 'up');
      const down = iperfMbits(b.results, 'down');
      expect(up).toBeGreaterThan(1);
      expect(down).toBeGreaterThan(1);
      console.log(`switch, two guests (${ring} rings) under ${a.accel}: iperf3 B->A ${up} Mbit/s, A->B ${down} Mbit/s; offloads: ${a.results.find((r) => r.startsWith('offload'))}`);
      expect(devs[0].stats().txFrames).toBeGreaterThan(1000);
    } finally {
      for (const s of servers) await s.close();
    }
    expect(logs.filter((l) => !/disconnected/.test(l))).toEqual([]);
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);

  it.skipIf(noNetns !== null)('a guest on a tap in a network namespace: ping and iperf3 to the host side, TSO on', async () => {
    const ns = await createNetns('vtsg');
    const socket = join(dir, 'tap.sock');
    // The backend runs inside the namespace so its tap is created there; QEMU reaches it through the socket file.
    const backend = spawn('ip', ['netns', 'exec', ns.name, process.execPath, bin, 'net', '--socket-path', socket, '--tap', 'vtstap0', '--mac', '52:54:00:00:bb:01'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    const listening = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the net backend did not start listening within 20 s')), 20_000);
      backend.stderr.on('data', (d) => {
        stderr += d;
        if (stderr.includes(`listening on ${socket}`)) {
          clearTimeout(timer);
          resolve();
        }
      });
      backend.once('exit', (code) => reject(new Error(`the net backend exited (${code}) before listening`)));
    });
    let iperfServer: ReturnType<typeof spawn> | undefined;
    try {
      await listening;
      const guest = runGuest({
        setup,
        timeoutMs: 240_000,
        memoryMiB: 384,
        cpus: 1,
        devices: [{ kind: 'net', socket, mac: '52:54:00:00:bb:01' }],
        script: netGuestScript('10.215.0.2', '10.215.0.1', 'client'),
        onConsoleLine: (line) => {
          if (process.env.NET_DEBUG) console.log('guest:', line);
          // Once the guest is up, the tap exists (the backend opened it when the queues started): configure the host side.
          if (line.startsWith('RESULT offload') && !iperfServer) {
            void (async () => {
              await ns.exec(['ip', 'addr', 'add', '10.215.0.1/24', 'dev', 'vtstap0']);
              await ns.exec(['ip', 'link', 'set', 'vtstap0', 'up']);
              iperfServer = spawn('ip', ['netns', 'exec', ns.name, 'iperf3', '-s'], { stdio: 'ignore' });
            })();
          }
        },
      });
      const run = await guest;
      expect(run.exitCode).toBe(0);
      expect(run.results.find((r) => r.startsWith('ping '))).toMatch(/3 packets transmitted, 3 (packets )?received/);
      expect(run.results.find((r) => r.startsWith('offload'))).toMatch(/tcp-segmentation-offload: on/);
      const up = iperfMbits(run.results, 'up');
      const down = iperfMbits(run.results, 'down');
      expect(up).toBeGreaterThan(1);
      expect(down).toBeGreaterThan(1);
      console.log(`tap under ${run.accel}: iperf3 guest->host ${up} Mbit/s, host->guest ${down} Mbit/s`);
    } catch (e) {
      throw new Error(`${(e as Error).message}\nbackend stderr:\n${stderr}`);
    } finally {
      iperfServer?.kill('SIGKILL');
      backend.kill('SIGTERM');
      await new Promise((r) => (backend.exitCode !== null ? r(null) : backend.once('exit', r)));
      await ns.close();
    }
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);
});
