import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { close, eventfdCreate, eventfdRead, eventfdWrite, watchReadable } from '../../src/sys/index.js';

describe('watchReadable', () => {
  it('fires while readable and stops after close', async () => {
    const fd = eventfdCreate();
    let calls = 0;
    let drained = 0;
    const watch = watchReadable(fd, () => {
      calls++;
      drained += eventfdRead(fd);
    });

    eventfdWrite(fd, 2);
    for (let i = 0; i < 100 && drained === 0; i++) await sleep(5);
    expect(drained).toBe(2);
    expect(calls).toBe(1);

    watch.close();
    watch.close();
    eventfdWrite(fd, 1);
    await sleep(30);
    expect(calls).toBe(1);
    expect(eventfdRead(fd)).toBe(1);
    close(fd);
  });

  it('keeps firing until the handler drains', async () => {
    const fd = eventfdCreate();
    let calls = 0;
    const watch = watchReadable(fd, () => {
      if (++calls === 3) eventfdRead(fd);
    });
    eventfdWrite(fd);
    for (let i = 0; i < 100 && calls < 3; i++) await sleep(5);
    await sleep(20);
    expect(calls).toBe(3);
    watch.close();
    close(fd);
  });
});
