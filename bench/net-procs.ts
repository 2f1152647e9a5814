/**
 * Processes for bench/net.ts: dpdk-testpmd (frontend and reference backend) and vhost-ts, each tracked from spawn
 * to exit so stopAll() leaves nothing behind (normal path, error, SIGINT), with every wait bounded; and a parser for
 * testpmd's periodic port statistics (`--stats-period`).
 */
import fs from 'node:fs';
import path from 'node:path';
import { sleep, within, type Command, type Proc } from './procs.js';

export { pinned, Processes, sleep, within, type Command, type Proc } from './procs.js';


/** A command line as one would type it (arguments quoted where a shell would need it). */
export function shellLine(cmd: Command): string {
  const q = (s: string) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`);
  return [cmd.file, ...cmd.args].map(q).join(' ');
}

/** The program's absolute path if it is on PATH. */
export function which(program: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, program);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      if (fs.statSync(p).isFile()) return p;
    } catch {
      // not here
    }
  }
  return undefined;
}


/** CPU seconds (user + system, all threads) a process has used so far, from /proc/PID/stat; undefined if gone. */
export function cpuSeconds(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may contain spaces and parentheses): state is field 3, utime 14, stime 15.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / CLOCK_TICKS;
  } catch {
    return undefined;
  }
}

// USER_HZ: 100 on every Linux architecture Node runs on.
const CLOCK_TICKS = 100;

/** CPU seconds all CPUs have spent busy since boot (/proc/stat: all but idle and iowait); undefined without /proc. */
export function systemBusySeconds(): number | undefined {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
    return (total - f[3] - f[4]) / CLOCK_TICKS;
  } catch {
    return undefined;
  }
}

/**
 * CPU used by everything else while a window ran: the system's busy time minus the given processes' and this
 * process's own, as a share of one CPU. A sample is taken at each end of the window.
 */
export class OthersMeter {
  private start: { t: number; busy: number | undefined; self: number; pids: (number | undefined)[] } | undefined;

  constructor(private readonly pids: (number | undefined)[]) {}

  private sample() {
    const u = process.cpuUsage();
    return {
      t: performance.now(),
      busy: systemBusySeconds(),
      self: (u.user + u.system) / 1e6,
      pids: this.pids.map((p) => cpuSeconds(p)),
    };
  }

  begin(): void {
    this.start = this.sample();
  }

  /** Shares of one CPU over the window: each process's (in the order given) and everything else's. */
  end(): { procs: (number | undefined)[]; others: number | undefined } {
    const a = this.start;
    const b = this.sample();
    if (!a) return { procs: this.pids.map(() => undefined), others: undefined };
    const secs = (b.t - a.t) / 1000;
    const procs = b.pids.map((x, i) => {
      const y = a.pids[i];
      return x === undefined || y === undefined ? undefined : (x - y) / secs;
    });
    if (a.busy === undefined || b.busy === undefined || procs.some((x) => x === undefined)) return { procs, others: undefined };
    const ours = procs.reduce<number>((sum, x) => sum + (x ?? 0), 0) + (b.self - a.self) / secs;
    return { procs, others: Math.max(0, (b.busy - a.busy) / secs - ours) };
  }
}

/** Waits until path is a socket (the backend has bound it), failing early if the backend exits. */
export async function waitForSocketFile(proc: Proc, socketPath: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!proc.running) throw new Error(`${proc.name} exited before creating ${socketPath}\n${proc.describe()}`);
    if (fs.statSync(socketPath, { throwIfNoEntry: false })?.isSocket()) return;
    await sleep(25);
  }
  throw new Error(`${proc.name} did not create ${socketPath} within ${timeoutMs / 1000} s\n${proc.describe()}`);
}

// ---------------------------------------------------------------------------------------------------------------
// testpmd statistics

/**
 * One block of testpmd's periodic port statistics (`--stats-period`), as printed by nic_stats_display():
 *
 *     ######################## NIC statistics for port 0  ########################
 *     RX-packets: 0          RX-missed: 0          RX-bytes:  0
 *     RX-errors: 0
 *     RX-nombuf:  0
 *     TX-packets: 11668192   TX-errors: 0          TX-bytes:  746764288
 *
 *     Throughput (since last show)
 *     Rx-pps:            0          Rx-bps:            0
 *     Tx-pps:     11651501          Tx-bps:   5965568720
 *     ############################################################################
 *
 * The counters are the port's totals since it started; the rates are testpmd's own, from the same counter read
 * and its TSC clock over the time since the previous block (0 in the first block).
 */
export interface StatsBlock {
  port: number;
  /** performance.now() when the block arrived here (testpmd flushes stdout after each block). */
  t: number;
  rxPackets: number;
  rxBytes: number;
  txPackets: number;
  txBytes: number;
  rxPps: number;
  txPps: number;
}

/** The "Forward statistics for port N" block testpmd prints when it stops (SIGINT). */
export interface ForwardStats {
  port: number;
  rxPackets: number;
  txPackets: number;
  txDropped: number;
}

export class TestpmdStats {
  readonly blocks: StatsBlock[] = [];
  readonly forward: ForwardStats[] = [];
  /** How many times an interactive `stop` has finished ("Done." after its forward statistics). */
  stopped = 0;
  private cur: Partial<StatsBlock> | undefined;
  private fwd: Partial<ForwardStats> | undefined;
  private waiters: (() => void)[] = [];

  constructor(proc: Proc) {
    proc.onLine((line, t) => this.line(line, t));
    void proc.exited.then(() => this.wake());
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private line(raw: string, t: number): void {
    const line = raw.replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
    let m: RegExpExecArray | null;
    if (/^Done\.\s*$/.test(line)) {
      this.stopped++;
      this.wake();
      return;
    }
    if ((m = /NIC statistics for port (\d+)/.exec(line))) {
      this.cur = { port: Number(m[1]) };
      return;
    }
    if ((m = /Forward statistics for port (\d+)/.exec(line))) {
      this.fwd = { port: Number(m[1]) };
      return;
    }
    if (this.fwd) {
      if ((m = /RX-packets:\s*(\d+)\s+RX-dropped:/.exec(line))) this.fwd.rxPackets = Number(m[1]);
      else if ((m = /TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)/.exec(line))) {
        this.fwd.txPackets = Number(m[1]);
        this.fwd.txDropped = Number(m[2]);
      } else if (/^\s*-{20,}\s*$/.test(line)) {
        const f = this.fwd;
        this.fwd = undefined;
        if (f.rxPackets !== undefined && f.txPackets !== undefined) this.forward.push(f as ForwardStats);
      }
      return;
    }
    const c = this.cur;
    if (!c) return;
    if ((m = /RX-packets:\s*(\d+)\s+RX-missed:\s*\d+\s+RX-bytes:\s*(\d+)/.exec(line))) {
      c.rxPackets = Number(m[1]);
      c.rxBytes = Number(m[2]);
    } else if ((m = /TX-packets:\s*(\d+)\s+TX-errors:\s*\d+\s+TX-bytes:\s*(\d+)/.exec(line))) {
      c.txPackets = Number(m[1]);
      c.txBytes = Number(m[2]);
    } else if ((m = /Rx-pps:\s*(\d+)/.exec(line))) c.rxPps = Number(m[1]);
    else if ((m = /Tx-pps:\s*(\d+)/.exec(line))) c.txPps = Number(m[1]);
    else if (/^\s*#{20,}\s*$/.test(line)) {
      this.cur = undefined;
      if (c.rxPackets !== undefined && c.txPackets !== undefined && c.rxPps !== undefined && c.txPps !== undefined) {
        this.blocks.push({ ...(c as StatsBlock), t });
        this.wake();
      }
    }
  }

  /** Resolves when a block beyond the first `count` has arrived, or the process exited, or after timeoutMs. */
  waitForBlocks(count: number, timeoutMs: number, proc: Proc): Promise<boolean> {
    return this.waitUntil(() => this.blocks.length >= count, timeoutMs, proc);
  }

  /** Resolves true once `done()` holds (checked after each block or stop), false if the process exits or time runs out. */
  async waitUntil(done: () => boolean, timeoutMs: number, proc: Proc): Promise<boolean> {
    const deadline = performance.now() + timeoutMs;
    while (!done()) {
      const left = deadline - performance.now();
      if (left <= 0 || !proc.running) return false;
      await within(new Promise<void>((r) => this.waiters.push(r)), left);
    }
    return true;
  }
}

/**
 * Packets counted and the time between two blocks of one port. The time is testpmd's own: each block's rate is
 * (packets since the previous block) / (TSC time since the previous block), so that interval is packets / rate;
 * summed over the blocks in the window. Independent of when the output reached us (this process competes for the
 * CPUs with busy-polling testpmd lcores). An interval with no packets has no rate; its length is taken from the
 * arrival times instead.
 */
export function windowBetween(
  blocks: StatsBlock[],
  from: number,
  to: number,
  dir: 'rx' | 'tx',
): { packets: number; bytes: number; seconds: number; wallSeconds: number; perInterval: number[] } {
  let seconds = 0;
  const perInterval: number[] = [];
  for (let i = from + 1; i <= to; i++) {
    const a = blocks[i - 1];
    const b = blocks[i];
    const dp = dir === 'rx' ? b.rxPackets - a.rxPackets : b.txPackets - a.txPackets;
    const pps = dir === 'rx' ? b.rxPps : b.txPps;
    const dt = dp > 0 && pps > 0 ? dp / pps : (b.t - a.t) / 1000;
    seconds += dt;
    perInterval.push(dp / dt);
  }
  const a = blocks[from];
  const b = blocks[to];
  return {
    packets: dir === 'rx' ? b.rxPackets - a.rxPackets : b.txPackets - a.txPackets,
    bytes: dir === 'rx' ? b.rxBytes - a.rxBytes : b.txBytes - a.txBytes,
    seconds,
    wallSeconds: (b.t - a.t) / 1000,
    perInterval,
  };
}

/**
 * DPDK's runtime directory for a --file-prefix: /var/run/dpdk/PREFIX for root, else $XDG_RUNTIME_DIR/dpdk/PREFIX
 * (or /tmp/dpdk/PREFIX), as eal_get_runtime_dir() picks it.
 */
export function dpdkRuntimeDir(prefix: string): string {
  const base = process.getuid?.() === 0 ? '/var/run' : (process.env.XDG_RUNTIME_DIR ?? '/tmp');
  return path.join(base, 'dpdk', prefix);
}
