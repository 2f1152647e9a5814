import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import {
  EPOLLET,
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

  it('edge-triggered on an eventfd: one event per write, with the counter never read', () => {
    // The queue workers rely on this to skip reading kick fds: if a write into a non-zero counter were not an
    // edge, a kick would be lost and its queue would stall.
    const epoll = new Epoll();
    const fd = eventfdCreate();
    eventfdWrite(fd); // pending before the watch: reported when added
    epoll.add(fd, 5, EPOLLIN | EPOLLET);
    expect(epoll.wait(0)).toBe(1);
    expect(epoll.token(0)).toBe(5);
    expect(epoll.wait(0)).toBe(0); // no new write, no event, though the counter is 1
    for (let k = 0; k < 3; k++) {
      eventfdWrite(fd);
      expect(epoll.wait(0)).toBe(1);
      expect(epoll.wait(0)).toBe(0);
    }
    expect(eventfdRead(fd)).toBe(4);
    epoll.close();
    close(fd);
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
