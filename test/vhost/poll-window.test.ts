// The adaptive poll window (QEMU's IOThread rule, with room for our own wakeup): it grows while the driver comes back
// soon after the queue went idle and drops to nothing after a long wait, so that an idle queue never spins; a fixed window never moves.
import { describe, expect, it } from 'vitest';
import { ADAPTIVE_POLL_MAX_US, PollWindow, checkPollSetting } from '../../src/vhost/poll-window.js';

/** Go idle at t ms and be kicked `waitUs` later. */
function sleepThenKick(w: PollWindow, t: number, waitUs: number): number {
  w.idle(t);
  w.woke(t + waitUs / 1000);
  return w.us;
}

describe('PollWindow', () => {
  it('adaptive: starts at 0, doubles from 4 us while kicks come within the longest window, up to 32 us', () => {
    const w = new PollWindow('adaptive');
    expect(w.us).toBe(0);
    expect(sleepThenKick(w, 1, 10)).toBe(4);
    expect(sleepThenKick(w, 2, 10)).toBe(8);
    expect(sleepThenKick(w, 3, 20)).toBe(16);
    expect(sleepThenKick(w, 4, 30)).toBe(ADAPTIVE_POLL_MAX_US);
    // Already at the longest window: a kick that comes after it stays there.
    expect(sleepThenKick(w, 5, 31)).toBe(ADAPTIVE_POLL_MAX_US);
  });

  it('adaptive: a wait longer than the longest window drops the window to 0 (an idle queue does not spin)', () => {
    const w = new PollWindow('adaptive');
    for (let t = 1; t < 5; t++) sleepThenKick(w, t, 30);
    expect(w.us).toBe(ADAPTIVE_POLL_MAX_US);
    expect(sleepThenKick(w, 10, 1000)).toBe(0);
  });

  it('adaptive: a wait up to twice the longest window still grows it (the wait includes our own wakeup); longer drops it', () => {
    const w = new PollWindow('adaptive');
    expect(sleepThenKick(w, 1, 50)).toBe(4);
    expect(sleepThenKick(w, 2, 2 * ADAPTIVE_POLL_MAX_US - 1)).toBe(8);
    expect(sleepThenKick(w, 3, 2 * ADAPTIVE_POLL_MAX_US + 2)).toBe(0);
  });

  it('adaptive: a kick within the window, or work found by polling, leaves it as it is', () => {
    const w = new PollWindow('adaptive');
    sleepThenKick(w, 1, 10);
    sleepThenKick(w, 2, 10);
    expect(w.us).toBe(8);
    expect(sleepThenKick(w, 3, 6)).toBe(8);
    w.idle(4);
    w.found();
    w.woke(4.5); // a kick after polling found the work: not a wait to judge
    expect(w.us).toBe(8);
    w.woke(5); // kicked with no idle spell behind it (the queue was busy)
    expect(w.us).toBe(8);
  });

  it('fixed: the window is the setting and never moves', () => {
    const w = new PollWindow(200);
    expect(w.adaptive).toBe(false);
    expect(sleepThenKick(w, 1, 5000)).toBe(200);
    expect(new PollWindow(0).us).toBe(0);
  });

  it('checkPollSetting takes whole microseconds or adaptive', () => {
    expect(checkPollSetting('adaptive', 'blk')).toBe('adaptive');
    expect(checkPollSetting(0, 'blk')).toBe(0);
    expect(() => checkPollSetting(-1, 'blk')).toThrow(/whole number of microseconds.*adaptive/);
    expect(() => checkPollSetting(1.5, 'blk')).toThrow(RangeError);
    expect(() => checkPollSetting('fast' as never, 'blk')).toThrow(RangeError);
  });
});
