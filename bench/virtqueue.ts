/**
 * npm run bench:virtqueue [-- --json]
 *
 * Descriptor chains per second through split and packed rings for a no-op device: SplitQueue and PackedQueue
 * (pop, push, publish with validation) each against a bare typed-array loop over the same layout, measured in the
 * same run. Same thread: driver and device alternate in batches. Across threads: the driver runs in a worker, the
 * device on the main thread, both busy-polling.
 *
 * Against rust-vmm: after the same-thread cases, the 1-descriptor round trip through rust-vmm's virtio-queue
 * (bench/rust-vmm, built offline from Debian trixie's crate sources by bench/rust-vmm-peer.ts, in a default release
 * build and an LTO one) and through SplitQueue, in turns of short windows, all on the CPU this process runs on,
 * rated over CPU time. `--no-rust` skips it; a host without cargo or the crates says so loudly and runs the rest.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';
import { Bench } from 'tinybench';
import { stderrLog } from '../harness/progress.js';
import { which } from '../harness/host-tools.js';
import { spawnWorker } from '../src/vhost/spawn-worker.js';
import {
  RawPackedDevice,
  makePackedQueue,
  packedIndirectCase,
  packedOneDescriptorCase,
  packedRawCase,
  packedThreeDescriptorCase,
} from './virtqueue-packed-setup.js';
import { RustPeerUnavailable, RustVmmPeerProcess, ensureRustVmmPeer, type Rate, type RustVmmPeer } from './rust-vmm-peer.js';
import { QUEUE_SIZE, RawDevice, indirectCase, makeQueue, oneDescriptorCase, rawCase, threeDescriptorCase } from './virtqueue-setup.js';

const json = process.argv.includes('--json');
const noRust = process.argv.includes('--no-rust');
const MEMORY = 1 << 20;

interface Result {
  name: string;
  value: number;
  unit: string;
  reference?: number;
  ratio?: number;
}

/** The same-thread rows, and the 1-descriptor case's round function (the rust-vmm comparison runs it again). */
async function sameThread(): Promise<{ results: Result[]; oneDescriptor: () => number }> {
  const bench = new Bench({ time: 1000, warmup: true });
  // Each layout's cases are measured against the raw loop of that layout (the first case of its group).
  const cases: [string, () => number][] = [
    ['raw typed-array loop (reference)', rawCase()],
    ['SplitQueue, 1-descriptor chains', oneDescriptorCase()],
    ['SplitQueue, 3-descriptor chains', threeDescriptorCase()],
    ['SplitQueue, 3 descriptors in an indirect table', indirectCase()],
    ['raw typed-array packed loop (reference)', packedRawCase()],
    ['PackedQueue, 1-descriptor chains', packedOneDescriptorCase()],
    ['PackedQueue, 3-descriptor chains', packedThreeDescriptorCase()],
    ['PackedQueue, 3 descriptors in an indirect table', packedIndirectCase()],
  ];
  const referenceOf = (i: number) => (i < 4 ? 0 : 4);
  // Chains are counted as the device serves them, not inferred from the case: a round that served a different
  // number than the first (a driver that ran out of descriptors, say) fails the run instead of skewing it.
  const perRound = new Map<string, number>();
  for (const [name, round] of cases) {
    bench.add(name, () => {
      const n = round();
      const expected = perRound.get(name);
      if (expected === undefined) perRound.set(name, n);
      else if (n !== expected) throw new Error(`${name}: served ${n} chains in a round, earlier rounds ${expected}`);
    });
  }
  await bench.run();
  const hz = bench.tasks.map((t) => {
    if (t.result.state !== 'completed') throw new Error(`${t.name}: ${t.result.state}`);
    const chains = perRound.get(t.name) ?? 0;
    if (chains === 0) throw new Error(`${t.name}: served no chains`);
    // Rounds per second from the mean round time (period). throughput.mean averages per-round rates, which
    // overstates the rate whenever round times vary.
    return (chains * 1000) / t.result.period;
  });
  const results = bench.tasks.map((t, i): Result => {
    const r = referenceOf(i);
    return {
      name: `same thread: ${t.name}`,
      value: hz[i],
      unit: 'chains/s',
      ...(i === r ? {} : { reference: hz[r], ratio: hz[i] / hz[r] }),
    };
  });
  const one = cases.find(([name]) => name === 'SplitQueue, 1-descriptor chains');
  if (!one) throw new Error('no SplitQueue 1-descriptor case');
  return { results, oneDescriptor: one[1] };
}

// The device side of the cross-thread runs: serve what the driver made available, return how many chains.
function rawServer(bytes: Uint8Array): () => number {
  const raw = new RawDevice(bytes);
  return () => raw.drain();
}

function rawPackedServer(bytes: Uint8Array): () => number {
  const raw = new RawPackedDevice(bytes);
  return () => raw.drain();
}

function packedQueueServer(bytes: Uint8Array): () => number {
  const queue = makePackedQueue(bytes);
  return () => {
    let n = 0;
    let c;
    while ((c = queue.pop()) !== null) {
      queue.push(c, 0);
      n++;
    }
    queue.publish();
    return n;
  };
}

function queueServer(bytes: Uint8Array): () => number {
  const queue = makeQueue(bytes);
  return () => {
    let n = 0;
    let c;
    while ((c = queue.pop()) !== null) {
      queue.push(c, 0);
      n++;
    }
    queue.publish();
    return n;
  };
}

type Kind = 'raw' | 'queue' | 'raw-packed' | 'packed';
const servers: Record<Kind, (bytes: Uint8Array) => () => number> = {
  raw: rawServer,
  queue: queueServer,
  'raw-packed': rawPackedServer,
  packed: packedQueueServer,
};

async function crossThread(kind: Kind, ms: number): Promise<number> {
  const shared = new SharedArrayBuffer(MEMORY);
  const control = new SharedArrayBuffer(4);
  const flag = new Int32Array(control);
  const bytes = new Uint8Array(shared);
  const ring = kind === 'raw' || kind === 'queue' ? 'split' : 'packed';
  const worker = spawnWorker(new URL('./virtqueue-driver-worker.ts', import.meta.url), { shared, control, ring });
  await new Promise((resolve) => worker.once('message', resolve));
  // A function per kind rather than both kinds' code in this loop: the device loop is compiled on its own.
  const serve = servers[kind](bytes);
  Atomics.store(flag, 0, 1);
  const start = performance.now();
  let served = 0;
  while (performance.now() - start < ms) {
    for (let spin = 0; spin < 1000; spin++) served += serve();
  }
  const elapsed = performance.now() - start;
  Atomics.store(flag, 0, 2);
  const done = new Promise((resolve) => worker.once('message', resolve));
  // The driver may be waiting for used entries; keep serving until it reports.
  let finished = false;
  void done.then(() => (finished = true));
  while (!finished) {
    serve();
    await new Promise((r) => setImmediate(r));
  }
  await worker.terminate();
  return (served / elapsed) * 1000;
}

// The rust-vmm comparison: rounds of short windows, one per side (ours, each build of the peer; which goes first
// rotates), each window a warm-up (another side has just had the CPU's caches) and a measured part. Short windows
// taken in turn many times see the same machine load on every side, where a few long runs each catch a different
// moment of the other engineers' jobs.
const RUST_ROUNDS = 15;
const RUST_WARMUP_MS = 50;
const RUST_MS = 250;
const execFileAsync = promisify(execFile);
/** What the output says besides the table: how the rust-vmm peer was had, or why it was not. */
const notes: string[] = [];

/** Said loudly (stderr, whatever the output format) and kept for the output. */
function loud(line: string): void {
  process.stderr.write(`!! ${line}\n`);
  notes.push(line);
}

/** The CPU the calling thread last ran on (field 39 of /proc/thread-self/stat). */
function currentCpu(): number {
  const stat = fs.readFileSync('/proc/thread-self/stat', 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[36]);
}

/**
 * Pin this process's main thread (not its workers) to the CPU it is on for fn, then restore its affinity. Without
 * taskset fn runs unpinned, cpu undefined.
 */
async function pinnedMainThread<T>(fn: (cpu: number | undefined) => Promise<T>): Promise<T> {
  if (!which('taskset')) {
    loud('taskset not found (util-linux): the rust-vmm comparison runs unpinned');
    return fn(undefined);
  }
  const pid = String(process.pid);
  const mask = (await execFileAsync('taskset', ['-p', pid])).stdout.match(/mask:\s*([0-9a-f,]+)/i)?.[1];
  const cpu = currentCpu();
  await execFileAsync('taskset', ['-p', '-c', String(cpu), pid]);
  try {
    return await fn(cpu);
  } finally {
    if (mask) await execFileAsync('taskset', ['-p', mask, pid]);
  }
}

/**
 * Chains per second through a round function, timed as the peer times itself: rounds for warmupMs, then rounds
 * until ms have passed (the clock read once per round); over wall time and over this process's CPU time.
 */
function timedRounds(name: string, round: () => number, warmupMs: number, ms: number): Rate {
  const check = (n: number) => {
    if (n !== QUEUE_SIZE) throw new Error(`${name}: served ${n} chains in a round, expected ${QUEUE_SIZE}`);
  };
  const warm = performance.now();
  while (performance.now() - warm < warmupMs) check(round());
  const start = performance.now();
  const cpuStart = process.cpuUsage();
  let chains = 0;
  let elapsed = 0;
  do {
    const n = round();
    check(n);
    chains += n;
    elapsed = performance.now() - start;
  } while (elapsed < ms);
  const cpu = process.cpuUsage(cpuStart);
  return { wall: (chains * 1000) / elapsed, cpu: (chains * 1e6) / (cpu.user + cpu.system) };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/**
 * SplitQueue against rust-vmm's virtio-queue (each build of the peer), 1-descriptor chains, same thread, all on
 * one CPU: result rows. `oneDescriptor` is the round function tinybench measured: a second oneDescriptorCase()
 * would be a second closure of the same functions, which V8 compiles less specifically (measured: about 12 M
 * chains/s instead of 17-24 M in one process), and the row would no longer be the case the table reports.
 */
async function againstRustVmm(oneDescriptor: () => number): Promise<Result[]> {
  if (noRust) {
    notes.push('rust-vmm comparison skipped: --no-rust');
    return [];
  }
  let peer: RustVmmPeer;
  try {
    peer = await ensureRustVmmPeer({ log: stderrLog });
  } catch (err) {
    if (!(err instanceof RustPeerUnavailable)) throw err;
    loud(`rust-vmm comparison SKIPPED: ${err.message}`);
    return [];
  }
  const builds = peer.builds;
  notes.push(
    `rust-vmm peer: virtio-queue ${peer.virtioQueue}, vm-memory ${peer.vmMemory} (Debian trixie sources), ${peer.rustc}, RUSTFLAGS empty (no target-cpu); ` +
      (peer.built ? `built now in ${(peer.buildMs / 1000).toFixed(1)} s` : `reused a build of ${(peer.buildMs / 1000).toFixed(1)} s`) +
      (peer.provisionMs > 0 ? `, crates provisioned in ${(peer.provisionMs / 1000).toFixed(1)} s` : ''),
    ...builds.map((b) => `  profile ${b.profile}: ${b.description}`),
  );
  if (!peer.packed.supported) notes.push(`packed rings not compared with rust-vmm: ${peer.packed.why}`);
  // sides[0] is ours, sides[1 + k] the peer's build k.
  const sides: Rate[][] = [[], ...builds.map(() => [])];
  const cpu = await pinnedMainThread(async (cpu) => {
    const peers = builds.map((b) => new RustVmmPeerProcess(b.binary, cpu));
    try {
      const measure = async (side: number, ms: number): Promise<Rate> =>
        side === 0 ? timedRounds('SplitQueue', oneDescriptor, RUST_WARMUP_MS, ms) : peers[side - 1].measure(RUST_WARMUP_MS, ms);
      // A first, longer warm-up of each: page faults, caches, and (for ours) any recompilation since tinybench.
      for (let side = 0; side < sides.length; side++) await measure(side, 4 * RUST_MS);
      for (let i = 0; i < RUST_ROUNDS; i++) {
        // Rotate which side goes first, so drift in machine load hits each alike.
        for (let k = 0; k < sides.length; k++) {
          const side = (i + k) % sides.length;
          sides[side].push(await measure(side, RUST_MS));
        }
      }
    } finally {
      for (const p of peers) await p.close();
    }
    return cpu;
  });
  const ours = sides[0];
  // Rates over CPU time: on a shared machine a window's wall time includes whatever else ran on this CPU, which
  // differs from window to window; its CPU time is what the chains cost. Over wall time, for comparison, in the notes.
  const spread = (xs: number[]) => {
    const s = [...xs].sort((a, b) => a - b);
    const q = (f: number) => s[Math.min(s.length - 1, Math.floor(f * s.length))].toFixed(2);
    return `median ${median(xs).toFixed(2)}, quartiles ${q(0.25)}-${q(0.75)}, range ${s[0].toFixed(2)}-${s[s.length - 1].toFixed(2)}`;
  };
  const m = (xs: Rate[]) => xs.map((x) => (x.cpu / 1e6).toFixed(1)).join(' ');
  const share = (xs: Rate[]) => median(xs.map((x) => x.wall / x.cpu)).toFixed(2);
  notes.push(
    `rust-vmm comparison: ${RUST_ROUNDS} rounds of one ${RUST_MS} ms window per side (each after ${RUST_WARMUP_MS} ms of warm-up), ` +
      `${cpu === undefined ? 'unpinned' : `all pinned to CPU ${cpu}`}; rates over each side's CPU time, ratio = median of the rounds' ratios`,
    `  share of the CPU each side got while measured (median CPU/wall time): SplitQueue ${share(ours)}, ` +
      builds.map((b, k) => `${b.profile} ${share(sides[1 + k])}`).join(', '),
    `  M chains/CPU-s SplitQueue ${m(ours)}`,
  );
  const rows: Result[] = [];
  builds.forEach((b, k) => {
    const theirs = sides[1 + k];
    const ratios = (key: keyof Rate) => ours.map((o, i) => o[key] / theirs[i][key]);
    notes.push(
      `  M chains/CPU-s rust-vmm ${b.profile} ${m(theirs)}`,
      `  SplitQueue / rust-vmm ${b.profile}: over CPU time ${spread(ratios('cpu'))}; over wall time ${spread(ratios('wall'))}`,
    );
    const t = median(theirs.map((x) => x.cpu));
    const build = k === 0 ? '' : ` (${b.profile} build)`;
    rows.push(
      {
        name: `same thread: rust-vmm virtio-queue ${peer.virtioQueue} (vm-memory ${peer.vmMemory})${build}, 1-descriptor chains (reference)`,
        value: t,
        unit: 'chains/CPU-s',
      },
      {
        name: `same thread: SplitQueue vs rust-vmm virtio-queue${build}, 1-descriptor chains`,
        value: median(ours.map((x) => x.cpu)),
        unit: 'chains/CPU-s',
        reference: t,
        ratio: median(ratios('cpu')),
      },
    );
  });
  return rows;
}

const { results, oneDescriptor } = await sameThread();
results.push(...(await againstRustVmm(oneDescriptor)));
// Alternate raw and queue runs so drift in machine load hits both.
const runs: Record<Kind, number[]> = { raw: [], queue: [], 'raw-packed': [], packed: [] };
for (let i = 0; i < 3; i++) for (const kind of Object.keys(runs) as Kind[]) runs[kind].push(await crossThread(kind, 500));
const x = Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, median(v)])) as Record<Kind, number>;
results.push({ name: 'across threads: raw typed-array loop (reference)', value: x.raw, unit: 'chains/s' });
results.push({ name: 'across threads: SplitQueue, 1-descriptor chains', value: x.queue, unit: 'chains/s', reference: x.raw, ratio: x.queue / x.raw });
results.push({ name: 'across threads: raw typed-array packed loop (reference)', value: x['raw-packed'], unit: 'chains/s' });
results.push({
  name: 'across threads: PackedQueue, 1-descriptor chains',
  value: x.packed,
  unit: 'chains/s',
  reference: x['raw-packed'],
  ratio: x.packed / x['raw-packed'],
});
// Packed against split, both through our queues, same run.
results.push({ name: 'across threads: PackedQueue vs SplitQueue, 1-descriptor chains', value: x.packed, unit: 'chains/s', reference: x.queue, ratio: x.packed / x.queue });

if (json) {
  console.log(JSON.stringify({ bench: 'virtqueue', results, notes }));
} else {
  console.table(
    results.map((r) => ({
      benchmark: r.name,
      'M chains/s': (r.value / 1e6).toFixed(2),
      'vs reference': r.ratio === undefined ? '' : r.ratio.toFixed(2),
    })),
  );
  for (const n of notes) console.log(n);
}
