// A disk that fails with EIO in one range (a FUSE file with a bad patch): the guest gets VIRTIO_BLK_S_IOERR for
// requests touching that range and only those; the queue is never marked broken and the disk keeps serving.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blkDevice } from '../../src/devices/blk/index.js';
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from '../../src/devices/blk/spec.js';
import { VhostUserFrontend } from '../../src/frontend/index.js';
import { eventfdRead } from '../../src/sys/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { fuseUnavailable, mountFuseDisk, type FuseDisk } from '../helpers/fuse-disk.js';

const DISK = 1 << 20;
const BAD_OFFSET = 256 * 1024; // sectors 512..519 fail
const BAD_LENGTH = 4096;

const skipReason = fuseUnavailable();
if (skipReason !== null) console.warn(`SKIPPED: blk EIO tests: ${skipReason}`);

function header(type: number, sector: number): Uint8Array {
  const b = new Uint8Array(16);
  new DataView(b.buffer).setUint32(0, type, true);
  new DataView(b.buffer).setUint32(8, sector, true);
  return b;
}

describe.skipIf(skipReason !== null)('blk on a disk with a bad range', () => {
  let dir: string;
  let disk: FuseDisk;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-eio-'));
    disk = await mountFuseDisk(dir, { size: DISK, bad: { offset: BAD_OFFSET, length: BAD_LENGTH } });
  }, 20_000);

  afterAll(async () => {
    await disk?.unmount();
    rmSync(dir, { recursive: true, force: true });
  });

  for (const engine of ['sync', 'uring'] as const) {
    it(`answers IOERR for the bad range only and keeps serving (${engine} engine)`, async () => {
      const logs: string[] = [];
      const log: Logger = { info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m) };
      const dev = blkDevice({ path: disk.path, engine });
      const socket = join(dir, `${engine}.sock`);
      const server = await VhostUserServer.start(dev, { socketPath: socket, log });
      const fe = await VhostUserFrontend.connect(socket);
      try {
        const [q] = await fe.start({ queues: [{ index: 0, size: 64 }] });
        const request = async (type: number, sector: number, data: Uint8Array | number): Promise<number> => {
          const readable = [header(type, sector), ...(data instanceof Uint8Array ? [data] : [])];
          const writable = [...(typeof data === 'number' && data > 0 ? [data] : []), 1];
          const chain = q.add({ readable, writable });
          q.kick();
          const [used] = await q.waitForUsed(1, 10_000);
          const all = q.written(chain, writable.reduce((a, b) => a + b, 0));
          expect(used.len).toBe(all.length);
          return all[all.length - 1];
        };
        const bad = BAD_OFFSET / 512;
        const pattern = new Uint8Array(4096).fill(0x6b);
        expect(await request(VIRTIO_BLK_T_OUT, bad - 8, pattern), 'write just before the bad range').toBe(VIRTIO_BLK_S_OK);
        expect(await request(VIRTIO_BLK_T_OUT, bad, pattern), 'write into it').toBe(VIRTIO_BLK_S_IOERR);
        expect(await request(VIRTIO_BLK_T_IN, bad + 4, 4096), 'read across its end').toBe(VIRTIO_BLK_S_IOERR);
        expect(await request(VIRTIO_BLK_T_IN, bad - 8, 4096), 'read just before').toBe(VIRTIO_BLK_S_OK);
        expect(await request(VIRTIO_BLK_T_IN, bad + 8, 4096), 'read just after').toBe(VIRTIO_BLK_S_OK);
        for (let i = 0; i < 20; i++) expect(await request(i % 2 ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT, i % 2 ? bad : 8 * i, i % 2 ? 512 : pattern)).toBe(i % 2 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
        expect(await request(VIRTIO_BLK_T_FLUSH, 0, 0)).toBe(VIRTIO_BLK_S_OK);
        expect(eventfdRead(q.errFd), 'the queue was never marked broken').toBe(0);
        expect(logs.filter((l) => /queue stopped|broken/.test(l))).toEqual([]);
      } finally {
        fe.close();
        await server.close();
      }
    }, 60_000);
  }
});

