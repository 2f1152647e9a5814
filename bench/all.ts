/**
 * npm run bench [-- --quick] [--only virtqueue,blk,net,net-polled,net-packed,net-switch]: every benchmark, one after the other, each comparing
 * vhost-ts with its reference in the same run. Writes bench/results/<date>.json (every figure, the machine it
 * came from) and bench/results/<date>.svg plus bench/results/latest.svg (the README's chart): one bar pair per
 * case, the reference at 1.0 and vhost-ts at its ratio, labelled. The chart is drawn by Vega-Lite.
 */
import { spawn } from 'node:child_process';
import { cpus, release } from 'node:os';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import * as vega from 'vega';
import * as vl from 'vega-lite';

interface Result {
  name: string;
  value: number;
  unit: string;
  reference?: number;
  ratio?: number;
}
interface BenchOutput {
  bench: string;
  results: Result[];
  config?: Record<string, unknown>;
}

const REFERENCES: Record<string, string> = {
  virtqueue: 'bare typed-array ring loop',
  blk: 'qemu-storage-daemon',
  net: "DPDK's vhost PMD",
};

const root = fileURLToPath(new URL('..', import.meta.url));
const { values } = parseArgs({ options: { quick: { type: 'boolean' }, only: { type: 'string' } }, strict: true });
const benches = (values.only ?? 'virtqueue,blk,net,net-polled,net-packed,net-switch').split(',');
// A run is a benchmark program and its options: net-packed is bench:net on packed rings (libblkio, blk's
// frontend, does not negotiate them, so blk has no packed run without a VM); net-polled is the sink and source
// busy-polling (DPDK always polls); net-switch the two-port io-forward loop through the switch.
const RUNS: Record<string, { file: string; args: string[] }> = {
  virtqueue: { file: 'virtqueue', args: [] },
  blk: { file: 'blk', args: [] },
  net: { file: 'net', args: [] },
  'net-polled': { file: 'net', args: ['--poll-us', '200', '--frame-sizes', '64'] },
  'net-packed': { file: 'net', args: ['--packed'] },
  'net-switch': { file: 'net', args: ['--cases', 'switch', '--frame-sizes', '64'] },
};

/** What a case is compared with: the case names it ("PackedQueue vs SplitQueue, ..."), or its benchmark's reference. */
const referenceOf = (bench: string, name: string): string => / vs ([^,]+)/.exec(name)?.[1] ?? REFERENCES[bench] ?? 'reference';

function runBench(name: string): Promise<BenchOutput> {
  const run = RUNS[name];
  if (!run) throw new Error(`--only takes ${Object.keys(RUNS).join(', ')}, not "${name}"`);
  const args = ['tsx', `bench/${run.file}.ts`, '--json', ...run.args, ...(values.quick && name !== 'virtqueue' ? ['--quick'] : [])];
  process.stderr.write(`bench: ${name} (${args.slice(1).join(' ')}) ...\n`);
  return new Promise((resolve, reject) => {
    const child = spawn('npx', args, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.once('exit', (code) => {
      const line = out.trim().split('\n').reverse().find((l) => l.startsWith('{'));
      if (code !== 0 || !line) return reject(new Error(`bench ${name} exited ${code}:\n${out.slice(-2000)}`));
      resolve(JSON.parse(line) as BenchOutput);
    });
  });
}

const started = new Date();
const outputs: BenchOutput[] = [];
for (const b of benches) outputs.push(await runBench(b));

const cpuModel = cpus()[0]?.model ?? 'unknown';
const machine = { cpu: cpuModel, cpus: cpus().length, kernel: release(), node: process.version };
const stamp = started.toISOString().replace(/:\d\d\.\d+Z$/, '').replace(':', '-');
const dir = path.join(root, 'bench/results');
fs.mkdirSync(dir, { recursive: true });
const record = { date: started.toISOString(), machine, quick: values.quick === true, benches: outputs };
fs.writeFileSync(path.join(dir, `${stamp}.json`), JSON.stringify(record, null, 2) + '\n');

// Bars: every case with a reference, as two rows (reference = 1, vhost-ts = ratio).
const rows = outputs.flatMap((o) =>
  o.results
    .filter((r) => r.ratio !== undefined)
    .flatMap((r) => [
      { bench: o.bench, case: r.name, who: referenceOf(o.bench, r.name), ratio: 1, label: '' },
      { bench: o.bench, case: r.name, who: 'vhost-ts', ratio: r.ratio!, label: `${r.ratio!.toFixed(2)}×` },
    ]),
);
const spec: vl.TopLevelSpec = {
  $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
  title: { text: 'vhost-ts against reference backends, same run (ratio; reference = 1.0)', subtitle: `${cpuModel}, ${machine.cpus} CPUs, ${started.toISOString().slice(0, 10)}` },
  data: { values: rows },
  facet: { row: { field: 'bench', type: 'nominal', title: null } },
  resolve: { scale: { y: 'independent' } },
  spec: {
    width: 560,
    layer: [
      {
        mark: { type: 'bar' },
        encoding: {
          y: { field: 'case', type: 'nominal', title: null, axis: { labelLimit: 360 } },
          yOffset: { field: 'who', type: 'nominal' },
          x: { field: 'ratio', type: 'quantitative', title: 'throughput relative to the reference' },
          color: { field: 'who', type: 'nominal', title: null, legend: { orient: 'bottom' } },
        },
      },
      {
        mark: { type: 'text', align: 'left', dx: 3, fontSize: 10 },
        encoding: {
          y: { field: 'case', type: 'nominal' },
          yOffset: { field: 'who', type: 'nominal' },
          x: { field: 'ratio', type: 'quantitative' },
          text: { field: 'label' },
        },
      },
    ],
  },
};
const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
const svg = await view.toSVG();
fs.writeFileSync(path.join(dir, `${stamp}.svg`), svg);
fs.writeFileSync(path.join(dir, 'latest.svg'), svg);
view.finalize();

console.table(outputs.flatMap((o) => o.results.map((r) => ({ bench: o.bench, case: r.name, value: r.value.toPrecision(4), unit: r.unit, ratio: r.ratio?.toFixed(2) ?? '' }))));
process.stderr.write(`bench: wrote bench/results/${stamp}.json and .svg (and latest.svg)\n`);
