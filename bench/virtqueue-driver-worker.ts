/** Benchmark worker: the guest driver on its own thread, busy-polling one split ring in shared memory. */
import { parentPort, workerData } from 'node:worker_threads';
import { makeDriver } from './virtqueue-setup.js';

const { shared, control } = workerData as { shared: SharedArrayBuffer; control: SharedArrayBuffer };
const bytes = new Uint8Array(shared);
const flag = new Int32Array(control); // [0] = 1 while running
const { driver, alloc } = makeDriver(bytes, false);
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
