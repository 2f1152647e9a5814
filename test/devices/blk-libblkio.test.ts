// virtio-blk served to a real frontend nobody here wrote: QEMU's libblkio driver through qemu-io.
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { blkDevice, type BlkOptions } from '../../src/devices/blk/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { blkioImage, qemuIo, runQemuTool } from './qemu-tools.js';

const MIB = 1 << 20;
const DISK = 64 * MIB;
const quiet: Logger = { info() {}, warn() {}, error() {} };

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('blk device through libblkio (qemu-io)', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-blk-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  async function withDisk<T>(opts: Partial<BlkOptions>, f: (socket: string, image: string) => Promise<T>): Promise<T> {
    const image = join(dir, `disk-${Math.random().toString(36).slice(2)}.img`);
    writeFileSync(image, '');
    truncateSync(image, DISK);
    const socket = `${image}.sock`;
    const server = await VhostUserServer.start(blkDevice({ path: image, ...opts }), { socketPath: socket, log: quiet });
    try {
      return await f(socket, image);
    } finally {
      await server.close();
    }
  }

  for (const engine of ['sync', 'auto'] as const) {
    it(`writes patterns at many offsets and sizes and reads them back (${engine} engine)`, async () => {
      await withDisk({ engine }, async (socket, image) => {
        const cases: [number, number][] = [
          [0, 512],
          [512, 4096],
          [8192, 65536],
          [MIB - 512, 1536], // straddles a MiB boundary
          [3 * MIB, MIB],
          [DISK - 4096, 4096], // the last block
        ];
        const cmds = cases.flatMap(([off, len], i) => [`write -P 0x${(0x11 * (i + 1)).toString(16)} ${off} ${len}`]);
        cmds.push(...cases.map(([off, len], i) => `read -P 0x${(0x11 * (i + 1)).toString(16)} ${off} ${len}`));
        const run = await qemuIo(setup, socket, cmds);
        expect(run.stdout + run.stderr).not.toMatch(/fail|error|Pattern verification/i);
        expect(run.code).toBe(0);
        // The image on the host holds the same bytes.
        const bytes = readFileSync(image);
        for (const [[off, len], i] of cases.map((c, i) => [c, i] as const)) {
          expect(bytes.subarray(off, off + len).every((b) => b === 0x11 * (i + 1))).toBe(true);
        }
      });
    });
  }

  it('fails requests across the end of the disk cleanly and keeps serving', async () => {
    await withDisk({}, async (socket) => {
      const run = await qemuIo(setup, socket, [`write -P 0xaa ${DISK - 512} 1024`]);
      expect(run.stdout + run.stderr).toMatch(/write failed: Input\/output error/);
      const read = await qemuIo(setup, socket, [`read ${DISK - 512} 1024`]);
      expect(read.stdout + read.stderr).toMatch(/read failed: Input\/output error/);
      const ok = await qemuIo(setup, socket, [`write -P 0x5a ${DISK - 512} 512`, `read -P 0x5a ${DISK - 512} 512`]);
      expect(ok.code).toBe(0);
      expect(ok.stdout).not.toMatch(/fail/);
    });
  });

  it('discard and write-zeroes read back as zeroes', async () => {
    await withDisk({}, async (socket, image) => {
      const run = await qemuIo(setup, socket, [
        `write -P 0xcd 0 ${2 * MIB}`,
        'discard 0 64k',
        'read -P 0 0 64k',
        'write -z 128k 64k',
        'read -P 0 128k 64k',
        'write -z -u 512k 256k', // with unmap: a hole
        'read -P 0 512k 256k',
        'read -P 0xcd 64k 64k', // untouched between them
      ]);
      expect(run.stdout + run.stderr).not.toMatch(/fail|error|verification/i);
      const bytes = readFileSync(image);
      expect(bytes.subarray(0, 65536).every((b) => b === 0)).toBe(true);
      expect(bytes.subarray(65536, 131072).every((b) => b === 0xcd)).toBe(true);
    });
  });

  it('a read-only export refuses writes and serves reads', async () => {
    await withDisk({ readonly: true }, async (socket) => {
      // libblkio sees VIRTIO_BLK_F_RO and refuses to open the disk for writing...
      const rw = await qemuIo(setup, socket, ['write -P 1 0 4k']);
      expect(rw.stderr).toMatch(/Device is read-only/);
      // ...and serves it read-only. (That the device itself refuses writes is tested with our own frontend.)
      const ro = await runQemuTool(setup, 'qemu-io', ['-r', '--image-opts', `${blkioImage(socket)},read-only=on`, '-c', 'read -P 0 0 64k']);
      expect(ro.stdout).toMatch(/read 65536\/65536/);
    });
  });
});
