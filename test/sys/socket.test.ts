import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  SysError,
  close,
  eventfdCreate,
  eventfdRead,
  eventfdWrite,
  fdCount,
  isListeningSocket,
  receiveMessage,
  sendMessage,
  unixAccept,
  unixConnect,
  unixListen,
  unixSocketPair,
} from '../../src/sys/index.js';

const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-sys-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function expectSysError(fn: () => unknown, code: string): SysError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(SysError);
    expect((error as SysError).code).toBe(code);
    return error as SysError;
  }
  throw new Error(`expected ${code}`);
}

describe('unix sockets', () => {
  it('passes an eventfd across a socketpair', () => {
    const [a, b] = unixSocketPair();
    const efd = eventfdCreate();
    const message = new TextEncoder().encode('hello');
    expect(sendMessage(a, message, message.length, [efd])).toBe(5);

    const buf = new Uint8Array(64);
    const fds: number[] = [];
    expect(receiveMessage(b, buf, 10, 54, fds)).toBe(5);
    expect(new TextDecoder().decode(buf.subarray(10, 15))).toBe('hello');
    expect(fds).toHaveLength(1);
    expect(fds[0]).not.toBe(efd);

    eventfdWrite(efd, 5);
    expect(eventfdRead(fds[0])).toBe(5);
    expect(receiveMessage(b, buf, 0, 64, fds)).toBe(-1);
    for (const fd of [a, b, efd, fds[0]]) close(fd);
  });

  it('returns 0 at EOF', () => {
    const [a, b] = unixSocketPair();
    close(a);
    const fds: number[] = [];
    expect(receiveMessage(b, new Uint8Array(8), 0, 8, fds)).toBe(0);
    expect(fds).toEqual([]);
    close(b);
  });

  it('closes every received fd and throws ECTRUNC when more than 32 arrive', () => {
    const [a, b] = unixSocketPair();
    const efds = Array.from({ length: 40 }, () => eventfdCreate());
    expect(sendMessage(a, new Uint8Array([1]), 1, efds)).toBe(1);
    for (const fd of efds) close(fd);
    const before = fdCount();
    const fds: number[] = [];
    expectSysError(() => receiveMessage(b, new Uint8Array(8), 0, 8, fds), 'ECTRUNC');
    expect(fds).toEqual([]);
    expect(fdCount()).toBe(before);
    close(a);
    close(b);
  });

  it('listens, connects and accepts on a path', () => {
    const path = join(dir, 'listen.sock');
    const listener = unixListen(path);
    expect(isListeningSocket(listener)).toBe(true);
    expect(unixAccept(listener)).toBe(-1);

    const client = unixConnect(path);
    const server = unixAccept(listener);
    expect(server).toBeGreaterThanOrEqual(0);
    expect(isListeningSocket(server)).toBe(false);

    expect(sendMessage(client, new Uint8Array([7, 8, 9]), 3, [])).toBe(3);
    const buf = new Uint8Array(3);
    expect(receiveMessage(server, buf, 0, 3, [])).toBe(3);
    expect([...buf]).toEqual([7, 8, 9]);
    for (const fd of [client, server, listener]) close(fd);
  });

  it('reports ENOENT for a missing path and ECONNREFUSED for a closed listener', () => {
    const missing = join(dir, 'missing.sock');
    const error = expectSysError(() => unixConnect(missing), 'ENOENT');
    expect(error.syscall).toBe('connect');
    expect(error.message).toBe(`connect(${missing}): ENOENT (No such file or directory)`);

    const path = join(dir, 'closed.sock');
    close(unixListen(path));
    expectSysError(() => unixConnect(path), 'ECONNREFUSED');
  });

  it('throws ENOTSOCK when asked whether an eventfd listens', () => {
    const efd = eventfdCreate();
    expectSysError(() => isListeningSocket(efd), 'ENOTSOCK');
    close(efd);
  });
});
