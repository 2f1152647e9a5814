// Data acknowledged by a FLUSH survives the backend being killed with SIGKILL the moment the status arrives.
// (A process kill keeps the page cache, so this proves ordering - the status is written after fdatasync returns -
// rather than surviving power loss; fdatasync is what covers the latter.)
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT } from '../../src/devices/blk/spec.js';
import { VhostUserFrontend } from '../../src/frontend/index.js';

const bin = new URL('../../bin/vhost-ts.mjs', import.meta.url).pathname;

function header(type: number, sector: number): Uint8Array {
  const b = new Uint8Array(16);
  new DataView(b.buffer).setUint32(0, type, true);
  new DataView(b.buffer).setUint32(8, sector, true);
  return b;
}

describe('blk durability', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-durable-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  for (const flags of [[], ['--direct'], ['--engine', 'sync']]) {
    it(`data written then flushed is in the image after SIGKILL (${flags.join(' ') || 'default'})`, async () => {
      const image = join(dir, `disk${flags.join('')}.img`);
      writeFileSync(image, '');
      truncateSync(image, 16 << 20);
      const socket = `${image}.sock`;
      const backend = spawn(process.execPath, [bin, 'blk', '--socket-path', socket, '--image', image, ...flags], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      let stderr = '';
      backend.stderr.on('data', (d) => (stderr += d));
      const exited = once(backend, 'exit');
      let fe: VhostUserFrontend | undefined;
      try {
        fe = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 20_000 });
        const [q] = await fe.start({ queues: [{ index: 0, size: 128 }] });
        const pattern = new Uint8Array(65536).map((_, i) => (i * 7 + 3) & 0xff);
        for (let k = 0; k < 8; k++) q.add({ readable: [header(VIRTIO_BLK_T_OUT, 256 + k * 128), pattern], writable: [1] });
        q.kick();
        const writes = await q.waitForUsed(8);
        for (const w of writes) expect(q.written(w.chain!, 1)[0]).toBe(VIRTIO_BLK_S_OK);
        const flush = q.add({ readable: [header(VIRTIO_BLK_T_FLUSH, 0)], writable: [1] });
        q.kick();
        await q.waitForUsed(1);
        expect(q.written(flush, 1)[0]).toBe(VIRTIO_BLK_S_OK);
        backend.kill('SIGKILL');
        await exited;
        const bytes = readFileSync(image);
        for (let k = 0; k < 8; k++) {
          const at = (256 + k * 128) * 512;
          expect(Buffer.compare(bytes.subarray(at, at + 65536), pattern), `block ${k}`).toBe(0);
        }
      } catch (e) {
        throw new Error(`${(e as Error).message}\nbackend stderr:\n${stderr}`);
      } finally {
        fe?.close();
        if (backend.exitCode === null && backend.signalCode === null) {
          backend.kill('SIGKILL');
          await exited;
        }
      }
    });
  }
});
