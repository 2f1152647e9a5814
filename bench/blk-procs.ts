/**
 * Child processes for bench/blk.ts: long-lived backends (vhost-ts, qemu-storage-daemon) and bounded one-shot runs
 * (qemu-img bench), each optionally pinned to a CPU with taskset. Every process started here is tracked until it
 * exits, so stopAll() (on the normal path, on an error and on SIGINT/SIGTERM) leaves nothing behind. Every wait is
 * bounded.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import type { Command } from '../harness/qemu-install.js';

const TAIL = 8192;

/** `taskset -c CPU` in front of a command (taskset execs it: the PID stays the program's own). */
export function pinned(cmd: Command, cpu: number | undefined): Command {
  if (cpu === undefined) return cmd;
  return { file: 'taskset', args: ['-c', String(cpu), cmd.file, ...cmd.args], env: cmd.env };
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A backend program that keeps running until stopped; its output is kept (the last few KiB) for error messages. */
export class Backend {
  private out = '';
  private exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  readonly exited: Promise<void>;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    const keep = (d: Buffer) => {
      this.out = (this.out + d.toString()).slice(-TAIL);
    };
    child.stdout?.on('data', keep);
    child.stderr?.on('data', keep);
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        resolve();
      });
      child.once('error', (e) => {
        this.out += `\nspawn failed: ${e.message}`;
        this.exitInfo ??= { code: null, signal: null };
        resolve();
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.exitInfo === undefined;
  }

  /** The last lines it printed, and how it exited if it did. */
  describe(): string {
    const how = this.exitInfo
      ? `${this.name} exited (${this.exitInfo.signal ?? `code ${this.exitInfo.code}`})`
      : `${this.name} is running (pid ${this.pid})`;
    const text = this.out.trim();
    return text ? `${how}; its output ends with:\n${text.split('\n').slice(-15).join('\n')}` : `${how}; no output`;
  }

  /** SIGTERM, then SIGKILL if it is still there after graceMs; resolves once it has exited (bounded). */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.running) return;
    this.child.kill('SIGTERM');
    if (await within(this.exited, graceMs)) return;
    this.child.kill('SIGKILL');
    await within(this.exited, 5000);
  }
}

/** True if p settled within ms. */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([p.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export class Processes {
  private readonly live = new Set<Backend>();

  /** Starts a long-lived program (stdin closed, output kept). */
  start(name: string, cmd: Command): Backend {
    const child = spawn(cmd.file, cmd.args, {
      env: { ...process.env, ...cmd.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const b = new Backend(name, child);
    this.live.add(b);
    void b.exited.then(() => this.live.delete(b));
    return b;
  }

  /** Runs a program to completion, killed (SIGKILL) if it takes longer than timeoutMs. */
  async run(name: string, cmd: Command, timeoutMs: number): Promise<RunResult> {
    const b = this.start(name, cmd);
    let stdout = '';
    let stderr = '';
    b.child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
    b.child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    const finished = await within(b.exited, timeoutMs);
    if (!finished) {
      await b.stop(0);
      throw new Error(`${name} did not finish within ${(timeoutMs / 1000).toFixed(0)} s (killed)\n${stdout}${stderr}`);
    }
    // Exit can precede the last output: give the pipes a moment to drain.
    await within(
      Promise.all([once(b.child.stdout), once(b.child.stderr)]),
      1000,
    );
    const child = b.child;
    return { code: child.exitCode, signal: child.signalCode, stdout, stderr };
  }

  /** Stops everything still running (in parallel, each bounded). */
  async stopAll(): Promise<void> {
    await Promise.all([...this.live].map((b) => b.stop()));
  }
}

function once(stream: NodeJS.ReadableStream | null | undefined): Promise<void> {
  if (!stream || (stream as { readableEnded?: boolean }).readableEnded) return Promise.resolve();
  return new Promise((r) => {
    stream.once('end', () => r());
    stream.once('close', () => r());
  });
}

function tryConnect(socketPath: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    const done = (ok: boolean) => {
      clearTimeout(timer);
      s.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

/**
 * Waits until the backend accepts connections on socketPath: the socket file exists and a connection succeeds
 * (bind creates the file before listen). The probe connection is closed at once and the backend given a moment to
 * notice, since a vhost-user backend serves one frontend at a time. Fails early if the backend exits.
 */
export async function waitForSocket(backend: Backend, socketPath: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!backend.running) throw new Error(`${backend.name} exited before listening on ${socketPath}\n${backend.describe()}`);
    const st = fs.statSync(socketPath, { throwIfNoEntry: false });
    if (st?.isSocket() && (await tryConnect(socketPath, 1000))) {
      await sleep(300);
      if (!backend.running) throw new Error(`${backend.name} exited after the probe connection\n${backend.describe()}`);
      return;
    }
    await sleep(50);
  }
  throw new Error(`${backend.name} did not listen on ${socketPath} within ${timeoutMs / 1000} s\n${backend.describe()}`);
}
