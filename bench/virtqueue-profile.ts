/**
 * npx tsx bench/virtqueue-profile.ts [case,case,...] [seconds]    cases: raw, 1, 3, indirect (default: all four)
 *
 * The benchmark's same-thread cases, in order, in a plain loop with no tinybench around them: run under
 * `node --cpu-prof --import tsx` (or --prof) to see where a chain's time goes. Prints per case the rate of the
 * best, 10th-percentile and median 20 ms slice: on a shared machine the best slices are the ones nobody preempted.
 * Cases run one after another in one process, as in the benchmark, so code shared by the cases (SplitQueue.pop)
 * carries the type feedback of the earlier cases, as it does there.
 */
import { indirectCase, oneDescriptorCase, rawCase, threeDescriptorCase } from './virtqueue-setup.js';

const factories: Record<string, () => () => number> = {
  raw: rawCase,
  '1': oneDescriptorCase,
  '3': threeDescriptorCase,
  indirect: indirectCase,
};
const names = (process.argv[2] ?? 'raw,1,3,indirect').split(',');
const seconds = Number(process.argv[3] ?? 2);

for (const name of names) {
  const factory = factories[name];
  if (!factory) throw new Error(`unknown case ${name}: one of ${Object.keys(factories).join(', ')}`);
  const round = factory();
  const rates: number[] = [];
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    const t0 = performance.now();
    let chains = 0;
    while (performance.now() - t0 < 20) for (let i = 0; i < 10; i++) chains += round();
    rates.push(chains / (performance.now() - t0) / 1000);
  }
  rates.sort((a, b) => b - a);
  const at = (q: number) => rates[Math.floor(q * (rates.length - 1))].toFixed(2);
  console.log(`${name}: best ${at(0)} p10 ${at(0.1)} median ${at(0.5)} M chains/s`);
}
