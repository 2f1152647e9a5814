/**
 * npm run bench:virtqueue [-- --json]
 *
 * Descriptor chains per second through split and packed rings for a no-op device: SplitQueue and PackedQueue
 * (pop, push, publish with validation) each against a bare typed-array loop over the same layout, measured in the
 * same run. Same thread: driver and device alternate in batches. Across threads: the driver runs in a worker, the
 * device on the main thread, both busy-polling.
 */
import { Bench } from 'tinybench';
import { spawnWorker } from '../src/vhost/spawn-worker.js';
import {
  RawPackedDevice,
  makePackedQueue,
  packedIndirectCase,
  packedOneDescriptorCase,
  packedRawCase,
  packedThreeDescriptorCase,
} from './virtqueue-packed-setup.js';
import { RawDevice, indirectCase, makeQueue, oneDescriptorCase, rawCase, threeDescriptorCase } from './virtqueue-setup.js';

const json = process.argv.includes('--json');
const MEMORY = 1 << 20;

interface Result {
  name: string;
  value: number;
  unit: string;
  reference?: number;
  ratio?: number;
}

async function sameThread(): Promise<Result[]> {
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
  return bench.tasks.map((t, i) => {
    const r = referenceOf(i);
    return {
      name: `same thread: ${t.name}`,
      value: hz[i],
      unit: 'chains/s',
      ...(i === r ? {} : { reference: hz[r], ratio: hz[i] / hz[r] }),
    };
  });
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

const results = await sameThread();
// Alternate raw and queue runs so drift in machine load hits both.
const runs: Record<Kind, number[]> = { raw: [], queue: [], 'raw-packed': [], packed: [] };
for (let i = 0; i < 3; i++) for (const kind of Object.keys(runs) as Kind[]) runs[kind].push(await crossThread(kind, 500));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
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
  console.log(JSON.stringify({ bench: 'virtqueue', results }));
} else {
  console.table(
    results.map((r) => ({
      benchmark: r.name,
      'M chains/s': (r.value / 1e6).toFixed(2),
      'vs reference': r.ratio === undefined ? '' : r.ratio.toFixed(2),
    })),
  );
}
