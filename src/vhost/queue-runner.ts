/**
 * Serves the started queues of one queue group in whatever thread hosts it (a worker, or the main thread for
 * low-rate devices). It owns no fds: the session does, and only closes one after the runner has let go of it
 * (every request is acknowledged before the session moves on).
 */
import { eventfdWrite, viewOf } from '../sys/index.js';
import { DirtyLog, GuestMemory, PackedQueue, SplitQueue, VirtqueueError, type RingQueue } from '../virtqueue/index.js';
import type { QueueContext, QueueHandler, ThreadHandler } from './device.js';
import { guestMemoryOf, type MappedRegion } from './memory-map.js';
import { PollWindow, type PollSetting } from './poll-window.js';

/** Everything a queue needs to start, as plain data (it crosses to workers). */
export interface QueueStartConfig {
  index: number;
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** SET_VRING_BASE: the split ring's next avail index, or the packed ring's 32-bit position word. */
  base: number;
  /** VIRTIO_F_RING_PACKED negotiated. */
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
  features: bigint;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  /** This queue's part of the frontend's inflight region (INFLIGHT_SHMFD), mapped by the session; null: none. */
  inflight?: { address: number; length: number; descNum: number } | null;
  /** VHOST_VRING_F_LOG: where the ring's writes are logged (log_guest_addr); -1: not logged. */
  usedLogAddr?: number;
  /** Counters the runner keeps for the session (see QueueStat), shared with the main thread. */
  stats?: SharedArrayBuffer;
}

/** Slots of a queue's stats array (Float64Array over QueueStartConfig.stats). */
export const QueueStat = { chains: 0, bytes: 1, kicks: 2, notifications: 3, suppressed: 4, broken: 5 } as const;
export const QUEUE_STATS = 6;

/** Control requests from the session to a runner, answered in order. */
export type RunnerRequest =
  | { op: 'memory'; regions: MappedRegion[] }
  | { op: 'start'; config: QueueStartConfig }
  | { op: 'stop'; index: number }
  | { op: 'kickFd'; index: number; fd: number }
  | { op: 'callFd'; index: number; fd: number }
  | { op: 'errFd'; index: number; fd: number }
  | { op: 'enable'; index: number; enabled: boolean }
  /** Between sessions: stop whatever still runs, drop the memory views, forget stopped queues. */
  | { op: 'reset' }
  /** The dirty log (SET_LOG_BASE), mapped by the session at `address`; length 0: none. */
  | { op: 'log'; address: number; length: number }
  /** VHOST_F_LOG_ALL on or off (SET_FEATURES): whether writes are logged at all. */
  | { op: 'logging'; enabled: boolean }
  /** A running ring's VHOST_VRING_F_LOG (SET_VRING_ADDR): its log_guest_addr, or -1. */
  | { op: 'ringLog'; index: number; usedLogAddr: number };

/** 'stop' answers the vring base to resume from (-1: the queue was not running); the others answer 0. */
export type RunnerReply = { ok: true; value: number } | { ok: false; error: string };

/** What the hosting thread provides: fd watching in its own event loop. */
export interface RunnerEnvironment {
  watch(fd: number, onReadable: () => void): { close(): void };
  /** Start or stop watching a queue's kick fd; the host calls runner.kicked(index) when it fires. */
  watchKick(index: number, fd: number): void;
  unwatchKick(index: number): void;
  log(message: string): void;
}

interface RunningQueue {
  queue: RingQueue;
  handler: QueueHandler;
  callFd: number;
  errFd: number;
  usedLogAddr: number;
  /** The session's counters, and what of the queue's own totals they already hold. */
  stats: Float64Array | null;
  counted: { done: number; bytes: number; suppressed: number };
  /** How long the queue polls after going idle. */
  poll: PollWindow;
}

export class QueueRunner {
  private dirtyLog: DirtyLog | null = null;
  private logAll = false;
  private memory = GuestMemory.empty();
  private regions: MappedRegion[] = [];
  private readonly queues = new Map<number, RunningQueue>();
  /** Where queues dropped for unusable rings stopped, for the GET_VRING_BASE that follows. */
  private readonly droppedAt = new Map<number, number>();
  /**
   * Queues being polled (notifications off) and until when, in performance.now() milliseconds: the hosting thread
   * calls poll() while any are, instead of sleeping.
   */
  private readonly polled = new Map<number, number>();

  /**
   * @param pollUs after a pass that served chains, keep the queue's notifications off and look at it again on each
   *   of the thread's poll passes, for this many microseconds, before re-arming them and sleeping (0: never;
   *   'adaptive': a window per queue that follows how soon the driver comes back, see PollWindow). Saves the
   *   kick/wakeup round trip on both sides; costs a busy CPU while traffic flows.
   * @param device this runner's number among the devices sharing the thread (QueueContext.device).
   */
  constructor(
    private readonly thread: ThreadHandler,
    private readonly options: unknown,
    private readonly env: RunnerEnvironment,
    private readonly pollUs: PollSetting = 0,
    private readonly device = 0,
  ) {}

  /** Whether some queue is being polled: the hosting thread should call poll() rather than sleep. */
  get polling(): boolean {
    return this.polled.size > 0;
  }

  /**
   * One poll pass over the polled queues: serve those with chains, re-arm and drop those idle past their time.
   * @param now performance.now()
   */
  poll(now: number): void {
    this.pollNow = now;
    // forEach, not for-of: a pass runs per few microseconds while polling, and must not allocate.
    this.polled.forEach(this.pollOne);
  }

  private pollNow = 0;
  private readonly pollOne = (until: number, index: number): void => {
    const rq = this.queues.get(index);
    if (!rq || rq.queue.disabled || rq.queue.broken) {
      this.polled.delete(index);
      return;
    }
    const q = rq.queue;
    if (q.hasAvailable()) {
      rq.poll.found();
      this.kick(index);
    } else if (this.pollNow > until) {
      this.polled.delete(index);
      // Re-armed: a driver that published meanwhile did not kick; serve what it published.
      try {
        if (q.enableNotification()) {
          rq.poll.found();
          this.kick(index);
        }
      } catch (e) {
        this.fail(rq, e);
      }
    }
  };

  handle(req: RunnerRequest): RunnerReply {
    try {
      return { ok: true, value: this.apply(req) };
    } catch (e) {
      return { ok: false, error: (e as Error).message };
    }
  }

  private apply(req: RunnerRequest): number {
    switch (req.op) {
      case 'memory':
        this.setMemory(req.regions);
        return 0;
      case 'start':
        this.start(req.config);
        return 0;
      case 'stop':
        return this.stop(req.index);
      case 'kickFd':
        this.env.unwatchKick(req.index);
        if (req.fd >= 0) this.env.watchKick(req.index, req.fd);
        // A kick written to the old fd just before the swap is gone with it; with a full ring the driver would
        // never kick again. Look at the ring now.
        this.kick(req.index);
        return 0;
      case 'callFd':
        this.running(req.index, (rq) => (rq.callFd = req.fd));
        return 0;
      case 'errFd':
        this.running(req.index, (rq) => (rq.errFd = req.fd));
        return 0;
      case 'enable':
        this.running(req.index, (rq) => (rq.queue.disabled = !req.enabled));
        if (req.enabled) this.kick(req.index);
        return 0;
      case 'reset':
        for (const index of [...this.queues.keys()]) this.stop(index);
        this.droppedAt.clear();
        this.memory = GuestMemory.empty();
        this.regions = [];
        this.dirtyLog = null;
        this.logAll = false;
        return 0;
      case 'log':
        this.dirtyLog = req.length > 0 ? new DirtyLog(new Uint8Array(viewOf(req.address, req.length))) : null;
        for (const rq of this.queues.values()) this.applyLog(rq);
        return 0;
      case 'logging':
        this.logAll = req.enabled;
        for (const rq of this.queues.values()) this.applyLog(rq);
        return 0;
      case 'ringLog':
        this.running(req.index, (rq) => {
          rq.usedLogAddr = req.usedLogAddr;
          this.applyLog(rq);
        });
        return 0;
    }
  }

  /** The driver kicked (the queue's kick eventfd fired). */
  kicked(index: number): void {
    const rq = this.queues.get(index);
    if (rq) {
      if (rq.stats) rq.stats[QueueStat.kicks]++;
      if (rq.poll.adaptive) rq.poll.woke(performance.now());
    }
    this.kick(index);
  }

  /** Serve a queue after a kick: process until the ring is empty and notifications are back on. */
  kick(index: number): void {
    const rq = this.queues.get(index);
    if (!rq || rq.queue.disabled || rq.queue.broken) return;
    const q = rq.queue;
    try {
      for (;;) {
        q.disableNotification();
        const before = q.popped;
        // Whether the handler was offered chains: taking none of them means it is out of resources, taking none
        // of none means only that the driver had not published yet.
        const offered = q.hasAvailable();
        rq.handler.process(q);
        this.publish(rq);
        if (q.broken) break;
        // Notifications stay off for good: the device takes chains when it has data for them.
        if (rq.handler.needsKicks === false) break;
        const took = q.popped !== before;
        // Poll only while idle: with chains in flight (asynchronous I/O) the kernel's workers, often on this very
        // CPU, are what we wait for, and their completion wakes us anyway. Notifications stay off meanwhile.
        const idle = took && q.inFlight === 0;
        const window = rq.poll.us;
        if (window > 0 && idle) {
          const now = performance.now();
          rq.poll.idle(now);
          this.polled.set(index, now + window / 1000);
          break;
        }
        // Re-arm, then look once more: a driver that published while notifications were off did not kick, and
        // will not (a full ring never kicks again). Sleeping now would stall the queue for good.
        if (!q.enableNotification()) {
          // How soon the driver's kick comes is what sets an adaptive window.
          if (idle && rq.poll.adaptive) rq.poll.idle(performance.now());
          break;
        }
        // A handler that declined what it was offered calls ctx.resume() when it can go on.
        if (offered && !took) break;
      }
    } catch (e) {
      this.fail(rq, e);
    }
  }

  private setMemory(regions: MappedRegion[]): void {
    const memory = guestMemoryOf(regions);
    for (const [index, rq] of this.queues) {
      try {
        rq.handler.drain?.(rq.queue);
        this.publish(rq);
        rq.queue.setMemory(memory);
      } catch (e) {
        // Its rings are gone from the new table. The queue still holds views of the old mappings, which the
        // session unmaps next: drop it without touching ring memory again (that would be SIGSEGV).
        this.queues.delete(index);
        this.polled.delete(index);
        this.env.unwatchKick(index);
        this.droppedAt.set(index, rq.queue.vringBase());
        // The handler lets go of what it holds (an io_uring, references to this queue), or it leaks past the
        // session. The old mappings are still mapped: the session unmaps them after this request.
        this.stopHandler(rq, index);
        this.fail(rq, e);
      }
    }
    this.memory = memory;
    this.regions = regions;
    // Chains the handlers declined while draining are served against the new table.
    for (const index of this.queues.keys()) this.kick(index);
  }

  private start(c: QueueStartConfig): void {
    if (this.queues.has(c.index)) this.stop(c.index);
    this.droppedAt.delete(c.index);
    const inflight = c.inflight ? { region: new Uint8Array(viewOf(c.inflight.address, c.inflight.length)), descNum: c.inflight.descNum } : null;
    const ring = { index: c.index, size: c.size, memory: this.memory, descAddr: c.descAddr, eventIdx: c.eventIdx, indirect: c.indirect, inflight };
    const queue: RingQueue = c.packed
      ? new PackedQueue({ ...ring, driverAddr: c.availAddr, deviceAddr: c.usedAddr, base: c.base })
      : new SplitQueue({ ...ring, availAddr: c.availAddr, usedAddr: c.usedAddr, lastAvailIdx: c.base });
    const rq: RunningQueue = { queue, handler: undefined as unknown as QueueHandler, callFd: c.callFd, errFd: c.errFd, usedLogAddr: c.usedLogAddr ?? -1,
      stats: c.stats ? new Float64Array(c.stats) : null,
      counted: { done: 0, bytes: 0, suppressed: 0 },
      poll: new PollWindow(this.pollUs),
    };
    queue.disabled = !c.enabled;
    this.applyLog(rq);
    const ctx: QueueContext = {
      queueIndex: c.index,
      device: this.device,
      queue,
      options: this.options,
      features: c.features,
      // The start of a ring: split avail index 0; packed avail index 0 in the first lap (wrap counter 1).
      resumed: c.packed ? (c.base & 0xffff) !== 0x8000 : c.base !== 0,
      publish: () => this.publish(rq),
      resume: () => this.kick(c.index),
      watch: (fd, onReadable) =>
        this.env.watch(fd, () => {
          try {
            onReadable();
          } catch (e) {
            this.fail(rq, e);
          }
        }),
      log: (message) => this.env.log(`queue ${c.index}: ${message}`),
    };
    if (queue.recovered > 0) ctx.log(`${queue.recovered} requests were in flight when the previous backend stopped: running them again first`);
    rq.handler = this.thread.createQueueHandler(ctx);
    this.queues.set(c.index, rq);
    try {
      this.env.watchKick(c.index, c.kickFd);
    } catch (e) {
      // A kick fd the event loop refuses (not an eventfd): the session does not count the queue as started and
      // will never stop it, so stop it here.
      this.queues.delete(c.index);
      this.stopHandler(rq, c.index);
      throw e;
    }
    // The driver may have queued chains before the kick fd arrived.
    this.kick(c.index);
  }

  private stop(index: number): number {
    const rq = this.queues.get(index);
    this.env.unwatchKick(index);
    if (!rq) {
      const dropped = this.droppedAt.get(index) ?? -1;
      this.droppedAt.delete(index);
      return dropped;
    }
    this.queues.delete(index);
    this.polled.delete(index);
    try {
      rq.handler.drain?.(rq.queue);
    } catch (e) {
      this.env.log(`queue ${index}: drain failed: ${(e as Error).message}`);
    }
    // Even after a failed drain: stop is where the handler releases its resources.
    this.stopHandler(rq, index);
    try {
      this.publish(rq);
      // Its last writes (notification flags after the last publish) reach the migration's final pass.
      rq.queue.logRing();
    } catch (e) {
      this.env.log(`queue ${index}: publish on stop failed: ${(e as Error).message}`);
    }
    return rq.queue.vringBase();
  }

  private applyLog(rq: RunningQueue): void {
    rq.queue.setLog(this.logAll ? this.dirtyLog : null, rq.usedLogAddr);
  }

  private stopHandler(rq: RunningQueue, index: number): void {
    try {
      rq.handler.stop?.(rq.queue);
    } catch (e) {
      this.env.log(`queue ${index}: stop failed: ${(e as Error).message}`);
    }
  }

  private running(index: number, f: (rq: RunningQueue) => void): void {
    const rq = this.queues.get(index);
    if (rq) f(rq);
  }

  private publish(rq: RunningQueue): void {
    const q = rq.queue;
    const st = rq.stats;
    const c = rq.counted;
    // Deltas of the queue's own totals: the runner thread is the only writer, the control API reads. Counted
    // before the used index moves, so whoever has seen a chain used also sees it counted (a frontend that reads
    // the stats right after its used entry came found it missing when this thread was preempted in between).
    if (st !== null) {
      const done = q.popped - q.inFlight;
      st[QueueStat.chains] += done - c.done;
      st[QueueStat.bytes] += q.bytesWritten - c.bytes;
      c.done = done;
      c.bytes = q.bytesWritten;
    }
    const notify = q.publish() && rq.callFd >= 0;
    if (st !== null) {
      st[QueueStat.suppressed] += q.suppressed - c.suppressed;
      c.suppressed = q.suppressed;
      if (notify) st[QueueStat.notifications]++;
    }
    if (notify) eventfdWrite(rq.callFd, 1);
  }

  private fail(rq: RunningQueue, e: unknown): void {
    const q = rq.queue;
    const why = e instanceof VirtqueueError ? e.message : `queue ${q.index}: device handler failed: ${(e as Error)?.stack ?? e}`;
    if (!q.broken) q.broken = e instanceof VirtqueueError ? e : new VirtqueueError('DEVICE_FAILED', q.index, why);
    if (rq.stats) rq.stats[QueueStat.broken] = 1;
    this.env.log(`${why}; queue stopped until the driver resets the device`);
    // QEMU marks the device NEEDS_RESET when the error eventfd fires.
    if (rq.errFd >= 0) eventfdWrite(rq.errFd, 1);
  }

  /** Regions currently in use (for tests and diagnostics). */
  get mappedRegions(): readonly MappedRegion[] {
    return this.regions;
  }
}
