/**
 * Which queues of a multi-queue tap are attached, shared by the pairs' threads and the control queue's: the
 * kernel steers received frames only to attached queues, so the pairs the driver does not use (beyond
 * VQ_PAIRS_SET, virtio 1.2 §5.1.6.5.5) are detached at once when it says so, before a frame can land there.
 * Int32 per pair: [3p] the pair's tap fd (-1: none open), [3p + 1] 1 attached, 0 detached, [3p + 2] an eventfd
 * that wakes the pair's thread to read its queue again once attached (a detached queue cannot be watched).
 */
import { eventfdWrite, setTapQueueAttached } from '../../sys/index.js';

export const tapQueuesBytes = (pairs: number): number => 12 * pairs;

export function initTapQueues(shared: SharedArrayBuffer): void {
  const slots = new Int32Array(shared);
  for (let p = 0; 3 * p < slots.length; p++) {
    slots[3 * p] = -1;
    slots[3 * p + 1] = 1;
    slots[3 * p + 2] = -1;
  }
}

/** Attach or detach one pair's queue; false when it has no tap open or the kernel refused. */
export function setPairAttached(slots: Int32Array, pair: number, attached: boolean, log: (m: string) => void): boolean {
  const fd = Atomics.load(slots, 3 * pair);
  if (fd < 0) return false;
  const want = attached ? 1 : 0;
  const cur = Atomics.load(slots, 3 * pair + 1);
  if (cur === want) return true;
  // Whoever swaps the flag does the ioctl: the pair's own thread and the control queue's may both try.
  if (Atomics.compareExchange(slots, 3 * pair + 1, cur, want) !== cur) return Atomics.load(slots, 3 * pair + 1) === want;
  try {
    setTapQueueAttached(fd, attached);
    const wake = Atomics.load(slots, 3 * pair + 2);
    if (attached && wake >= 0) eventfdWrite(wake, 1);
    return true;
  } catch (e) {
    Atomics.store(slots, 3 * pair + 1, cur);
    log(`cannot ${attached ? 'attach' : 'detach'} the tap queue of pair ${pair}: ${(e as Error).message}`);
    return false;
  }
}

export function isPairAttached(slots: Int32Array, pair: number): boolean {
  return Atomics.load(slots, 3 * pair + 1) === 1;
}

/** The driver uses `active` pairs now: theirs attached, the rest detached. */
export function applyActivePairs(slots: Int32Array, active: number, log: (m: string) => void): void {
  for (let p = 0; 3 * p < slots.length; p++) setPairAttached(slots, p, p < active, log);
}
