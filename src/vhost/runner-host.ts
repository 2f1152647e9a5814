/**
 * Where a queue group runs, seen from the session: in a worker thread, or inline on the main thread. Both take
 * the same requests and answer them in order, so the session does not care which.
 */
import { MessageChannel, type MessagePort, type Worker } from 'node:worker_threads';
import { close, eventfdCreate, eventfdRead, eventfdWrite, watchReadable, type FdWatch } from '../sys/index.js';
import type { QueueHandlerFactory, ThreadHandler, ThreadHandlerFactory } from './device.js';
import { QueueRunner, type RunnerReply, type RunnerRequest } from './queue-runner.js';
import { spawnWorker } from './spawn-worker.js';
import { threadHandlerOf } from './thread-handler.js';
import type { PollSetting } from './poll-window.js';

export interface RunnerHost {
  request(req: RunnerRequest): Promise<number>;
  close(): Promise<void>;
  /** False once the thread died or was closed: requests would fail. */
  readonly alive: boolean;
}

export interface RunnerHostOptions {
  /** Device data-plane module (exports createQueueHandler). */
  module?: URL;
  /** Inline hosts only: the factory, instead of a module to import. */
  factory?: QueueHandlerFactory;
  /** Inline hosts only: the thread handler factory, instead of a module to import. */
  threadFactory?: ThreadHandlerFactory;
  options: unknown;
  name: string;
  log: (message: string) => void;
  pollUs?: PollSetting;
}

const workerEntry = new URL(`./queue-worker${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url);

/**
 * A queue worker thread. It serves lanes, one per device whose queues it runs (one, or several with
 * DataPlane.shareThread); each lane is a RunnerHost of its own.
 */
export class WorkerThread {
  private readonly port: MessagePort;
  private readonly pending = new Map<number, { resolve: (v: number) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private nextLane = 0;
  private dead: Error | null = null;
  private closed = false;

  private constructor(
    private readonly worker: Worker,
    port: MessagePort,
    private readonly controlFd: number,
    private readonly opts: RunnerHostOptions,
  ) {
    this.port = port;
  }

  static async start(opts: RunnerHostOptions): Promise<WorkerThread> {
    if (!opts.module) throw new Error(`${opts.name}: queues in worker threads need dataPlane.module (a function cannot cross threads)`);
    const controlFd = eventfdCreate(0, true);
    const { port1, port2 } = new MessageChannel();
    const worker = spawnWorker(
      workerEntry,
      { module: opts.module.href, controlFd, port: port2, name: opts.name, pollUs: opts.pollUs ?? 0 },
      { transferList: [port2] },
    );
    const thread = new WorkerThread(worker, port1, controlFd, opts);
    try {
      await new Promise<void>((resolve, reject) => {
        port1.once('message', (m: { ready: boolean; error?: string }) =>
          m.ready ? resolve() : reject(new Error(`${opts.name}: cannot load the device's queue handler: ${m.error}`)),
        );
        worker.once('error', reject);
        worker.once('exit', (code) => reject(new Error(`${opts.name}: queue worker exited (${code}) while starting`)));
      });
    } catch (e) {
      await worker.terminate();
      close(controlFd);
      port1.close();
      throw e;
    }
    port1.on('message', (m) => thread.onMessage(m));
    worker.on('error', (e) => thread.die(new Error(`${opts.name}: queue worker crashed: ${e.stack ?? e}`)));
    worker.on('exit', (code) => thread.die(new Error(`${opts.name}: queue worker exited with code ${code}`)));
    return thread;
  }

  get alive(): boolean {
    return this.dead === null && !this.closed;
  }

  /**
   * A lane for one device's queues, with that device's options.
   * @param onClose what closing the lane also does (close the thread of one device; let go of a shared one).
   */
  async lane(options: unknown, name: string, onClose: () => Promise<void>): Promise<RunnerHost> {
    const lane = this.nextLane++;
    await this.send({ lane, create: { options, name } });
    return new LaneHost(this, lane, onClose);
  }

  send(message: Record<string, unknown>): Promise<number> {
    if (this.dead) return Promise.reject(this.dead);
    if (this.closed) return Promise.reject(new Error(`${this.opts.name}: the queue thread is closed`));
    const id = this.nextId++;
    return new Promise<number>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.port.postMessage({ id, ...message });
      eventfdWrite(this.controlFd, 1);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.dead) {
      const exited = new Promise((r) => this.worker.once('exit', r));
      const id = this.nextId++;
      this.port.postMessage({ id, exit: true });
      eventfdWrite(this.controlFd, 1);
      // A worker stuck in a device handler is terminated after a grace period.
      const timer = setTimeout(() => void this.worker.terminate(), 2000);
      await exited;
      clearTimeout(timer);
    }
    this.port.close();
    close(this.controlFd);
  }

  private onMessage(m: { id?: number; reply?: RunnerReply; log?: string }): void {
    if (m.log !== undefined) {
      this.opts.log(m.log);
      return;
    }
    const p = m.id === undefined ? undefined : this.pending.get(m.id);
    if (!p || !m.reply) return;
    this.pending.delete(m.id!);
    if (m.reply.ok) p.resolve(m.reply.value);
    else p.reject(new Error(m.reply.error));
  }

  private die(e: Error): void {
    if (this.dead) return;
    this.dead = e;
    if (!this.closed) this.opts.log(e.message);
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}

/** One device's queues in a worker thread. */
class LaneHost implements RunnerHost {
  private isClosed = false;

  constructor(
    private readonly thread: WorkerThread,
    private readonly lane: number,
    private readonly onClose: () => Promise<void>,
  ) {}

  get alive(): boolean {
    return !this.isClosed && this.thread.alive;
  }

  request(req: RunnerRequest): Promise<number> {
    return this.thread.send({ lane: this.lane, request: req });
  }

  async close(): Promise<void> {
    if (this.isClosed) return;
    this.isClosed = true;
    if (this.thread.alive) await this.thread.send({ lane: this.lane, drop: true }).catch(() => {});
    await this.onClose();
  }
}

/** A thread of its own for one queue group of one device. */
export async function startWorkerHost(opts: RunnerHostOptions): Promise<RunnerHost> {
  const thread = await WorkerThread.start(opts);
  try {
    return await thread.lane(opts.options, opts.name, () => thread.close());
  } catch (e) {
    await thread.close();
    throw e;
  }
}

/** Threads shared by the devices of this process that name the same DataPlane.shareThread key. */
const sharedThreads = new Map<string, { thread: Promise<WorkerThread>; users: number }>();

/** A lane in the shared thread `key`, started with the first device's module and pollUs. */
export async function startSharedHost(key: string, opts: RunnerHostOptions): Promise<RunnerHost> {
  let entry = sharedThreads.get(key);
  if (entry) {
    const known = entry;
    const thread = await known.thread.catch(() => null);
    if (!thread || !thread.alive) {
      if (sharedThreads.get(key) === known) sharedThreads.delete(key);
      entry = undefined;
    }
  }
  if (!entry) {
    entry = { thread: WorkerThread.start({ ...opts, name: `shared thread ${key}` }), users: 0 };
    sharedThreads.set(key, entry);
    const made = entry;
    made.thread.catch(() => {
      if (sharedThreads.get(key) === made) sharedThreads.delete(key);
    });
  }
  const mine = entry;
  const thread = await mine.thread;
  mine.users++;
  const release = async () => {
    if (--mine.users > 0) return;
    if (sharedThreads.get(key) === mine) sharedThreads.delete(key);
    await thread.close();
  };
  try {
    return await thread.lane(opts.options, opts.name, release);
  } catch (e) {
    await release();
    throw e;
  }
}

/** Runs the queue group on the main thread's event loop (DataPlane.thread = 'main'). */
export class InlineHost implements RunnerHost {
  private readonly kickWatches = new Map<number, FdWatch>();
  private readonly runner: QueueRunner;
  private readonly thread: ThreadHandler;
  private pollScheduled = false;

  private constructor(exports: { createThreadHandler?: ThreadHandlerFactory; createQueueHandler?: QueueHandlerFactory }, opts: RunnerHostOptions) {
    const log = (message: string) => opts.log(`${opts.name}: ${message}`);
    // As in a worker: a throw from the thread handler's own fd callback is logged, not fatal.
    const watch = (fd: number, onReadable: () => void) =>
      watchReadable(fd, () => {
        try {
          onReadable();
        } catch (e) {
          log((e as Error).message);
        }
      });
    this.thread = threadHandlerOf(exports, { watch, log }, opts.name);
    this.runner = new QueueRunner(this.thread, opts.options, {
      watch: (fd, onReadable) => watchReadable(fd, onReadable),
      watchKick: (index, fd) => {
        this.kickWatches.set(
          index,
          watchReadable(fd, () => {
            eventfdRead(fd);
            this.runner.kicked(index);
            this.afterBatch();
          }),
        );
      },
      unwatchKick: (index) => {
        this.kickWatches.get(index)?.close();
        this.kickWatches.delete(index);
      },
      log,
    }, opts.pollUs ?? 0);
  }

  static async start(opts: RunnerHostOptions): Promise<InlineHost> {
    if (opts.factory || opts.threadFactory) return new InlineHost({ createQueueHandler: opts.factory, createThreadHandler: opts.threadFactory }, opts);
    if (!opts.module) throw new Error(`${opts.name}: the device's dataPlane names neither a module nor createQueueHandler`);
    return new InlineHost(await import(opts.module.href), opts);
  }

  private isClosed = false;

  get alive(): boolean {
    return !this.isClosed;
  }

  async request(req: RunnerRequest): Promise<number> {
    const reply = this.runner.handle(req);
    this.afterBatch();
    if (!reply.ok) throw new Error(reply.error);
    return reply.value;
  }

  async close(): Promise<void> {
    this.isClosed = true;
    this.runner.handle({ op: 'reset' });
    for (const w of this.kickWatches.values()) w.close();
    this.kickWatches.clear();
  }

  /** Flush the thread handler's batch; keep polling from the event loop (between its other work) while asked to. */
  private afterBatch(): void {
    this.thread.endOfBatch?.();
    if (!this.runner.polling || this.pollScheduled || this.isClosed) return;
    this.pollScheduled = true;
    setImmediate(() => {
      this.pollScheduled = false;
      if (this.isClosed) return;
      this.runner.poll(performance.now());
      this.afterBatch();
    });
  }
}
