import { describe, expect, it } from 'vitest';
import {
  close,
  dup,
  eventfdCreate,
  fdCount,
  memfdCreate,
  read,
  unixSocketPair,
  write,
} from '../../src/sys/index.js';

describe('fd', () => {
  it('reads and writes, -1 on EAGAIN', () => {
    const [a, b] = unixSocketPair();
    const buf = new Uint8Array(16);
    expect(read(b, buf)).toBe(-1);
    expect(write(a, new Uint8Array([1, 2, 3, 4]), 3)).toBe(3);
    expect(read(b, buf.subarray(5))).toBe(3);
    expect([...buf.subarray(5, 8)]).toEqual([1, 2, 3]);
    expect(() => read(b, buf, 17)).toThrow(RangeError);
    close(a);
    close(b);
  });

  it('dup gives a new descriptor for the same file', () => {
    const [a, b] = unixSocketPair();
    const copy = dup(a);
    expect(copy).not.toBe(a);
    write(copy, new Uint8Array([42]));
    const buf = new Uint8Array(1);
    expect(read(b, buf)).toBe(1);
    expect(buf[0]).toBe(42);
    for (const fd of [a, b, copy]) close(fd);
  });

  it('leaves the fd count unchanged after open/close cycles', () => {
    const before = fdCount();
    for (let i = 0; i < 100; i++) {
      const [a, b] = unixSocketPair();
      const e = eventfdCreate();
      const m = memfdCreate('cycle', 4096);
      for (const fd of [a, b, e, m]) close(fd);
    }
    expect(fdCount()).toBe(before);
  });

  it('throws EBADF when closing a closed fd', () => {
    const fd = eventfdCreate();
    close(fd);
    expect(() => close(fd)).toThrow(/^close: EBADF \(Bad file descriptor\)$/);
  });
});
