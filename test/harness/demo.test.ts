// The main job end to end: `vhost-ts demo --exec` boots the full Debian with its disk, network and console served
// by vhost-ts, logs in on the virtio console, runs commands, powers off and exits with their status. It runs in a
// network namespace of its own, so its tap and traffic never leave it; afterwards nothing it made is left.
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup } from '../../harness/setup.js';
import { createNetns, netnsUnavailable, run, type Netns } from '../net/netns.js';

const bin = fileURLToPath(new URL('../../bin/vhost-ts.mjs', import.meta.url));
const noNetns = await netnsUnavailable();
if (noNetns !== null) console.warn(`SKIPPED: demo test: ${noNetns}`);
const demoDirs = () => readdirSync(tmpdir()).filter((n) => n.startsWith('vhost-ts-demo-'));

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1' || noNetns !== null)('vhost-ts demo (full Debian, TCG, own netns)', () => {
  let ns: Netns;
  beforeAll(async () => {
    // The full image is built once (about two minutes), then cached.
    await ensureSetup({ full: true });
    ns = await createNetns('vtsdemo');
  }, 20 * 60_000);
  afterAll(async () => {
    await ns?.close();
  });

  it('answers each command from inside the guest, exits with the last status, and leaves nothing behind', async () => {
    const before = demoDirs();
    const commands = [
      'echo "version $(cat /etc/debian_version)"',
      'echo "root $(findmnt -n -o SOURCE /)"',
      'echo "tty $(tty)"',
      'ip -br addr',
      'ping -c 1 -W 10 10.0.77.1 | grep -o "1 received"',
      'echo vhost-ts-probe > /root/probe && sync && echo "file $(cat /root/probe)"',
      "sh -c 'exit 7'",
    ].join('\n');
    const child = spawn('ip', ['netns', 'exec', ns.name, process.execPath, bin, 'demo', '--accel', 'tcg', '--exec', commands], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 12 * 60_000);
    const code = await new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
    clearTimeout(timer);
    const context = `stdout:\n${stdout}\nstderr:\n${stderr.slice(-4000)}`;
    expect(code, context).toBe(7);
    const lines = stdout.split('\n');
    expect(lines.find((l) => l.startsWith('version ')), context).toMatch(/^version 12\.\d+$/);
    expect(lines, context).toContain('root /dev/vda');
    expect(lines, context).toContain('tty /dev/hvc0');
    expect(stdout, context).toMatch(/^\S+\s+UP\s+10\.0\.77\.2\/24/m);
    expect(lines, context).toContain('1 received');
    expect(lines, context).toContain('file vhost-ts-probe');
    expect(stderr).toMatch(/starting a Debian guest under TCG/);
    expect(stderr).toMatch(/logged in on hvc0 after/);
    console.log(`demo --exec: ${stderr.match(/logged in on hvc0 after [\d.]+ s/)?.[0]}; ${stderr.match(/[\d.]+ s in all/)?.[0]}`);

    // Nothing left: no tap in its namespace (only lo), no files, no QEMU.
    const links = await ns.exec(['ip', '-o', 'link']);
    expect(links.stdout.trim().split('\n').map((l) => l.split(':')[1].trim())).toEqual(['lo']);
    expect(demoDirs()).toEqual(before);
    const qemus = await run(['pgrep', '-f', 'vhost-ts-demo-']);
    expect(qemus.stdout.trim()).toBe('');
  }, 15 * 60_000);

  // Interactive: the console is this process's stdio (a pipe here, so not in raw mode). Both ways out a person
  // takes: the detach key typed on the console, and SIGTERM from outside. Each shuts the guest down and removes
  // everything the demo made.
  for (const way of ['detach', 'SIGTERM'] as const) {
    it(`interactive: the login prompt on stdout; ${way === 'detach' ? 'Ctrl-] typed' : 'SIGTERM'} ends it, nothing left behind`, async () => {
      const before = demoDirs();
      const child = spawn('ip', ['netns', 'exec', ns.name, process.execPath, bin, 'demo', '--accel', 'tcg'], { stdio: ['pipe', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d) => (stdout += d));
      child.stderr.on('data', (d) => (stderr += d));
      const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
      const killer = setTimeout(() => child.kill('SIGKILL'), 12 * 60_000);
      try {
        const prompt = await Promise.race([
          new Promise<boolean>((resolve) => {
            const look = () => stdout.includes('login:') && resolve(true);
            child.stdout.on('data', look);
            look();
          }),
          exited.then(() => false),
        ]);
        expect(prompt, `no login prompt:\n${stdout.slice(-2000)}\n${stderr.slice(-2000)}`).toBe(true);
        if (way === 'detach') child.stdin.write('\x1d');
        else child.kill('SIGTERM');
        const code = await exited;
        const context = `stdout:\n${stdout.slice(-2000)}\nstderr:\n${stderr.slice(-4000)}`;
        expect(code, context).toBe(0);
        expect(stderr, context).toContain(way === 'detach' ? 'detached (Ctrl-]); shutting down' : 'SIGTERM; shutting down');
        expect(stderr, context).not.toContain('could not');
      } finally {
        clearTimeout(killer);
        child.kill('SIGKILL');
      }
      const links = await ns.exec(['ip', '-o', 'link']);
      expect(links.stdout.trim().split('\n').map((l) => l.split(':')[1].trim())).toEqual(['lo']);
      expect(demoDirs()).toEqual(before);
      expect((await run(['pgrep', '-f', 'vhost-ts-demo-'])).stdout.trim()).toBe('');
    }, 15 * 60_000);
  }
});
