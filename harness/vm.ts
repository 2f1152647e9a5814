// One test VM from start to power-off: QEMU runs the guest's script, the serial console is the only channel back,
// and whatever happens (guest done, guest hung, QEMU crashed, caller aborted) QEMU is gone and its temporary files
// removed before runGuest settles.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chooseAccel, type Accel } from './accel.js';
import { EXIT_PREFIX, READY_LINE, RESULT_PREFIX } from './guest-init.js';
import { tail } from './host-tools.js';
import { machineArgs, type MachineSpec, type VhostUserDevice } from './qemu-args.js';
import { qemuCommand } from './qemu-install.js';
import { loadSetup, type HarnessSetup } from './setup.js';

export interface RunGuestOptions {
  devices?: VhostUserDevice[];
  /** Shell script (busybox sh) the guest runs; print `RESULT ...` lines to report back. */
  script: string;
  /** Bound on the whole run, from spawning QEMU to the guest's exit line. */
  timeoutMs: number;
  memoryMiB?: number;
  /** DIMM slots for memory hot-plug (see MachineSpec). */
  hotplugSlots?: number;
  cpus?: number;
  accel?: Accel;
  onConsoleLine?: (line: string) => void;
  /** Receives QEMU's process as soon as it is spawned, e.g. to record its pid for a leak check. */
  onSpawn?: (qemu: ChildProcess) => void;
  /** Aborting kills QEMU and rejects; wire it to the caller's own failure (a backend that threw). */
  signal?: AbortSignal;
  /** Extra kernel command line words, e.g. harness.root=/dev/vda for the full Debian guest. */
  append?: string[];
  /** Extra QEMU arguments, appended last. */
  extra?: string[];
  /** Defaults to the last completed set-up (loadSetup()). */
  setup?: HarnessSetup;
  /** How long QEMU may take to exit after the guest's exit line or after SIGTERM. */
  graceMs?: number;
}

export interface GuestRun {
  /** The script's exit status as the guest reported it. */
  exitCode: number;
  /** The rest of each `RESULT ` line, in order. */
  results: string[];
  console: string;
  accel: Accel;
  /** From spawning QEMU to the guest's ready line. */
  bootMs: number;
}

export class GuestError extends Error {
  constructor(
    message: string,
    readonly console: string,
    readonly qemuStderr: string,
  ) {
    super(message);
    this.name = 'GuestError';
  }
}

const CONSOLE_CAP = 32 * 1024 * 1024;

// QEMU runs in its own process group, so a test runner's signals to our group do not reach it: if this process
// exits while a VM is still up, kill it here rather than leave it running.
const live = new Set<number>();
let exitHookInstalled = false;
function track(pid: number): void {
  live.add(pid);
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const p of live) {
      try {
        process.kill(p, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  });
}

/** Pids of QEMU processes this process started that have not yet been reaped. */
export function liveQemuPids(): number[] {
  return [...live];
}

function exited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (exited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.off('exit', onExit);
      resolve(false);
    }, ms);
    const onExit = () => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

/** SIGTERM, then SIGKILL after the grace period, by pid: only the process we spawned. */
async function stop(child: ChildProcess, graceMs: number): Promise<void> {
  const pid = child.pid;
  if (pid === undefined || exited(child)) return;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  if (await waitExit(child, graceMs)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  if (!(await waitExit(child, 5000))) throw new Error(`QEMU pid ${pid} survived SIGKILL for 5 s`);
}

/**
 * The QEMU command for the test guest with the serial console on stdio: with a script file the guest runs it and
 * powers off; without one its /init starts a shell on the console.
 */
export function guestCommand(
  setup: HarnessSetup,
  m: Pick<MachineSpec, 'accelArgs' | 'memoryMiB' | 'hotplugSlots' | 'cpus' | 'devices' | 'scriptFile' | 'append' | 'extra'>,
): ReturnType<typeof qemuCommand> {
  return qemuCommand(setup.qemu, 'qemu-system-x86_64', machineArgs({ kernel: setup.guest.kernel, initrd: setup.guest.initrd, serial: { to: 'stdio' }, ...m }));
}

export async function runGuest(opts: RunGuestOptions): Promise<GuestRun> {
  const setup = opts.setup ?? loadSetup();
  if (!setup) throw new Error('no harness set-up found: run `npm run setup` (or call ensureSetup()) first');
  opts.signal?.throwIfAborted();
  const accel = chooseAccel(opts.accel ? { force: opts.accel } : {});
  const graceMs = opts.graceMs ?? 5000;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vhost-ts-vm-'));
  let child: ChildProcess | undefined;
  try {
    const scriptFile = path.join(tmp, 'script.sh');
    fs.writeFileSync(scriptFile, opts.script);
    const cmd = guestCommand(setup, {
      accelArgs: accel.args,
      scriptFile,
      memoryMiB: opts.memoryMiB ?? 512,
      ...(opts.hotplugSlots ? { hotplugSlots: opts.hotplugSlots } : {}),
      cpus: opts.cpus ?? 2,
      devices: opts.devices ?? [],
      ...(opts.append ? { append: opts.append } : {}),
      ...(opts.extra ? { extra: opts.extra } : {}),
    });
    const started = Date.now();
    const proc = spawn(cmd.file, cmd.args, {
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...cmd.env },
      cwd: tmp,
    });
    child = proc;
    if (proc.pid !== undefined) {
      const pid = proc.pid;
      track(pid);
      proc.once('exit', () => live.delete(pid));
    }
    opts.onSpawn?.(proc);
    return await watch(proc, opts, accel.accel, started, graceMs);
  } finally {
    if (child) await stop(child, graceMs);
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

/** Reads the console until the guest's exit line and QEMU's exit, or a failure; never outlives opts.timeoutMs. */
function watch(proc: ChildProcess, opts: RunGuestOptions, accel: Accel, started: number, graceMs: number): Promise<GuestRun> {
  return new Promise<GuestRun>((resolve, reject) => {
    let consoleText = '';
    let stderr = '';
    let pending = '';
    const results: string[] = [];
    let bootMs: number | undefined;
    let exitCode: number | undefined;
    let settled = false;
    let afterExitTimer: NodeJS.Timeout | undefined;

    const finish = (err?: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (afterExitTimer) clearTimeout(afterExitTimer);
      opts.signal?.removeEventListener('abort', onAbort);
      if (err !== undefined) {
        const detail = `\n--- console (tail) ---\n${tail(consoleText, 40)}\n--- QEMU stderr ---\n${tail(stderr, 40)}`;
        reject(new GuestError(`${err}${detail}`, consoleText, stderr));
      } else {
        resolve({ exitCode: exitCode!, results, console: consoleText, accel, bootMs: bootMs ?? Date.now() - started });
      }
    };

    const onLine = (raw: string) => {
      const line = raw.replace(/\r$/, '');
      try {
        opts.onConsoleLine?.(line);
      } catch (err) {
        finish(`onConsoleLine threw: ${(err as Error).message ?? String(err)}`);
      }
      if (line === READY_LINE && bootMs === undefined) bootMs = Date.now() - started;
      else if (line.startsWith(RESULT_PREFIX)) results.push(line.slice(RESULT_PREFIX.length));
      else if (line.startsWith(EXIT_PREFIX) && exitCode === undefined) {
        exitCode = Number(line.slice(EXIT_PREFIX.length).trim());
        // The guest powers off next; give QEMU a moment to exit on its own, runGuest's cleanup stops it otherwise.
        afterExitTimer = setTimeout(() => finish(), graceMs);
      }
    };

    proc.stdout!.on('data', (chunk: Buffer) => {
      const text = chunk.toString('utf8');
      if (consoleText.length < CONSOLE_CAP) consoleText += text;
      pending += text;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const l of lines) onLine(l);
    });
    proc.stderr!.on('data', (chunk: Buffer) => {
      stderr = (stderr + chunk.toString('utf8')).slice(-CONSOLE_CAP);
    });
    proc.on('error', (err) => finish(`cannot start QEMU: ${err.message}`));
    proc.on('close', (code, signal) => {
      if (pending) onLine(pending);
      pending = '';
      if (exitCode !== undefined) finish();
      else finish(`QEMU exited (${code ?? signal}) before the guest reported an exit code`);
    });

    const timer = setTimeout(
      () => finish(`guest did not finish within ${opts.timeoutMs} ms${bootMs === undefined ? ' (it never reached its ready line)' : ''}`),
      opts.timeoutMs,
    );
    const onAbort = () => finish(`aborted by the caller: ${String(opts.signal?.reason ?? 'abort')}`);
    if (opts.signal?.aborted) onAbort();
    else opts.signal?.addEventListener('abort', onAbort, { once: true });
  });
}
