/**
 * npx tsx bench/switch-profile.ts [seconds] [--flood] [--no-drivers]
 *
 * The switch's forwarding path in one thread with no frontend around it: two guests (driver models) on two ports
 * of one switch, each round guest A sends 256 64-byte frames to guest B and B as many back, through the net
 * device's own thread handler (transmit handler, Forwarder, SwitchPort, RxQueue) as the switch's worker runs it.
 * Run under `node --cpu-prof --import tsx` to see where a frame's time goes. Prints the rate of the best,
 * 10th-percentile and median 20 ms slice, with the driver models' own share measured alone beside it.
 * `--flood`: the frames go to an address no port has, so every frame is flooded, as in bench:net's DPDK loop
 * (testpmd's frames carry made-up destinations).
 */
import type { QueueContext, QueueHandler, ThreadContext } from '../src/vhost/device.js';
import { createThreadHandler, netDevice, type NetQueueOptions } from '../src/devices/net/index.js';
import { VIRTIO_NET_F_MRG_RXBUF } from '../src/devices/net/spec.js';
import { GuestAllocator, GuestMemory, SplitQueue, SplitQueueDriver, splitRingLayout } from '../src/virtqueue/index.js';

const RING = 256;
const FRAME = 64;
const HDR = 12;
const RX_BUF = 2048;
const flood = process.argv.includes('--flood');
const seconds = Number(process.argv.find((a, i) => i >= 2 && !a.startsWith("--")) ?? 3);

interface Guest {
  mac: Uint8Array;
  tx: { driver: SplitQueueDriver; queue: SplitQueue; handler: QueueHandler };
  rx: { driver: SplitQueueDriver; queue: SplitQueue; handler: QueueHandler };
  frames: number;
  rxBufs: number;
  stats: SharedArrayBuffer;
}

const thread: ThreadContext = {
  watch: () => ({ close() {} }),
  log: (m: string) => console.error(m),
} as unknown as ThreadContext;
const handler = createThreadHandler(thread);

function guest(device: number, mac: string, peer: string): Guest {
  const dev = netDevice({ backend: { kind: 'switch', name: 'profile' }, mac: parse(mac) } as never);
  const options = dev.dataPlane!.options as NetQueueOptions;
  // Flooded frames carry no port's address: the receivers are promiscuous, as testpmd puts its ports.
  if (flood) new Int32Array(options.rxMode, 0, 1)[0] = 1;
  const bytes = new Uint8Array(1 << 22);
  const base = 0x100000;
  const memory = GuestMemory.fromBuffers([{ guestPhysAddr: base, bytes }]);
  const txLayout = splitRingLayout(RING, base);
  const rxLayout = splitRingLayout(RING, txLayout.end + 4096);
  const alloc = new GuestAllocator(rxLayout.end, base + bytes.length);
  const features = (1n << 32n) | (1n << BigInt(VIRTIO_NET_F_MRG_RXBUF));
  const make = (index: number, layout: typeof txLayout) => {
    const queue = new SplitQueue({ index, memory, ...layout, eventIdx: false, indirect: true, lastAvailIdx: 0 });
    const ctx: QueueContext<NetQueueOptions> = {
      queueIndex: index,
      device,
      queue,
      options,
      features,
      resumed: false,
      publish: () => void queue.publish(),
      resume: () => {},
      watch: () => ({ close() {} }),
      log: (m: string) => console.error(m),
    };
    const driver = new SplitQueueDriver(memory, layout, false);
    return { driver, queue, handler: handler.createQueueHandler(ctx) };
  };
  const rx = make(0, rxLayout);
  const tx = make(1, txLayout);
  // Each tx slot gets its own frame buffer, as a DPDK guest's mbufs: header then frame, one descriptor.
  const frames = alloc.alloc(RING * 128, 64);
  const rxBufs = alloc.alloc(RING * RX_BUF, 64);
  for (let k = 0; k < RING; k++) {
    const at = frames + k * 128 - base;
    bytes.fill(0, at, at + HDR);
    bytes.set(parse(peer), at + HDR);
    bytes.set(parse(mac), at + HDR + 6);
    bytes[at + HDR + 12] = 0x08;
  }
  return { mac: parse(mac), tx, rx, frames, rxBufs, stats: options.stats };
}

function parse(mac: string): Uint8Array {
  return Uint8Array.from(mac.split(':').map((h) => parseInt(h, 16)));
}

const a = guest(0, '52:54:00:00:00:0a', flood ? '02:00:00:00:00:01' : '52:54:00:00:00:0b');
const b = guest(1, '52:54:00:00:00:0b', flood ? '02:00:00:00:00:00' : '52:54:00:00:00:0a');

function post(g: Guest): void {
  for (let k = 0; k < RING; k++) g.rx.driver.add1(g.rxBufs + k * RX_BUF, RX_BUF, true);
  g.rx.driver.publish();
  for (let k = 0; k < RING; k++) g.tx.driver.add1(g.frames + k * 128, HDR + FRAME, false);
  g.tx.driver.publish();
}

function reap(g: Guest): number {
  let n = 0;
  while (g.tx.driver.nextUsed() >= 0);
  while (g.rx.driver.nextUsed() >= 0) n++;
  return n;
}

function serve(g: Guest): void {
  g.tx.handler.process(g.tx.queue);
  g.tx.queue.publish();
  handler.endOfBatch?.();
}

function round(): number {
  post(a);
  post(b);
  serve(a);
  serve(b);
  return reap(a) + reap(b);
}

/** The driver models' share: post and reap with a bare device that returns every chain unread. */
function driversOnly(): number {
  let n = 0;
  for (const g of [a, b]) {
    post(g);
    for (const q of [g.tx.queue, g.rx.queue]) {
      for (let c = q.pop(); c !== null; c = q.pop()) q.push(c, 0);
      q.publish();
    }
    n += reap(g);
  }
  return n;
}

function measure(name: string, f: () => number): void {
  const rates: number[] = [];
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    const t0 = performance.now();
    let frames = 0;
    while (performance.now() - t0 < 20) for (let i = 0; i < 10; i++) frames += f();
    rates.push(frames / (performance.now() - t0) / 1000);
  }
  rates.sort((x, y) => y - x);
  const at = (q: number) => rates[Math.floor(q * (rates.length - 1))];
  console.log(`${name}: best ${at(0).toFixed(2)} p10 ${at(0.1).toFixed(2)} median ${at(0.5).toFixed(2)} M frames/s (${(1000 / at(0)).toFixed(0)} ns/frame best)`);
}

{ const n = round(); if (n !== 2 * RING) throw new Error(`a round delivered ${n} frames, not ${2 * RING}: a ${new Float64Array(a.stats)} b ${new Float64Array(b.stats)}`); }
measure('switch forwarding', round);
if (!process.argv.includes('--no-drivers')) measure('driver models alone', driversOnly);
