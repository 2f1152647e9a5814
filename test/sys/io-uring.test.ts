import { closeSync, fstatSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import koffi from 'koffi';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { IoUring, IovecArray, addressOf, fdCount, watchReadable } from '../../src/sys/index.js';

const { EBADF } = koffi.os.errno;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
const FIVE_GIB = 5 * 1024 ** 3;

interface Completion {
  userData: number;
  result: number;
}

/** Submits what is prepared and waits for `count` completions; tests want them all, in a plain list. */
function complete(ring: IoUring, count: number): Completion[] {
  const done: Completion[] = [];
  while (done.length < count) {
    ring.submitAndWait(1);
    ring.reap((userData, result) => done.push({ userData, result }));
  }
  return done;
}

function pattern(length: number, seed: number): Uint8Array {
  return new Uint8Array(length).map((_, i) => (i * 7 + seed) & 0xff);
}

describe.skipIf(!IoUring.available())('IoUring', () => {
  let dir: string;
  let fd: number;
  let ring: IoUring;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-uring-'));
    fd = openSync(join(dir, 'disk.img'), 'w+');
    ring = IoUring.create(8);
  });

  afterEach(() => {
    ring.close();
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  });

  it('writes several iovecs past 4 GiB and reads them back scattered', () => {
    const parts = [pattern(4096, 1), pattern(512, 2), pattern(1536, 3)];
    const out = new IovecArray(3);
    parts.forEach((part, i) => out.set(i, addressOf(part), part.length));
    // Both u64 halves of off and user_data must survive the trip.
    const writeTag = 2 ** 52 + 3;
    expect(ring.prepWritev(fd, out.address, 3, FIVE_GIB, writeTag)).toBe(true);
    expect(complete(ring, 1)).toEqual([{ userData: writeTag, result: 6144 }]);
    expect(fstatSync(fd).size).toBe(FIVE_GIB + 6144);

    const target = new Uint8Array(6144);
    const into = new IovecArray(2);
    into.set(0, addressOf(target.subarray(1000)), 5144);
    into.set(1, addressOf(target), 1000);
    expect(ring.prepReadv(fd, into.address, 2, FIVE_GIB, 7)).toBe(true);
    expect(complete(ring, 1)).toEqual([{ userData: 7, result: 6144 }]);
    const written = new Uint8Array(6144);
    written.set(parts[0], 0);
    written.set(parts[1], 4096);
    written.set(parts[2], 4608);
    expect(Buffer.from(target.subarray(1000)).equals(written.subarray(0, 5144))).toBe(true);
    expect(Buffer.from(target.subarray(0, 1000)).equals(written.subarray(5144))).toBe(true);

    const four = new Uint8Array(4);
    expect(ring.prepRead(fd, addressOf(four), 4, FIVE_GIB + 4096, 8)).toBe(true);
    expect(ring.prepWrite(fd, addressOf(parts[2]), 4, FIVE_GIB - 4, 9)).toBe(true);
    const done = complete(ring, 2).sort((a, b) => a.userData - b.userData);
    expect(done).toEqual([
      { userData: 8, result: 4 },
      { userData: 9, result: 4 },
    ]);
    expect([...four]).toEqual([...parts[1].subarray(0, 4)]);
  });

  it('fsync and fdatasync complete with 0', () => {
    const data = pattern(4096, 5);
    ring.prepWrite(fd, addressOf(data), data.length, 0, 1);
    complete(ring, 1);
    expect(ring.prepFsync(fd, true, 2)).toBe(true);
    expect(complete(ring, 1)).toEqual([{ userData: 2, result: 0 }]);
    expect(ring.prepFsync(fd, false, 3)).toBe(true);
    expect(complete(ring, 1)).toEqual([{ userData: 3, result: 0 }]);
  });

  it('punches holes and zeroes ranges without changing the size', () => {
    const data = pattern(3 * 4096, 9);
    ring.prepWrite(fd, addressOf(data), data.length, FIVE_GIB, 1);
    expect(complete(ring, 1)[0].result).toBe(data.length);

    ring.prepFallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FIVE_GIB, 4096, 2);
    ring.prepFallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, FIVE_GIB + 8192, 4096, 3);
    expect(complete(ring, 2).sort((a, b) => a.userData - b.userData)).toEqual([
      { userData: 2, result: 0 },
      { userData: 3, result: 0 },
    ]);
    expect(fstatSync(fd).size).toBe(FIVE_GIB + data.length);

    const back = new Uint8Array(data.length).fill(0xee);
    ring.prepRead(fd, addressOf(back), back.length, FIVE_GIB, 4);
    expect(complete(ring, 1)[0].result).toBe(back.length);
    expect(back.subarray(0, 4096).every((b) => b === 0)).toBe(true);
    expect(Buffer.from(back.subarray(4096, 8192)).equals(data.subarray(4096, 8192))).toBe(true);
    expect(back.subarray(8192).every((b) => b === 0)).toBe(true);
  });

  it('reports failures as -errno in result', () => {
    const writeOnly = openSync(join(dir, 'disk.img'), 'w');
    try {
      const buf = new Uint8Array(16);
      ring.prepRead(writeOnly, addressOf(buf), buf.length, 0, 1);
      ring.prepWrite(-1, addressOf(buf), buf.length, 0, 2);
      const done = complete(ring, 2).sort((a, b) => a.userData - b.userData);
      expect(done).toEqual([
        { userData: 1, result: -EBADF },
        { userData: 2, result: -EBADF },
      ]);
    } finally {
      closeSync(writeOnly);
    }
  });

  it('signals completions on its eventfd', async () => {
    const data = pattern(512, 4);
    let reaped: Completion[] = [];
    const woken = new Promise<void>((resolve) => {
      const watch = watchReadable(ring.eventFd, () => {
        ring.reap((userData, result) => reaped.push({ userData, result }));
        if (reaped.length === 0) return;
        watch.close();
        resolve();
      });
    });
    ring.prepWrite(fd, addressOf(data), data.length, 0, 42);
    expect(ring.submit()).toBe(1);
    await woken;
    expect(reaped).toEqual([{ userData: 42, result: 512 }]);
    // Drained by reap: nothing more to read.
    reaped = [];
    expect(ring.reap((userData, result) => reaped.push({ userData, result }))).toBe(0);
  });

  it('refuses to prepare when the SQ is full, or when unreaped completions would fill the CQ', () => {
    const buf = new Uint8Array(8);
    expect(ring.entries).toBe(8);
    expect(ring.cqEntries).toBe(16);
    for (let i = 0; i < 8; i++) expect(ring.prepWrite(fd, addressOf(buf), 8, i * 8, i)).toBe(true);
    expect(ring.sqSpace).toBe(0);
    expect(ring.prepWrite(fd, addressOf(buf), 8, 64, 8)).toBe(false);
    expect(ring.unsubmitted).toBe(8);
    expect(ring.submit()).toBe(8);
    expect(ring.sqSpace).toBe(8);
    for (let i = 8; i < 16; i++) expect(ring.prepWrite(fd, addressOf(buf), 8, i * 8, i)).toBe(true);
    expect(ring.submit()).toBe(8);
    expect(ring.pending).toBe(16);
    expect(ring.sqSpace).toBe(0);
    expect(ring.prepWrite(fd, addressOf(buf), 8, 0, 99)).toBe(false);
    expect(complete(ring, 16)).toHaveLength(16);
    expect(ring.pending).toBe(0);
    expect(ring.sqSpace).toBe(8);
  });

  it('pushes 10k operations through a 64-entry ring', () => {
    const big = IoUring.create(64);
    try {
      const slots = 256;
      const buffer = new Uint8Array(slots * 512);
      const base = addressOf(buffer);
      const seen = new Uint8Array(10_000);
      let reaped = 0;
      let bad = 0;
      const onCompletion = (userData: number, result: number): void => {
        seen[userData]++;
        reaped++;
        if (result !== 512) bad++;
      };
      for (let op = 0; op < 10_000; ) {
        const slot = op % slots;
        // Writes fill the file first; later ops read back what earlier ones wrote.
        const ok =
          op < slots
            ? big.prepWrite(fd, base + slot * 512, 512, slot * 512, op)
            : big.prepRead(fd, base + slot * 512, 512, slot * 512, op);
        if (ok) {
          op++;
          // The first writes must land before reads of the same blocks are issued.
          if (op === slots) while (big.pending > 0) (big.submitAndWait(1), big.reap(onCompletion));
          continue;
        }
        big.submit();
        big.reap(onCompletion);
        if (big.sqSpace === 0) big.submitAndWait(1);
      }
      while (big.pending > 0) {
        big.submitAndWait(1);
        big.reap(onCompletion);
      }
      expect(reaped).toBe(10_000);
      expect(bad).toBe(0);
      expect(seen.every((n) => n === 1)).toBe(true);
    } finally {
      big.close();
    }
  });

  it('close releases every fd and can be repeated', () => {
    const before = fdCount();
    const extra = IoUring.create(32);
    expect(fdCount()).toBe(before + 2);
    extra.close();
    extra.close();
    expect(fdCount()).toBe(before);
    expect(extra.prepFsync(fd, false, 1)).toBe(false);
    expect(extra.reap(() => {})).toBe(0);
    expect(() => extra.submit()).toThrow(/EBADF/);
  });
});
