/**
 * npm run bench:net [-- --json] [--quick] [--method turns|fresh] [--rounds N] [--reps N] [--warmup S] [--dpdk-only]
 *
 * virtio-net over vhost-user with no VM: DPDK's virtio-user PMD in dpdk-testpmd is the frontend (the guest's
 * driver) and either vhost-ts (`vhost-ts net --backend sink|source`) or DPDK's own vhost PMD (net_vhost in a second
 * testpmd) is the backend (DESIGN.md §6).
 *
 *   transmit: frontend txonly (the guest sends) -> backend sink (vhost-ts) / rxonly (DPDK) drops every frame
 *   receive:  backend source (vhost-ts) / txonly (DPDK) fills every receive buffer -> frontend rxonly
 *
 * 64- and 1518-byte frames. Packets are counted at the frontend (its port's TX or RX counter), the same program for
 * both backends. The backend runs on one CPU and the frontend on another (taskset, and testpmd's lcores on that
 * CPU), one backend at a time. By default every side of a case (vhost-ts, DPDK) is set up once and the sides run
 * in turns of half a second, driven through testpmd's interactive commands (start, show port stats, stop), the
 * order reversed each round: this host's rates move by up to 2x with phases of seconds, and a side's ratio is
 * taken within a round, the median over the rounds reported. `--method fresh` starts fresh processes for every
 * run instead (a warm-up, then a window counted from testpmd's periodic statistics), the medians compared.
 *
 * Until `vhost-ts net` exists (or with --dpdk-only) the vhost-ts column is DPDK's vhost PMD again, which proves the
 * plumbing and shows the noise of the method: the ratio should be 1.
 *
 * Needs dpdk-testpmd and the virtio-user, vhost and ring-mempool PMDs; on Debian 12:
 *   apt-get install -y dpdk-dev librte-net-virtio23 librte-net-vhost23 librte-mempool-ring23
 * (dpdk-testpmd is in dpdk-dev, not in the dpdk package). Runs as root or not; no hugepages (--no-huge).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import {
  dpdkRuntimeDir,
  OthersMeter,
  pinned,
  Processes,
  shellLine,
  sleep,
  TestpmdStats,
  waitForSocketFile,
  which,
  windowBetween,
  type Command,
  type Proc,
  type StatsBlock,
} from './net-procs.js';

const usage = `usage: npm run bench:net [-- options]
  --json               print one JSON object {"bench":"net","results":[...]} instead of the table
  --quick              smoke run: 1 s warm-up; turns: 4 rounds; fresh: 1 repetition (unless --reps), 2 s window
  --method M           turns (default): every backend of a case and its frontend set up once and run in turns
                       (testpmd's interactive start and stop), the order reversed each round, the ratio the
                       median of the rounds' ratios; fresh: new processes for every run, --reps runs a side
  --rounds N           turns: rounds (default 20; 4 with --quick)
  --turn-ms N          turns: milliseconds counted per turn (default 500), after 200 ms of traffic
  --reps N             fresh: repetitions per case and backend (default 3); the median is reported
  --seconds S          fresh: measured window per run, whole seconds (default 5)
  --warmup S           seconds of traffic before the window starts (default 2; turns: once per backend)
  --frame-sizes LIST   comma-separated frame sizes in bytes (default 64,1518)
  --cases LIST         transmit,receive,switch (default transmit,receive); switch: one testpmd with two
                       virtio-user ports in io-forward mode (--tx-first) through a two-port backend, vhost-ts
                       net --switch without and with polling (--poll-us, 200 unless given) against DPDK's
                       vhost PMD in io-forward mode
  --case LIST          the same as --cases
  --packed             packed virtqueues (virtio-user packed_vq=1) on both backends; default split
  --retries N          fresh: repeat a run (at most N times, default 3; 0 with --quick) when other processes used more
                       than --max-others of a CPU during its window, after waiting up to 60 s for the host to quiet
  --max-others F       CPU share (of one CPU) other processes may use during a window (default 0.1)
  --dpdk-only          DPDK's vhost PMD in both columns even if 'vhost-ts net' is available
  --vhost-ts PATH      the vhost-ts CLI to measure (default: bin/vhost-ts.mjs of this checkout)
  --backend-cpu N      CPU for the backends (default 0)
  --poll-us N          vhost-ts busy-polls each queue N us after traffic (default 0; DPDK always polls)
  --client-cpu N       CPU for the testpmd frontend (default 1)
  --no-pin             do not pin (testpmd's lcores still share one CPU per process)`;

const { values: opts } = parseArgs({
  options: {
    json: { type: 'boolean' },
    quick: { type: 'boolean' },
    reps: { type: 'string' },
    seconds: { type: 'string' },
    warmup: { type: 'string' },
    'frame-sizes': { type: 'string' },
    cases: { type: 'string' },
    case: { type: 'string' },
    packed: { type: 'boolean' },
    'dpdk-only': { type: 'boolean' },
    retries: { type: 'string' },
    'max-others': { type: 'string' },
    method: { type: 'string' },
    rounds: { type: 'string' },
    'turn-ms': { type: 'string' },
    'vhost-ts': { type: 'string' },
    'backend-cpu': { type: 'string' },
    'poll-us': { type: 'string' },
    'client-cpu': { type: 'string' },
    'no-pin': { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
  },
  strict: true,
});

if (opts.help) {
  console.log(usage);
  process.exit(0);
}

function wholeNumber(text: string | undefined, flag: string, fallback: number, min: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < min) {
    console.error(`${flag} takes a whole number >= ${min}, not "${text}"\n${usage}`);
    process.exit(2);
  }
  return n;
}

const json = opts.json === true;
const packed = opts.packed === true;
const quick = opts.quick === true;
const method = opts.method ?? 'turns';
if (method !== 'turns' && method !== 'fresh') {
  console.error(`--method takes turns or fresh, not "${method}"\n${usage}`);
  process.exit(2);
}
const inTurns = method === 'turns';
const rounds = wholeNumber(opts.rounds, '--rounds', quick ? 4 : 20, 1);
const turnMs = wholeNumber(opts['turn-ms'], '--turn-ms', 500, 50);
// Traffic in each turn before its count begins: the pipeline refills after its pause (the JIT's code stays warm).
const SETTLE_MS = 200;
const reps = wholeNumber(opts.reps, '--reps', quick ? 1 : 3, 1);
const windowSeconds = wholeNumber(opts.seconds, '--seconds', quick ? 2 : 5, 1);
const warmupSeconds = wholeNumber(opts.warmup, '--warmup', quick ? 1 : 2, 0);
const retries = wholeNumber(opts.retries, '--retries', quick ? 0 : 3, 0);
const maxOthers = opts['max-others'] === undefined ? 0.1 : Number(opts['max-others']);
if (!(maxOthers >= 0)) {
  console.error(`--max-others takes a CPU share (0.1 = 10% of one CPU), not "${opts['max-others']}"`);
  process.exit(2);
}
const backendCpuOpt = wholeNumber(opts['backend-cpu'], '--backend-cpu', 0, 0);
const pollUs = wholeNumber(opts['poll-us'], '--poll-us', 0, 0);
const clientCpuOpt = wholeNumber(opts['client-cpu'], '--client-cpu', 1, 0);
const frameSizes = (opts['frame-sizes'] ?? '64,1518').split(',').map((s) => {
  const n = Number(s);
  // 60: the smallest Ethernet frame without its FCS; 1518: testpmd's default mbufs (2048 bytes of data) and MTU.
  if (!Number.isInteger(n) || n < 60 || n > 1518) {
    console.error(`--frame-sizes takes sizes from 60 to 1518 bytes, not "${s}"`);
    process.exit(2);
  }
  return n;
});
type Direction = 'transmit' | 'receive' | 'switch';
const directions = (opts.cases ?? opts.case ?? 'transmit,receive').split(',').map((s) => {
  if (s !== 'transmit' && s !== 'receive' && s !== 'switch') {
    console.error(`--cases takes transmit, receive and/or switch, not "${s}"`);
    process.exit(2);
  }
  return s as Direction;
});

const log = (line: string) => process.stderr.write(`bench:net: ${line}\n`);

// Debian 12: dpdk-testpmd is in dpdk-dev (not in dpdk); the PMDs the bench loads each have their own package.
const PMD_PACKAGES: Record<string, string> = {
  librte_net_virtio: 'librte-net-virtio23',
  librte_net_vhost: 'librte-net-vhost23',
  librte_mempool_ring: 'librte-mempool-ring23',
};
const INSTALL = `apt-get install -y dpdk-dev ${Object.values(PMD_PACKAGES).join(' ')}`;

// ---------------------------------------------------------------------------------------------------------------
// Clean-up: every process, socket directory and DPDK runtime directory, on success, on error and on a signal.

const procs = new Processes();
// testpmd prints its forward statistics and closes its ports on SIGINT (vhost-ts stops the same way).
const TESTPMD_STOP = { stopSignal: 'SIGINT' as const, graceMs: 10_000 };
const runtimeDirs = new Set<string>();
let tempDir: string | undefined;
let cleaning: Promise<void> | undefined;
let interrupted = false;

function removeRuntimeDirs(): void {
  for (const d of runtimeDirs) {
    fs.rmSync(d, { recursive: true, force: true });
    runtimeDirs.delete(d);
  }
}

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await procs.stopAll();
    removeRuntimeDirs();
    if (tempDir) fs.rmSync(tempDir, { recursive: true, force: true });
  })();
  return cleaning;
}

// process.on, not once: Ctrl-C reaches this process twice (from the terminal and relayed by tsx), and a second
// signal with no handler would kill it before the clean-up has run.
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    if (interrupted) return;
    interrupted = true;
    log(`${sig}: stopping testpmd and the backends`);
    const hard = setTimeout(() => process.exit(130), 20_000);
    void cleanup().finally(() => {
      clearTimeout(hard);
      process.exit(130);
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Prerequisites

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const vhostTsBin = path.resolve(opts['vhost-ts'] ?? path.join(repoRoot, 'bin/vhost-ts.mjs'));

function checkDpdk(): string {
  const testpmd = which('dpdk-testpmd');
  if (!testpmd) {
    console.error(`bench:net: dpdk-testpmd not found. Install DPDK (Debian 12):\n  ${INSTALL}`);
    process.exit(2);
  }
  // Debian's testpmd loads the PMDs from /usr/lib/<triplet>/dpdk/pmds-<abi>/; elsewhere (a DPDK built from source,
  // static) they may be linked in, so only a Debian-style plugin directory without them is an error.
  const libDirs = ['/usr/lib', '/usr/lib64', ...fs.readdirSync('/usr/lib').filter((d) => d.includes('-linux-')).map((d) => `/usr/lib/${d}`)];
  const pmdDirs = libDirs.flatMap((l) => {
    const d = path.join(l, 'dpdk');
    return fs.existsSync(d) ? fs.readdirSync(d).filter((x) => x.startsWith('pmds-')).map((x) => path.join(d, x)) : [];
  });
  if (pmdDirs.length > 0) {
    const have = pmdDirs.flatMap((d) => fs.readdirSync(d));
    const missing = Object.keys(PMD_PACKAGES).filter((lib) => !have.some((f) => f.startsWith(`${lib}.so`)));
    if (missing.length > 0) {
      console.error(`bench:net: DPDK drivers missing from ${pmdDirs.join(', ')}: ${missing.join(', ')}. Install them (Debian 12):\n  ${INSTALL}`);
      process.exit(2);
    }
  }
  return testpmd;
}

function testpmdVersion(testpmd: string): string {
  // -v prints the version during EAL init; `-- --help` makes testpmd print its usage and exit.
  const prefix = `vhost-ts-bench-net-${process.pid}-v`;
  runtimeDirs.add(dpdkRuntimeDir(prefix));
  const r = spawnSync(testpmd, ['-v', '--no-pci', '--no-huge', '-m', '64', `--file-prefix=${prefix}`, '--', '--help'], {
    encoding: 'utf8',
    timeout: 20_000,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  removeRuntimeDirs();
  const m = /RTE Version: 'DPDK ([^']+)'/.exec(`${r.stdout}${r.stderr}`);
  return m ? m[1] : 'unknown';
}

/** `vhost-ts net --help` exits 0: the net device has landed. */
function vhostTsNetAvailable(): { ok: boolean; why: string; help: string } {
  const r = spawnSync(process.execPath, [vhostTsBin, 'net', '--help'], {
    encoding: 'utf8',
    timeout: 30_000,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (r.status === 0) return { ok: true, why: '', help: r.stdout };
  const first = `${r.stderr}${r.stdout}`.trim().split('\n')[0] ?? '';
  return { ok: false, why: r.error ? r.error.message : `exit ${r.status ?? r.signal}: ${first}`, help: '' };
}

/** The checkout vhost-ts runs from: commit, and whether src/ has uncommitted changes (others edit in parallel). */
function sourceVersion(): string {
  if (opts['vhost-ts'] !== undefined) return vhostTsBin;
  try {
    const git = (args: string[]) =>
      execFileSync('git', ['-C', repoRoot, ...args], { timeout: 10_000, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    const commit = git(['rev-parse', '--short', 'HEAD']);
    return git(['status', '--porcelain', '--', 'src', 'bin']) ? `${commit} + uncommitted changes in src/` : commit;
  } catch {
    return 'unknown (not a git checkout)';
  }
}

/** Share of all CPUs busy over ms milliseconds (/proc/stat), before the bench starts anything. */
async function hostBusy(ms: number): Promise<number | undefined> {
  const read = () => {
    const cpu = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const idle = cpu[3] + (cpu[4] ?? 0);
    return { idle, total: cpu.reduce((a, b) => a + b, 0) };
  };
  try {
    const a = read();
    await sleep(ms);
    const b = read();
    return b.total > a.total ? 1 - (b.idle - a.idle) / (b.total - a.total) : undefined;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Commands

/** candidate: vhost-ts (with --poll-us as given, none in the switch case); polled: the switch case with polling. */
type Side = 'candidate' | 'polled' | 'dpdk';
/** The switch case's polled side: --poll-us, or 200 us. */
const switchPollUs = pollUs > 0 ? pollUs : 200;
const sidesOf = (c: Case): Side[] => (c.direction === 'switch' && candidateIsVhostTs ? ['candidate', 'polled', 'dpdk'] : ['candidate', 'dpdk']);

interface Case {
  direction: Direction;
  frameSize: number;
  name: string;
}

let testpmdPath = 'dpdk-testpmd';
let pinning: { backend: number; client: number } | undefined;
let candidateIsVhostTs = false;
let runCounter = 0;

/**
 * testpmd's EAL and forwarding options shared by both roles (DESIGN.md §6); both lcores on one CPU. In turns,
 * interactive (commands on stdin), its stdout line-buffered by stdbuf: into a pipe, stdio would hold the statistics
 * a command prints until its buffer filled.
 */
function testpmd(cpu: number, prefix: string, vdevs: string[], forward: string[]): Command {
  const mode = inTurns
    ? // --no-flush-rx: each start would otherwise drop what waits in the RX queues, the switch loop's frames too.
      ['-i', '--no-flush-rx']
    : // Statistics every second, flushed per block; also keeps testpmd from reading stdin (it exits at EOF without).
      ['--auto-start', '--stats-period', '1'];
  return {
    file: inTurns ? 'stdbuf' : testpmdPath,
    args: [
      ...(inTurns ? ['-oL', testpmdPath] : []),
      `--lcores=0@${cpu},1@${cpu}`,
      '--no-pci',
      '--no-huge',
      '-m',
      '512',
      `--file-prefix=${prefix}`,
      ...vdevs.flatMap((v) => ['--vdev', v]),
      '--',
      ...forward,
      ...mode,
      '--nb-cores=1',
      '--total-num-mbufs=32768',
      '--no-mlockall',
    ],
  };
}

function frontendCommand(c: Case, sockets: string[], prefix: string): Command {
  const forward =
    c.direction === 'transmit'
      ? ['--forward-mode=txonly', `--txpkts=${c.frameSize}`]
      : c.direction === 'receive'
        ? ['--forward-mode=rxonly']
        : // The loop: a first burst on each port, then every frame received on one port is sent on the other (in
          // turns, the first `start tx_first` sends that burst).
          ['--forward-mode=io', ...(inTurns ? [] : ['--tx-first']), `--txpkts=${c.frameSize}`];
  const vdevs = sockets.map((s, i) => `net_virtio_user${i},path=${s}${packed ? ',packed_vq=1' : ''}`);
  return pinned(testpmd(pinning?.client ?? 0, prefix, vdevs, forward), pinning?.client);
}

function dpdkBackendCommand(c: Case, sockets: string[], prefix: string): Command {
  const forward =
    c.direction === 'transmit'
      ? ['--forward-mode=rxonly']
      : c.direction === 'receive'
        ? ['--forward-mode=txonly', `--txpkts=${c.frameSize}`]
        : ['--forward-mode=io'];
  const vdevs = sockets.map((s, i) => `net_vhost${i},iface=${s},queues=1`);
  return pinned(testpmd(pinning?.backend ?? 0, prefix, vdevs, forward), pinning?.backend);
}

function vhostTsCommand(c: Case, sockets: string[], side: Side): Command {
  const args = [vhostTsBin, 'net', ...sockets.flatMap((s) => ['--socket-path', s])];
  const poll = c.direction === 'switch' ? (side === 'polled' ? switchPollUs : 0) : pollUs;
  if (poll > 0) args.push('--poll-us', String(poll));
  if (c.direction === 'switch') args.push('--switch', 'bench');
  else if (c.direction === 'transmit') args.push('--queues', '1', '--backend', 'sink');
  else args.push('--queues', '1', '--backend', 'source', '--frame-size', String(c.frameSize));
  return pinned({ file: process.execPath, args }, pinning?.backend);
}

/** The command lines, with placeholders, for the report. */
const commandLines = new Map<string, string>();

function remember(label: string, cmd: Command, sockets: string[], prefix: string | undefined): void {
  let line = shellLine(cmd);
  sockets.forEach((s, i) => (line = line.split(s).join(sockets.length > 1 ? `SOCK${i}` : 'SOCK')));
  if (prefix) line = line.split(prefix).join('PREFIX');
  line = line
    .split(vhostTsBin)
    .join(opts['vhost-ts'] === undefined ? 'bin/vhost-ts.mjs' : vhostTsBin)
    .split(process.execPath)
    .join('node')
    .split(testpmdPath)
    .join('dpdk-testpmd')
    .replace(/--txpkts=\d+/, '--txpkts=FRAME')
    .replace(/--frame-size \d+/, '--frame-size FRAME')
    .replace(/--poll-us \d+/, '--poll-us N');
  commandLines.set(label, line);
}

// ---------------------------------------------------------------------------------------------------------------
// One run: a backend and a frontend, warm-up, window, stop both.

interface Run {
  side: Side;
  rep: number;
  mpps: number;
  /** Bytes per packet counted at the frontend over the window (should equal the frame size). */
  bytesPerPacket: number;
  seconds: number;
  /** The window by our own clock: should match `seconds` (testpmd's clock) closely. */
  wallSeconds: number;
  /** Per-second rates within the window (Mpps). */
  perInterval: number[];
  /** CPU the frontend process used over the window, as a share of one CPU (testpmd polls: ~1 unless starved). */
  frontendCpu: number | undefined;
  /** CPU the backend process used over the window, as a share of one CPU. */
  backendCpu: number | undefined;
  /** CPU everything else on the host used over the window (other users' work competing), as a share of one CPU. */
  othersCpu: number | undefined;
  /** Runs discarded before this one because other work competed (--retries). */
  retried: number;
  /**
   * Totals from the forward statistics both testpmds print when stopped (DPDK backend only): packets the frontend
   * sent and the backend received (transmit), or the backend sent and the frontend received (receive).
   */
  totals?: { sent: number; received: number };
}

function sideLabel(side: Side): string {
  if (side === 'polled') return `vhost-ts --poll-us ${switchPollUs}`;
  return side === 'dpdk' ? 'DPDK' : candidateIsVhostTs ? 'vhost-ts' : 'DPDK (stand-in)';
}

async function stopQuietly(p: Proc | undefined): Promise<void> {
  if (p) await p.stop();
}

/** A run that failed (backend exited, traffic stopped): reported, and the bench goes on with the other runs. */
class RunFailure extends Error {}

async function runOnce(c: Case, side: Side, rep: number): Promise<Run> {
  const n = runCounter++;
  const sockets = Array.from({ length: c.direction === 'switch' ? 2 : 1 }, (_, i) => path.join(tempDir!, `net-${n}-${i}.sock`));
  const backendPrefix = `vhost-ts-bench-net-${process.pid}-${n}b`;
  const frontendPrefix = `vhost-ts-bench-net-${process.pid}-${n}f`;
  let backend: Proc | undefined;
  let frontend: Proc | undefined;
  try {
    const useVhostTs = side !== 'dpdk' && candidateIsVhostTs;
    const backendCmd = useVhostTs ? vhostTsCommand(c, sockets, side) : dpdkBackendCommand(c, sockets, backendPrefix);
    if (!useVhostTs) runtimeDirs.add(dpdkRuntimeDir(backendPrefix));
    remember(`${c.direction} backend ${useVhostTs ? sideLabel(side) : 'DPDK'}`, backendCmd, sockets, useVhostTs ? undefined : backendPrefix);
    backend = procs.start(`${sideLabel(side)} backend`, backendCmd, TESTPMD_STOP);
    const backendStats = useVhostTs ? undefined : new TestpmdStats(backend);
    for (const socket of sockets) await waitForSocketFile(backend, socket, useVhostTs ? 60_000 : 30_000);
    // bind() creates the file before listen(): give the backend a moment before the frontend connects.
    await sleep(200);

    const frontendCmd = frontendCommand(c, sockets, frontendPrefix);
    runtimeDirs.add(dpdkRuntimeDir(frontendPrefix));
    remember(`${c.direction} frontend`, frontendCmd, sockets, frontendPrefix);
    frontend = procs.start('testpmd frontend (virtio-user)', frontendCmd, TESTPMD_STOP);
    const stats = new TestpmdStats(frontend);
    // The loop counts what the frontend received on both ports: every such frame crossed the backend once.
    const dir = c.direction === 'transmit' ? 'tx' : 'rx';
    const ports = sockets.map((_, i) => i);
    const blocksOf = (p: number) => stats.blocks.filter((b) => b.port === p);
    const blocksPerSecond = ports.length;
    const counted = () =>
      ports.reduce((sum, p) => {
        const b = blocksOf(p).at(-1);
        return sum + (b === undefined ? 0 : dir === 'tx' ? b.txPackets : b.rxPackets);
      }, 0);
    const failure = (what: string) =>
      new RunFailure(`${c.name}, ${sideLabel(side)}: ${what}\n${frontend!.describe()}\n${backend!.describe()}`);
    const check = () => {
      if (!backend!.running) throw failure('the backend exited');
      if (!frontend!.running) throw failure('the frontend exited');
    };

    // Traffic: the first block with packets counted (the link comes up once the backend has the rings).
    const deadline = performance.now() + 30_000;
    while (counted() === 0 || stats.blocks.length % blocksPerSecond !== 0) {
      check();
      if (performance.now() > deadline) throw failure('no packets counted at the frontend within 30 s');
      await stats.waitForBlocks(stats.blocks.length + 1, 5000, frontend);
    }
    // Seconds, counted in blocks of one port (testpmd prints one block per port per period).
    const first = stats.blocks.length / blocksPerSecond - 1;
    const from = first + warmupSeconds;
    const to = from + windowSeconds;
    const meter = new OthersMeter([frontend.pid, backend.pid]);
    for (let want = first + 1; want <= to + 1; want++) {
      if (!(await stats.waitForBlocks(want * blocksPerSecond, 10_000, frontend))) {
        check();
        throw failure(`no statistics from the frontend for 10 s (expected one a second)`);
      }
      if (want === from + 1) meter.begin();
    }
    check();
    const cpu = meter.end();
    const perPort = ports.map((p) => windowBetween(blocksOf(p), from, to, dir));
    const w = {
      packets: perPort.reduce((a, x) => a + x.packets, 0),
      bytes: perPort.reduce((a, x) => a + x.bytes, 0),
      // Both ports' blocks come from one counter read per period: their intervals are the same.
      seconds: perPort[0].seconds,
      wallSeconds: perPort[0].wallSeconds,
      perInterval: perPort[0].perInterval.map((_, i) => perPort.reduce((a, x) => a + x.perInterval[i], 0)),
    };
    if (w.packets <= 0) throw failure(`no packets in the measured window (${counted()} counted before it)`);
    // Frontend first: it disconnects cleanly (GET_VRING_BASE) while the backend is still there.
    await frontend.stop();
    await backend.stop();
    const f = stats.forward.find((x) => x.port === 0);
    const b = backendStats?.forward.find((x) => x.port === 0);
    const totals =
      f && b
        ? c.direction === 'transmit'
          ? { sent: f.txPackets, received: b.rxPackets }
          : { sent: b.txPackets, received: f.rxPackets }
        : undefined;
    return {
      side,
      rep,
      totals,
      retried: 0,
      mpps: w.packets / w.seconds / 1e6,
      bytesPerPacket: w.bytes / w.packets,
      seconds: w.seconds,
      wallSeconds: w.wallSeconds,
      perInterval: w.perInterval.map((x) => x / 1e6),
      frontendCpu: cpu.procs[0],
      backendCpu: cpu.procs[1],
      othersCpu: cpu.others,
    };
  } finally {
    await stopQuietly(frontend);
    await stopQuietly(backend);
    for (const socket of sockets) fs.rmSync(socket, { force: true });
    removeRuntimeDirs();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Turns: every side's backend and frontend live at once, idle but for the one whose turn it is.
//
// This host's cache-line transfer between the two vCPUs takes ~60 ns for some seconds and ~280 ns for others, and
// a loop's rate follows it: runs seconds apart can fall in different phases. Turns of half a second, the sides one
// after the other and the order reversed each round, put both sides of a round in (mostly) the same phase; the
// median of the rounds' ratios is what a side is worth against the other.

/** One side's processes, set up for a case and run in turns through testpmd's interactive commands. */
interface Pair {
  side: Side;
  backend: Proc;
  frontend: Proc;
  stats: TestpmdStats;
  /** DPDK's vhost PMD in its own interactive testpmd; undefined for vhost-ts, which serves whenever kicked. */
  backendStats: TestpmdStats | undefined;
  sockets: string[];
  prefixes: string[];
  /** The switch loop's first start sends a burst on each port (`start tx_first`); later starts resume. */
  started: boolean;
}

async function setUpPair(c: Case, side: Side): Promise<Pair> {
  const n = runCounter++;
  const sockets = Array.from({ length: c.direction === 'switch' ? 2 : 1 }, (_, i) => path.join(tempDir!, `net-${n}-${i}.sock`));
  const backendPrefix = `vhost-ts-bench-net-${process.pid}-${n}b`;
  const frontendPrefix = `vhost-ts-bench-net-${process.pid}-${n}f`;
  const useVhostTs = side !== 'dpdk' && candidateIsVhostTs;
  const backendCmd = useVhostTs ? vhostTsCommand(c, sockets, side) : dpdkBackendCommand(c, sockets, backendPrefix);
  const prefixes = useVhostTs ? [frontendPrefix] : [backendPrefix, frontendPrefix];
  for (const prefix of prefixes) runtimeDirs.add(dpdkRuntimeDir(prefix));
  remember(`${c.direction} backend ${useVhostTs ? sideLabel(side) : 'DPDK'}`, backendCmd, sockets, useVhostTs ? undefined : backendPrefix);
  const backend = procs.start(`${sideLabel(side)} backend`, backendCmd, { ...TESTPMD_STOP, input: !useVhostTs });
  const backendStats = useVhostTs ? undefined : new TestpmdStats(backend);
  let frontend: Proc | undefined;
  try {
    for (const socket of sockets) await waitForSocketFile(backend, socket, useVhostTs ? 60_000 : 30_000);
    // bind() creates the file before listen(): give the backend a moment before the frontend connects.
    await sleep(200);
    const frontendCmd = frontendCommand(c, sockets, frontendPrefix);
    remember(`${c.direction} frontend`, frontendCmd, sockets, frontendPrefix);
    frontend = procs.start(`testpmd frontend (virtio-user) of ${sideLabel(side)}`, frontendCmd, { ...TESTPMD_STOP, input: true });
    const pair: Pair = { side, backend, frontend, stats: new TestpmdStats(frontend), backendStats, sockets, prefixes, started: false };
    // Its ports are up once it answers a command (it reads stdin only after setting them up).
    await showStats(c, pair, 60_000);
    return pair;
  } catch (e) {
    await stopQuietly(frontend);
    await stopQuietly(backend);
    throw e;
  }
}

function pairFailure(c: Case, p: Pair, what: string): RunFailure {
  return new RunFailure(`${c.name}, ${sideLabel(p.side)}: ${what}\n${p.frontend.describe()}\n${p.backend.describe()}`);
}

/** `show port stats all`: one block per port, counters and the rate since the previous show. */
async function showStats(c: Case, p: Pair, timeoutMs = 10_000): Promise<StatsBlock[]> {
  const from = p.stats.blocks.length;
  const ports = p.sockets.length;
  p.frontend.send('show port stats all');
  if (!(await p.stats.waitForBlocks(from + ports, timeoutMs, p.frontend))) {
    throw pairFailure(c, p, `no port statistics from the frontend within ${timeoutMs / 1000} s of asking`);
  }
  return p.stats.blocks.slice(from, from + ports);
}

/** `stop` to an interactive testpmd, waiting for it to finish (its forward statistics, then "Done."). */
async function stopForwarding(c: Case, p: Pair, proc: Proc, stats: TestpmdStats): Promise<void> {
  const before = stats.stopped;
  proc.send('stop');
  if (!(await stats.waitUntil(() => stats.stopped > before, 10_000, proc))) throw pairFailure(c, p, `${proc.name} did not stop forwarding within 10 s`);
}

/**
 * One turn: start the side's forwarding, let it settle, count `ms` milliseconds at the frontend, stop it. The
 * consumer starts first and the producer stops first, so that neither end runs long against a stopped peer.
 */
async function turn(c: Case, p: Pair, round: number, ms: number): Promise<Run> {
  const b = p.backendStats;
  const frontendStart = c.direction === 'switch' && !p.started ? 'start tx_first' : 'start';
  const backendFirst = c.direction !== 'receive';
  if (b && backendFirst) p.backend.send('start');
  p.frontend.send(frontendStart);
  if (b && !backendFirst) p.backend.send('start');
  p.started = true;
  await sleep(SETTLE_MS);
  const before = await showStats(c, p);
  const meter = new OthersMeter([p.frontend.pid, p.backend.pid]);
  meter.begin();
  await sleep(ms);
  const after = await showStats(c, p);
  const cpu = meter.end();
  if (b && !backendFirst) await stopForwarding(c, p, p.backend, b);
  await stopForwarding(c, p, p.frontend, p.stats);
  if (b && backendFirst) await stopForwarding(c, p, p.backend, b);
  if (!p.backend.running) throw pairFailure(c, p, 'the backend exited');
  const dir = c.direction === 'transmit' ? 'tx' : 'rx';
  const perPort = before.map((a, i) => windowBetween([a, after[i]], 0, 1, dir));
  const packets = perPort.reduce((sum, x) => sum + x.packets, 0);
  if (packets <= 0) throw pairFailure(c, p, `no packets in round ${round + 1}'s turn`);
  // Both ports' blocks come from one counter read: their intervals are the same.
  const { seconds, wallSeconds } = perPort[0];
  return {
    side: p.side,
    rep: round,
    retried: 0,
    mpps: packets / seconds / 1e6,
    bytesPerPacket: perPort.reduce((sum, x) => sum + x.bytes, 0) / packets,
    seconds,
    wallSeconds,
    perInterval: [packets / seconds / 1e6],
    frontendCpu: cpu.procs[0],
    backendCpu: cpu.procs[1],
    othersCpu: cpu.others,
  };
}

async function tearDownPair(p: Pair): Promise<void> {
  // The frontend first: it disconnects cleanly (GET_VRING_BASE) while the backend is still there.
  await stopQuietly(p.frontend);
  await stopQuietly(p.backend);
  for (const socket of p.sockets) fs.rmSync(socket, { force: true });
  for (const prefix of p.prefixes) {
    const dir = dpdkRuntimeDir(prefix);
    fs.rmSync(dir, { recursive: true, force: true });
    runtimeDirs.delete(dir);
  }
}

async function measureInTurns(c: Case, index: number): Promise<Measured> {
  const runs: Record<Side, Run[]> = { candidate: [], polled: [], dpdk: [] };
  const failures: Measured['failures'] = [];
  const pairs: Pair[] = [];
  const fail = (side: Side, round: number, e: unknown) => {
    if (interrupted || !(e instanceof RunFailure)) throw e;
    failures.push({ side, rep: round, error: e.message });
    log(`${c.name}${round >= 0 ? ` round ${round + 1}/${rounds}` : ''}: ${sideLabel(side)} FAILED: ${e.message}`);
  };
  try {
    for (const side of sidesOf(c)) {
      let p: Pair | undefined;
      try {
        p = await setUpPair(c, side);
        // Warm-up, once: the JIT compiles vhost-ts's loops, the rings fill.
        await turn(c, p, -1, warmupSeconds * 1000);
        pairs.push(p);
      } catch (e) {
        if (p) await tearDownPair(p);
        fail(side, -1, e);
      }
    }
    for (let r = 0; r < rounds; r++) {
      const order = (r + index) % 2 === 0 ? [...pairs] : [...pairs].reverse();
      const line: string[] = [];
      for (const p of order) {
        if (!pairs.includes(p)) continue;
        try {
          const run = await turn(c, p, r, turnMs);
          checkRun(c, run);
          runs[p.side].push(run);
          line.push(`${sideLabel(p.side)} ${run.mpps.toFixed(3)}`);
        } catch (e) {
          fail(p.side, r, e);
          // A side whose processes broke sits out the remaining rounds.
          pairs.splice(pairs.indexOf(p), 1);
          await tearDownPair(p);
        }
      }
      log(`${c.name} round ${r + 1}/${rounds}: ${line.join(', ')} Mpps`);
    }
  } finally {
    for (const p of pairs) await tearDownPair(p);
  }
  return { case: c, runs, failures };
}

interface Measured {
  case: Case;
  runs: Record<Side, Run[]>;
  failures: { side: Side; rep: number; error: string }[];
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

/** Linear-interpolated quantile q (0..1). */
function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  const at = (s.length - 1) * q;
  const lo = Math.floor(at);
  return s[lo] + (s[Math.min(lo + 1, s.length - 1)] - s[lo]) * (at - lo);
}

/** A side's rate over DPDK's in the same rep (fresh) or round (turns). */
function pairedRatios(m: Measured, side: Side): number[] {
  return m.runs[side].flatMap((r) => {
    const other = m.runs.dpdk.find((x) => x.rep === r.rep);
    return other ? [r.mpps / other.mpps] : [];
  });
}

/** In turns, the median of the rounds' ratios (both sides of a round ran within a second or two); fresh: none. */
function ratioOf(m: Measured, side: Side): number | undefined {
  const xs = pairedRatios(m, side);
  return inTurns && xs.length ? median(xs) : undefined;
}

const warnings: string[] = [];

function checkRun(c: Case, r: Run): void {
  const label = `${c.name}, ${sideLabel(r.side)}`;
  if (Math.abs(r.bytesPerPacket - c.frameSize) > 0.5) {
    warnings.push(`${label}: ${r.bytesPerPacket.toFixed(1)} bytes per packet counted at the frontend, expected ${c.frameSize}`);
  }
  if (r.othersCpu !== undefined && r.othersCpu > maxOthers) {
    warnings.push(`${label}: other processes used ${(r.othersCpu * 100).toFixed(0)}% of a CPU during the window`);
  }
  if (r.frontendCpu !== undefined && r.frontendCpu < 0.9) {
    warnings.push(`${label}: the frontend got ${(r.frontendCpu * 100).toFixed(0)}% of its CPU (other processes competed?)`);
  }
  // Sent but not received: what was in flight when the frontend stopped (rings of 256 descriptors, and what the
  // PMDs hold; up to ~1200 seen). A miscount would be far more.
  if (r.totals && (r.totals.received > r.totals.sent || r.totals.sent - r.totals.received > 4096)) {
    warnings.push(`${label}: ${r.totals.sent} packets sent, ${r.totals.received} received (testpmd forward statistics)`);
  }
  const idle = r.perInterval.filter((x) => x === 0).length;
  if (idle > 0) warnings.push(`${label}: no packets in ${idle} of the window's ${r.perInterval.length} seconds (traffic stalled)`);
  if (Math.abs(r.wallSeconds - r.seconds) > 0.1 * r.seconds) {
    warnings.push(`${label}: window ${r.seconds.toFixed(2)} s by testpmd's clock, ${r.wallSeconds.toFixed(2)} s by ours`);
  }
}

async function measure(c: Case, index: number): Promise<Measured> {
  const runs: Record<Side, Run[]> = { candidate: [], polled: [], dpdk: [] };
  const failures: Measured['failures'] = [];
  for (let r = 0; r < reps; r++) {
    const sides = sidesOf(c);
    const order: Side[] = (r + index) % 2 === 0 ? sides : [...sides].reverse();
    for (const side of order) {
      let run: Run | undefined;
      const cpu = (x: number | undefined) => (x === undefined ? '?' : `${(x * 100).toFixed(0)}%`);
      for (let attempt = 0; ; attempt++) {
        try {
          run = await runOnce(c, side, r);
        } catch (e) {
          if (interrupted || !(e instanceof RunFailure)) throw e;
          failures.push({ side, rep: r, error: e.message });
          log(`${c.name} rep ${r + 1}/${reps}: ${sideLabel(side)} FAILED: ${e.message}`);
          break;
        }
        run.retried = attempt;
        log(
          `${c.name} rep ${r + 1}/${reps}: ${sideLabel(side).padEnd(15)} ${run.mpps.toFixed(3)} Mpps ` +
            `(per second ${run.perInterval.map((x) => x.toFixed(2)).join(' ')}; CPU frontend ${cpu(run.frontendCpu)}, ` +
            `backend ${cpu(run.backendCpu)}, other processes ${cpu(run.othersCpu)})`,
        );
        if (run.othersCpu === undefined || run.othersCpu <= maxOthers || attempt >= retries) break;
        log(`  other processes competed: run again (${attempt + 1}/${retries}) once the host is quiet`);
        if (!(await waitQuiet(60_000))) log('  the host stayed busy for 60 s: running anyway');
      }
      if (!run) continue;
      checkRun(c, run);
      runs[side].push(run);
    }
  }
  return { case: c, runs, failures };
}

/** Waits (at most maxMs) until the host's CPUs are idle enough: other processes below --max-others of a CPU. */
async function waitQuiet(maxMs: number): Promise<boolean> {
  const deadline = performance.now() + maxMs;
  const cpus = os.availableParallelism();
  while (performance.now() < deadline) {
    const busy = await hostBusy(2000);
    if (busy === undefined || busy * cpus <= maxOthers) return true;
  }
  return false;
}

const gbps = (mpps: number, frameSize: number) => (mpps * 1e6 * frameSize * 8) / 1e9;

function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ');
  return [line(rows[0]), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.slice(1).map(line)].join('\n');
}

async function main(): Promise<void> {
  testpmdPath = checkDpdk();
  const dpdkVersion = testpmdVersion(testpmdPath);
  const version = sourceVersion();

  const net = opts['dpdk-only'] ? { ok: false, why: '--dpdk-only', help: '' } : vhostTsNetAvailable();
  candidateIsVhostTs = net.ok;
  if (!net.ok) log(`vhost-ts net not used (${net.why}): DPDK's vhost PMD stands in for vhost-ts, to prove the plumbing`);

  const cpus = os.availableParallelism();
  if (!opts['no-pin']) {
    if (!which('taskset')) log('taskset not found: running unpinned (install util-linux)');
    else if (Math.max(backendCpuOpt, clientCpuOpt) >= cpus || backendCpuOpt === clientCpuOpt) {
      log(`cannot pin the backends to CPU ${backendCpuOpt} and the frontend to CPU ${clientCpuOpt} with ${cpus} CPUs: running unpinned`);
    } else pinning = { backend: backendCpuOpt, client: clientCpuOpt };
  }

  const busy = await hostBusy(1000);
  if (busy !== undefined && busy > 0.1) {
    log(`the CPUs were ${(busy * 100).toFixed(0)}% busy before the bench started: other work will skew the results`);
  }

  tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhost-ts-bench-net-'));
  if (tempDir.includes(',')) throw new Error(`temporary directory ${tempDir} has a comma, which DPDK's devargs cannot take`);

  const cases: Case[] = directions.flatMap((direction) =>
    frameSizes.map((frameSize) => ({
      direction,
      frameSize,
      // The switch case names its polled side itself; the others say when the candidate polls.
      name: `${direction === 'switch' ? 'switch loop' : direction} ${frameSize} B${packed ? ', packed ring' : ''}${direction !== 'switch' && pollUs > 0 ? `, --poll-us ${pollUs}` : ''}`,
    })),
  );
  const measured: Measured[] = [];
  for (const c of cases) measured.push(await (inTurns ? measureInTurns : measure)(c, measured.length));
  if (measured.some((m) => m.failures.length > 0)) process.exitCode = 1;

  const candidate = candidateIsVhostTs ? 'vhost-ts' : 'DPDK (stand-in)';
  const results: { name: string; value: number; unit: string; reference: number; ratio: number }[] = [];
  for (const m of measured) {
    for (const side of ['candidate', 'polled'] as const) {
      if (m.runs[side].length === 0 || m.runs.dpdk.length === 0) continue;
      const v = median(m.runs[side].map((r) => r.mpps));
      const d = median(m.runs.dpdk.map((r) => r.mpps));
      const ratio = ratioOf(m, side) ?? v / d;
      const suffix = (candidateIsVhostTs ? '' : ' (DPDK stand-in for vhost-ts)') + (side === 'polled' ? `, --poll-us ${switchPollUs}` : '');
      results.push({ name: `${m.case.name}${suffix}`, value: v, unit: 'Mpps', reference: d, ratio });
      results.push({
        name: `${m.case.name}${suffix}, Gbit/s`,
        value: gbps(v, m.case.frameSize),
        unit: 'Gbit/s',
        reference: gbps(d, m.case.frameSize),
        ratio,
      });
    }
  }

  const pinText = pinning
    ? `backend pinned to CPU ${pinning.backend}, testpmd frontend to CPU ${pinning.client} (taskset; testpmd lcores 0 and 1 on that CPU)`
    : 'unpinned (testpmd lcores 0 and 1 on CPU 0 in each process)';
  const methodText = inTurns
    ? [
        `${pinText}; every side of a case set up once, run one at a time in turns (testpmd's interactive start/stop), the`,
        `order reversed each round; ${rounds} rounds; per turn ${SETTLE_MS} ms of traffic, then ${turnMs} ms counted at the frontend (testpmd's`,
        `own clock); ${warmupSeconds} s warm-up per side; rates: medians over the rounds; ratio = median over the rounds of ${candidate} / DPDK`,
      ]
    : [
        `${pinText}; one backend at a time, fresh processes per run; ${reps} rep(s) per case and side, alternating which goes first;`,
        `${warmupSeconds} s warm-up then a ${windowSeconds} s window counted at the frontend (testpmd's own clock); medians; ratio = ${candidate} / DPDK`,
      ];
  const header = [
    `frontend: dpdk-testpmd (DPDK ${dpdkVersion}) with virtio-user; backends: ${candidate} vs DPDK's vhost PMD`,
    ...methodText,
    inTurns
      ? `turns during which other processes used > ${(maxOthers * 100).toFixed(0)}% of a CPU are listed under warnings (not repeated)`
      : `runs during which other processes used > ${(maxOthers * 100).toFixed(0)}% of a CPU repeated up to ${retries} time(s) (${measured.reduce((n, m) => n + [...m.runs.candidate, ...m.runs.dpdk].reduce((k, r) => k + r.retried, 0), 0)} repeated)`,
    `vhost-ts source: ${version}${candidateIsVhostTs ? '' : ' (not measured: vhost-ts net not available)'}`,
    ...[...commandLines].map(([k, v]) => `${k}: ${v}`),
  ];
  const notes = [
    'frame size: the bytes testpmd hands to / gets from the device (Ethernet header to payload, no FCS, no virtio-net header);',
    'Gbit/s = frame bytes x 8 x packets/s, without the 20 bytes of preamble and inter-frame gap (or the 4-byte FCS) a wire would add',
    'transmit: frontend txonly -> backend sink (vhost-ts) / rxonly (DPDK), counted as the frontend\'s TX packets (enqueued on its TX ring);',
    'receive: backend source (vhost-ts) / txonly (DPDK) -> frontend rxonly, counted as the frontend\'s RX packets',
    'switch loop: one testpmd, two virtio-user ports, io forward with --tx-first, through vhost-ts net --switch (two ports) /',
    '  DPDK\'s vhost PMD (two ports, io forward); counted as the frontend\'s RX packets on both ports (each crossed the backend once)',
    'CPU: the backend process\'s CPU time over the window / the window (median; DPDK\'s lcore polls, so ~100% unless other work competes)',
  ];

  if (json) {
    console.log(
      JSON.stringify({
        bench: 'net',
        results,
        config: {
          dpdk: dpdkVersion,
          vhostTs: candidateIsVhostTs ? version : null,
          candidate: candidateIsVhostTs ? 'vhost-ts' : 'dpdk-vhost-pmd',
          method,
          ...(inTurns ? { rounds, turnMs, settleMs: SETTLE_MS } : { reps, windowSeconds }),
          warmupSeconds,
          retries,
          maxOthers,
          pinning: pinning ?? null,
          gbitIncludesPreambleAndGap: false,
          commands: Object.fromEntries(commandLines),
        },
        runs: measured.map((m) => ({
          name: m.case.name,
          frameSize: m.case.frameSize,
          candidate: m.runs.candidate,
          ...(m.runs.polled.length ? { polled: m.runs.polled, pollUs: switchPollUs } : {}),
          dpdk: m.runs.dpdk,
          failures: m.failures,
        })),
        warnings,
      }),
    );
    return;
  }
  const rows = [['case', `${candidate} Mpps`, 'Gbit/s', 'CPU', 'DPDK Mpps', 'Gbit/s', 'CPU', 'ratio', `ratio/${inTurns ? 'round quartiles' : 'rep min-max'}`]];
  // The backend's CPU use over the window (median), as a share of its one CPU.
  const cpuCell = (runs: Run[]) => {
    const xs = runs.flatMap((r) => (r.backendCpu === undefined ? [] : [r.backendCpu]));
    return xs.length ? `${(median(xs) * 100).toFixed(0)}%` : '';
  };
  for (const m of measured) {
    for (const side of ['candidate', 'polled'] as const) {
      if (side === 'polled' && m.runs.polled.length === 0 && !m.failures.some((f) => f.side === 'polled')) continue;
      const v = m.runs[side].length ? median(m.runs[side].map((r) => r.mpps)) : undefined;
      const d = m.runs.dpdk.length ? median(m.runs.dpdk.map((r) => r.mpps)) : undefined;
      const perRep = pairedRatios(m, side);
      const ratio = ratioOf(m, side) ?? (v !== undefined && d !== undefined ? v / d : undefined);
      const failed = (s: Side) => {
        const n = m.failures.filter((f) => f.side === s).length;
        return n ? ` (${n} failed)` : '';
      };
      rows.push([
        side === 'polled' ? `${m.case.name}, --poll-us ${switchPollUs}` : m.case.name,
        v === undefined ? 'failed' : `${v.toFixed(3)}${failed(side)}`,
        v === undefined ? '' : gbps(v, m.case.frameSize).toFixed(2),
        cpuCell(m.runs[side]),
        d === undefined ? 'failed' : `${d.toFixed(3)}${failed('dpdk')}`,
        d === undefined ? '' : gbps(d, m.case.frameSize).toFixed(2),
        cpuCell(m.runs.dpdk),
        ratio === undefined ? '' : ratio.toFixed(2),
        !perRep.length ? '' : inTurns ? `${quantile(perRep, 0.25).toFixed(2)}-${quantile(perRep, 0.75).toFixed(2)}` : `${Math.min(...perRep).toFixed(2)}-${Math.max(...perRep).toFixed(2)}`,
      ]);
    }
  }
  const failures = measured.flatMap((m) => m.failures.map((f) => `${m.case.name} rep ${f.rep + 1}: ${sideLabel(f.side)}: ${f.error.split('\n')[0]}`));
  console.log(
    [
      ...header,
      '',
      table(rows),
      '',
      ...notes,
      ...(failures.length ? ['', 'failed runs (details above, on stderr):', ...failures.map((f) => `  ${f}`)] : []),
      ...(warnings.length ? ['', 'warnings:', ...warnings.map((w) => `  ${w}`)] : []),
    ].join('\n'),
  );
}

try {
  await main();
} catch (e) {
  process.exitCode = 1;
  if (!interrupted) log(`failed: ${(e as Error).stack ?? e}`);
} finally {
  await cleanup();
}
