/** Benchmark worker: the guest driver on its own thread, busy-polling one split or packed ring in shared memory. */
import { parentPort, workerData } from 'node:worker_threads';
import { makePackedDriver } from './virtqueue-packed-setup.js';
import { makeDriver } from './virtqueue-setup.js';

const { shared, control, ring } = workerData as { shared: SharedArrayBuffer; control: SharedArrayBuffer; ring: 'split' | 'packed' };
const bytes = new Uint8Array(shared);
const flag = new Int32Array(control); // [0] = 1 while running
// One layout per worker, so the loop below only ever sees one driver class.
const { driver, alloc } = ring === 'packed' ? makePackedDriver(bytes, false) : makeDriver(bytes, false);
const buf = alloc.alloc(64);
let completed = 0;
parentPort!.postMessage('ready');
while (Atomics.load(flag, 0) === 0);
while (Atomics.load(flag, 0) === 1) {
  while (driver.add1(buf, 64, true) >= 0);
  driver.publish();
  while (driver.nextUsed() >= 0) completed++;
}
parentPort!.postMessage(completed);
