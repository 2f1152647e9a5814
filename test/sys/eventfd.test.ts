import { describe, expect, it } from 'vitest';
import { close, eventfdCreate, eventfdRead, eventfdWrite } from '../../src/sys/index.js';

describe('eventfd', () => {
  it('adds writes and resets on read', () => {
    const fd = eventfdCreate(2);
    eventfdWrite(fd);
    eventfdWrite(fd, 2 ** 40);
    expect(eventfdRead(fd)).toBe(3 + 2 ** 40);
    expect(eventfdRead(fd)).toBe(0);
    close(fd);
  });
});
