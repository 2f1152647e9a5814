// virtio-net against our own frontend: transmit and receive paths, MRG_RXBUF, bad input, the control queue, and
// two ports on the built-in switch.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { netDevice, type NetDevice, type NetOptions } from '../../src/devices/net/index.js';
import { sourceFrame } from '../../src/devices/net/ports.js';
import {
  NET_HDR_SIZE,
  VIRTIO_NET_CTRL_MAC,
  VIRTIO_NET_CTRL_MAC_ADDR_SET,
  VIRTIO_NET_CTRL_RX,
  VIRTIO_NET_CTRL_RX_PROMISC,
  VIRTIO_NET_ERR,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_OK,
} from '../../src/devices/net/spec.js';
import { findSwitch } from '../../src/devices/net/switch.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { bit, VhostUserServer, VIRTIO_F_IN_ORDER, type Logger } from '../../src/vhost/index.js';

const quiet: Logger = { info() {}, warn() {}, error() {} };
const ALL = (1n << 64n) - 1n;

function ethFrame(dst: number[], src: number[], len: number, fill: number): Uint8Array {
  const f = new Uint8Array(len).fill(fill);
  f.set(dst, 0);
  f.set(src, 6);
  f[12] = 0x08;
  f[13] = 0x00;
  return f;
}
const withHeader = (f: Uint8Array) => {
  const b = new Uint8Array(NET_HDR_SIZE + f.length);
  b.set(f, NET_HDR_SIZE);
  return b;
};

describe('net device', () => {
  let dir: string;
  const servers: VhostUserServer[] = [];
  const frontends: VhostUserFrontend[] = [];

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-net-'));
  });
  afterEach(async () => {
    for (const f of frontends.splice(0)) f.close();
    for (const s of servers.splice(0)) await s.close();
    rmSync(dir, { recursive: true, force: true });
  });

  async function port(
    opts: NetOptions,
    features = ALL,
  ): Promise<{ dev: NetDevice; fe: VhostUserFrontend; rx: TestQueue; tx: TestQueue; ctrl: TestQueue; queues: TestQueue[] }> {
    const dev = netDevice(opts);
    const socket = join(dir, `p${servers.length}.sock`);
    servers.push(await VhostUserServer.start(dev, { socketPath: socket, log: quiet }));
    const fe = await VhostUserFrontend.connect(socket);
    frontends.push(fe);
    const n = dev.numQueues;
    const queues = await fe.start({
      features,
      protocolFeatures: ALL,
      queues: Array.from({ length: n }, (_, index) => ({ index, size: index === n - 1 ? 64 : 256 })),
    });
    return { dev, fe, rx: queues[0], tx: queues[1], ctrl: queues[n - 1], queues };
  }

  it('sink: counts transmitted frames, checks them against the first, drops bad ones and goes on', async () => {
    const { dev, tx } = await port({ backend: { kind: 'sink', verify: true } });
    const frame = ethFrame([0xff, 0xff, 0xff, 0xff, 0xff, 0xff], [0x52, 0x54, 0, 1, 2, 3], 60, 0x42);
    for (let i = 0; i < 10; i++) tx.add({ readable: [withHeader(frame)] });
    // header split from the frame (ANY_LAYOUT)
    tx.add({ readable: [new Uint8Array(NET_HDR_SIZE), frame] });
    // bad: shorter than a header, and a different frame
    tx.add({ readable: [new Uint8Array(8)] });
    tx.add({ readable: [withHeader(ethFrame([1, 2, 3, 4, 5, 6], [0x52, 0x54, 0, 1, 2, 3], 60, 0x43))] });
    tx.kick();
    await tx.waitForUsed(13);
    const s = dev.stats();
    expect(s.txFrames).toBe(12);
    expect(s.txDropped).toBe(1);
    expect(s.sinkMismatches).toBe(1);
  });

  it('sink: a frame over 64 KiB is dropped and counted', async () => {
    const { dev, tx } = await port({ backend: { kind: 'sink', verify: true } });
    tx.add({ readable: [new Uint8Array(NET_HDR_SIZE), new Uint8Array(40000), new Uint8Array(40000)], indirect: true });
    tx.add({ readable: [withHeader(ethFrame([0xff, 0xff, 0xff, 0xff, 0xff, 0xff], [2, 0, 0, 0, 0, 1], 64, 1))] });
    tx.kick();
    await tx.waitForUsed(2);
    expect(dev.stats()).toMatchObject({ txFrames: 1, txDropped: 1 });
  });

  it('source: fills receive buffers with whole frames and num_buffers = 1', async () => {
    const { dev, rx } = await port({ backend: { kind: 'source', frameSize: 100 } });
    const chains = Array.from({ length: 8 }, () => rx.add({ writable: [2048] }));
    rx.kick();
    const used = await rx.waitForUsed(8);
    const want = sourceFrame(100);
    for (const u of used) {
      expect(u.len).toBe(NET_HDR_SIZE + 100);
      const got = rx.written(u.chain!, u.len);
      expect(got[10] | (got[11] << 8)).toBe(1);
      expect(Buffer.compare(got.subarray(NET_HDR_SIZE), want)).toBe(0);
    }
    expect(chains.length).toBe(8);
    expect(dev.stats().rxFrames).toBeGreaterThanOrEqual(8);
  });

  it('source with MRG_RXBUF: a frame spans small receive buffers; num_buffers counts them', async () => {
    const { rx } = await port({ backend: { kind: 'source', frameSize: 200 } });
    for (let i = 0; i < 9; i++) rx.add({ writable: [64] });
    rx.kick();
    const used = await rx.waitForUsed(4); // 12 + 200 = 212 bytes = 64 + 64 + 64 + 20
    expect(used.map((u) => u.len)).toEqual([64, 64, 64, 20]);
    const first = rx.written(used[0].chain!, 64);
    expect(first[10] | (first[11] << 8)).toBe(4);
    const bytes = Buffer.concat(used.map((u) => rx.written(u.chain!, u.len))).subarray(NET_HDR_SIZE);
    expect(Buffer.compare(bytes, sourceFrame(200))).toBe(0);
  });

  it('VIRTIO_F_IN_ORDER is offered and holds: chains come back in the order they were made available, a frame split across several and a dropped one too', async () => {
    const src = await port({ backend: { kind: 'source', frameSize: 200 } });
    expect(src.dev.features & bit(VIRTIO_F_IN_ORDER)).not.toBe(0n);
    // 212 bytes a frame: 64 + 148 of 2048; 64 + 64 + 64 + 20 of 300; 2048; then a lone 64 waits for more.
    const posted = [64, 2048, 64, 64, 64, 300, 2048, 64].map((n) => src.rx.add({ writable: [n] }));
    src.rx.kick();
    const used = await src.rx.waitForUsed(7);
    expect(used.map((u) => u.chain)).toEqual(posted.slice(0, 7));
    expect(used.map((u) => u.len)).toEqual([64, 148, 64, 64, 64, 20, 212]);

    const sink = await port({ backend: { kind: 'sink' } });
    const frame = withHeader(ethFrame([0xff, 0xff, 0xff, 0xff, 0xff, 0xff], [0x52, 0x54, 0, 1, 2, 4], 60, 0x42));
    const sent = [
      sink.tx.add({ readable: [frame] }),
      sink.tx.add({ readable: [new Uint8Array(8)] }), // too short: dropped, still returned in its turn
      sink.tx.add({ readable: [frame.subarray(0, NET_HDR_SIZE), frame.subarray(NET_HDR_SIZE)] }),
      sink.tx.add({ readable: [frame] }),
    ];
    sink.tx.kick();
    expect((await sink.tx.waitForUsed(4)).map((u) => u.chain)).toEqual(sent);
  });

  it('without MRG_RXBUF: a receive chain too small for the frame gets nothing; the frame is dropped and counted', async () => {
    const { dev, rx } = await port({ backend: { kind: 'source', frameSize: 200 } }, ALL & ~(1n << BigInt(VIRTIO_NET_F_MRG_RXBUF)));
    rx.add({ writable: [64] });
    rx.kick();
    // The drop is the event to wait for (bounded); only then is "nothing used" a fact, not a race with start-up.
    for (const until = Date.now() + 10_000; dev.stats().rxDropped === 0 && Date.now() < until; ) await new Promise((r) => setTimeout(r, 5));
    expect(dev.stats().rxDropped).toBeGreaterThan(0);
    await expect(rx.waitForUsed(1, 100)).rejects.toThrow();
    // A big enough buffer behind it does not help: the small one stays first (no reordering); a fresh ring does.
  });

  it('control queue: receive modes and MAC address; unknown commands get VIRTIO_NET_ERR', async () => {
    const { ctrl } = await port({ backend: { kind: 'sink', verify: true } });
    const cmd = async (bytes: number[]) => {
      const c = ctrl.add({ readable: [new Uint8Array(bytes)], writable: [1] });
      ctrl.kick();
      await ctrl.waitForUsed(1);
      return ctrl.written(c, 1)[0];
    };
    expect(await cmd([VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0])).toBe(VIRTIO_NET_OK);
    expect(await cmd([VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, 0x52, 0x54, 0, 9, 9, 9])).toBe(VIRTIO_NET_OK);
    expect(await cmd([VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, 0x01, 0, 0, 0, 0, 0])).toBe(VIRTIO_NET_ERR); // multicast
    expect(await cmd([42, 0])).toBe(VIRTIO_NET_ERR);
  });

  it('switch: two ports learn each other, unicast goes only where it belongs, broadcast floods', async () => {
    const macA = [0x52, 0x54, 0, 0xa, 0xa, 0xa];
    const macB = [0x52, 0x54, 0, 0xb, 0xb, 0xb];
    const a = await port({ backend: { kind: 'switch', name: 'test-sw' }, mac: new Uint8Array(macA) });
    const b = await port({ backend: { kind: 'switch', name: 'test-sw' }, mac: new Uint8Array(macB) });
    for (const p of [a, b]) {
      for (let i = 0; i < 16; i++) p.rx.add({ writable: [2048] });
      p.rx.kick();
    }
    // A -> broadcast: B receives it, A does not.
    const bcast = ethFrame([0xff, 0xff, 0xff, 0xff, 0xff, 0xff], macA, 60, 0x11);
    a.tx.add({ readable: [withHeader(bcast)] });
    a.tx.kick();
    const [got] = await b.rx.waitForUsed(1);
    expect(Buffer.compare(b.rx.written(got.chain!, got.len).subarray(NET_HDR_SIZE), bcast)).toBe(0);
    // B -> A (A's MAC was learned): delivered to A only.
    const uni = ethFrame(macA, macB, 1514, 0x22);
    b.tx.add({ readable: [withHeader(uni)] });
    b.tx.kick();
    const [atA] = await a.rx.waitForUsed(1);
    expect(Buffer.compare(a.rx.written(atA.chain!, atA.len).subarray(NET_HDR_SIZE), uni)).toBe(0);
    expect(findSwitch('test-sw')!.macCount()).toBe(2);
    // A -> a MAC nobody has (and B is not promiscuous once its driver says so): flooded, B filters it.
    const stranger = ethFrame([0x52, 0x54, 0, 0xc, 0xc, 0xc], macA, 60, 0x33);
    const c = b.ctrl.add({ readable: [new Uint8Array([VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, 0])], writable: [1] });
    b.ctrl.kick();
    await b.ctrl.waitForUsed(1);
    expect(b.ctrl.written(c, 1)[0]).toBe(VIRTIO_NET_OK);
    a.tx.add({ readable: [withHeader(stranger)] });
    a.tx.kick();
    await a.tx.waitForUsed(2);
    expect(b.dev.stats().rxDropped).toBe(1);
    expect(b.dev.stats().rxFrames).toBe(1);
  });

  it('switch: a run longer than a burst arrives whole, and the frames before a chain that breaks the ring still go', async () => {
    const macA = [0x52, 0x54, 0, 0xa, 0xa, 0xb];
    const macB = [0x52, 0x54, 0, 0xb, 0xb, 0xc];
    const a = await port({ backend: { kind: 'switch', name: 'burst-sw' }, mac: new Uint8Array(macA) });
    const b = await port({ backend: { kind: 'switch', name: 'burst-sw' }, mac: new Uint8Array(macB) });
    for (let i = 0; i < 100; i++) b.rx.add({ writable: [2048] });
    b.rx.kick();
    // 40 frames (more than two bursts), then a descriptor outside guest memory, all in one kick.
    const frames = Array.from({ length: 40 }, (_, i) => ethFrame(macB, macA, 60 + i, i));
    for (const f of frames) a.tx.add({ readable: [withHeader(f)] });
    a.tx.driver.addRaw([[0x7f0000000000, 64, 0]]);
    a.tx.kick();
    await a.tx.waitForError();
    const got = await b.rx.waitForUsed(40);
    got.forEach((u, i) => expect(Buffer.compare(b.rx.written(u.chain!, u.len).subarray(NET_HDR_SIZE), frames[i])).toBe(0));
    expect(a.dev.stats().txFrames).toBe(40);
  });

  it('SEND_RARP: the next pass announces the guest on the switch with a RARP broadcast', async () => {
    const a = await port({ backend: { kind: 'switch', name: 'rarp-sw' }, mac: new Uint8Array([0x52, 0x54, 0, 1, 1, 1]) });
    const b = await port({ backend: { kind: 'switch', name: 'rarp-sw' }, mac: new Uint8Array([0x52, 0x54, 0, 2, 2, 2]) });
    for (let i = 0; i < 4; i++) b.rx.add({ writable: [2048] });
    b.rx.kick();
    await a.fe.request({ type: 'SEND_RARP', mac: new Uint8Array([0x52, 0x54, 0, 1, 1, 1]), needReply: true });
    // The announcement goes out on the pair's next pass: the guest's next kick (here a receive refill).
    a.rx.add({ writable: [2048] });
    a.rx.kick();
    const [got] = await b.rx.waitForUsed(1);
    const f = b.rx.written(got.chain!, got.len).subarray(NET_HDR_SIZE);
    expect([...f.subarray(0, 6)]).toEqual([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    expect([...f.subarray(6, 12)]).toEqual([0x52, 0x54, 0, 1, 1, 1]);
    expect([f[12], f[13]]).toEqual([0x80, 0x35]); // ethertype RARP
    expect(findSwitch('rarp-sw')!.macCount()).toBe(1);
  });

  it('switch: the addresses learned on a port go with its device state, also once the port left the switch; the port that loads it announces them and the switch learns them there', async () => {
    const macA = [0x52, 0x54, 0, 0xd, 0xd, 0x1];
    const behindA = [0x52, 0x54, 0, 0xd, 0xd, 0x99]; // a second address on A's port (a bridge in the guest)
    const a = await port({ backend: { kind: 'switch', name: 'state-sw' }, mac: new Uint8Array(macA) });
    const b = await port({ backend: { kind: 'switch', name: 'state-sw' }, mac: new Uint8Array([0x52, 0x54, 0, 0xd, 0xd, 0x2]) });
    for (let i = 0; i < 8; i++) b.rx.add({ writable: [2048] });
    b.rx.kick();
    const bcast = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    for (const src of [macA, behindA]) a.tx.add({ readable: [withHeader(ethFrame(bcast, src, 60, 0x44))] });
    a.tx.kick();
    await b.rx.waitForUsed(2);
    const sw = findSwitch('state-sw')!;
    const portOf = (d: NetDevice) => (d.dataPlane.options as { switchPort: { port: number } }).switchPort.port;
    const hex = (m: number[] | Uint8Array) => [...m].map((x) => x.toString(16).padStart(2, '0')).join(':');
    const on = (p: number) => sw.learnedOn(p, 16).map(hex).sort();
    expect(on(portOf(a.dev))).toEqual([hex(macA), hex(behindA)].sort());
    const learned = (d: NetDevice) => ((d.state!.save() as { learned: Uint8Array[] }).learned.map(hex)).sort();
    expect(learned(a.dev)).toEqual([hex(macA), hex(behindA)].sort());
    // The frontend goes (QEMU stops the source's queues before it asks for the state): the switch forgets the
    // port's addresses, the state still has them.
    a.fe.close();
    for (const until = Date.now() + 10_000; on(portOf(a.dev)).length > 0 && Date.now() < until; ) await new Promise((r) => setTimeout(r, 5));
    expect(on(portOf(a.dev))).toEqual([]);
    const saved = a.dev.state!.save();
    expect(learned(a.dev)).toEqual([hex(macA), hex(behindA)].sort());
    // The destination's port loads it; its first pass announces both, and the switch learns them on it.
    const c = await port({ backend: { kind: 'switch', name: 'state-sw' }, mac: new Uint8Array([0x52, 0x54, 0, 0xd, 0xd, 0x3]) });
    c.dev.state!.load(saved);
    c.rx.add({ writable: [2048] });
    c.rx.kick();
    const got = await b.rx.waitForUsed(2);
    const sources = got.map((u) => hex(b.rx.written(u.chain!, u.len).subarray(NET_HDR_SIZE + 6, NET_HDR_SIZE + 12))).sort();
    expect(sources).toEqual([hex(macA), hex(behindA)].sort());
    expect(on(portOf(c.dev))).toEqual([hex(macA), hex(behindA)].sort());
    expect(() => c.dev.state!.load({ ...(saved as object), learned: [new Uint8Array(5)] })).toThrow(/learned addresses/);
  });

  it('multiqueue: every queue pair transmits and receives, each in its own worker', async () => {
    const { dev, queues } = await port({ backend: { kind: 'source', frameSize: 64 }, queuePairs: 3 });
    expect(dev.numQueues).toBe(7);
    for (let p = 0; p < 3; p++) {
      const rx = queues[2 * p];
      for (let i = 0; i < 4; i++) rx.add({ writable: [256] });
      rx.kick();
      expect((await rx.waitForUsed(4)).every((u) => u.len === NET_HDR_SIZE + 64)).toBe(true);
    }
    expect(dev.stats().rxFrames).toBeGreaterThanOrEqual(12);
  });

  it('link status: setLink reaches the frontend as CONFIG_CHANGE_MSG and the config status follows', async () => {
    const { dev, fe } = await port({ backend: { kind: 'sink' } });
    const status = async () => {
      const c = await fe.getConfig(0, 12);
      return new DataView(c.buffer, c.byteOffset).getUint16(6, true);
    };
    expect(await status()).toBe(1); // VIRTIO_NET_S_LINK_UP
    const notice = fe.waitForBackendMessage('CONFIG_CHANGE_MSG', 5000);
    expect(dev.setLink(false)).toBe(true);
    await notice;
    expect(await status()).toBe(0);
    dev.setLink(true);
    expect(await status()).toBe(1);
  });
});
