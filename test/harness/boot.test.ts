// Boots the test guest with no vhost-user devices: proves set-up, the QEMU command line, the guest's /init and the
// console protocol end to end, and that runGuest leaves no QEMU behind whichever way a run ends.
import fs from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { GuestError, liveQemuPids, runGuest } from '../../harness/vm.js';

const SETUP_TIMEOUT_MS = 15 * 60_000;
const BOOT_TIMEOUT_MS = 90_000;

function processGone(pid: number): boolean {
  return !fs.existsSync(`/proc/${pid}`);
}

/** Children of this test process still alive or unreaped: a leaked QEMU would show up here. */
function childPids(): number[] {
  const mine = String(process.pid);
  return fs
    .readdirSync('/proc')
    .filter((e) => /^\d+$/.test(e))
    .filter((e) => {
      try {
        // Fields after the parenthesised command name: state, ppid, ...
        const stat = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
        return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1] === mine;
      } catch {
        return false;
      }
    })
    .map(Number);
}

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('test guest boot', () => {
  let setup: HarnessSetup;

  beforeAll(async () => {
    setup = await ensureSetup();
  }, SETUP_TIMEOUT_MS);

  it('boots, runs the script and reports its RESULT lines and exit code', async () => {
    const pids: number[] = [];
    const run = await runGuest({
      setup,
      timeoutMs: BOOT_TIMEOUT_MS,
      script: [
        'echo "RESULT uname $(uname -r)"',
        `echo "RESULT modules $(ls /sys/bus/virtio/drivers | tr '\\n' ' ')"`,
      ].join('\n'),
      onSpawn: (qemu) => pids.push(qemu.pid!),
    });
    expect(run.exitCode).toBe(0);
    expect(run.results[0]).toBe(`uname ${setup.guest.kernelRelease}`);
    const drivers = run.results[1]!.replace(/^modules /, '').trim().split(/\s+/);
    expect(drivers).toEqual(expect.arrayContaining(['virtio_blk', 'virtio_net', 'virtio_console', 'virtio_rng']));
    expect(run.results).toHaveLength(2);
    expect(['kvm', 'tcg']).toContain(run.accel);
    expect(run.bootMs).toBeGreaterThan(0);
    console.log(`guest booted under ${run.accel} in ${run.bootMs} ms`);

    expect(pids).toHaveLength(1);
    expect(processGone(pids[0]!)).toBe(true);
    expect(liveQemuPids()).toEqual([]);
    expect(childPids()).toEqual([]);
  }, BOOT_TIMEOUT_MS + 30_000);

  it('kills QEMU when the guest outlives the timeout', async () => {
    const pids: number[] = [];
    const run = runGuest({ setup, timeoutMs: 10_000, script: 'echo RESULT started\nsleep 600\n', onSpawn: (q) => pids.push(q.pid!) });
    await expect(run).rejects.toThrow(GuestError);
    await expect(run).rejects.toThrow(/did not finish within 10000 ms/);
    expect(processGone(pids[0]!)).toBe(true);
    expect(childPids()).toEqual([]);
  }, 60_000);

  it('kills QEMU when the caller aborts', async () => {
    const pids: number[] = [];
    const abort = new AbortController();
    const run = runGuest({
      setup,
      timeoutMs: BOOT_TIMEOUT_MS,
      script: 'echo RESULT started\nsleep 600\n',
      signal: abort.signal,
      onSpawn: (q) => pids.push(q.pid!),
      onConsoleLine: (line) => {
        if (line === 'RESULT started') abort.abort(new Error('backend failed'));
      },
    });
    await expect(run).rejects.toThrow(/aborted by the caller: Error: backend failed/);
    expect(processGone(pids[0]!)).toBe(true);
    expect(childPids()).toEqual([]);
  }, BOOT_TIMEOUT_MS + 30_000);

  it('reports QEMU stderr when QEMU refuses its command line', async () => {
    const run = runGuest({ setup, timeoutMs: 30_000, script: 'true', extra: ['-device', 'no-such-device'] });
    await expect(run).rejects.toThrow(/before the guest reported an exit code[\s\S]*QEMU stderr[\s\S]*no-such-device/);
    expect(childPids()).toEqual([]);
  }, 60_000);
});
