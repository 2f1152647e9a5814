// A FLUSH is acknowledged only once the disk's own flush returned. The disk is a FUSE file whose fsync takes
// 300 ms and logs when it started and ended (CLOCK_MONOTONIC, the clock process.hrtime reads), so the test sees
// every flush the backend makes and when: a backend that skipped the fdatasync, or completed the FLUSH before it
// returned, fails here. (Killing the backend after the status, as an earlier version of this test did, cannot
// tell: the page cache survives a process kill.)
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blkDevice } from '../../src/devices/blk/index.js';
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT } from '../../src/devices/blk/spec.js';
import { VhostUserFrontend } from '../../src/frontend/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';
import { fuseUnavailable, mountFuseDisk, type FuseDisk } from '../helpers/fuse-disk.js';

const FSYNC_DELAY_MS = 300;

const skipReason = fuseUnavailable();
if (skipReason !== null) console.warn(`SKIPPED: blk durability tests: ${skipReason}`);

function header(type: number, sector: number): Uint8Array {
  const b = new Uint8Array(16);
  new DataView(b.buffer).setUint32(0, type, true);
  new DataView(b.buffer).setUint32(8, sector, true);
  return b;
}

describe.skipIf(skipReason !== null)('blk durability', () => {
  let dir: string;
  let fsyncLog: string;
  let disk: FuseDisk;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-durable-'));
    fsyncLog = join(dir, 'fsync.log');
    disk = await mountFuseDisk(dir, { size: 4 << 20, fsyncLog: { path: fsyncLog, delayMs: FSYNC_DELAY_MS } });
  }, 20_000);

  afterAll(async () => {
    await disk?.unmount();
    rmSync(dir, { recursive: true, force: true });
  });

  const flushes = (): { start: bigint; end: bigint }[] =>
    (existsSync(fsyncLog) ? readFileSync(fsyncLog, 'utf8') : '')
      .trim()
      .split('\n')
      .filter((l) => l.startsWith('fsync '))
      .map((l) => {
        const [, start, end] = l.split(' ');
        return { start: BigInt(start), end: BigInt(end) };
      });

  /**
   * Three rounds of four writes and a FLUSH; what went wrong, or null. Every FLUSH must have caused flushes of the
   * disk that started after it was sent and all ended before its status came.
   */
  async function flushRounds(opts: { engine: 'uring' | 'sync'; direct?: boolean }, name: string): Promise<string | null> {
    const dev = blkDevice({ path: disk.path, ...opts });
    const socket = join(dir, `${name.replace(/\W+/g, '-')}.sock`);
    const server = await VhostUserServer.start(dev, { socketPath: socket, log: { info() {}, warn() {}, error() {} } });
    const fe = await VhostUserFrontend.connect(socket);
    try {
      const [q] = await fe.start({ queues: [{ index: 0, size: 64 }] });
      for (let round = 0; round < 3; round++) {
        for (let k = 0; k < 4; k++) q.add({ readable: [header(VIRTIO_BLK_T_OUT, 64 * k), new Uint8Array(4096).fill(round + 1)], writable: [1] });
        q.kick();
        for (const w of await q.waitForUsed(4, 10_000)) expect(q.written(w.chain!, 1)[0]).toBe(VIRTIO_BLK_S_OK);
        const before = flushes().length;
        const sent = process.hrtime.bigint();
        const flush = q.add({ readable: [header(VIRTIO_BLK_T_FLUSH, 0)], writable: [1] });
        q.kick();
        await q.waitForUsed(1, 10_000);
        const acked = process.hrtime.bigint();
        expect(q.written(flush, 1)[0]).toBe(VIRTIO_BLK_S_OK);
        // Exactly the flushes this FLUSH caused: started after it was sent, and all over before its status.
        const caused = flushes().slice(before);
        if (caused.length === 0) return `round ${round}: the disk saw no flush for the FLUSH`;
        for (const f of caused) {
          if (f.start <= sent) return `round ${round}: a flush began before the FLUSH was sent`;
          if (f.end >= acked) return `round ${round}: FLUSH acknowledged ${Number(f.end - acked) / 1e6} ms before the disk's flush returned`;
        }
        if (Number(acked - sent) / 1e6 < FSYNC_DELAY_MS) return `round ${round}: FLUSH acknowledged after ${Number(acked - sent) / 1e6} ms, less than the disk's flush takes`;
      }
      return null;
    } finally {
      fe.close();
      await server.close();
    }
  }

  for (const opts of [{ engine: 'uring' as const }, { engine: 'uring' as const, direct: true }, { engine: 'sync' as const }]) {
    const name = `${opts.engine}${opts.direct ? ', O_DIRECT' : ''}`;
    it(`completes a FLUSH after the disk's flush returned, never before (${name})`, async () => {
      expect(await flushRounds(opts, name)).toBeNull();
    }, 60_000);
  }

  // The test can fail: a backend that acknowledges FLUSH without syncing (fault injected) is caught, on both engines.
  for (const engine of ['uring', 'sync'] as const) {
    it(`catches a backend that skips the sync (${engine}, VHOST_TS_FAULTS=skip-flush)`, async () => {
      process.env.VHOST_TS_FAULTS = 'skip-flush';
      try {
        expect(await flushRounds({ engine }, `skip-${engine}`)).toBe('round 0: the disk saw no flush for the FLUSH');
      } finally {
        delete process.env.VHOST_TS_FAULTS;
      }
    }, 60_000);
  }
});
