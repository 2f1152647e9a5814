/**
 * Child processes for the benchmarks: long-lived backends and frontends, and bounded one-shot runs, each
 * optionally pinned to a CPU with taskset. Every process started through Processes is tracked until it exits, so
 * stopAll() (on the normal path, on an error, on SIGINT/SIGTERM) leaves nothing behind. Every wait is bounded.
 */
import { spawn, type ChildProcess } from 'node:child_process';

const TAIL = 16384;

export interface Command {
  file: string;
  args: string[];
  env?: Record<string, string>;
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** `taskset -c CPU` in front of a command (taskset execs it: the PID stays the program's own). */
export function pinned(cmd: Command, cpu: number | undefined): Command {
  if (cpu === undefined) return cmd;
  return { ...cmd, file: 'taskset', args: ['-c', String(cpu), cmd.file, ...cmd.args] };
}

/** True if p settled within ms. */
export async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([p.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export interface ProcOptions {
  /** How to ask it to stop (testpmd prints its statistics and closes its ports on SIGINT). Default SIGTERM. */
  stopSignal?: NodeJS.Signals;
  /** How long it may take to stop before SIGKILL. Default 5 s. */
  graceMs?: number;
  /** Keep its stdin open as a pipe for {@link Proc.send} (testpmd's interactive commands). Default: closed. */
  input?: boolean;
}

/** A long-running program: output kept (the tail, for error messages) and offered line by line to listeners. */
export class Proc {
  private out = '';
  private partial = '';
  private exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly lineListeners: ((line: string, t: number) => void)[] = [];
  readonly exited: Promise<void>;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
    private readonly opts: ProcOptions = {},
  ) {
    child.stdout?.on('data', (d: Buffer) => this.take(d));
    child.stderr?.on('data', (d: Buffer) => {
      this.out = (this.out + d.toString()).slice(-TAIL);
    });
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

  private take(d: Buffer): void {
    const t = performance.now();
    const text = d.toString();
    this.out = (this.out + text).slice(-TAIL);
    if (this.lineListeners.length === 0) return;
    const lines = (this.partial + text).split('\n');
    this.partial = lines.pop() ?? '';
    for (const line of lines) for (const l of this.lineListeners) l(line, t);
  }

  onLine(listener: (line: string, t: number) => void): void {
    this.lineListeners.push(listener);
  }

  /** Writes one line to its stdin (started with `input`). */
  send(line: string): void {
    if (!this.child.stdin) throw new Error(`${this.name} was started without input`);
    this.child.stdin.write(`${line}\n`);
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.exitInfo === undefined;
  }

  get output(): string {
    return this.out;
  }

  /** The last lines it printed, and how it exited if it did. */
  describe(lines = 25): string {
    const how = this.exitInfo
      ? `${this.name} exited (${this.exitInfo.signal ?? `code ${this.exitInfo.code}`})`
      : `${this.name} is running (pid ${this.pid})`;
    // testpmd clears the screen before each statistics block.
    const text = this.out.replace(/\x1b\[[0-9;]*[A-Za-z]/g, '').replace(/\n{2,}/g, '\n').trim();
    return text ? `${how}; its output ends with:\n${text.split('\n').slice(-lines).join('\n')}` : `${how}; no output`;
  }

  /** The stop signal, then SIGKILL if it is still there after graceMs; resolves once it has exited (bounded). */
  async stop(graceMs = this.opts.graceMs ?? 5000): Promise<void> {
    if (!this.running) return;
    this.child.kill(this.opts.stopSignal ?? 'SIGTERM');
    if (await within(this.exited, graceMs)) return;
    this.child.kill('SIGKILL');
    await within(this.exited, 5000);
  }
}

export class Processes {
  private readonly live = new Set<Proc>();

  /** Starts a long-lived program (output kept; stdin closed unless `opts.input`). */
  start(name: string, cmd: Command, opts: ProcOptions = {}): Proc {
    const stdin = opts.input ? 'pipe' : 'ignore';
    const child = spawn(cmd.file, cmd.args, { env: { ...process.env, ...cmd.env }, stdio: [stdin, 'pipe', 'pipe'] });
    // A program that exits with our commands unread must not take this process down with EPIPE.
    child.stdin?.on('error', () => {});
    const p = new Proc(name, child, opts);
    this.live.add(p);
    void p.exited.then(() => this.live.delete(p));
    return p;
  }

  /** Runs a program to completion, killed (SIGKILL) if it takes longer than timeoutMs. */
  async run(name: string, cmd: Command, timeoutMs: number): Promise<RunResult> {
    const p = this.start(name, cmd);
    let stdout = '';
    let stderr = '';
    p.child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
    p.child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    if (!(await within(p.exited, timeoutMs))) {
      await p.stop(0);
      throw new Error(`${name} did not finish within ${(timeoutMs / 1000).toFixed(0)} s (killed)\n${stdout}${stderr}`);
    }
    // Exit can precede the last output: give the pipes a moment to drain.
    await within(Promise.all([ended(p.child.stdout), ended(p.child.stderr)]), 1000);
    return { code: p.child.exitCode, signal: p.child.signalCode, stdout, stderr };
  }

  /** Stops everything still running (in parallel, each bounded). */
  async stopAll(): Promise<void> {
    await Promise.all([...this.live].map((p) => p.stop()));
  }
}

function ended(stream: NodeJS.ReadableStream | null | undefined): Promise<void> {
  if (!stream || (stream as { readableEnded?: boolean }).readableEnded) return Promise.resolve();
  return new Promise((r) => {
    stream.once('end', () => r());
    stream.once('close', () => r());
  });
}
