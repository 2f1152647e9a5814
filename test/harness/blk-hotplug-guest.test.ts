// Memory hot-plug under I/O: while the guest runs fio with verification on a vhost-ts disk, a DIMM is plugged
// (QEMU sends ADD_MEM_REG), the guest puts it to use, and it is unplugged again (REM_MEM_REG), twice; fio finishes
// clean. QEMU asked GET_MAX_MEM_SLOTS first and took our 509.
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qmp } from '../../harness/qmp.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { blkDevice } from '../../src/devices/blk/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('blk with guest memory hot-plugged and unplugged under fio', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-hotplug-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('ADD_MEM_REG and REM_MEM_REG while requests run; fio verify passes', async () => {
    const image = join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, 64 << 20);
    const socket = join(dir, 'blk.sock');
    const qmpSocket = join(dir, 'qmp.sock');
    const logs: string[] = [];
    const note = (m: string) => logs.push(m);
    const server = await VhostUserServer.start(blkDevice({ path: image }), { socketPath: socket, log: { info: note, warn: note, error: note } });
    const until = async (what: string, pred: () => boolean, ms = 60_000) => {
      const deadline = Date.now() + ms;
      while (!pred()) {
        if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms\n${logs.join('\n')}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    const count = (re: RegExp) => logs.filter((l) => re.test(l)).length;
    let plugging: Promise<void> | null = null;
    const abort = new AbortController();
    const plugLoop = async (): Promise<void> => {
      for (let round = 0; round < 2; round++) {
        const added = count(/memory region added/);
        const removed = count(/memory region removed/);
        await qmp(qmpSocket, [
          { execute: 'object-add', arguments: { 'qom-type': 'memory-backend-memfd', id: `hp${round}`, size: 128 << 20, share: true } },
          { execute: 'device_add', arguments: { driver: 'pc-dimm', id: `dimm${round}`, memdev: `hp${round}` } },
        ]);
        await until(`ADD_MEM_REG of DIMM ${round}`, () => count(/memory region added/) > added);
        await new Promise((r) => setTimeout(r, 1000)); // the guest onlines it and fio goes on meanwhile
        await qmp(qmpSocket, [{ execute: 'device_del', arguments: { id: `dimm${round}` } }]);
        await until(`REM_MEM_REG of DIMM ${round}`, () => count(/memory region removed/) > removed);
        await qmp(qmpSocket, [{ execute: 'object-del', arguments: { id: `hp${round}` } }]);
      }
    };
    let run;
    try {
      run = await runGuest({
        setup,
        timeoutMs: 400_000,
        memoryMiB: 512,
        hotplugSlots: 2,
        cpus: 2,
        signal: abort.signal,
        // Hot-plugged memory goes online movable, so the guest can give it back on unplug.
        append: ['memhp_default_state=online_movable'],
        extra: ['-qmp', `unix:${qmpSocket},server=on,wait=off`],
        devices: [{ kind: 'blk', socket, numQueues: 1 }],
        onConsoleLine: (line) => {
          if (line.includes('FIO-STARTED') && !plugging) {
            plugging = plugLoop().catch((e) => {
              logs.push(`plug loop: ${(e as Error).message}`);
              abort.abort(e);
            });
          }
        },
        script: `
echo FIO-STARTED
ok=ok
for pass in 1 2 3 4; do
  fio --name=verify$pass --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k --size=48m \\
      --randseed=$pass --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=terse > /tmp/fio.log 2>&1 \\
    || { tail -20 /tmp/fio.log; ok=failed; }
done
echo "RESULT fio $ok"
echo "RESULT errors $(dmesg | grep -c -i 'i/o error' || true)"
echo "RESULT memory blocks $(ls -d /sys/devices/system/memory/memory* | wc -l)"
`,
      });
      await plugging;
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- backend log ---\n${logs.join('\n')}`);
    } finally {
      await server.close();
    }
    expect(run.exitCode).toBe(0);
    expect(run.results, `${run.console.slice(-3000)}\n${logs.join('\n')}`).toContain('fio ok');
    expect(run.results).toContain('errors 0');
    expect(count(/memory region removed/)).toBeGreaterThanOrEqual(2);
    expect(logs.filter((l) => /failed|refused|cannot/.test(l))).toEqual([]);
    console.log(`hot-plug: ${count(/memory region added/)} regions added, ${count(/memory region removed/)} removed under fio (${run.accel})`);
    expect(liveQemuPids()).toEqual([]);
  }, 480_000);
});
