/**
 * npm run bench:virtqueue [-- --json]
 *
 * Descriptor chains per second through the split ring for a no-op device: SplitQueue (pop, push, publish with
 * validation) against a bare typed-array loop measured in the same run. Same thread: driver and device alternate
 * in batches. Across threads: the driver runs in a worker, the device on the main thread, both busy-polling.
 */
import { Bench } from 'tinybench';
import { spawnWorker } from '../src/vhost/spawn-worker.js';
import { QUEUE_SIZE, RawDevice, makeDriver, makeQueue } from './virtqueue-setup.js';

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
  const batch = QUEUE_SIZE;

  const rawBytes = new Uint8Array(MEMORY);
  const rawDriver = makeDriver(rawBytes);
  const raw = new RawDevice(rawBytes);
  const rawBuf = rawDriver.alloc.alloc(64);
  bench.add('raw typed-array loop (reference)', () => {
    for (let k = 0; k < batch; k++) rawDriver.driver.add1(rawBuf, 64, true);
    rawDriver.driver.publish();
    raw.drain();
    while (rawDriver.driver.nextUsed() >= 0);
  });

  for (const [name, descriptors, indirect] of [
    ['SplitQueue, 1-descriptor chains', 1, false],
    ['SplitQueue, 3-descriptor chains', 3, false],
    ['SplitQueue, 3 descriptors in an indirect table', 3, true],
  ] as const) {
    const bytes = new Uint8Array(MEMORY);
    const { driver, alloc } = makeDriver(bytes);
    const queue = makeQueue(bytes);
    const buf = alloc.alloc(64);
    const tables = Array.from({ length: QUEUE_SIZE }, () => alloc.alloc(48, 16));
    const per = descriptors === 1 ? 0 : Math.floor(batch / descriptors);
    bench.add(name, () => {
      if (descriptors === 1) for (let k = 0; k < batch; k++) driver.add1(buf, 64, true);
      else for (let k = 0; k < per; k++) driver.add([[buf, 16]], [[buf + 16, 32], [buf + 48, 1]], indirect ? tables[k] : undefined);
      driver.publish();
      let c;
      while ((c = queue.pop()) !== null) queue.push(c, 0);
      queue.publish();
      while (driver.nextUsed() >= 0);
    });
  }
  await bench.run();
  const chainsPerIteration = (name: string) => (name.includes('3-') || name.includes('indirect') ? Math.floor(batch / 3) : batch);
  const hz = bench.tasks.map((t) => {
    const r = t.result as { throughput?: { mean: number } };
    return (r.throughput?.mean ?? 0) * chainsPerIteration(t.name);
  });
  const reference = hz[0];
  return bench.tasks.map((t, i) => ({
    name: `same thread: ${t.name}`,
    value: hz[i],
    unit: 'chains/s',
    ...(i === 0 ? {} : { reference, ratio: hz[i] / reference }),
  }));
}

async function crossThread(kind: 'raw' | 'queue', ms: number): Promise<number> {
  const shared = new SharedArrayBuffer(MEMORY);
  const control = new SharedArrayBuffer(4);
  const flag = new Int32Array(control);
  const bytes = new Uint8Array(shared);
  const worker = spawnWorker(new URL('./virtqueue-driver-worker.ts', import.meta.url), { shared, control });
  await new Promise((resolve) => worker.once('message', resolve));
  const raw = kind === 'raw' ? new RawDevice(bytes) : null;
  const queue = kind === 'queue' ? makeQueue(bytes) : null;
  Atomics.store(flag, 0, 1);
  const start = performance.now();
  let served = 0;
  while (performance.now() - start < ms) {
    for (let spin = 0; spin < 1000; spin++) {
      if (raw) served += raw.drain();
      else {
        let c;
        while ((c = queue!.pop()) !== null) {
          queue!.push(c, 0);
          served++;
        }
        queue!.publish();
      }
    }
  }
  const elapsed = performance.now() - start;
  Atomics.store(flag, 0, 2);
  const done = new Promise((resolve) => worker.once('message', resolve));
  // The driver may be waiting for used entries; keep serving until it reports.
  let finished = false;
  void done.then(() => (finished = true));
  while (!finished) {
    if (raw) raw.drain();
    else {
      let c;
      while ((c = queue!.pop()) !== null) queue!.push(c, 0);
      queue!.publish();
    }
    await new Promise((r) => setImmediate(r));
  }
  await worker.terminate();
  return (served / elapsed) * 1000;
}

const results = await sameThread();
// Alternate raw and queue runs so drift in machine load hits both.
const rawRuns: number[] = [];
const queueRuns: number[] = [];
for (let i = 0; i < 3; i++) {
  rawRuns.push(await crossThread('raw', 500));
  queueRuns.push(await crossThread('queue', 500));
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const rawX = median(rawRuns);
const queueX = median(queueRuns);
results.push({ name: 'across threads: raw typed-array loop (reference)', value: rawX, unit: 'chains/s' });
results.push({ name: 'across threads: SplitQueue, 1-descriptor chains', value: queueX, unit: 'chains/s', reference: rawX, ratio: queueX / rawX });

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
