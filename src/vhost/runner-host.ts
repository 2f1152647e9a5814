/**
 * Where a queue group runs, seen from the session: in a worker thread, or inline on the main thread. Both take
 * the same requests and answer them in order, so the session does not care which.
 */
import { MessageChannel, type MessagePort, type Worker } from 'node:worker_threads';
import { close, eventfdCreate, eventfdRead, eventfdWrite, watchReadable, type FdWatch } from '../sys/index.js';
import type { QueueHandlerFactory } from './device.js';
import { QueueRunner, type RunnerReply, type RunnerRequest } from './queue-runner.js';
import { spawnWorker } from './spawn-worker.js';

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
  options: unknown;
  name: string;
  log: (message: string) => void;
  pollUs?: number;
}

const workerEntry = new URL(`./queue-worker${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url);

export class WorkerHost implements RunnerHost {
  private readonly port: MessagePort;
  private readonly pending = new Map<number, { resolve: (v: number) => void; reject: (e: Error) => void }>();
  private nextId = 1;
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

  static async start(opts: RunnerHostOptions): Promise<WorkerHost> {
    if (!opts.module) throw new Error(`${opts.name}: queues in worker threads need dataPlane.module (a function cannot cross threads)`);
    const controlFd = eventfdCreate(0, true);
    const { port1, port2 } = new MessageChannel();
    const worker = spawnWorker(
      workerEntry,
      { module: opts.module.href, options: opts.options, controlFd, port: port2, name: opts.name, pollUs: opts.pollUs ?? 0 },
      { transferList: [port2] },
    );
    const host = new WorkerHost(worker, port1, controlFd, opts);
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
    port1.on('message', (m) => host.onMessage(m));
    worker.on('error', (e) => host.die(new Error(`${opts.name}: queue worker crashed: ${e.stack ?? e}`)));
    worker.on('exit', (code) => host.die(new Error(`${opts.name}: queue worker exited with code ${code}`)));
    return host;
  }

  get alive(): boolean {
    return this.dead === null && !this.closed;
  }

  request(req: RunnerRequest): Promise<number> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise<number>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.port.postMessage({ id, request: req });
      eventfdWrite(this.controlFd, 1);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.dead) {
      const exited = new Promise((r) => this.worker.once('exit', r));
      const id = this.nextId++;
      this.port.postMessage({ id, request: { op: 'exit' } });
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

/** Runs the queue group on the main thread's event loop (DataPlane.thread = 'main'). */
export class InlineHost implements RunnerHost {
  private readonly kickWatches = new Map<number, FdWatch>();
  private readonly runner: QueueRunner;

  private constructor(factory: QueueHandlerFactory, opts: RunnerHostOptions) {
    this.runner = new QueueRunner(factory, opts.options, {
      watch: (fd, onReadable) => watchReadable(fd, onReadable),
      watchKick: (index, fd) => {
        this.kickWatches.set(
          index,
          watchReadable(fd, () => {
            eventfdRead(fd);
            this.runner.kicked(index);
          }),
        );
      },
      unwatchKick: (index) => {
        this.kickWatches.get(index)?.close();
        this.kickWatches.delete(index);
      },
      log: (message) => opts.log(`${opts.name}: ${message}`),
    }, opts.pollUs ?? 0);
  }

  static async start(opts: RunnerHostOptions): Promise<InlineHost> {
    if (opts.factory) return new InlineHost(opts.factory, opts);
    if (!opts.module) throw new Error(`${opts.name}: the device's dataPlane names neither a module nor createQueueHandler`);
    const mod = (await import(opts.module.href)) as { createQueueHandler?: QueueHandlerFactory };
    if (typeof mod.createQueueHandler !== 'function') {
      throw new Error(`${opts.name}: ${opts.module.href} does not export createQueueHandler(ctx)`);
    }
    return new InlineHost(mod.createQueueHandler, opts);
  }

  private isClosed = false;

  get alive(): boolean {
    return !this.isClosed;
  }

  async request(req: RunnerRequest): Promise<number> {
    const reply = this.runner.handle(req);
    if (!reply.ok) throw new Error(reply.error);
    return reply.value;
  }

  async close(): Promise<void> {
    this.isClosed = true;
    this.runner.handle({ op: 'reset' });
    for (const w of this.kickWatches.values()) w.close();
    this.kickWatches.clear();
  }
}
