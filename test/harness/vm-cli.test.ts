// `vhost-ts vm` as a user runs it: the CLI boots the test guest under QEMU with the devices it is asked for, served
// by its own process, and the guest sees them. The console's two host ends a script can check: a file that gets
// what the guest writes to hvc0, and a socket whose keys reach the shell on hvc0 (and whose prompt comes back). And
// a SIGTERM stops the guest too: QEMU runs in a process group of its own, which the signal does not reach.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup } from '../../harness/setup.js';

const bin = fileURLToPath(new URL('../../bin/vhost-ts.mjs', import.meta.url));

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('vhost-ts vm (the CLI)', () => {
  let dir: string;
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-vm-cli-'));
  }, 15 * 60_000);
  afterEach(() => {
    // A failed test may leave its vm running: end it (its exit handler stops QEMU and the servers).
    for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  function vm(args: string[]): { child: ChildProcess; done: Promise<{ code: number | null; stdout: string; stderr: string }> } {
    const child = spawn(process.execPath, [bin, 'vm', '--accel', 'tcg', '--timeout', '180', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 240_000);
    const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
      child.once('exit', (code) => {
        clearTimeout(timer);
        resolve({ code, stdout, stderr });
      }),
    );
    return { child, done };
  }

  it('--rng --blk --console file: the default script finds all three, and the guest\'s hvc0 output lands in the file', async () => {
    const image = join(dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(8 << 20));
    const out = join(dir, 'hvc0.txt');
    const r = await vm(['--rng', '--blk', image, '--console', `file:${out}`]).done;
    const context = `stdout:\n${r.stdout}\nstderr:\n${r.stderr.slice(-3000)}`;
    expect(r.code, context).toBe(0);
    expect(r.stdout, context).toMatch(/^RESULT vda 16384 sectors, 2 queues$/m);
    expect(r.stdout, context).toMatch(/^RESULT hwrng \S+ [0-9a-f]{32}$/m);
    expect(r.stdout, context).toMatch(/^RESULT hvc0 \d+ \d+ \(rows cols\)$/m);
    expect(readFileSync(out, 'utf8')).toContain("hello from the guest's /dev/hvc0");
  }, 300_000);

  it('--console socket: keys sent to the socket reach the shell on the guest\'s hvc0', async () => {
    const sock = join(dir, 'hvc0.sock');
    const script = join(dir, 'wait-for-typed.sh');
    // The script waits (bounded) for the file the test types a command to create, through hvc0's shell.
    writeFileSync(script, 'i=0; while [ ! -s /tmp/typed ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\necho "RESULT typed $(cat /tmp/typed 2>&1)"\n');
    const { child, done } = vm(['--console', `socket:${sock}`, '--script', script]);
    // The CLI says where the console is once it serves it (before QEMU starts).
    let stderr = '';
    const served = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the CLI did not announce the console within 120 s:\n${stderr}`)), 120_000);
      child.stderr!.on('data', (d) => {
        stderr += d;
        if (stderr.includes("the guest's /dev/hvc0 (a shell) is on")) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    await served;
    expect(existsSync(sock)).toBe(true);
    const client = connect(sock);
    await new Promise<void>((resolve, reject) => client.once('connect', resolve).once('error', reject));
    // getty flushes what was typed before it opened hvc0, as on any terminal: type once the shell's prompt shows.
    let screen = '';
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no shell prompt on hvc0 within 120 s; it showed:\n${screen}`)), 120_000);
      client.on('data', (d) => {
        screen += d;
        // Busybox's shell follows its prompt with a cursor position query (ESC [ 6 n).
        if (/# (\x1b\[6n)?$/.test(screen)) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    client.write('echo typed-through-hvc0 > /tmp/typed\n');
    const r = await done;
    client.destroy();
    const context = `stdout:\n${r.stdout}\nstderr:\n${r.stderr.slice(-3000)}`;
    expect(r.code, context).toBe(0);
    expect(r.stdout, context).toMatch(/^RESULT typed typed-through-hvc0$/m);
  }, 300_000);

  it('SIGTERM while the guest runs: the CLI stops its QEMU and exits 143', async () => {
    const script = join(dir, 'long.sh');
    writeFileSync(script, 'echo "RESULT started"; sleep 600\n');
    const { child, done } = vm(['--rng', '--script', script]);
    // Once the script has started, the guest is up: find the CLI's QEMU (its child) and stop the CLI.
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the guest did not start its script within 120 s')), 120_000);
      let out = '';
      child.stdout!.on('data', (d) => {
        out += d;
        if (out.includes('RESULT started')) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    const qemus = childrenOf(child.pid!).filter((p) => readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('qemu-system'));
    expect(qemus).toHaveLength(1);
    try {
      child.kill('SIGTERM');
      const r = await done;
      expect(r.code, r.stderr.slice(-2000)).toBe(143);
      expect(r.stderr).toContain('vhost-ts vm: SIGTERM: the guest was stopped');
      expect(alive(qemus[0]), `QEMU ${qemus[0]} outlived the CLI`).toBe(false);
    } finally {
      // If it did, it is ours to end (its guest would sleep on for ten minutes).
      if (alive(qemus[0])) process.kill(qemus[0], 'SIGKILL');
    }
  }, 300_000);
});

/** Pids whose parent is `pid` (from /proc). */
function childrenOf(pid: number): number[] {
  return readdirSync('/proc')
    .filter((n) => /^\d+$/.test(n))
    .filter((n) => {
      try {
        // The fields after the command's closing parenthesis: state, then the parent's pid.
        const stat = readFileSync(`/proc/${n}/stat`, 'utf8');
        return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid;
      } catch {
        return false;
      }
    })
    .map(Number);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
