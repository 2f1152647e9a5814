// Host programs the harness runs during set-up, each with a hard time bound, and the Debian package that provides
// each so a missing one turns into an actionable message instead of a bare ENOENT.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const APT_PACKAGE: Record<string, string> = {
  'apt-get': 'apt',
  'apt-cache': 'apt',
  'dpkg-deb': 'dpkg',
  ldd: 'libc-bin',
  chroot: 'coreutils',
  debootstrap: 'debootstrap',
  mke2fs: 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  fio: 'fio',
  iperf3: 'iperf3',
  ip: 'iproute2',
  ethtool: 'ethtool',
  umount: 'mount',
  'qemu-system-x86_64': 'qemu-system-x86',
};

export class HostToolError extends Error {
  constructor(
    message: string,
    readonly tool: string,
  ) {
    super(message);
    this.name = 'HostToolError';
  }
}

export function aptPackageFor(tool: string): string {
  return APT_PACKAGE[tool] ?? tool;
}

export function missingToolMessage(tools: string[]): string {
  const pkgs = [...new Set(tools.map(aptPackageFor))].sort();
  return `missing host tool${tools.length > 1 ? 's' : ''}: ${tools.join(', ')}; install with: apt-get install -y ${pkgs.join(' ')}`;
}

// Non-root PATHs often lack the sbin directories where mke2fs, debootstrap and chroot live.
const EXTRA_PATH = ['/usr/local/sbin', '/usr/sbin', '/sbin'];

export function which(tool: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), ...EXTRA_PATH];
  for (const dir of dirs) {
    const candidate = path.join(dir, tool);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (fs.statSync(candidate).isFile()) return candidate;
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

export function requireTools(tools: string[]): Record<string, string> {
  const found: Record<string, string> = {};
  const missing: string[] = [];
  for (const t of tools) {
    const p = which(t);
    if (p) found[t] = p;
    else missing.push(t);
  }
  if (missing.length > 0) throw new HostToolError(missingToolMessage(missing), missing[0]!);
  return found;
}

export interface RunOptions {
  timeoutMs: number;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Each output line as it arrives, for long steps whose progress the user should see. */
  onLine?: (line: string) => void;
}

export interface RunResult {
  stdout: string;
  stderr: string;
}

const OUTPUT_CAP = 8 * 1024 * 1024;

/** Runs a program to completion; rejects on non-zero exit or timeout (after killing it) with its stderr tail. */
export function run(file: string, args: string[], opts: RunOptions): Promise<RunResult> {
  const resolved = file.includes('/') ? file : which(file);
  if (!resolved) return Promise.reject(new HostToolError(missingToolMessage([file]), file));
  return new Promise((resolve, reject) => {
    const child = spawn(resolved, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    let pending = '';
    const collect = (which: 'out' | 'err') => (chunk: Buffer) => {
      const text = chunk.toString('utf8');
      if (which === 'out') stdout = (stdout + text).slice(-OUTPUT_CAP);
      else stderr = (stderr + text).slice(-OUTPUT_CAP);
      if (opts.onLine) {
        pending += text;
        const lines = pending.split('\n');
        pending = lines.pop() ?? '';
        for (const l of lines) opts.onLine(l);
      }
    };
    child.stdout.on('data', collect('out'));
    child.stderr.on('data', collect('err'));
    let timedOut = false;
    let killTimer: NodeJS.Timeout | undefined;
    const signal = (sig: NodeJS.Signals) => {
      if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
      try {
        process.kill(child.pid, sig);
      } catch {
        // exited between the check and the kill
      }
    };
    const timer = setTimeout(() => {
      timedOut = true;
      signal('SIGTERM');
      killTimer = setTimeout(() => signal('SIGKILL'), 5000);
    }, opts.timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      const cmd = [path.basename(resolved), ...args].join(' ');
      if (timedOut) {
        reject(new Error(`${cmd}: timed out after ${opts.timeoutMs} ms\n${tail(stderr || stdout)}`));
      } else if (code !== 0) {
        reject(new Error(`${cmd}: exited with ${code ?? signal}\n${tail(stderr || stdout)}`));
      } else {
        resolve({ stdout, stderr });
      }
    });
  });
}

export function tail(text: string, lines = 30): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

export function isRoot(): boolean {
  return process.getuid?.() === 0;
}
