// A `vhost-ts blk` process SIGKILLed four times under the guest's fio (random writes with crc32c, two jobs at
// queue depth 16) and restarted on the same socket; QEMU reconnects (reconnect-ms) and hands each new backend
// the inflight region. fio must finish without an error and its verify pass find every block intact: on a packed
// ring (where QEMU has no fallback), on a split ring, and with completions forced out of ring order (where
// QEMU's fallback, rewinding to used->idx, would run finished requests again and lose unfinished ones).
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { featureBitScript, RING_PACKED_BIT } from '../../harness/guest-features.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { listening, startBackend as start, vhostTsBin, type BackendProcess } from '../helpers/backend-process.js';

const KILLS = 4;
/** More kills, up to this many, until one lands with requests in flight (most land between requests). */
const MAX_KILLS = 12;

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('blk backend killed under guest I/O', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-blk-restart-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const cases = [
    { ring: 'packed', order: 'ready' },
    { ring: 'split', order: 'ready' },
    { ring: 'split', order: 'reverse' },
  ] as const;
  for (const { ring, order } of cases)
  it(`${ring} ring, completions ${order === 'reverse' ? 'in reverse (out of ring order)' : 'as they finish'}: fio verify passes across ${KILLS} SIGKILLs`, async () => {
    const image = join(dir, `disk-${ring}-${order}.img`);
    writeFileSync(image, '');
    truncateSync(image, 96 << 20);
    const socket = join(dir, `blk-${ring}-${order}.sock`);
    const args = [vhostTsBin, 'blk', '--socket-path', socket, '--image', image, '--direct', '--num-queues', '2', '--completion-order', order];
    const backends: BackendProcess[] = [];
    const logs = (): string[] => backends.map((b) => b.log());
    const startBackend = async (): Promise<void> => {
      backends.push(await start(args, listening));
    };
    const current = (): BackendProcess => backends[backends.length - 1];
    // Kill and restart while fio writes: each backend serves a moment of I/O, then dies with requests in flight.
    const abort = new AbortController();
    let killer: Promise<void> | null = null;
    let kills = 0;
    let guestDone = false;
    const resubmits = (): number[] => [...logs().join('\n').matchAll(/(\d+) requests were in flight/g)].map((m) => Number(m[1]));
    const killLoop = async (): Promise<void> => {
      for (; (kills < KILLS || resubmits().length === 0) && kills < MAX_KILLS && !guestDone; kills++) {
        // Until the new backend has served requests (QEMU reconnected and started its queues), then a little more.
        const deadline = Date.now() + 60_000;
        while (!/queue \d started/.test(current().log()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
        if (!guestDone && !/queue \d started/.test(current().log())) throw new Error(`backend ${backends.length - 1}: QEMU started no queue on it within 60 s`);
        await new Promise((r) => setTimeout(r, 1000));
        if (guestDone) break;
        await current().kill();
        await startBackend();
      }
    };
    await startBackend();
    let run;
    try {
      run = await runGuest({
        setup,
        timeoutMs: 400_000,
        cpus: 2,
        signal: abort.signal,
        devices: [{ kind: 'blk', socket, numQueues: 2, packed: ring === 'packed', reconnectMs: 200 }],
        onConsoleLine: (line) => {
          if (line.includes('RESULT fio')) guestDone = true;
          if (line.includes('FIO-STARTED') && !killer) {
            killer = killLoop().catch((e) => abort.abort(e));
          }
        },
        script: `
set -e
${featureBitScript(2, RING_PACKED_BIT, 'packed')}
echo FIO-STARTED
fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \\
    --numjobs=2 --cpus_allowed=0,1 --cpus_allowed_policy=split --offset_increment=48m --size=48m \\
    --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting --output-format=terse > /tmp/fio.log 2>&1 \\
  && echo "RESULT fio ok" || { tail -20 /tmp/fio.log; echo "RESULT fio failed"; }
echo "RESULT errors $(dmesg | grep -c -i 'i/o error' || true)"
`,
      });
      await killer;
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- backend logs ---\n${logs().map((l, i) => `[${i}]\n${l}`).join('\n')}`);
    } finally {
      for (const b of backends) await b.kill();
    }
    const detail = `\n--- backend logs ---\n${logs().map((l, i) => `[${i}]\n${l}`).join('\n')}`;
    expect(run.exitCode, detail).toBe(0);
    expect(run.results, detail).toContain(`packed ${ring === 'packed' ? 1 : 0}`);
    expect(run.results, `${run.console.slice(-3000)}${detail}`).toContain('fio ok');
    expect(run.results).toContain('errors 0');
    expect(kills).toBeGreaterThanOrEqual(KILLS);
    // A restart found requests in flight and ran them again (the region did its job, not luck).
    const resubmitted = resubmits();
    expect(resubmitted.length, detail).toBeGreaterThan(0);
    console.log(`blk restart (${ring}, ${order}) under ${run.accel}: ${kills} kills; requests run again per restarted queue: ${resubmitted.join(', ')}`);
    expect(liveQemuPids()).toEqual([]);
  }, 480_000);
});
