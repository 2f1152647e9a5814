// `vhost-ts ctl PATH blk-resize` on a disk a booted guest has open: the backend grows the image and tells QEMU
// (CONFIG_CHANGE_MSG), QEMU tells the driver, and the guest sees the new capacity without a reboot.
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { ControlClient, ControlServer } from '../../src/control/index.js';
import { blkDevice } from '../../src/devices/blk/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('blk resize through the control API', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-resize-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('a running guest sees its disk grow from 32 to 48 MiB', async () => {
    const image = join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, 32 << 20);
    const socket = join(dir, 'blk.sock');
    const ctlPath = join(dir, 'blk.ctl');
    const server = await VhostUserServer.start(blkDevice({ path: image }), { socketPath: socket, log: { info() {}, warn() {}, error() {} } });
    const control = await ControlServer.start(ctlPath, [server]);
    let resized = null as Promise<Record<string, unknown>> | null;
    try {
      const run = await runGuest({
        setup,
        timeoutMs: 120_000,
        devices: [{ kind: 'blk', socket, numQueues: 1 }],
        onConsoleLine: (line) => {
          if (line.startsWith('RESULT before') && !resized) {
            resized = ControlClient.connect(ctlPath).then(async (c) => {
              try {
                return await c.call({ blkResize: { sizeBytes: 48 << 20 } });
              } finally {
                c.close();
              }
            });
          }
        },
        script: `
echo "RESULT before $(cat /sys/block/vda/size)"
n=0; while [ "$(cat /sys/block/vda/size)" = ${(32 << 20) / 512} ] && [ $n -lt 300 ]; do n=$((n+1)); sleep 0.1; done
echo "RESULT after $(cat /sys/block/vda/size)"
dd if=/dev/vda of=/dev/null bs=1M skip=47 count=1 iflag=direct 2>/dev/null && echo "RESULT read past the old end ok"
`,
      });
      expect((await resized)?.error ?? '').toBe('');
      expect(run.exitCode).toBe(0);
      expect(run.results).toContain(`before ${(32 << 20) / 512}`);
      expect(run.results).toContain(`after ${(48 << 20) / 512}`);
      expect(run.results).toContain('read past the old end ok');
    } finally {
      await control.close();
      await server.close();
    }
    expect(liveQemuPids()).toEqual([]);
  }, 180_000);
});
