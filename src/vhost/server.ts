/**
 * Serves one device to one frontend at a time, over a socket we listen on, an inherited fd (`--fd`), or a
 * socket we connect to (client mode, retried). When the frontend goes, its session is torn down (queues stopped,
 * memory unmapped, device reset) and the server waits for the next one.
 *
 * @example
 * ```ts
 * import { VhostUserServer } from 'vhost-ts';
 * import { rngDevice } from 'vhost-ts/devices/rng';
 * const server = await VhostUserServer.start(rngDevice(), { socketPath: '/tmp/rng.sock' });
 * // qemu ... -chardev socket,id=c,path=/tmp/rng.sock -device vhost-user-rng-pci,chardev=c
 * ```
 */
import { EventEmitter } from 'node:events';
import { lstatSync, unlinkSync } from 'node:fs';
import { close, isListeningSocket, SysError, unixAccept, unixConnect, unixListen, watchReadable, type FdWatch } from '../sys/index.js';
import { Connection } from './connection.js';
import type { VhostUserDevice } from './device.js';
import { RunnerPool } from './runner-pool.js';
import { BackendSession, newQueueStats, type Logger, type QueueStatus } from './session.js';

export interface ServeOptions {
  /** Listen on this path (a stale socket file is replaced; a live one is refused). */
  socketPath?: string;
  /** Adopt an inherited fd: a listening socket (serve many frontends in turn) or a connected one (serve one). */
  fd?: number;
  /** Connect to a frontend listening here (QEMU `-chardev socket,server=on`), retrying until it answers. */
  connectPath?: string;
  /**
   * Client mode: the first delay between connection attempts, in ms (default 100); it doubles after each failed
   * attempt up to `maxRetryMs` (default 5000), and starts over once connected.
   */
  retryMs?: number;
  maxRetryMs?: number;
  /**
   * Offer packed virtqueues (VIRTIO_F_RING_PACKED; default true): the frontend decides. false offers split rings
   * only, for a frontend that takes every feature offered (QEMU's generic vhost-user devices: rng, the test
   * device) when split rings are wanted.
   */
  packedRings?: boolean;
  log?: Logger;
}

export interface ServerEvents {
  connected: [];
  disconnected: [error: Error | null];
  closed: [];
}

export class VhostUserServer extends EventEmitter<ServerEvents> {
  private listenFd = -1;
  private listenWatch: FdWatch | null = null;
  private ownsSocketPath = false;
  private session: BackendSession | null = null;
  private connection: Connection | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  /** Client mode: the next retry delay, and what the last failed attempt said (logged once per change). */
  private retryDelay = 0;
  private sessionStarted = 0;
  private lastConnectError = '';
  private closing = false;
  private ended: Promise<void> = Promise.resolve();
  readonly log: Logger;
  /** Queue threads, reused by one session after another. */
  private readonly pool: RunnerPool;
  /** Per-queue counters over every session (the control API's stats). */
  private readonly stats: SharedArrayBuffer[];

  private constructor(
    readonly device: VhostUserDevice,
    private readonly opts: ServeOptions,
  ) {
    super();
    this.log = opts.log ?? stderrLogger(device.name);
    this.pool = new RunnerPool(device, (m) => this.log.warn(m));
    this.stats = newQueueStats(device.numQueues);
  }

  static async start(device: VhostUserDevice, opts: ServeOptions): Promise<VhostUserServer> {
    const modes = [opts.socketPath, opts.fd, opts.connectPath].filter((x) => x !== undefined).length;
    if (modes !== 1) throw new Error('give exactly one of socketPath, fd or connectPath');
    const server = new VhostUserServer(device, opts);
    if (opts.socketPath !== undefined) server.listen(opts.socketPath);
    else if (opts.fd !== undefined) server.adopt(opts.fd);
    else server.connectLoop();
    return server;
  }

  /** Whether a frontend is connected now. */
  get connected(): boolean {
    return this.session !== null;
  }

  /** Where the frontend reaches us: the socket path, the connect path, or the inherited fd. */
  get endpoint(): string {
    return this.opts.socketPath ?? this.opts.connectPath ?? `fd ${this.opts.fd}`;
  }

  /** The queues: as the connected frontend set them up, and their counters since the server started. */
  queueStatus(): QueueStatus[] {
    return (
      this.session?.queueStatus() ??
      this.stats.map((s, index) => ({ index, started: false, size: 0, packed: false, stats: new Float64Array(s) }))
    );
  }

  /** Stop serving: disconnect the frontend (its session is torn down), stop listening, remove our socket file. */
  async close(): Promise<void> {
    if (this.closing) return this.ended;
    this.closing = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.listenWatch?.close();
    this.listenWatch = null;
    if (this.listenFd >= 0) close(this.listenFd);
    this.listenFd = -1;
    if (this.ownsSocketPath && this.opts.socketPath) unlinkQuiet(this.opts.socketPath);
    if (this.connection && !this.connection.isClosed) {
      this.connection.close();
      void this.endSession(null);
    }
    await this.ended;
    await this.pool.close();
    this.emit('closed');
  }

  private listen(path: string): void {
    removeStaleSocket(path);
    this.listenFd = unixListen(path);
    this.ownsSocketPath = true;
    this.log.info(`listening on ${path}`);
    this.acceptWhenReady();
  }

  private adopt(fd: number): void {
    if (isListeningSocket(fd)) {
      this.listenFd = fd;
      this.log.info(`serving on inherited listening socket fd ${fd}`);
      this.acceptWhenReady();
    } else {
      this.log.info(`serving the frontend on inherited socket fd ${fd}`);
      this.beginSession(fd);
    }
  }

  private acceptWhenReady(): void {
    if (this.closing || this.listenFd < 0 || this.listenWatch) return;
    this.listenWatch = watchReadable(this.listenFd, () => {
      const fd = unixAccept(this.listenFd);
      if (fd < 0) return;
      // One frontend at a time: later ones wait in the listen backlog until this session ends.
      this.listenWatch?.close();
      this.listenWatch = null;
      this.log.info('frontend connected');
      this.beginSession(fd);
    });
  }

  /**
   * Client mode: connect to the frontend, and again whenever it goes (QEMU restarted, its socket removed), with
   * backoff, for as long as the server runs: a frontend that comes back finds us by itself.
   */
  private connectLoop(): void {
    this.retryTimer = null;
    if (this.closing) return;
    const path = this.opts.connectPath!;
    let fd: number;
    try {
      fd = unixConnect(path);
    } catch (e) {
      const first = this.opts.retryMs ?? 100;
      const max = Math.max(first, this.opts.maxRetryMs ?? 5000);
      this.retryDelay = this.retryDelay === 0 ? first : Math.min(this.retryDelay * 2, max);
      const why = e instanceof SysError ? e.code : (e as Error).message;
      if (why !== this.lastConnectError) {
        this.lastConnectError = why;
        const hint =
          e instanceof SysError && (e.code === 'ENOENT' || e.code === 'ECONNREFUSED')
            ? 'the frontend is not listening yet (QEMU: -chardev socket,path=…,server=on)'
            : (e as Error).message;
        this.log.warn(`cannot connect to the frontend at ${path}: ${hint}; retrying, at most every ${max / 1000} s`);
      }
      this.retryTimer = setTimeout(() => this.connectLoop(), this.retryDelay);
      return;
    }
    this.lastConnectError = '';
    this.log.info(`connected to frontend at ${path}`);
    this.sessionStarted = Date.now();
    this.beginSession(fd);
  }

  /** Client mode, after a session: at once if it lasted, else after the backoff (a frontend that keeps hanging up on us). */
  private reconnect(): void {
    const path = this.opts.connectPath!;
    if (Date.now() - this.sessionStarted >= 1000) {
      this.retryDelay = 0;
      this.log.info(`reconnecting to the frontend at ${path}`);
      this.connectLoop();
      return;
    }
    const first = this.opts.retryMs ?? 100;
    this.retryDelay = Math.min(this.retryDelay === 0 ? first : this.retryDelay * 2, Math.max(first, this.opts.maxRetryMs ?? 5000));
    this.log.info(`reconnecting to the frontend at ${path} in ${this.retryDelay} ms (its last session ended at once)`);
    this.retryTimer = setTimeout(() => this.connectLoop(), this.retryDelay);
  }

  private beginSession(fd: number): void {
    const conn: Connection = new Connection(fd, {
      onMessage: (msg): Promise<void> => session.handle(msg),
      onClose: (error) => void this.endSession(error),
    });
    const session: BackendSession = new BackendSession(this.device, conn, this.log, { packedRings: this.opts.packedRings ?? true, pool: this.pool, stats: this.stats });
    this.connection = conn;
    this.session = session;
    let release!: () => void;
    this.ended = new Promise((r) => (release = r));
    this.endRelease = release;
    conn.start();
    this.emit('connected');
  }

  private endRelease: (() => void) | null = null;

  private async endSession(error: Error | null): Promise<void> {
    const session = this.session;
    if (!session) return;
    this.session = null;
    this.connection = null;
    if (error) this.log.error(`frontend connection closed: ${error.message}`);
    else this.log.info('frontend disconnected');
    try {
      await session.close();
    } catch (e) {
      this.log.error(`tearing down the session failed: ${(e as Error).stack ?? e}`);
    }
    this.emit('disconnected', error);
    const release = this.endRelease;
    this.endRelease = null;
    release?.();
    if (this.closing) return;
    if (this.opts.connectPath !== undefined) this.reconnect();
    else if (this.listenFd >= 0) this.acceptWhenReady();
    else void this.close(); // an inherited connected fd serves one frontend
  }
}

/** A socket file left by a backend that died is replaced; a live backend's, or any other file, is refused. */
function removeStaleSocket(path: string): void {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch {
    return; // nothing there
  }
  if (!isSocket) throw new Error(`${path} exists and is not a socket: refusing to replace it`);
  let fd: number;
  try {
    fd = unixConnect(path);
  } catch (e) {
    if (e instanceof SysError && e.code === 'ECONNREFUSED') {
      unlinkSync(path);
      return;
    }
    throw e;
  }
  close(fd);
  throw new Error(`${path} is in use by a running backend: stop it or choose another --socket-path`);
}

function unlinkQuiet(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}

export function stderrLogger(name: string): Logger {
  const line = (level: string, m: string) => process.stderr.write(`${new Date().toISOString()} ${level} ${name}: ${m}\n`);
  return { info: (m) => line('info', m), warn: (m) => line('warn', m), error: (m) => line('error', m) };
}
