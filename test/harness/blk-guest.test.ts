// The blk device serving a booted guest through QEMU's vhost-user-blk-pci: a filesystem, fio with verification,
// two request queues, and the image on the host holding what the guest wrote.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { featureBitScript, RING_PACKED_BIT } from '../../harness/guest-features.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { blkDevice } from '../../src/devices/blk/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('blk device in a guest', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-blk-guest-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  for (const ring of ['split', 'packed'] as const)
  it(`${ring} ring: mkfs.ext4, files, fsck clean, fio crc32c verify, two queues both used; the host image matches`, async () => {
    const image = join(dir, `disk-${ring}.img`);
    writeFileSync(image, '');
    truncateSync(image, 256 << 20);
    const socket = join(dir, `blk-${ring}.sock`);
    const blk = blkDevice({ path: image, numQueues: 2, serial: 'vhost-ts-guest' });
    const errors: string[] = [];
    const server = await VhostUserServer.start(blk, { socketPath: socket, log: { info() {}, warn: (m) => errors.push(m), error: (m) => errors.push(m) } });
    let run;
    try {
      run = await runGuest({
        setup,
        timeoutMs: 240_000,
        cpus: 2,
        devices: [{ kind: 'blk', socket, numQueues: 2, packed: ring === 'packed' }],
        script: `
set -e
${featureBitScript(2, RING_PACKED_BIT, 'packed')}
echo "RESULT serial $(cat /sys/block/vda/serial)"
echo "RESULT mq $(ls /sys/block/vda/mq | wc -l)"
echo "RESULT size $(cat /sys/block/vda/size)"
mkfs.ext4 -q -F /dev/vda 128M  # fio writes the second half of the disk
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt
head -c 3000000 /dev/urandom > /mnt/file1
head -c 12345 /dev/urandom > /mnt/file2
mkdir /mnt/dir
cp /mnt/file1 /mnt/dir/copy
sync
echo "RESULT md5 file1 $(md5sum < /mnt/file1 | cut -d' ' -f1)"
echo "RESULT md5 file2 $(md5sum < /mnt/file2 | cut -d' ' -f1)"
umount /mnt
fsck.ext4 -n -f /dev/vda > /tmp/fsck.log 2>&1 && echo "RESULT fsck clean" || { cat /tmp/fsck.log; echo "RESULT fsck dirty"; }
# Random writes with checksums from two jobs, one per vCPU (so both request queues are used), then verify.
fio --name=verify --filename=/dev/vda --offset=128m --size=64m --direct=1 --ioengine=psync --rw=randwrite --bs=4k \\
    --numjobs=2 --cpus_allowed=0,1 --cpus_allowed_policy=split --offset_increment=32m --size=32m \\
    --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting --output-format=terse > /tmp/fio.log 2>&1 \\
  && echo "RESULT fio ok" || { tail -20 /tmp/fio.log; echo "RESULT fio failed"; }
`,
      });
    } finally {
      await server.close();
    }
    expect(errors.filter((e) => !/disconnected/.test(e))).toEqual([]);
    expect(run.exitCode).toBe(0);
    expect(run.results).toContain(`packed ${ring === 'packed' ? 1 : 0}`);
    expect(run.results).toContain('serial vhost-ts-guest');
    expect(run.results).toContain('mq 2');
    expect(run.results).toContain(`size ${(256 << 20) / 512}`);
    expect(run.results).toContain('fsck clean');
    expect(run.results).toContain('fio ok');
    // Both queues carried requests.
    const perQueue = blk.queueStats();
    expect(perQueue).toHaveLength(2);
    for (const q of perQueue) expect(q.requests).toBeGreaterThan(100);
    // The host image has the guest's files, byte for byte (read with debugfs: no mount needed).
    for (const name of ['file1', 'file2']) {
      const want = run.results.find((r) => r.startsWith(`md5 ${name} `))!.split(' ')[2];
      const got = execFileSync('sh', ['-c', `debugfs -R 'cat /${name}' ${image} 2>/dev/null | md5sum | cut -d' ' -f1`]).toString().trim();
      expect(got, name).toBe(want);
    }
    console.log(`blk guest (${ring} ring) under ${run.accel}: boot ${run.bootMs} ms; queues ${perQueue.map((q) => q.requests).join('/')} requests`);
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);
});
