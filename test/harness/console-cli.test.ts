// `vhost-ts console` with the stdio backend, run as a user runs it: in a terminal (a pty the test holds the master
// of), serving a booted guest. The guest's hvc0 output shows on the terminal, keys typed reach the guest, Ctrl-]
// detaches, and the terminal is back in cooked mode afterwards.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, closeSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { close, openPty, read, watchReadable, write } from '../../src/sys/index.js';

const bin = fileURLToPath(new URL('../../bin/vhost-ts.mjs', import.meta.url));

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('vhost-ts console on a terminal (stdio backend)', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-console-cli-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('shows the guest on the terminal, types into it, detaches on Ctrl-] and restores the terminal', async () => {
    const pty = openPty();
    const slave = openSync(pty.path, 'r+');
    const socket = join(dir, 'c.sock');
    const child = spawn(process.execPath, [bin, 'console', '--socket-path', socket, '--cols', '90', '--rows', '33'], { stdio: [slave, slave, 'pipe'] });
    let stderr = '';
    let wake = () => {};
    child.stderr!.on('data', (d) => {
      stderr += d;
      wake();
    });
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    let screen = '';
    const buf = new Uint8Array(4096);
    const watch = watchReadable(pty.fd, () => {
      for (let n = read(pty.fd, buf); n > 0; n = read(pty.fd, buf)) screen += Buffer.from(buf.subarray(0, n)).toString('latin1');
      wake();
    });
    const until = (pred: () => boolean, ms: number, what: string) =>
      new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms; terminal: ${JSON.stringify(screen.slice(-300))}; stderr: ${stderr}`)), ms);
        wake = () => {
          if (!pred()) return;
          clearTimeout(timer);
          resolve();
        };
        wake();
      });
    const abort = new AbortController();
    let guest: ReturnType<typeof runGuest> | undefined;
    try {
      await until(() => stderr.includes('listening on'), 20_000, 'the backend listening');
      expect(stderr).toMatch(/QEMU: -chardev socket,id=console0,path=\S+ -device vhost-user-test-device-pci,chardev=console0,virtio-id=3,num_vqs=4,config_size=12/);
      expect(stderr).toContain('Ctrl-] detaches');
      // Raw mode while it runs: no echo, no line editing.
      expect(spawnSync('stty', ['-F', pty.path, '-a'], { encoding: 'utf8' }).stdout).toMatch(/-icanon.*-echo|-echo.*-icanon|-icanon[\s\S]*-echo /);
      guest = runGuest({
        setup,
        signal: abort.signal,
        timeoutMs: 120_000,
        devices: [{ kind: 'console', socket, numQueues: 4 }],
        script: [
          'n=0; until [ -e /dev/hvc0 ]; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done',
          'exec 3<>/dev/hvc0',
          // Cooked, as a shell has it: the terminal's Enter (CR) becomes a newline (icrnl).
          'stty -echo <&3',
          'echo "RESULT size $(stty size <&3)"',
          'echo "guest says hello" >&3',
          'read -r line <&3; echo "RESULT typed $line"',
        ].join('\n'),
      });
      await until(() => screen.includes('guest says hello'), 60_000, 'the guest on the terminal');
      write(pty.fd, Buffer.from('keys from the terminal\r'));
      const run = await guest;
      expect(run.exitCode).toBe(0);
      expect(run.results).toContain('size 33 90');
      expect(run.results).toContain('typed keys from the terminal');
      write(pty.fd, Buffer.from([0x1d])); // Ctrl-]
      expect(await exited).toBe(0);
      const after = spawnSync('stty', ['-F', pty.path, '-a'], { encoding: 'utf8' }).stdout;
      expect(after).toMatch(/(^|\s)icanon(\s|$)/);
      expect(after).toMatch(/(^|\s)echo(\s|$)/);
    } finally {
      abort.abort();
      await guest?.catch(() => {});
      if (child.exitCode === null) child.kill('SIGKILL');
      watch.close();
      closeSync(slave);
      close(pty.fd);
    }
    expect(liveQemuPids()).toEqual([]);
  }, 180_000);
});
