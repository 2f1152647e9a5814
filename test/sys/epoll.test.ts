import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import {
  EPOLLIN,
  EPOLLOUT,
  Epoll,
  close,
  eventfdCreate,
  eventfdRead,
  eventfdWrite,
} from '../../src/sys/index.js';

describe('Epoll', () => {
  it('reports ready fds by token', () => {
    const epoll = new Epoll();
    const a = eventfdCreate();
    const b = eventfdCreate();
    epoll.add(a, 1);
    epoll.add(b, 0xfffffffe);
    expect(epoll.wait(0)).toBe(0);

    eventfdWrite(b);
    expect(epoll.wait(0)).toBe(1);
    expect(epoll.token(0)).toBe(0xfffffffe);
    expect(epoll.events(0)).toBe(EPOLLIN);

    eventfdWrite(a);
    expect(epoll.wait(0)).toBe(2);
    const tokens = [epoll.token(0), epoll.token(1)].sort((x, y) => x - y);
    expect(tokens).toEqual([1, 0xfffffffe]);

    epoll.modify(a, 9, EPOLLIN | EPOLLOUT);
    epoll.remove(b);
    eventfdRead(a);
    expect(epoll.wait(0)).toBe(1);
    expect(epoll.token(0)).toBe(9);
    expect(epoll.events(0)).toBe(EPOLLOUT);

    epoll.close();
    epoll.close();
    close(a);
    close(b);
  });

  it('blocks in wait inside a worker thread', async () => {
    const fd = eventfdCreate();
    const worker = new Worker(new URL('./fixtures/ts-worker.mjs', import.meta.url), {
      workerData: { entry: new URL('./fixtures/epoll-worker.ts', import.meta.url).href, fd },
    });
    const woke = await new Promise<Record<string, number>>((resolve, reject) => {
      worker.on('error', reject);
      worker.on('message', (message: { kind: string } & Record<string, number>) => {
        if (message.kind === 'ready') {
          expect(message.idle).toBe(0);
          eventfdWrite(fd, 3);
        } else {
          resolve(message);
        }
      });
    });
    await worker.terminate();
    expect(woke).toMatchObject({ count: 1, token: 77, events: EPOLLIN, value: 3 });
    close(fd);
  });
});
