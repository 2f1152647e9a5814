// The artefact cache: every artefact is a directory that appears only complete (built under a temporary name, a
// marker written last, then renamed), so an interrupted set-up leaves either the old artefact or debris that the
// next run recognises by name and removes.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isRoot, run } from './host-tools.js';

const MARKER = '.vhost-ts.json';
const SOURCE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export function resolveCacheDir(explicit?: string): string {
  const dir = path.resolve(explicit ?? process.env.VHOST_TS_CACHE ?? path.join(os.homedir(), '.cache', 'vhost-ts'));
  // Hundreds of MB of root filesystems inside the repo would be crawled by tsc, vitest and git.
  if (dir === SOURCE_ROOT || dir.startsWith(SOURCE_ROOT + path.sep)) {
    throw new Error(`cache directory ${dir} is inside the source tree ${SOURCE_ROOT}; choose another VHOST_TS_CACHE`);
  }
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

export interface Marker {
  kind: string;
  /** Bumped when the way an artefact is built changes, so old caches are rebuilt rather than trusted. */
  format: number;
  sizeBytes: number;
  buildMs: number;
  builtAt: string;
  [key: string]: unknown;
}

export function readMarker<M extends Marker>(dir: string, kind: string, format: number): M | undefined {
  try {
    const m = JSON.parse(fs.readFileSync(path.join(dir, MARKER), 'utf8')) as M;
    return m.kind === kind && m.format === format ? m : undefined;
  } catch {
    return undefined;
  }
}

/** Mount points strictly below dir, deepest first (debootstrap mounts /proc and /sys inside its target). */
function mountsUnder(dir: string): string[] {
  let text: string;
  try {
    text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return [];
  }
  const prefix = path.resolve(dir) + '/';
  return text
    .split('\n')
    .map((l) => l.split(' ')[4])
    .filter((m): m is string => m !== undefined)
    .map((m) => m.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((m) => m.startsWith(prefix))
    .sort((a, b) => b.length - a.length);
}

/** Removes a directory tree, first detaching anything mounted inside it so rm never descends into /proc or /sys. */
export async function removeTree(dir: string): Promise<void> {
  const mounts = mountsUnder(dir);
  if (mounts.length > 0 && isRoot()) {
    for (const m of mounts) await run('umount', ['-l', m], { timeoutMs: 30_000 }).catch(() => undefined);
  }
  const left = mountsUnder(dir);
  if (left.length > 0) throw new Error(`refusing to remove ${dir}: still mounted inside it: ${left.join(', ')}`);
  await fs.promises.rm(dir, { recursive: true, force: true });
}

function partialPrefix(finalDir: string): string {
  return `${path.basename(finalDir)}.partial-`;
}

/** Leftovers of builds that were interrupted; only called under the set-up lock, so none of them is live. */
export async function removeStalePartials(finalDir: string): Promise<string[]> {
  const parent = path.dirname(finalDir);
  const prefix = partialPrefix(finalDir);
  const removed: string[] = [];
  let entries: string[] = [];
  try {
    entries = fs.readdirSync(parent);
  } catch {
    return removed;
  }
  for (const e of entries) {
    if (e.startsWith(prefix) || e.startsWith(`${path.basename(finalDir)}.old-`)) {
      await removeTree(path.join(parent, e));
      removed.push(e);
    }
  }
  return removed;
}

/**
 * Builds finalDir through a temporary sibling: build() fills it and returns the marker, which is written last, and
 * the directory is renamed into place. A reader therefore sees a marker only in a complete artefact.
 */
export async function buildAtomically<M extends Marker>(
  finalDir: string,
  build: (tmpDir: string) => Promise<Omit<M, 'builtAt' | 'buildMs'>>,
): Promise<M> {
  fs.mkdirSync(path.dirname(finalDir), { recursive: true });
  await removeStalePartials(finalDir);
  const tmp = path.join(path.dirname(finalDir), `${partialPrefix(finalDir)}${process.pid}-${Date.now()}`);
  fs.mkdirSync(tmp);
  const t0 = Date.now();
  try {
    const partial = await build(tmp);
    const marker = { ...partial, builtAt: new Date().toISOString(), buildMs: Date.now() - t0 } as M;
    fs.writeFileSync(path.join(tmp, MARKER), JSON.stringify(marker, null, 2) + '\n');
    if (fs.existsSync(finalDir)) {
      const old = path.join(path.dirname(finalDir), `${path.basename(finalDir)}.old-${process.pid}`);
      fs.renameSync(finalDir, old);
      fs.renameSync(tmp, finalDir);
      await removeTree(old);
    } else {
      fs.renameSync(tmp, finalDir);
    }
    return marker;
  } catch (err) {
    await removeTree(tmp).catch(() => undefined);
    throw err;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

let inProcess: Promise<unknown> = Promise.resolve();

/**
 * Serialises set-up across processes (parallel vitest workers may all call ensureSetup) with a lock directory that
 * names its owner; a lock whose owner died is taken over.
 */
export async function withCacheLock<T>(
  cacheDir: string,
  waitMs: number,
  onWait: (ownerPid: number) => void,
  fn: () => Promise<T>,
): Promise<T> {
  const previous = inProcess;
  let release!: () => void;
  inProcess = new Promise<void>((r) => (release = r));
  await previous;
  const lockDir = path.join(cacheDir, '.setup.lock');
  const ownerFile = path.join(lockDir, 'pid');
  const deadline = Date.now() + waitMs;
  let reported = false;
  try {
    for (;;) {
      try {
        fs.mkdirSync(lockDir);
        fs.writeFileSync(ownerFile, String(process.pid));
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      let owner = NaN;
      try {
        owner = Number(fs.readFileSync(ownerFile, 'utf8'));
      } catch {
        // The owner is between mkdir and writing its pid, or died there: give it a few seconds.
        const age = Date.now() - (fs.statSync(lockDir, { throwIfNoEntry: false })?.mtimeMs ?? 0);
        if (age > 10_000) fs.rmSync(lockDir, { recursive: true, force: true });
      }
      if (Number.isInteger(owner) && owner > 0 && (owner === process.pid || !alive(owner))) {
        fs.rmSync(lockDir, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for the set-up lock ${lockDir} (held by ${owner})`);
      if (!reported && Number.isInteger(owner)) {
        onWait(owner);
        reported = true;
      }
      await new Promise((r) => setTimeout(r, 500));
    }
    try {
      return await fn();
    } finally {
      fs.rmSync(lockDir, { recursive: true, force: true });
    }
  } finally {
    release();
  }
}
