/**
 * How long a queue's thread keeps looking at the ring after the queue went idle, before it re-arms the driver's
 * kicks and sleeps. Fixed, or adaptive as QEMU's IOThreads poll (util/aio-posix.c, adjust_polling_time): the
 * window grows while work keeps coming back soon after the queue went idle, and drops to nothing once a wait
 * outlasts the longest window, so an idle or slow queue costs no CPU.
 */

/** DataPlane.pollUs: microseconds to poll after each busy pass (0: never), or 'adaptive'. */
export type PollSetting = number | 'adaptive';

/** The longest adaptive window: QEMU's default poll-max-ns (32768 ns). */
export const ADAPTIVE_POLL_MAX_US = 32;
/**
 * A wait we measure runs until this thread runs again after the kick: it includes our own wakeup, which in a VM
 * costs tens of microseconds (on this project's VM a kicked wakeup made a QD1 round trip 56 µs, polling 14 µs).
 * QEMU judges the wait against the longest window alone; we allow the wakeup as much again.
 */
const WAKE_ALLOWANCE = 2;
/** Where an adaptive window starts growing from (QEMU: 4 µs, then doubled). */
const ADAPTIVE_POLL_FIRST_US = 4;

/** A queue's poll window. Times are performance.now() milliseconds. */
export class PollWindow {
  /** The current window in microseconds (0: re-arm and sleep at once). */
  us: number;
  readonly adaptive: boolean;
  private readonly maxUs: number;
  /** When the queue last went idle with nothing in flight (-1: not idle, or the idle spell was already judged). */
  private idleSince = -1;

  constructor(setting: PollSetting) {
    this.adaptive = setting === 'adaptive';
    this.maxUs = this.adaptive ? ADAPTIVE_POLL_MAX_US : (setting as number);
    this.us = this.adaptive ? 0 : this.maxUs;
  }

  /** The ring ran dry with nothing in flight: from now on the queue waits for the driver. */
  idle(now: number): void {
    this.idleSince = now;
  }

  /** Polling found new chains: the window was long enough. */
  found(): void {
    this.idleSince = -1;
  }

  /**
   * A kick woke the queue after it slept: a wait within the current window leaves it; one within the longest
   * window and our wakeup (WAKE_ALLOWANCE) would have been caught by a longer one (grow); a longer wait would have
   * been polled in vain (back to 0).
   */
  woke(now: number): void {
    if (!this.adaptive || this.idleSince < 0) return;
    const waitedUs = (now - this.idleSince) * 1000;
    this.idleSince = -1;
    if (waitedUs <= this.us) return;
    if (waitedUs > WAKE_ALLOWANCE * this.maxUs) this.us = 0;
    else if (this.us < this.maxUs) this.us = this.us === 0 ? ADAPTIVE_POLL_FIRST_US : Math.min(2 * this.us, this.maxUs);
  }
}

/** Checks a DataPlane.pollUs value; throws RangeError with what is accepted. */
export function checkPollSetting(setting: PollSetting, what: string): PollSetting {
  if (setting === 'adaptive') return setting;
  if (typeof setting !== 'number' || !Number.isSafeInteger(setting) || setting < 0) {
    throw new RangeError(`${what}: pollUs takes a whole number of microseconds (0: never) or 'adaptive', not ${String(setting)}`);
  }
  return setting;
}
