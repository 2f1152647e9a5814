/**
 * npm run bench:net-guests [-- --json] [--seconds N]
 *
 * Two booted guests talking through a backend, iperf3 TCP each way: the vhost-ts built-in switch against DPDK
 * testpmd forwarding between two vhost ports (io mode), in the same run, same guests and script. Guests run
 * under TCG here (DESIGN §4), so the guest CPU bounds both; the ratio is what to read.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { iperfMbits, netGuestScript } from '../harness/net-guest-script.js';
import { ensureSetup } from '../harness/setup.js';
import { runGuest } from '../harness/vm.js';
import { netDevice } from '../src/devices/net/index.js';
import { parseMac } from '../src/devices/net/spec.js';
import { VhostUserServer } from '../src/vhost/index.js';

const json = process.argv.includes('--json');
const secondsArg = process.argv.indexOf('--seconds');
const seconds = secondsArg > 0 ? Number(process.argv[secondsArg + 1]) : 10;
const TESTPMD = '/usr/bin/dpdk-testpmd';
const MACS = ['52:54:00:00:cc:01', '52:54:00:00:cc:02'];
const IPS = ['10.216.0.1', '10.216.0.2'];

async function twoGuests(sockets: string[]): Promise<{ up: number; down: number; accel: string }> {
  const setup = await ensureSetup({ log: () => {} });
  const [, b] = await Promise.all(
    [0, 1].map((i) =>
      runGuest({
        setup,
        timeoutMs: 300_000,
        memoryMiB: 384,
        cpus: 1,
        devices: [{ kind: 'net', socket: sockets[i], mac: MACS[i] }],
        script: netGuestScript(IPS[i], IPS[1 - i], i === 0 ? 'server' : 'client', seconds),
      }),
    ),
  );
  if (b.exitCode !== 0) throw new Error(`client guest exited ${b.exitCode}`);
  return { up: iperfMbits(b.results, 'up'), down: iperfMbits(b.results, 'down'), accel: b.accel };
}

async function viaSwitch(dir: string) {
  const sockets = MACS.map((_, i) => join(dir, `sw${i}.sock`));
  const quiet = { info() {}, warn() {}, error: (m: string) => console.error(m) };
  const servers = await Promise.all(
    MACS.map((m, i) => VhostUserServer.start(netDevice({ backend: { kind: 'switch', name: 'bench' }, mac: parseMac(m) }), { socketPath: sockets[i], log: quiet })),
  );
  try {
    return await twoGuests(sockets);
  } finally {
    for (const s of servers) await s.close();
  }
}

async function viaTestpmd(dir: string) {
  const sockets = MACS.map((_, i) => join(dir, `pmd${i}.sock`));
  const prefix = `vts-guests-${process.pid}`;
  // Both lcores (main and forwarding) on CPU 0, as DESIGN §6 runs it; the guests have the other CPU.
  const pmd: ChildProcess = spawn(
    TESTPMD,
    ['--lcores=0@0,1@0', '--no-pci', '--no-huge', '-m', '1024', `--file-prefix=${prefix}`, ...sockets.flatMap((s, i) => ['--vdev', `net_vhost${i},iface=${s},tso=1`]),
      '--', '--forward-mode=io', '--auto-start', '--stats-period', '5', '--nb-cores=1', '--no-mlockall'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  pmd.stdout!.on('data', (d) => (out += d));
  pmd.stderr!.on('data', (d) => (out += d));
  try {
    // The vhost PMD creates the sockets; guests connect as clients.
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`testpmd did not start within 30 s:\n${out.slice(-2000)}`)), 30_000);
      const check = setInterval(() => {
        if (sockets.every((s) => existsSync(s))) {
          clearTimeout(timer);
          clearInterval(check);
          resolve();
        }
      }, 100);
    });
    return await twoGuests(sockets);
  } finally {
    pmd.kill('SIGINT');
    await new Promise((r) => (pmd.exitCode !== null ? r(null) : pmd.once('exit', r)));
    rmSync(`/var/run/dpdk/${prefix}`, { recursive: true, force: true });
  }
}

const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-bench-guests-'));
try {
  if (!existsSync(TESTPMD)) throw new Error('dpdk-testpmd is missing: apt-get install -y dpdk');
  const ours = await viaSwitch(dir);
  const dpdk = await viaTestpmd(dir);
  const results = [
    { name: `guest->guest iperf3 via vhost-ts switch (${ours.accel})`, value: ours.up, unit: 'Mbit/s', reference: dpdk.up, ratio: ours.up / dpdk.up },
    { name: `guest<-guest iperf3 via vhost-ts switch (${ours.accel})`, value: ours.down, unit: 'Mbit/s', reference: dpdk.down, ratio: ours.down / dpdk.down },
  ];
  if (json) console.log(JSON.stringify({ bench: 'net-guests', results }));
  else {
    console.log(`iperf3 TCP ${seconds} s each way between two guests (${ours.accel}); reference: dpdk-testpmd io forwarding between two vhost ports (tso=1)`);
    console.table(results.map((r) => ({ case: r.name, 'vhost-ts Mbit/s': r.value.toFixed(0), 'testpmd Mbit/s': r.reference.toFixed(0), ratio: r.ratio.toFixed(2) })));
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
