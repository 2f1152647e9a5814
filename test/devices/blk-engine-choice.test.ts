// engine 'auto': io_uring, except for an image in memory (tmpfs), where io_uring would hand every request to a
// kernel worker thread and a synchronous copy is faster (measured in src/devices/blk/engine.ts).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { autoEngine } from '../../src/devices/blk/engine.js';

const shm = mkdtempSync('/dev/shm/vhost-ts-engine-');
afterAll(() => rmSync(shm, { recursive: true, force: true }));

describe('autoEngine', () => {
  it('serves an image on tmpfs synchronously', () => {
    const image = join(shm, 'disk.img');
    writeFileSync(image, Buffer.alloc(4096));
    expect(autoEngine(image)).toBe('sync');
  });

  it('uses io_uring for anything else, and when the path cannot be looked at', () => {
    expect(autoEngine('/proc/self/stat')).toBe('uring'); // procfs
    // A device node: /dev is devtmpfs, whose statfs type is tmpfs's; a block device there is not in memory.
    expect(autoEngine('/dev/null')).toBe('uring');
    expect(autoEngine(join(shm, 'missing', 'disk.img'))).toBe('uring');
  });
});
