/**
 * npx tsx bench/switch-cross.ts [seconds] [--frames N]
 *
 * bench:net's two-port DPDK loop with the guests' drivers in a worker thread on CPU 1 and the switch's handler
 * on CPU 0: the same cache lines cross between the CPUs as with testpmd (rings, descriptors, frames), and the
 * rate is counted here, per 100 ms, instead of from testpmd's late statistics. For comparing two trees (run each
 * in turns, both orders); the ratio to DPDK still comes from bench:net.
 *
 * The drivers forward as testpmd's io mode with --tx-first: N frames (default 64, 32 a port) circulate; a frame
 * received on a port is sent back out of the same port (its header read and rewritten, as DPDK's virtio driver
 * does), and its transmit buffer, once used, is posted to receive again. Frames carry a destination no port has, so every frame is flooded to the other port (promiscuous).
 */
import { execFileSync } from 'node:child_process';
import { readlinkSync } from 'node:fs';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { spawnWorker } from '../src/vhost/spawn-worker.js';
import type { QueueContext, QueueHandler, ThreadContext } from '../src/vhost/device.js';
import { createThreadHandler, netDevice } from '../src/devices/net/index.js';
import { VIRTIO_NET_F_MRG_RXBUF } from '../src/devices/net/spec.js';
import { GuestAllocator, GuestMemory, SplitQueue, SplitQueueDriver, splitRingLayout } from '../src/virtqueue/index.js';

const RING = 256;
const HDR = 12;
const FRAME = 64;
const BUF = 2048;
const BUFS = 2 * RING; // a port's buffers: its receive ring full, and frames in flight on its transmit ring
const MEMORY = 1 << 23;
const BASE = 0x100000;

/** Where each port's rings and buffers lie; computed alike on both threads. */
function layout(port: number) {
  const at = BASE + port * (MEMORY / 2);
  const tx = splitRingLayout(RING, at);
  const rx = splitRingLayout(RING, tx.end);
  const alloc = new GuestAllocator(rx.end, at + MEMORY / 2);
  return { tx, rx, bufs: alloc.alloc(BUFS * BUF, 64) };
}

/** Pin the calling thread (taskset on its thread id). */
function pin(cpu: number): void {
  const tid = readlinkSync('/proc/thread-self').split('/').pop()!;
  execFileSync('taskset', ['-p', '-c', String(cpu), tid], { stdio: 'ignore' });
}

if (isMainThread) await main();
else driverThread();

async function main(): Promise<void> {
  const seconds = Number(process.argv.find((a, i) => i >= 2 && /^\d/.test(a) && process.argv[i - 1] !== '--frames') ?? 5);
  const fi = process.argv.indexOf('--frames');
  const frames = fi > 0 ? Number(process.argv[fi + 1]) : 64;
  pin(0);
  const shared = new SharedArrayBuffer(MEMORY);
  const bytes = new Uint8Array(shared);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: BASE, bytes }]);
  const control = new Int32Array(new SharedArrayBuffer(8));
  const thread = { watch: () => ({ close() {} }), log: (m: string) => console.error(m) } as unknown as ThreadContext;
  const handler = createThreadHandler(thread);
  const features = (1n << 32n) | (1n << BigInt(VIRTIO_NET_F_MRG_RXBUF)); // VERSION_1 and MRG_RXBUF, as virtio-user has them
  const ports: { tx: SplitQueue; txHandler: QueueHandler; stats: Float64Array }[] = [];
  // The queues are made once the drivers have zeroed their rings.
  const worker = spawnWorker(new URL(import.meta.url), { shared, control: control.buffer, frames });
  await new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  for (let port = 0; port < 2; port++) {
    const dev = netDevice({ backend: { kind: 'switch', name: 'cross' }, mac: Uint8Array.of(0x52, 0x54, 0, 0, 0, port) } as never);
    const options = dev.dataPlane!.options as { rxMode: SharedArrayBuffer; stats: SharedArrayBuffer };
    new Int32Array(options.rxMode, 0, 1)[0] = 1; // promiscuous, as testpmd's ports
    const l = layout(port);
    const make = (index: number, rl: ReturnType<typeof splitRingLayout>) => {
      const queue = new SplitQueue({ index, memory, ...rl, eventIdx: false, indirect: true, lastAvailIdx: 0 });
      const ctx = {
        queueIndex: index, device: port, queue, options, features, resumed: false,
        publish: () => void queue.publish(), resume: () => {}, watch: () => ({ close() {} }), log: (m: string) => console.error(m),
      } as unknown as QueueContext<never>;
      return { queue, handler: handler.createQueueHandler(ctx) };
    };
    make(0, l.rx);
    const tx = make(1, l.tx);
    ports.push({ tx: tx.queue, txHandler: tx.handler, stats: new Float64Array(options.stats) });
  }
  Atomics.store(control, 0, 1);
  // The switch's worker loop while polling: serve each transmit queue, publish, end the batch.
  const serve = (p: (typeof ports)[0]) => {
    p.txHandler.process(p.tx);
    p.tx.publish();
  };
  const delivered = () => ports[0].stats[3] + ports[1].stats[3];
  const rates: number[] = [];
  const end = performance.now() + seconds * 1000;
  let t0 = performance.now();
  let n0 = delivered();
  while (t0 < end) {
    for (let i = 0; i < 200; i++) {
      serve(ports[0]);
      serve(ports[1]);
      handler.endOfBatch?.();
    }
    const t = performance.now();
    if (t - t0 >= 100) {
      const n = delivered();
      rates.push((n - n0) / (t - t0) / 1000);
      t0 = t;
      n0 = n;
    }
  }
  Atomics.store(control, 0, 2);
  const { idle, bad } = await new Promise<{ idle: number; bad: number }>((resolve) => worker.once('message', resolve));
  if (bad > 0) throw new Error(`${bad} frames arrived without num_buffers 1`);
  await new Promise((resolve) => worker.once('exit', resolve));
  rates.sort((x, y) => x - y);
  const q = (f: number) => rates[Math.floor(f * (rates.length - 1))].toFixed(2);
  console.log(`switch loop across CPUs (${frames} frames): median ${q(0.5)} p25 ${q(0.25)} p75 ${q(0.75)} max ${q(1)} M frames/s over ${rates.length} slices of 100 ms; the drivers found nothing in ${(100 * idle).toFixed(0)}% of their passes`);
  console.log(`rates ${rates.map((r) => r.toFixed(2)).join(' ')}`);
}

function driverThread(): void {
  const { shared, control, frames } = workerData as { shared: SharedArrayBuffer; control: SharedArrayBuffer; frames: number };
  pin(1);
  const flag = new Int32Array(control);
  const bytes = new Uint8Array(shared);
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: BASE, bytes }]);
  const guests = [0, 1].map((port) => {
    const l = layout(port);
    const tx = new SplitQueueDriver(memory, l.tx, false);
    const rx = new SplitQueueDriver(memory, l.rx, false);
    tx.setNoInterrupt(true);
    rx.setNoInterrupt(true);
    // Buffer address by descriptor head, for each ring; free buffers in a stack.
    const txBuf = new Float64Array(RING);
    const rxBuf = new Float64Array(RING);
    const free = new Float64Array(BUFS);
    let top = 0;
    for (let k = BUFS - 1; k >= 0; k--) free[top++] = l.bufs + k * BUF;
    return { tx, rx, txBuf, rxBuf, free, top };
  });
  for (const g of guests) {
    for (let k = 0; k < RING; k++) g.rxBuf[g.rx.add1(g.free[--g.top], BUF, true)] = g.free[g.top];
    g.rx.publish();
  }
  parentPort!.postMessage('ready');
  while (Atomics.load(flag, 0) === 0);
  // --tx-first: each port sends its share of frames, to an address no port has.
  for (let port = 0; port < 2; port++) {
    const g = guests[port];
    for (let k = 0; k < frames / 2; k++) {
      const addr = g.free[--g.top];
      const at = addr - BASE;
      bytes.fill(0, at, at + HDR);
      bytes.set([0x02, 0, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 1, port], at + HDR);
      bytes[at + HDR + 12] = 0x08;
      g.txBuf[g.tx.add1(addr, HDR + FRAME, false)] = addr;
    }
    g.tx.publish();
  }
  let passes = 0;
  let empty = 0;
  let bad = 0;
  while (Atomics.load(flag, 0) === 1) {
    passes++;
    let any = 0;
    for (let port = 0; port < 2; port++) {
      const g = guests[port];
      for (let h = g.tx.nextUsed(); h >= 0; h = g.tx.nextUsed()) g.free[g.top++] = g.txBuf[h];
      let got = 0;
      for (let h = g.rx.nextUsed(); h >= 0; h = g.rx.nextUsed()) {
        const addr = g.rxBuf[h];
        const at = addr - BASE;
        // As DPDK's virtio driver: it reads num_buffers of each frame received, and writes the header of each
        // frame it sends (into the headroom before the frame), so those lines cross to this CPU and back.
        if (bytes[at + 10] !== 1) bad++;
        bytes.fill(0, at, at + HDR);
        g.txBuf[g.tx.add1(addr, g.rx.lastUsedLen, false)] = addr;
        g.rxBuf[g.rx.add1(g.free[--g.top], BUF, true)] = g.free[g.top];
        got++;
      }
      if (got > 0) {
        g.tx.publish();
        g.rx.publish();
      }
      any += got;
    }
    if (any === 0) empty++;
  }
  parentPort!.postMessage({ idle: empty / passes, bad });
}
