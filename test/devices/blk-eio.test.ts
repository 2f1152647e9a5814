// A disk that fails with EIO in one range (a FUSE file with a bad patch): the guest gets VIRTIO_BLK_S_IOERR for
// requests touching that range and only those; the queue is never marked broken and the disk keeps serving.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blkDevice } from '../../src/devices/blk/index.js';
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from '../../src/devices/blk/spec.js';
import { VhostUserFrontend } from '../../src/frontend/index.js';
import { eventfdRead } from '../../src/sys/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';

const PYTHON = '/usr/bin/python3';
const FAULTY = fileURLToPath(new URL('./fixtures/faulty-disk.py', import.meta.url));
const DISK = 1 << 20;
const BAD_OFFSET = 256 * 1024; // sectors 512..519 fail
const BAD_LENGTH = 4096;

function unavailable(): string | null {
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing';
  const probe = spawnSync(PYTHON, ['-c', 'import fusepy'], { encoding: 'utf8' });
  if (probe.status !== 0) return 'python3-fusepy is not installed (apt-get install python3-fusepy libfuse2)';
  return null;
}
const skipReason = unavailable();
if (skipReason !== null) console.warn(`SKIPPED: blk EIO tests: ${skipReason}`);

const isMounted = (path: string) => readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === path);

function header(type: number, sector: number): Uint8Array {
  const b = new Uint8Array(16);
  new DataView(b.buffer).setUint32(0, type, true);
  new DataView(b.buffer).setUint32(8, sector, true);
  return b;
}

describe.skipIf(skipReason !== null)('blk on a disk with a bad range', () => {
  let dir: string;
  let mnt: string;
  let fuse: ChildProcess;
  let fuseOutput = '';

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-eio-'));
    mnt = join(dir, 'mnt');
    mkdirSync(mnt);
    const backing = join(dir, 'backing.img');
    writeFileSync(backing, '');
    truncateSync(backing, DISK);
    fuse = spawn(PYTHON, [FAULTY, backing, String(BAD_OFFSET), String(BAD_LENGTH), mnt], { stdio: ['ignore', 'pipe', 'pipe'] });
    fuse.stdout!.on('data', (d) => (fuseOutput += d));
    fuse.stderr!.on('data', (d) => (fuseOutput += d));
    const exited = new Promise<never>((_, reject) => fuse.once('exit', (code) => reject(new Error(`faulty-disk.py exited ${code}: ${fuseOutput}`))));
    const deadline = Date.now() + 10_000;
    while (!isMounted(mnt)) {
      if (Date.now() > deadline) throw new Error(`faulty-disk.py did not mount within 10 s: ${fuseOutput}`);
      await Promise.race([exited, new Promise((r) => setTimeout(r, 20))]);
    }
  }, 20_000);

  afterAll(async () => {
    if (fuse && fuse.exitCode === null) {
      const gone = new Promise((r) => fuse.once('exit', r));
      fuse.kill('SIGTERM');
      const timer = setTimeout(() => fuse.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(timer);
    }
    if (mnt && isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
    rmSync(dir, { recursive: true, force: true });
  });

  for (const engine of ['sync', 'uring'] as const) {
    it(`answers IOERR for the bad range only and keeps serving (${engine} engine)`, async () => {
      const logs: string[] = [];
      const log: Logger = { info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m) };
      const dev = blkDevice({ path: join(mnt, 'disk'), engine });
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

