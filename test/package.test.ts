// The package as users get it: `npm pack`, `npm install <tarball>` into an empty project, then the CLI, the
// exports, and a device written in plain JavaScript against the installed package serving a booted guest.
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup } from '../harness/setup.js';
import { liveQemuPids, runGuest } from '../harness/vm.js';
import { createNetns, netnsUnavailable } from './net/netns.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const skipVm = process.env.VHOST_TS_SKIP_VM === '1';
const noNetns = await netnsUnavailable();

function sh(file: string, args: string[], cwd: string, timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { cwd, timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8', maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

// A device in plain JavaScript, as a user writes it: the rng device of the README.
const JS_DEVICE = `import { randomFillSync } from 'node:crypto';
import { VhostUserServer } from 'vhost-ts';

export function createQueueHandler(ctx) {
  return {
    process(queue) {
      for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
        for (let i = chain.readableCount; i < chain.count; i++) randomFillSync(chain.segment(i));
        queue.push(chain, chain.writableBytes);
      }
    },
  };
}

export const device = {
  name: 'js-rng',
  deviceId: 4,
  numQueues: 1,
  maxQueueSize: 256,
  features: 0n,
  dataPlane: { module: new URL(import.meta.url), options: {} },
};

if (process.argv[2]) {
  const server = await VhostUserServer.start(device, { socketPath: process.argv[2] });
  process.on('SIGTERM', () => server.close().then(() => process.exit(0)));
}
`;

describe('the npm package, installed into an empty project', () => {
  let dir: string;
  let project: string;
  let hadDist: boolean;

  beforeAll(async () => {
    hadDist = existsSync(join(root, 'dist'));
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-pkg-'));
    const pack = await sh('npm', ['pack', '--pack-destination', dir, '--silent'], root, 300_000);
    expect(pack.code, pack.stderr).toBe(0);
    const tarball = join(dir, pack.stdout.trim().split('\n').pop()!);
    project = join(dir, 'app');
    await sh('mkdir', ['-p', project], dir);
    expect((await sh('npm', ['init', '-y'], project)).code).toBe(0);
    const install = await sh('npm', ['install', '--no-audit', '--no-fund', tarball], project, 300_000);
    expect(install.code, install.stderr).toBe(0);
  }, 600_000);

  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
    if (!hadDist) rmSync(join(root, 'dist'), { recursive: true, force: true });
  });

  it('runs the CLI: help, every device command, setup, vm and demo', async () => {
    const help = await sh('npx', ['vhost-ts', '--help'], project);
    expect(help.code, help.stderr).toBe(0);
    expect(help.stdout).toMatch(/demo\s+boot a full Debian/);
    for (const device of ['rng', 'blk', 'net', 'console']) {
      const h = await sh('npx', ['vhost-ts', device, '--help'], project);
      expect(h.code, `${device}: ${h.stderr}`).toBe(0);
      const caps = await sh('npx', ['vhost-ts', device, '--print-capabilities'], project);
      expect(JSON.parse(caps.stdout)).toMatchObject({ type: device });
    }
    for (const tool of ['setup', 'vm', 'demo']) {
      const h = await sh('npx', ['vhost-ts', tool, '--help'], project);
      expect(h.code, `${tool}: ${h.stderr}`).toBe(0);
    }
    const qemu = await sh('npx', ['vhost-ts', 'console', '--socket-path', '/tmp/x.sock', '--port', 'a=pty', '--print-qemu-args'], project);
    expect(qemu.stdout).toContain('vhost-user-test-device-pci,chardev=console0,virtio-id=3,num_vqs=6,config_size=12');
  }, 120_000);

  it('exports the API, the devices and the test tooling at the paths the docs use', async () => {
    const script = `
      const main = await import('vhost-ts');
      const testing = await import('vhost-ts/testing');
      const devices = await Promise.all(['rng', 'blk', 'net', 'console'].map((d) => import('vhost-ts/devices/' + d)));
      console.log(JSON.stringify({
        server: typeof main.VhostUserServer, split: typeof main.SplitQueue, packed: typeof main.PackedQueue, rng: typeof main.rngDevice,
        driverInMain: 'SplitQueueDriver' in main, frontendInMain: 'VhostUserFrontend' in main,
        frontend: typeof testing.VhostUserFrontend, driver: typeof testing.SplitQueueDriver, packedDriver: typeof testing.PackedQueueDriver,
        devices: devices.map((m) => Object.keys(m).filter((k) => k.endsWith('Device')).sort()),
      }));`;
    const r = await sh(process.execPath, ['--input-type=module', '-e', script], project);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({
      server: 'function',
      split: 'function',
      packed: 'function',
      rng: 'function',
      driverInMain: false,
      frontendInMain: false,
      frontend: 'function',
      driver: 'function',
      packedDriver: 'function',
      devices: [['rngDevice'], ['blkDevice'], ['netDevice'], ['consoleDevice']],
    });
    // TypeScript users get declarations for every subpath.
    for (const d of ['index', 'testing', 'devices/console/index']) expect(existsSync(join(project, 'node_modules/vhost-ts/dist/src', `${d}.d.ts`))).toBe(true);
  }, 60_000);

  it.skipIf(skipVm)('a device written in plain JavaScript against the installed package serves a guest', async () => {
    writeFileSync(join(project, 'my-rng.mjs'), JS_DEVICE);
    const socket = join(dir, 'js-rng.sock');
    const backend = spawn(process.execPath, ['my-rng.mjs', socket], { cwd: project, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    backend.stderr!.on('data', (d) => (stderr += d));
    try {
      const deadline = Date.now() + 20_000;
      while (!stderr.includes('listening on')) {
        if (Date.now() > deadline || backend.exitCode !== null) throw new Error(`the JS device did not start: ${stderr}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      const run = await runGuest({
        setup: await ensureSetup(),
        timeoutMs: 120_000,
        devices: [{ kind: 'rng', socket }],
        script: ['echo "RESULT rng $(cat /sys/class/misc/hw_random/rng_current)"', 'echo "RESULT bytes $(head -c 65536 /dev/hwrng | wc -c)"'].join('\n'),
      });
      expect(run.results).toEqual(['rng virtio_rng.0', 'bytes 65536']);
    } finally {
      backend.kill('SIGTERM');
      await new Promise((r) => (backend.exitCode !== null ? r(null) : backend.once('exit', r)));
    }
    expect(liveQemuPids()).toEqual([]);
  }, 180_000);

  it.skipIf(skipVm || noNetns !== null)('vhost-ts setup and vhost-ts demo --exec run from the installed package', async () => {
    const setup = await sh('npx', ['vhost-ts', 'setup', '--full'], project, 20 * 60_000);
    expect(setup.code, setup.stderr).toBe(0);
    const ns = await createNetns('vtspkg');
    try {
      const demo = await sh('ip', ['netns', 'exec', ns.name, 'npx', 'vhost-ts', 'demo', '--exec', 'findmnt -n -o SOURCE /; tty'], project, 10 * 60_000);
      expect(demo.code, demo.stderr.slice(-3000)).toBe(0);
      expect(demo.stdout).toBe('/dev/vda\n/dev/hvc0\n');
    } finally {
      await ns.close();
    }
  }, 25 * 60_000);
});
