import { mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { IovecArray, addressOf, close, fdatasync, fsync, pread, preadv, pwrite, pwritev } from '../../src/sys/index.js';

describe('positional io', () => {
  it('pwritev/preadv scatter and gather through addresses', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-io-'));
    const path = join(dir, 'disk.img');
    const fd = openSync(path, 'w+');
    try {
      const source = new Uint8Array(4096).map((_, i) => i & 0xff);
      const iov = new IovecArray(4);
      iov.set(0, addressOf(source), 100);
      iov.set(1, addressOf(source.subarray(1000)), 50);
      expect(pwritev(fd, iov, 2, 512)).toBe(150);
      fdatasync(fd);

      const onDisk = readFileSync(path);
      expect(onDisk.length).toBe(662);
      expect([...onDisk.subarray(512, 612)]).toEqual([...source.subarray(0, 100)]);
      expect([...onDisk.subarray(612, 662)]).toEqual([...source.subarray(1000, 1050)]);

      const target = new Uint8Array(300);
      iov.set(0, addressOf(target.subarray(200)), 50);
      iov.set(1, addressOf(target), 100);
      expect(preadv(fd, iov, 2, 600)).toBe(62);
      expect([...target.subarray(200, 212)]).toEqual([...source.subarray(88, 100)]);
      expect([...target.subarray(212, 250)]).toEqual([...source.subarray(1000, 1038)]);
      expect([...target.subarray(0, 12)]).toEqual([...source.subarray(1038, 1050)]);

      expect(pwrite(fd, addressOf(source), 4, 0)).toBe(4);
      fsync(fd);
      const four = new Uint8Array(4);
      expect(pread(fd, addressOf(four), 4, 0)).toBe(4);
      expect([...four]).toEqual([0, 1, 2, 3]);
      expect(() => preadv(fd, iov, 5, 0)).toThrow(RangeError);
    } finally {
      close(fd);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
