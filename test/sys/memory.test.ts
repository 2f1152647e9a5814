import { describe, expect, it } from 'vitest';
import { addressOf, close, memfdCreate, mmapShared, munmap, pageSize, viewOf } from '../../src/sys/index.js';

describe('memory', () => {
  it('shows the same memfd through two mappings', () => {
    const length = 4 * pageSize;
    const fd = memfdCreate('sys-test', length);
    const first = mmapShared(fd, length, 0);
    const second = mmapShared(fd, 2 * pageSize, 2 * pageSize);
    expect(typeof first).toBe('number');
    expect(first).not.toBe(second);

    const a = new Uint32Array(viewOf(first, length));
    const b = new Uint32Array(viewOf(second, 2 * pageSize));
    a[(2 * pageSize) / 4 + 1] = 0xdeadbeef;
    expect(b[1]).toBe(0xdeadbeef);
    expect(addressOf(a)).toBe(first);
    expect(addressOf(a.subarray(3))).toBe(first + 12);

    munmap(first, length);
    munmap(second, 2 * pageSize);
    close(fd);
  });

  it('refuses views of 2^32 bytes or more', () => {
    expect(() => viewOf(0x10000, 2 ** 32)).toThrow(RangeError);
  });

  it('throws SysError when mmap fails', () => {
    expect(() => mmapShared(-1, pageSize, 0)).toThrow(/^mmap: EBADF/);
  });
});
