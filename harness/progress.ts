// Set-up can take minutes on a fresh machine; a step counter with sizes and times tells the user it is moving and
// where the time goes, and the same lines make a slow CI run diagnosable from its log.
import fs from 'node:fs';
import path from 'node:path';

export type LogFn = (line: string) => void;

export const stderrLog: LogFn = (line) => process.stderr.write(`${line}\n`);

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function formatMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

export class Progress {
  private current = 0;
  readonly started = Date.now();

  constructor(
    private readonly total: number,
    private readonly log: LogFn,
  ) {}

  step(title: string): void {
    this.current++;
    this.log(`[${this.current}/${this.total}] ${title}`);
  }

  note(line: string): void {
    this.log(`      ${line}`);
  }

  /** Runs one download or build and reports how long it took and how big its result is. */
  async task<T>(what: string, fn: () => Promise<T>, sizeOf?: (result: T) => number | undefined): Promise<T> {
    this.log(`      ${what} ...`);
    const t0 = Date.now();
    const result = await fn();
    const size = sizeOf?.(result);
    this.log(`      ${what}: ${size !== undefined ? `${formatBytes(size)}, ` : ''}${formatMs(Date.now() - t0)}`);
    return result;
  }
}

/** Bytes on disk under a path, counting hard links once and never following symlinks. */
export function diskUsage(p: string): number {
  const seen = new Set<string>();
  let total = 0;
  const walk = (q: string) => {
    const st = fs.lstatSync(q, { bigint: false });
    const key = `${st.dev}:${st.ino}`;
    if (seen.has(key)) return;
    seen.add(key);
    total += st.blocks * 512;
    if (st.isDirectory()) for (const e of fs.readdirSync(q)) walk(path.join(q, e));
  };
  walk(p);
  return total;
}
