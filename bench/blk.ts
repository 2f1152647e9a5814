/**
 * npm run bench:blk [-- --json] [--quick] [--reps N] [--direct] [--engine uring|sync] [--poll-us N] [--qsd-aio auto|io_uring|threads|native]
 *
 * virtio-blk over vhost-user with no VM: QEMU's `qemu-img bench` drives the disk through libblkio
 * (driver=virtio-blk-vhost-user), once against vhost-ts (`vhost-ts blk`) and once against QEMU's own backend
 * (qemu-storage-daemon, vhost-user-blk export of a file blockdev), on the same image. The backends run on one CPU
 * and qemu-img on another (taskset), the side that goes first alternates, each case is repeated and the medians are
 * compared within this one run (DESIGN.md §6).
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { which } from '../harness/host-tools.js';
import { qemuCommand, type Command } from '../harness/qemu-install.js';
import { ensureSetup, type HarnessSetup } from '../harness/setup.js';
import { pinned, Processes, waitForSocket, type Backend } from './blk-procs.js';
import { cpuSeconds } from './net-procs.js';

const KIB = 1024;
const MIB = 1024 * KIB;
const IMAGE_SIZE = 1024 * MIB;

const usage = `usage: npm run bench:blk [-- options]
  --json               print one JSON object {"bench":"blk","results":[...]} instead of the table
  --quick              smoke run: 1 repetition (unless --reps), fewer cases
  --reps N             repetitions per case and backend (default 3); the median is reported
  --seconds S          target length of one run of the faster backend (default 1.5)
  --direct             O_DIRECT on both backends (vhost-ts --direct, qsd cache.direct=on); default: page cache
  --engine E           passed to vhost-ts as --engine E (uring|sync); default: not passed (the CLI's default)
  --poll-us N|adaptive passed to vhost-ts as --poll-us (default: not passed, so vhost-ts polls adaptively, up to
                       32 us while requests keep coming back; 0: never poll; N: always N us)
  --qsd-iothread       run qemu-storage-daemon's export in an IOThread, which polls adaptively (QEMU's default
                       poll-max-ns): the like-for-like reference for vhost-ts's polling (its default, adaptive)
  --qsd-aio A          qemu-storage-daemon's aio= for the file: auto (io_uring if it starts, else threads),
                       io_uring, threads or native (native needs --direct); default auto
  --backend-cpu N      CPU for both backends (default 0)
  --client-cpu N       CPU for qemu-img (default 1)
  --no-pin             do not use taskset`;

const { values: opts } = parseArgs({
  options: {
    json: { type: 'boolean' },
    quick: { type: 'boolean' },
    reps: { type: 'string' },
    seconds: { type: 'string' },
    direct: { type: 'boolean' },
    engine: { type: 'string' },
    'poll-us': { type: 'string' },
    'qsd-iothread': { type: 'boolean' },
    'qsd-aio': { type: 'string' },
    'backend-cpu': { type: 'string' },
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

function positive(text: string | undefined, flag: string, fallback: number, integer: boolean): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!(n > 0) || (integer && !Number.isInteger(n))) {
    console.error(`${flag} takes a positive ${integer ? 'whole ' : ''}number, not "${text}"\n${usage}`);
    process.exit(2);
  }
  return n;
}

const json = opts.json === true;
const quick = opts.quick === true;
const direct = opts.direct === true;
const reps = positive(opts.reps, '--reps', quick ? 1 : 3, true);
const targetSeconds = positive(opts.seconds, '--seconds', 1.5, false);
const engine = opts.engine;
const pollUs = opts['poll-us'];
if (pollUs !== undefined && !/^(\d+|adaptive)$/.test(pollUs)) throw new Error(`--poll-us takes microseconds or adaptive, not "${pollUs}"`);
if (engine !== undefined && engine !== 'uring' && engine !== 'sync') {
  console.error(`--engine takes uring or sync\n${usage}`);
  process.exit(2);
}
const qsdAioOpt = opts['qsd-aio'] ?? 'auto';
if (!['auto', 'io_uring', 'threads', 'native'].includes(qsdAioOpt)) {
  console.error(`--qsd-aio takes auto, io_uring, threads or native\n${usage}`);
  process.exit(2);
}
if (qsdAioOpt === 'native' && !direct) {
  console.error('--qsd-aio native needs --direct (QEMU: aio=native requires cache.direct=on)');
  process.exit(2);
}
const backendCpuOpt = opts['backend-cpu'] === undefined ? 0 : Number(opts['backend-cpu']);
const clientCpuOpt = opts['client-cpu'] === undefined ? 1 : Number(opts['client-cpu']);

const log = (line: string) => process.stderr.write(`bench:blk: ${line}\n`);

// ---------------------------------------------------------------------------------------------------------------
// Cases

interface Case {
  name: string;
  image: 'disk' | 'tmpfs' | 'null';
  write: boolean;
  size: number;
  depth: number;
  /** Scattered offsets (a large stride through the whole image) rather than sequential ones. */
  scattered: boolean;
  quick: boolean;
}

function blkCase(image: Case['image'], write: boolean, size: number, depth: number, scattered: boolean, inQuick: boolean): Case {
  const what = `${size / KIB} KiB ${scattered ? 'rand' : 'seq'} ${write ? 'write' : 'read'} QD${depth}`;
  return { name: image === 'disk' ? what : `${image}: ${what}`, image, write, size, depth, scattered, quick: inQuick };
}

const ALL_CASES: Case[] = [
  blkCase('disk', false, 4 * KIB, 1, true, true),
  blkCase('disk', false, 4 * KIB, 32, true, true),
  blkCase('disk', true, 4 * KIB, 1, true, false),
  blkCase('disk', true, 4 * KIB, 32, true, true),
  blkCase('disk', false, 64 * KIB, 8, false, false),
  blkCase('disk', false, 64 * KIB, 32, false, true),
  blkCase('disk', true, 64 * KIB, 8, false, false),
  blkCase('disk', true, 64 * KIB, 32, false, false),
  // The queue path with the storage taken out as far as a file allows: the same image on tmpfs, page cache only.
  blkCase('tmpfs', false, 4 * KIB, 1, true, false),
  blkCase('tmpfs', false, 4 * KIB, 32, true, true),
  blkCase('tmpfs', true, 4 * KIB, 32, true, false),
  // The pure queue path: no storage at all (vhost-ts --null, qemu-storage-daemon driver=null-co).
  blkCase('null', false, 4 * KIB, 1, true, true),
  blkCase('null', false, 4 * KIB, 32, true, true),
  blkCase('null', true, 4 * KIB, 32, true, false),
];
const cases = ALL_CASES.filter((c) => !quick || c.quick);

const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));

/**
 * qemu-img bench has no random mode: request i goes to (i × step) mod (image size − request size). A step of
 * P request-sized blocks with P coprime to that block count visits every block once per pass, in an order with no
 * locality (P near the golden section of the block count); the step must fit in an int.
 */
function scatterStep(size: number): number {
  const blocks = (IMAGE_SIZE - size) / size;
  for (let p = Math.floor(blocks * 0.618) | 1; p > 1; p -= 2) {
    if (gcd(p, blocks) === 1 && p * size <= 0x7fffffff) return p * size;
  }
  throw new Error(`no scatter step for ${size}-byte requests`);
}

// ---------------------------------------------------------------------------------------------------------------
// Clean-up: every process and temporary directory, on success, on error and on SIGINT/SIGTERM/SIGHUP.

const procs = new Processes();
const tempDirs: string[] = [];
let cleaning: Promise<void> | undefined;
let interrupted = false;

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await procs.stopAll();
    for (const d of tempDirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  })();
  return cleaning;
}

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    interrupted = true;
    log(`${sig}: stopping the backends and removing the images`);
    const hard = setTimeout(() => process.exit(130), 20_000);
    void cleanup().finally(() => {
      clearTimeout(hard);
      process.exit(130);
    });
  });
}

function tempDir(parent: string, prefix: string): string {
  const d = fs.mkdtempSync(path.join(parent, prefix));
  tempDirs.push(d);
  if (d.includes(',')) throw new Error(`temporary directory ${d} has a comma, which QEMU's option syntax cannot take`);
  return d;
}

/** A raw image of non-zero data, written through and synced so reads hit allocated blocks. */
async function makeImage(file: string): Promise<void> {
  const chunk = randomBytes(4 * MIB);
  const fh = await fs.promises.open(file, 'w');
  try {
    for (let off = 0; off < IMAGE_SIZE; off += chunk.length) {
      chunk.writeUInt32LE(off / chunk.length, 0);
      await fh.write(chunk, 0, chunk.length, off);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backends

type Side = 'vhost-ts' | 'qsd';

interface Pair {
  image: string;
  sockets: Record<Side, string>;
  backends: Record<Side, Backend>;
  vhostArgs: string[];
  qsdBlockdev: string;
}

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** The checkout vhost-ts runs from: commit, and whether src/ has uncommitted changes (others edit in parallel). */
function sourceVersion(): string {
  try {
    const git = (args: string[]) =>
      execFileSync('git', ['-C', repoRoot, ...args], { timeout: 10_000, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    const commit = git(['rev-parse', '--short', 'HEAD']);
    return git(['status', '--porcelain', '--', 'src', 'bin']) ? `${commit} + uncommitted changes in src/` : commit;
  } catch {
    return 'unknown (not a git checkout)';
  }
}

let pinning: { backend: number; client: number } | undefined;

/** The null group passes image '' : vhost-ts --null and qsd driver=null-co of the same size. */
function vhostTsArgs(image: string, socket: string, useDirect: boolean): string[] {
  return [
    'blk',
    '--socket-path',
    socket,
    ...(image === '' ? ['--null', String(IMAGE_SIZE)] : ['--image', image]),
    '--num-queues',
    '1',
    ...(useDirect ? ['--direct'] : []),
    ...(engine ? ['--engine', engine] : []),
    ...(pollUs !== undefined ? ['--poll-us', pollUs] : []),
  ];
}

function qsdBlockdev(image: string, aio: string, useDirect: boolean): string {
  // locking=off: vhost-ts has the same image open at the same time (only one of the two is ever driven).
  return `driver=file,node-name=f,filename=${image},aio=${aio},locking=off${useDirect ? ',cache.direct=on' : ''}`;
}

function startQsd(setup: HarnessSetup, blockdev: string, socket: string): Backend {
  const iothread = opts['qsd-iothread'] === true;
  const cmd = qemuCommand(setup.qemu, 'qemu-storage-daemon', [
    ...(iothread ? ['--object', 'iothread,id=iot0'] : []),
    '--blockdev',
    blockdev,
    '--export',
    `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${socket},writable=on,num-queues=1${iothread ? ',iothread=iot0' : ''}`,
  ]);
  return procs.start('qemu-storage-daemon', pinned(cmd, pinning?.backend));
}

let resolvedQsdAio: string | undefined;

async function startPair(setup: HarnessSetup, dir: string, image: string, useDirect: boolean): Promise<Pair> {
  const sockets = { 'vhost-ts': path.join(dir, 'vhost-ts.sock'), qsd: path.join(dir, 'qsd.sock') };
  const vhostArgs = vhostTsArgs(image, sockets['vhost-ts'], useDirect);
  const vhostCmd: Command = { file: process.execPath, args: [path.join(repoRoot, 'bin/vhost-ts.mjs'), ...vhostArgs], env: {} };
  const vhost = procs.start('vhost-ts', pinned(vhostCmd, pinning?.backend));

  let aio = resolvedQsdAio ?? (qsdAioOpt === 'auto' ? 'io_uring' : qsdAioOpt);
  // aio=native needs O_DIRECT, which the tmpfs cases do not use.
  if (aio === 'native' && !useDirect) aio = 'io_uring';
  let blockdev = image === '' ? `driver=null-co,node-name=f,size=${IMAGE_SIZE}` : qsdBlockdev(image, aio, useDirect);
  let qsd = startQsd(setup, blockdev, sockets.qsd);
  try {
    await waitForSocket(qsd, sockets.qsd, 20_000);
  } catch (e) {
    if (!(qsdAioOpt === 'auto' && resolvedQsdAio === undefined)) throw e;
    log(`qemu-storage-daemon with aio=io_uring failed, using aio=threads:\n${qsd.describe()}`);
    await qsd.stop();
    fs.rmSync(sockets.qsd, { force: true });
    aio = 'threads';
    blockdev = qsdBlockdev(image, aio, useDirect);
    qsd = startQsd(setup, blockdev, sockets.qsd);
    await waitForSocket(qsd, sockets.qsd, 20_000);
  }
  resolvedQsdAio ??= aio;
  await waitForSocket(vhost, sockets['vhost-ts'], 60_000);
  return { image, sockets, backends: { 'vhost-ts': vhost, qsd }, vhostArgs, qsdBlockdev: blockdev };
}

async function stopPair(p: Pair): Promise<void> {
  await Promise.all([p.backends['vhost-ts'].stop(), p.backends.qsd.stop()]);
}

// ---------------------------------------------------------------------------------------------------------------
// qemu-img bench

function benchArgs(c: Case, socket: string, count: number): string[] {
  return [
    'bench',
    '-t',
    'none',
    '--image-opts',
    `driver=virtio-blk-vhost-user,path=${socket},cache.direct=on`,
    '-c',
    String(count),
    '-d',
    String(c.depth),
    '-s',
    String(c.size),
    ...(c.scattered ? ['-S', String(scatterStep(c.size))] : []),
    ...(c.write ? ['-w', '--pattern', '0xa5'] : []),
  ];
}

let setupRef: HarnessSetup;

/** One qemu-img bench run: the seconds it reports ("Run completed in X seconds."). */
async function runBench(p: Pair, side: Side, c: Case, count: number, timeoutMs: number): Promise<number> {
  const backend = p.backends[side];
  if (!backend.running) throw new Error(`${side} is no longer running\n${backend.describe()}`);
  const cmd = pinned(qemuCommand(setupRef.qemu, 'qemu-img', benchArgs(c, p.sockets[side], count)), pinning?.client);
  const r = await procs.run(`qemu-img bench (${side}, ${c.name})`, cmd, timeoutMs);
  const m = /Run completed in ([0-9.]+) seconds/.exec(r.stdout);
  if (r.code !== 0 || !m) {
    throw new Error(
      `qemu-img bench against ${side} (${c.name}, -c ${count}) failed (${r.signal ?? `exit ${r.code}`}):\n` +
        `${r.stdout}${r.stderr}\n${backend.describe()}`,
    );
  }
  const seconds = Number(m[1]);
  if (!(seconds > 0)) throw new Error(`qemu-img bench reported ${m[1]} seconds`);
  return seconds;
}

/** Requests per second of one backend from short runs grown until one lasts 0.2 s (doubles as the warm-up). */
async function probeRate(p: Pair, side: Side, c: Case): Promise<number> {
  let count = c.depth === 1 ? 1000 : 4000;
  for (let i = 0; ; i++) {
    const s = await runBench(p, side, c, count, 60_000);
    if (s >= 0.2 || i === 5) return count / s;
    count = Math.ceil(count * Math.min(10, 0.3 / s));
  }
}

/** Two significant digits. */
function roundCount(n: number): number {
  const scale = 10 ** Math.max(0, Math.floor(Math.log10(n)) - 1);
  return Math.round(n / scale) * scale;
}

interface Measured {
  case: Case;
  count: number;
  iops: Record<Side, number[]>;
  /**
   * Backend CPU time per request, in microseconds, each run (the whole qemu-img connection, set-up included): what
   * a side's polling costs shows here, since a poll that finds nothing still burns its CPU.
   */
  cpuUs: Record<Side, number[]>;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

async function measure(p: Pair, c: Case, index: number): Promise<Measured> {
  const rates = { 'vhost-ts': await probeRate(p, 'vhost-ts', c), qsd: await probeRate(p, 'qsd', c) };
  const fastest = Math.max(rates['vhost-ts'], rates.qsd);
  const slowest = Math.min(rates['vhost-ts'], rates.qsd);
  const count = Math.min(5_000_000, Math.max(1000, roundCount(fastest * targetSeconds)));
  const timeoutMs = Math.max(60_000, (20_000 * count) / slowest);
  const iops: Record<Side, number[]> = { 'vhost-ts': [], qsd: [] };
  const cpuUs: Record<Side, number[]> = { 'vhost-ts': [], qsd: [] };
  for (let r = 0; r < reps; r++) {
    const order: Side[] = (r + index) % 2 === 0 ? ['vhost-ts', 'qsd'] : ['qsd', 'vhost-ts'];
    for (const side of order) {
      const pid = p.backends[side].pid;
      const cpuBefore = cpuSeconds(pid);
      const s = await runBench(p, side, c, count, timeoutMs);
      const cpuAfter = cpuSeconds(pid);
      iops[side].push(count / s);
      if (cpuBefore !== undefined && cpuAfter !== undefined) cpuUs[side].push(((cpuAfter - cpuBefore) * 1e6) / count);
    }
  }
  const v = median(iops['vhost-ts']);
  const q = median(iops.qsd);
  log(`${c.name}: vhost-ts ${fmtInt(v)} IOPS, qsd ${fmtInt(q)} IOPS, ratio ${(v / q).toFixed(2)} (-c ${count}, ${reps} reps)`);
  return { case: c, count, iops, cpuUs };
}

// ---------------------------------------------------------------------------------------------------------------
// Output

const fmtInt = (n: number) => Math.round(n).toLocaleString('en-US');
const mibs = (iops: number, size: number) => (iops * size) / MIB;

function table(rows: string[][]): string {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ');
  return [line(rows[0]), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.slice(1).map(line)].join('\n');
}

// ---------------------------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  setupRef = await ensureSetup({ log });
  const setup = setupRef;
  const version = sourceVersion();

  if (!opts['no-pin']) {
    const cpus = os.availableParallelism();
    if (!which('taskset')) log('taskset not found: running unpinned (install util-linux)');
    else if (Math.max(backendCpuOpt, clientCpuOpt) >= cpus || backendCpuOpt === clientCpuOpt) {
      log(`cannot pin backends to CPU ${backendCpuOpt} and qemu-img to CPU ${clientCpuOpt} with ${cpus} CPUs: running unpinned`);
    } else pinning = { backend: backendCpuOpt, client: clientCpuOpt };
  }

  const results: {
    name: string;
    value: number;
    unit: string;
    reference: number;
    ratio: number;
  }[] = [];
  const measured: Measured[] = [];
  const commands: Record<string, { image: string; vhostTs: string; qsd: string }> = {};

  for (const kind of ['disk', 'tmpfs', 'null'] as const) {
    const group = cases.filter((c) => c.image === kind);
    if (group.length === 0) continue;
    let parent = os.tmpdir();
    if (kind === 'null') {
      const dir = tempDir(parent, 'vhost-ts-bench-blk-');
      const pair = await startPair(setup, dir, '', false);
      commands[kind] = { image: '(none)', vhostTs: `vhost-ts ${pair.vhostArgs.join(' ')}`, qsd: `qemu-storage-daemon --blockdev ${pair.qsdBlockdev} --export ...` };
      try {
        for (const c of group) measured.push(await measure(pair, c, measured.length));
      } finally {
        await stopPair(pair);
        fs.rmSync(dir, { recursive: true, force: true });
        tempDirs.splice(tempDirs.indexOf(dir), 1);
      }
      continue;
    }
    if (kind === 'tmpfs') {
      const free = fs.existsSync('/dev/shm') ? fs.statfsSync('/dev/shm') : undefined;
      if (!free || free.bavail * free.bsize < IMAGE_SIZE + 256 * MIB) {
        log('/dev/shm missing or without room for a 1 GiB image: skipping the tmpfs cases');
        continue;
      }
      parent = '/dev/shm';
    }
    const dir = tempDir(parent, 'vhost-ts-bench-blk-');
    const image = path.join(dir, 'disk.img');
    log(`writing a 1 GiB image of random data: ${image}`);
    await makeImage(image);
    // O_DIRECT applies to the disk image only; the tmpfs cases measure the page-cache path.
    const useDirect = direct && kind === 'disk';
    const pair = await startPair(setup, dir, image, useDirect);
    commands[kind] = {
      image,
      vhostTs: `vhost-ts ${pair.vhostArgs.join(' ')}`,
      qsd: `qemu-storage-daemon --blockdev ${pair.qsdBlockdev} --export type=vhost-user-blk,...,num-queues=1`,
    };
    log(`${kind}: vhost-ts ${pair.vhostArgs.join(' ')} (pid ${pair.backends['vhost-ts'].pid})`);
    log(`${kind}: qemu-storage-daemon --blockdev ${pair.qsdBlockdev} (pid ${pair.backends.qsd.pid})`);
    try {
      for (const c of group) measured.push(await measure(pair, c, measured.length));
    } finally {
      await stopPair(pair);
      fs.rmSync(dir, { recursive: true, force: true });
      tempDirs.splice(tempDirs.indexOf(dir), 1);
    }
  }

  for (const m of measured) {
    const v = median(m.iops['vhost-ts']);
    const q = median(m.iops.qsd);
    results.push({ name: m.case.name, value: v, unit: 'IOPS', reference: q, ratio: v / q });
  }

  const header = [
    `qemu-img bench (QEMU ${setup.qemu.version}) through libblkio: --image-opts driver=virtio-blk-vhost-user,path=SOCK,cache.direct=on -t none`,
    `backends ${pinning ? `pinned to CPU ${pinning.backend}, qemu-img to CPU ${pinning.client}` : 'and qemu-img unpinned'}; ` +
      `${reps} rep(s) per case and side, alternating which side goes first; medians; ratio = vhost-ts / qsd`,
    `vhost-ts source: ${version}`,
    `host I/O: ${direct ? 'O_DIRECT (disk image); tmpfs cases use the page cache' : 'page cache (buffered) on both sides'}`,
    ...Object.entries(commands).flatMap(([kind, c]) => [`${kind} vhost-ts: ${c.vhostTs}`, `${kind} qsd:      ${c.qsd}`]),
    `images: 1 GiB raw files of random data (${Object.values(commands).filter((c) => c.image !== '(none)').map((c) => path.dirname(c.image)).join(', ')}; deleted)`,
  ];
  const notes = [
    `rand = qemu-img bench -S stride (${scatterStep(4 * KIB) / (4 * KIB)} x 4 KiB, coprime to the block count): every block once per pass in scattered order; qemu-img bench has no random mode`,
    'tmpfs: both backends serve the same image in /dev/shm (page cache only, no device I/O)',
    'null: the pure queue path, no storage: vhost-ts --null against qemu-storage-daemon driver=null-co',
    'CPU us/req: the backend process\'s CPU time (all threads, /proc/PID/stat) over each qemu-img run, per request, median; a poll that finds nothing counts too',
    engine === undefined
      ? 'vhost-ts engine: CLI default (--engine not passed: io_uring where the build and kernel allow it, else preadv/pwritev)'
      : `vhost-ts engine: --engine ${engine}`,
    pollUs === undefined
      ? `vhost-ts polling: CLI default (adaptive: up to 32 us after requests while they keep coming back); qsd ${opts['qsd-iothread'] ? 'in an IOThread (adaptive polling, QEMU default poll-max-ns)' : 'in its main loop (no polling; --qsd-iothread for an IOThread that polls)'}`
      : `vhost-ts polling: --poll-us ${pollUs}`,
  ];

  if (json) {
    console.log(
      JSON.stringify({
        bench: 'blk',
        results,
        config: {
          qemu: setup.qemu.version,
          vhostTs: version,
          reps,
          direct,
          engine: engine ?? 'default',
          pollUs: pollUs ?? 'default (adaptive)',
          qsdIothread: opts['qsd-iothread'] === true,
          qsdAio: resolvedQsdAio,
          pinning: pinning ?? null,
          commands,
        },
        runs: measured.map((m) => ({
          name: m.case.name,
          count: m.count,
          vhostTs: m.iops['vhost-ts'],
          qsd: m.iops.qsd,
          cpuUsPerRequest: { vhostTs: m.cpuUs['vhost-ts'], qsd: m.cpuUs.qsd },
        })),
      }),
    );
    return;
  }
  const rows = [['case', 'vhost-ts IOPS', 'MiB/s', 'CPU us/req', 'qsd IOPS', 'MiB/s', 'CPU us/req', 'ratio', 'ratio/rep min-max']];
  const cpuCell = (xs: number[]) => (xs.length === 0 ? '?' : median(xs).toFixed(2));
  for (const m of measured) {
    const v = median(m.iops['vhost-ts']);
    const q = median(m.iops.qsd);
    const perRep = m.iops['vhost-ts'].map((x, i) => x / m.iops.qsd[i]);
    rows.push([
      m.case.name,
      fmtInt(v),
      mibs(v, m.case.size).toFixed(1),
      cpuCell(m.cpuUs['vhost-ts']),
      fmtInt(q),
      mibs(q, m.case.size).toFixed(1),
      cpuCell(m.cpuUs.qsd),
      (v / q).toFixed(2),
      `${Math.min(...perRep).toFixed(2)}-${Math.max(...perRep).toFixed(2)}`,
    ]);
  }
  console.log([...header, '', table(rows), '', ...notes].join('\n'));
}

try {
  await main();
} catch (e) {
  process.exitCode = 1;
  if (!interrupted) log(`failed: ${(e as Error).stack ?? e}`);
} finally {
  await cleanup();
}
