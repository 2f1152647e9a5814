// Client mode (`--connect`): QEMU listens (server=on) and one `vhost-ts blk --connect` process serves a guest,
// then the QEMU is killed and another started on the same socket path; the backend, left alone, reconnects and
// the new guest's disk works (reads back what the first guest wrote).
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { GuestError, liveQemuPids, runGuest } from '../../harness/vm.js';

const bin = new URL('../../bin/vhost-ts.mjs', import.meta.url).pathname;

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('client mode with QEMU restarted', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-connect-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('the backend reconnects by itself to a new QEMU after the old one was killed, and serves its guest', async () => {
    const image = join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, 16 << 20);
    const socket = join(dir, 'qemu.sock');
    let log = '';
    const backend: ChildProcess = spawn(process.execPath, [bin, 'blk', '--connect', socket, '--image', image, '--num-queues', '2'], { stdio: ['ignore', 'ignore', 'pipe'] });
    backend.stderr!.on('data', (d) => (log += d));
    const exited = once(backend, 'exit');
    try {
      // The first QEMU: its guest writes a marker, says so, and is killed while still running.
      const abort = new AbortController();
      const first = runGuest({
        setup,
        timeoutMs: 120_000,
        signal: abort.signal,
        devices: [{ kind: 'blk', socket, server: true, numQueues: 2 }],
        script: `
echo vhost-ts-connect-marker | dd of=/dev/vda bs=512 conv=sync oflag=direct 2>/dev/null
echo WROTE
sleep 600
`,
        onConsoleLine: (line) => {
          if (line === 'WROTE') abort.abort(new Error('killed by the test'));
        },
      });
      await expect(first).rejects.toThrow(GuestError);
      expect(log).toMatch(/connected to frontend at/);

      // The second QEMU on the same path; nothing is done to the backend. Its connections are counted while the
      // guest reads: once this QEMU exits, the backend rightly tries again (and may get in before it is gone).
      let connectionsWhileServing = -1;
      const second = await runGuest({
        setup,
        timeoutMs: 120_000,
        devices: [{ kind: 'blk', socket, server: true, numQueues: 2 }],
        script: 'echo "RESULT read $(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d "\\\\000")"',
        onConsoleLine: (line) => {
          if (line.startsWith('RESULT read')) connectionsWhileServing = log.match(/connected to frontend at/g)?.length ?? 0;
        },
      });
      expect(second.exitCode).toBe(0);
      expect(second.results).toContain('read vhost-ts-connect-marker');
      expect(log).toMatch(/reconnecting to the frontend at/);
      expect(connectionsWhileServing).toBe(2);
      expect(backend.exitCode).toBeNull();
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- backend log ---\n${log}`);
    } finally {
      backend.kill('SIGTERM');
      await exited;
    }
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);
});
