// The queue runner's notification rules, in-process and deterministic: a driver that publishes while the device
// has notifications off does not kick, so the runner must look at the ring again after re-arming them.
import { afterEach, describe, expect, it } from 'vitest';
import { TestGuestMemory } from '../../src/frontend/index.js';
import { close, eventfdCreate } from '../../src/sys/index.js';
import type { QueueContext, QueueHandler } from '../../src/vhost/device.js';
import { mapRegion, unmapRegion, type MappedRegion } from '../../src/vhost/memory-map.js';
import { QueueRunner, type RunnerEnvironment } from '../../src/vhost/queue-runner.js';
import { GuestAllocator, SplitQueueDriver, splitRingLayout, type SplitQueue } from '../../src/virtqueue/index.js';

const SIZE = 16;

interface Rig {
  runner: QueueRunner;
  /** stop() calls the handler got. */
  stops: () => number;
  startReply: ReturnType<QueueRunner['handle']>;
  driver: SplitQueueDriver;
  alloc: GuestAllocator;
  served: number[];
  logs: string[];
}

let cleanup: (() => void)[] = [];
afterEach(() => {
  for (const f of cleanup.reverse()) f();
  cleanup = [];
});

/**
 * A runner serving one queue whose handler pushes every chain it pops; `duringProcess` runs inside each process()
 * call after the handler found the ring empty (the moment a driver's publish races the device going to sleep).
 */
function rig(eventIdx: boolean, duringProcess: (call: number) => void, take = true, watchKick: () => void = () => {}): Rig {
  const memory = new TestGuestMemory({ regions: [{ guestPhysAddr: 0, size: 1 << 20 }] });
  const regions: MappedRegion[] = memory.regions.map((r) => mapRegion(r, r.fd));
  const layout = splitRingLayout(SIZE, memory.alloc(splitRingLayout(SIZE, 0).end, 4096));
  const driver = new SplitQueueDriver(memory.memory, layout, eventIdx);
  const alloc = new GuestAllocator(memory.alloc(64 * 1024, 4096), 64 * 1024);
  const fds = [eventfdCreate(0, true), eventfdCreate(0, true), eventfdCreate(0, true)];
  const served: number[] = [];
  const logs: string[] = [];
  let calls = 0;
  let stops = 0;
  const factory = (_ctx: QueueContext): QueueHandler => ({
    stop() {
      stops++;
    },
    process(queue: SplitQueue) {
      for (let c = take ? queue.pop() : null; c !== null; c = queue.pop()) {
        served.push(c.head);
        queue.push(c, 0);
      }
      duringProcess(calls++);
    },
  });
  const env: RunnerEnvironment = { watch: () => ({ close() {} }), watchKick, unwatchKick() {}, log: (m) => logs.push(m) };
  const runner = new QueueRunner({ createQueueHandler: factory }, {}, env);
  expect(runner.handle({ op: 'memory', regions })).toEqual({ ok: true, value: 0 });
  cleanup.push(() => {
    runner.handle({ op: 'stop', index: 0 });
    for (const r of regions) unmapRegion(r);
    for (const fd of fds) close(fd);
    memory.close();
  });
  const reply = runner.handle({
    op: 'start',
    config: {
      index: 0,
      size: SIZE,
      descAddr: layout.descAddr,
      availAddr: layout.availAddr,
      usedAddr: layout.usedAddr,
      base: 0,
      packed: false,
      eventIdx,
      indirect: true,
      features: 0n,
      kickFd: fds[0],
      callFd: fds[1],
      errFd: fds[2],
      enabled: true,
    },
  });
  return { runner, driver, alloc, served, logs, stops: () => stops, startReply: reply };
}

describe('queue runner: handlers are stopped whenever their queue goes', () => {
  it('when a new memory table drops the rings', () => {
    const r = rig(false, () => {});
    expect(r.startReply).toEqual({ ok: true, value: 0 });
    expect(r.runner.handle({ op: 'memory', regions: [] })).toEqual({ ok: true, value: 0 });
    expect(r.stops()).toBe(1);
    expect(r.logs.join('\n')).toMatch(/queue stopped until the driver resets the device/);
  });

  it('when the event loop refuses the kick fd', () => {
    const r = rig(false, () => {}, true, () => {
      throw new Error('epoll_ctl: EPERM');
    });
    expect(r.startReply).toMatchObject({ ok: false, error: expect.stringMatching(/EPERM/) });
    expect(r.stops()).toBe(1);
  });

  it('on stop, once', () => {
    const r = rig(false, () => {});
    r.runner.handle({ op: 'stop', index: 0 });
    expect(r.stops()).toBe(1);
  });
});

describe('queue runner: notifications', () => {
  for (const eventIdx of [false, true]) {
    it(`serves a chain published while notifications were off (EVENT_IDX ${eventIdx ? 'on' : 'off'})`, () => {
      let r!: Rig;
      const kicksAsked: boolean[] = [];
      r = rig(eventIdx, (call) => {
        // On the spurious kick (call 1, nothing in the ring), the driver publishes one chain and kicks only if
        // the device asked for it, as Linux and DPDK do.
        if (call !== 1) return;
        r.driver.add([[r.alloc.alloc(64), 64]], []);
        kicksAsked.push(r.driver.publish());
      });
      expect(r.served).toEqual([]); // the start pass found nothing (call 0)
      r.runner.kick(0); // spurious: the ring is empty (call 1 publishes)
      // A kick the driver asked for is delivered; one it did not ask for never comes.
      if (kicksAsked[0]) r.runner.kick(0);
      expect(r.served.length, `kick asked: ${kicksAsked[0]}`).toBe(1);
      expect(r.logs).toEqual([]);
    });
  }

  it('does not spin on a handler that declines what it is offered (it calls resume() later)', () => {
    let calls = 0;
    const r = rig(false, () => calls++, false);
    expect(calls).toBe(1); // the start pass
    r.driver.add([[r.alloc.alloc(64), 64]], []);
    r.driver.publish();
    r.runner.kick(0);
    expect(calls).toBe(2);
    expect(r.served).toEqual([]);
  });
});
