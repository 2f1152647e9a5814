// Live migration between two QEMUs on this host, with a vhost-ts blk disk on each side (two backends, one image):
// the guest checksums a 48 MiB pattern on its disk in a loop while it migrates (QMP migrate to `-incoming
// unix:`), and every checksum, before, during and after, is the pattern's. The backend's writes into guest
// memory (every read request's data) reach the destination only through the dirty log.
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qmp } from '../../harness/qmp.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest, type GuestRun } from '../../harness/vm.js';
import { blkDevice } from '../../src/devices/blk/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';

const PATTERN = 48 << 20;
const ROUNDS = 16;

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('live migration', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-migrate-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('a guest checksumming its vhost-ts disk migrates to a second QEMU and every checksum matches', async () => {
    const image = join(dir, 'disk.img');
    const pattern = randomBytes(PATTERN);
    writeFileSync(image, pattern);
    truncateSync(image, 64 << 20);
    const want = createHash('md5').update(pattern).digest('hex');
    const logs: string[] = [];
    const log = { info() {}, warn: (m: string) => logs.push(m), error: (m: string) => logs.push(m) };
    const [srcSock, dstSock] = ['src.sock', 'dst.sock'].map((n) => join(dir, n));
    const [srcQmp, dstQmp, incoming] = ['src.qmp', 'dst.qmp', 'migrate.sock'].map((n) => join(dir, n));
    const servers = [
      await VhostUserServer.start(blkDevice({ path: image }), { socketPath: srcSock, log }),
      await VhostUserServer.start(blkDevice({ path: image }), { socketPath: dstSock, log }),
    ];
    // Before the migration, two rounds read the disk itself. Then, when QEMU's slowed first pass over RAM is past
    // its middle (the host says GO through the disk's last sector), the guest reads the pattern into fresh
    // page-cache pages: in the pages QEMU had already sent, the backend's writes are the only change, and only the
    // dirty log makes QEMU send them again. The later rounds checksum that cache, on the destination too.
    const last = (64 << 20) / 512 - 1;
    const script = `
for i in 0 1; do
  echo "RESULT sum $i $(dd if=/dev/vda bs=1M count=${PATTERN >> 20} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
done
echo MIGRATE-NOW
n=0; until dd if=/dev/vda bs=512 skip=${last} count=1 iflag=direct 2>/dev/null | grep -q GO || [ $n -gt 600 ]; do n=$((n+1)); sleep 0.2; done
sync; echo 3 > /proc/sys/vm/drop_caches
echo "RESULT sum 2 $(dd if=/dev/vda bs=1M count=${PATTERN >> 20} 2>/dev/null | md5sum | cut -d' ' -f1)"
echo READ-DONE
i=3
while [ $i -lt ${ROUNDS} ]; do
  echo "RESULT sum $i $(dd if=/dev/vda bs=1M count=${PATTERN >> 20} 2>/dev/null | md5sum | cut -d' ' -f1)"
  i=$((i+1))
  sleep 0.5
done
`;
    // init_on_alloc=0: Debian's kernel zeroes every page it allocates, a CPU write that would make QEMU resend
    // the page-cache pages after all, dirty log or not.
    const common = { setup, timeoutMs: 300_000, memoryMiB: 512, cpus: 1, script, append: ['init_on_alloc=0'] };
    let migration: Promise<string> | null = null;
    const abort = new AbortController();
    let readDone: () => void = () => {};
    const guestRead = new Promise<void>((r) => (readDone = r));
    const status = async () => ((await qmp(srcQmp, [{ execute: 'query-migrate' }])) as { status?: string; 'error-desc'?: string; ram?: { remaining?: number; total?: number } }[])[0];
    const migrate = async (): Promise<string> => {
      // Slow (a first pass of about 16 s), and unable to converge until the guest has read: a tiny downtime limit.
      await qmp(srcQmp, [
        { execute: 'migrate-set-parameters', arguments: { 'max-bandwidth': 32 << 20, 'downtime-limit': 1 } },
        { execute: 'migrate', arguments: { uri: `unix:${incoming}` } },
      ]);
      for (const deadline = Date.now() + 120_000; ; ) {
        const info = await status();
        if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}`);
        if (info.status === 'completed') throw new Error('the migration ended before the guest read: nothing left for the dirty log to prove');
        // Past the middle of the first pass (zero pages go as markers, so count what is left, not what was sent).
        if (info.ram?.remaining !== undefined && info.ram.total !== undefined && info.ram.remaining < 0.4 * info.ram.total) break;
        if (Date.now() > deadline) throw new Error(`the first pass did not end within 120 s: ${JSON.stringify(info)}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      const fd = openSync(image, 'r+');
      writeSync(fd, Buffer.from('GO'), 0, 2, last * 512);
      closeSync(fd);
      await guestRead;
      if ((await status()).status === 'completed') throw new Error('the migration ended before the guest read');
      await qmp(srcQmp, [{ execute: 'migrate-set-parameters', arguments: { 'max-bandwidth': 8 << 30, 'downtime-limit': 5000 } }]);
      for (const deadline = Date.now() + 120_000; Date.now() < deadline; ) {
        const info = await status();
        if (info.status === 'completed') {
          await qmp(srcQmp, [{ execute: 'quit' }]).catch(() => {}); // the source is done; it exits
          return 'completed';
        }
        if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error('migration did not complete within 120 s');
    };
    const sourceSums: string[][] = [];
    let source: GuestRun | null = null;
    let sourceError: Error | null = null;
    let destination: GuestRun;
    try {
      const dst = runGuest({
        ...common,
        signal: abort.signal,
        devices: [{ kind: 'blk', socket: dstSock, numQueues: 1 }],
        extra: ['-qmp', `unix:${dstQmp},server=on,wait=off`, '-incoming', `unix:${incoming}`],
        onConsoleLine: (line) => {
          if (line === 'READ-DONE') readDone(); // too late (it migrated before the read), but do not hang
        },
      });
      const src = runGuest({
        ...common,
        signal: abort.signal,
        devices: [{ kind: 'blk', socket: srcSock, numQueues: 1 }],
        extra: ['-qmp', `unix:${srcQmp},server=on,wait=off`],
        onConsoleLine: (line) => {
          if (line.startsWith('RESULT sum ')) sourceSums.push(line.slice('RESULT '.length).split(' '));
          if (line === 'READ-DONE') readDone();
          if (line === 'MIGRATE-NOW' && !migration) {
            migration = migrate();
            migration.catch((e) => abort.abort(e));
          }
        },
      });
      // The source ends by quitting after the migration: not an exit the guest reported.
      source = await src.catch((e: Error) => {
        sourceError = e;
        return null;
      });
      expect(await migration).toBe('completed');
      destination = await dst;
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- backends ---\n${logs.join('\n')}`);
    } finally {
      abort.abort();
      for (const s of servers) await s.close();
    }
    expect(source, 'the source guest should not have finished before it migrated').toBeNull();
    expect(String(sourceError)).toMatch(/QEMU exited/);
    expect(destination.exitCode).toBe(0);
    for (const [, round, sum] of sourceSums) expect(sum, `round ${round} on the source`).toBe(want);
    const sums = destination.results.filter((r) => r.startsWith('sum ')).map((r) => r.split(' '));
    // The destination continues the guest's console: its lines are the rounds after the switch-over.
    expect(sums.length).toBeGreaterThan(0);
    expect(Number(sums[sums.length - 1][1])).toBe(ROUNDS - 1);
    for (const [, round, sum] of sums) expect(sum, `round ${round} on the destination`).toBe(want);
    expect(sourceSums.length + sums.length).toBeGreaterThanOrEqual(ROUNDS); // a round may print on both sides
    console.log(`migration under ${destination.accel}: ${sourceSums.length} rounds on the source, ${sums.length} on the destination, all ${want}`);
    expect(liveQemuPids()).toEqual([]);
  }, 420_000);
});
