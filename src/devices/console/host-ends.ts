/**
 * The host side of a console port: where the guest's output goes and its input comes from. Each end runs on the
 * main thread's event loop and has flow control both ways: `write` says when it is backed up (the port then stops
 * taking the guest's chains until `drain`), and `pauseInput` stops reading (the socket or terminal keeps the
 * bytes) while the guest has no buffers posted.
 */
import { closeSync, createWriteStream, lstatSync, openSync, unlinkSync, type WriteStream } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { close, hungUp, openPty, read, setWindowSize, watchReadable, windowSize, write, type FdWatch, type WindowSize } from '../../sys/index.js';

export interface HostEndEvents {
  /** Bytes for the guest (only valid during the call). */
  input(bytes: Uint8Array): void;
  /** A client attached (true) or went away (false). */
  connection(open: boolean): void;
  /** The terminal's window size changed. */
  resize(size: WindowSize): void;
  /** The end takes output again after `write` returned false. */
  drain(): void;
  /** stdio: the user typed the detach key. */
  detach(): void;
  log(message: string): void;
}

export interface HostEnd {
  /** What it is, for the log: "socket /tmp/c.sock", "pty /dev/pts/3". */
  readonly description: string;
  /** Whether a client is attached now (always true for stdio and file). */
  readonly connected: boolean;
  /**
   * Guest output. False: backed up, hold further output until drain(). `flushed` is called once these bytes
   * have left this process (handed to the kernel), when {@link unflushed} was not 0 after the call.
   */
  write(bytes: Uint8Array, flushed?: () => void): boolean;
  /** Bytes written and still in this process (not yet handed to the kernel): lost if the backend dies now. */
  readonly unflushed: number;
  pauseInput(): void;
  resumeInput(): void;
  /** The attached terminal's size, if it has one. */
  size(): WindowSize | null;
  /** Tell the end the guest's size (a pty: what a terminal program attaching to it sees first). */
  setSize?(size: WindowSize): void;
  /**
   * Resolves once the end serves (a socket listens); rejects with why it cannot (the path is taken, the directory
   * is missing). Ends that open synchronously throw from {@link openHostEnd} instead and resolve at once.
   */
  readonly ready: Promise<void>;
  /**
   * Let go of everything. `flush`: output already written still reaches the client (a socket's is sent, then
   * end-of-file) instead of being cut off; for a port removed at run time rather than a process that exits.
   */
  close(flush?: boolean): void;
}

export type HostEndSpec =
  | { kind: 'socket'; path: string }
  | { kind: 'pty' }
  | { kind: 'stdio'; detachKey?: number }
  | { kind: 'file'; path: string };

/** `socket:PATH`, `pty`, `stdio`, `file:PATH` as given on the command line. */
export function parseHostEnd(text: string): HostEndSpec {
  if (text === 'pty') return { kind: 'pty' };
  if (text === 'stdio') return { kind: 'stdio' };
  const m = /^(socket|file):(.+)$/.exec(text);
  if (m) return { kind: m[1] as 'socket' | 'file', path: m[2] };
  throw new Error(`console backend "${text}": use socket:PATH, pty, stdio or file:PATH`);
}

/** The spec as `parseHostEnd` reads it back (`socket:PATH`: what a saved state records). */
export function describeHostEnd(spec: HostEndSpec): string {
  return spec.kind === 'socket' || spec.kind === 'file' ? `${spec.kind}:${spec.path}` : spec.kind;
}

export function openHostEnd(spec: HostEndSpec, events: HostEndEvents): HostEnd {
  switch (spec.kind) {
    case 'socket':
      return new SocketEnd(spec.path, events);
    case 'pty':
      return new PtyEnd(events);
    case 'stdio':
      return new StdioEnd(events, spec.detachKey ?? 0x1d);
    case 'file':
      return new FileEnd(spec.path, events);
  }
}

/**
 * A Unix socket server, one client at a time. A client that connects while another is attached waits (unread)
 * until that one leaves, as it would in the listen queue; a third is told the port is busy and closed. (A client
 * that reconnects at once often arrives before its old connection's close has been seen here.)
 */
class SocketEnd implements HostEnd {
  readonly description: string;
  private readonly server: Server;
  private client: Socket | null = null;
  private waiting: Socket | null = null;
  private paused = false;
  /** The path is ours to unlink only once we listened on it (it may be someone's file). */
  private listening = false;
  readonly ready: Promise<void>;

  constructor(
    private readonly path: string,
    private readonly events: HostEndEvents,
  ) {
    this.description = `socket ${path}`;
    removeStaleSocket(path);
    this.server = createServer((socket) => this.accept(socket));
    this.ready = new Promise((resolve, reject) => {
      this.server.once('listening', () => {
        this.listening = true;
        resolve();
      });
      this.server.on('error', (e) => {
        events.log(`${this.description}: ${e.message}`);
        reject(e);
      });
    });
    this.ready.catch(() => {}); // ends opened at start-up are not awaited: the log says it
    this.server.listen(path);
  }

  get connected(): boolean {
    return this.client !== null;
  }

  private accept(socket: Socket): void {
    socket.on('error', () => {}); // 'close' follows and says it
    if (this.client === null) return this.attach(socket);
    if (this.waiting !== null) {
      socket.end('vhost-ts console: this port already has a client\r\n');
      return;
    }
    this.waiting = socket;
    socket.pause();
    socket.once('close', () => {
      if (this.waiting === socket) this.waiting = null;
    });
  }

  private attach(socket: Socket): void {
    this.client = socket;
    socket.on('data', (d: Buffer) => this.events.input(d));
    socket.on('drain', () => this.events.drain());
    socket.on('close', () => {
      if (this.client !== socket) return;
      this.client = null;
      this.events.connection(false);
      // Output that was waiting for this client's socket to drain now goes to the backlog.
      this.events.drain();
      const next = this.waiting;
      this.waiting = null;
      if (next !== null && !next.destroyed) {
        if (!this.paused) next.resume();
        this.attach(next);
      }
    });
    if (this.paused) socket.pause();
    else socket.resume();
    this.events.connection(true);
  }

  write(bytes: Uint8Array, flushed?: () => void): boolean {
    // Node copies nothing for a Buffer; the caller's bytes are a fresh copy per chain.
    return this.client ? this.client.write(bytes, flushed) : true;
  }

  get unflushed(): number {
    return this.client?.writableLength ?? 0;
  }

  pauseInput(): void {
    this.paused = true;
    this.client?.pause();
  }

  resumeInput(): void {
    this.paused = false;
    this.client?.resume();
  }

  size(): WindowSize | null {
    return null;
  }

  close(flush = false): void {
    this.waiting?.destroy();
    const client = this.client;
    if (flush && client) {
      // What was written is sent, then end-of-file; a client that does not read it is cut off after a while.
      client.end();
      const timer = setTimeout(() => client.destroy(), FLUSH_MS);
      timer.unref();
      client.once('close', () => clearTimeout(timer));
    } else client?.destroy();
    this.waiting = this.client = null;
    this.server.close();
    if (!this.listening) return;
    try {
      unlinkSync(this.path);
    } catch {
      /* already gone */
    }
  }
}

/** How long a closing socket end waits for its client to take the output already written. */
const FLUSH_MS = 5000;

function removeStaleSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    /* none there */
  }
}

/** How often a pty is checked for a terminal attaching or going, and for its size (Linux notifies neither). */
const PTY_CHECK_MS = 200;

/**
 * A pseudo-terminal: its slave path is what a user attaches a terminal program to (screen, minicom, socat). A
 * client is attached while someone holds the slave open; before that and after the last close the master reports
 * a hangup, and output waits in the port's backlog.
 */
class PtyEnd implements HostEnd {
  readonly description: string;
  private readonly fd: number;
  private watch: FdWatch | null = null;
  private readonly timer: NodeJS.Timeout;
  private attached = false;
  private paused = false;
  private last: WindowSize;
  private readonly buf = new Uint8Array(4096);
  readonly ready = Promise.resolve();
  /** Output the master could not take yet (EAGAIN): retried on the next check. */
  private stuck: Uint8Array | null = null;

  constructor(private readonly events: HostEndEvents) {
    const pty = openPty();
    this.fd = pty.fd;
    this.description = `pty ${pty.path}`;
    // Open and close the slave once, so that "nobody attached" reads as a hangup from the start.
    closeSync(openSync(pty.path, 'r+'));
    this.last = windowSize(this.fd);
    this.timer = setInterval(() => this.check(), PTY_CHECK_MS);
    this.timer.unref();
  }

  /** The size a user's terminal sees before it sets its own (TIOCSWINSZ on the master). */
  setSize(size: WindowSize): void {
    setWindowSize(this.fd, size);
    this.last = size;
  }

  get connected(): boolean {
    return this.attached;
  }

  private check(): void {
    const up = !hungUp(this.fd);
    if (up !== this.attached) {
      this.attached = up;
      this.updateWatch();
      this.events.connection(up);
    }
    if (this.stuck && this.flushStuck()) {
      const flushed = this.onFlushed;
      this.onFlushed = undefined;
      flushed?.();
      this.events.drain();
    }
    const now = windowSize(this.fd);
    if (now.cols !== this.last.cols || now.rows !== this.last.rows) {
      this.last = now;
      this.events.resize(now);
    }
  }

  private updateWatch(): void {
    const want = this.attached && !this.paused;
    if (want && !this.watch) this.watch = watchReadable(this.fd, () => this.readable());
    if (!want && this.watch) {
      this.watch.close();
      this.watch = null;
    }
  }

  private readable(): void {
    for (;;) {
      let n: number;
      try {
        n = read(this.fd, this.buf);
      } catch {
        // EIO: the last holder of the slave closed it. The next check notices the hangup.
        this.watch?.close();
        this.watch = null;
        return;
      }
      if (n <= 0) return;
      this.events.input(this.buf.subarray(0, n));
      if (this.paused) return;
    }
  }

  get unflushed(): number {
    return this.stuck?.length ?? 0;
  }

  private onFlushed: (() => void) | undefined;

  write(bytes: Uint8Array, flushed?: () => void): boolean {
    if (!this.attached) return true;
    if (this.stuck) return false;
    this.onFlushed = flushed;
    let n: number;
    try {
      n = write(this.fd, bytes);
    } catch {
      return true; // hung up under us: the next check says so
    }
    if (n === bytes.length) return true;
    this.stuck = bytes.slice(Math.max(n, 0));
    return false;
  }

  private flushStuck(): boolean {
    const s = this.stuck!;
    let n: number;
    try {
      n = write(this.fd, s);
    } catch {
      this.stuck = null;
      return true;
    }
    if (n === s.length) {
      this.stuck = null;
      return true;
    }
    if (n > 0) this.stuck = s.slice(n);
    return false;
  }

  pauseInput(): void {
    this.paused = true;
    this.updateWatch();
  }

  resumeInput(): void {
    this.paused = false;
    this.updateWatch();
  }

  size(): WindowSize | null {
    return this.last;
  }

  close(): void {
    clearInterval(this.timer);
    this.watch?.close();
    this.watch = null;
    close(this.fd);
  }
}

/**
 * The terminal this process runs in, in raw mode: every key goes to the guest but the detach key (Ctrl-] by
 * default, as telnet and virsh console), which restores the terminal and asks the program to leave.
 */
class StdioEnd implements HostEnd {
  readonly description = 'stdio';
  readonly connected = true;
  readonly ready = Promise.resolve();
  private readonly onData = (d: Buffer) => this.input(d);
  private readonly onResize = () => {
    const s = this.size();
    if (s) this.events.resize(s);
  };
  private readonly onDrain = () => this.events.drain();
  private readonly raw: boolean;

  constructor(
    private readonly events: HostEndEvents,
    private readonly detachKey: number,
  ) {
    this.raw = process.stdin.isTTY === true;
    if (this.raw) process.stdin.setRawMode(true);
    process.stdin.on('data', this.onData);
    process.stdin.resume();
    process.stdout.on('resize', this.onResize);
    process.stdout.on('drain', this.onDrain);
  }

  private input(d: Buffer): void {
    const k = d.indexOf(this.detachKey);
    if (k < 0) return this.events.input(d);
    if (k > 0) this.events.input(d.subarray(0, k));
    this.events.detach();
  }

  write(bytes: Uint8Array, flushed?: () => void): boolean {
    return process.stdout.write(bytes, flushed);
  }

  get unflushed(): number {
    return process.stdout.writableLength;
  }

  pauseInput(): void {
    process.stdin.pause();
  }

  resumeInput(): void {
    process.stdin.resume();
  }

  size(): WindowSize | null {
    return process.stdout.isTTY ? { cols: process.stdout.columns, rows: process.stdout.rows } : null;
  }

  close(): void {
    process.stdin.off('data', this.onData);
    process.stdout.off('resize', this.onResize);
    process.stdout.off('drain', this.onDrain);
    // A terminal that is gone, or no longer ours (EIO: our process group lost it), needs no restoring, and closing
    // must not throw: the program is on its way out and has more to clean up.
    try {
      if (this.raw) process.stdin.setRawMode(false);
    } catch {
      // nothing to restore
    }
    process.stdin.pause();
  }
}

/** An append-only log of what the guest writes; nothing comes back. */
class FileEnd implements HostEnd {
  readonly description: string;
  readonly connected = true;
  readonly ready = Promise.resolve();
  private readonly out: WriteStream;

  constructor(path: string, events: HostEndEvents) {
    this.description = `file ${path}`;
    // Opened now, so a bad path fails at start-up rather than at the guest's first byte.
    const fd = openSync(path, 'a');
    this.out = createWriteStream(path, { fd, flags: 'a' });
    this.out.on('drain', () => events.drain());
    this.out.on('error', (e) => events.log(`${this.description}: ${e.message}`));
  }

  write(bytes: Uint8Array, flushed?: () => void): boolean {
    return this.out.write(bytes, flushed);
  }

  get unflushed(): number {
    return this.out.writableLength;
  }

  pauseInput(): void {}
  resumeInput(): void {}

  size(): WindowSize | null {
    return null;
  }

  close(): void {
    this.out.end();
  }
}
