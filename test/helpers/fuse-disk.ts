/**
 * The FUSE disk of test/devices/fixtures/faulty-disk.py, mounted for a test: a file `disk` whose reads and writes
 * fail in one range, and whose fsyncs can be slowed and logged. Needs /dev/fuse and python3-fusepy.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const PYTHON = '/usr/bin/python3';
const SCRIPT = fileURLToPath(new URL('../devices/fixtures/faulty-disk.py', import.meta.url));

/** Why FUSE disks cannot be mounted here, or null. */
export function fuseUnavailable(): string | null {
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing';
  const probe = spawnSync(PYTHON, ['-c', 'import fusepy'], { encoding: 'utf8' });
  if (probe.status !== 0) return 'python3-fusepy is not installed (apt-get install python3-fusepy libfuse2)';
  return null;
}

const isMounted = (path: string) => readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === path);

export interface FuseDisk {
  /** The disk file to serve. */
  path: string;
  unmount(): Promise<void>;
}

export interface FuseDiskOptions {
  size: number;
  bad?: { offset: number; length: number };
  /** Log each fsync's start and end (CLOCK_MONOTONIC ns) here, each taking this much longer. */
  fsyncLog?: { path: string; delayMs: number };
}

/** Mount a FUSE disk under `dir` (bounded: 10 s). */
export async function mountFuseDisk(dir: string, opts: FuseDiskOptions): Promise<FuseDisk> {
  const mnt = join(dir, 'mnt');
  mkdirSync(mnt);
  const backing = join(dir, 'backing.img');
  writeFileSync(backing, '');
  truncateSync(backing, opts.size);
  const args = [SCRIPT, backing, String(opts.bad?.offset ?? 0), String(opts.bad?.length ?? 0), mnt];
  if (opts.fsyncLog) args.push(opts.fsyncLog.path, String(opts.fsyncLog.delayMs));
  const fuse: ChildProcess = spawn(PYTHON, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  fuse.stdout!.on('data', (d) => (output += d));
  fuse.stderr!.on('data', (d) => (output += d));
  const unmount = async (): Promise<void> => {
    if (fuse.exitCode === null && fuse.signalCode === null) {
      const gone = new Promise((r) => fuse.once('exit', r));
      fuse.kill('SIGTERM');
      const timer = setTimeout(() => fuse.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(timer);
    }
    if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
  };
  const exited = new Promise<never>((_, reject) => fuse.once('exit', (code) => reject(new Error(`faulty-disk.py exited ${code}: ${output}`))));
  exited.catch(() => {});
  const deadline = Date.now() + 10_000;
  while (!isMounted(mnt)) {
    if (Date.now() > deadline) {
      await unmount();
      throw new Error(`faulty-disk.py did not mount within 10 s: ${output}`);
    }
    await Promise.race([exited, new Promise((r) => setTimeout(r, 20))]);
  }
  return { path: join(mnt, 'disk'), unmount };
}
