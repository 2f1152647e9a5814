/**
 * virtio-net (virtio 1.2 §5.1): frames between a guest and a backend: a host tap interface, a built-in learning
 * switch shared by several ports, or (for benchmarks) a sink that drops and a source that generates.
 *
 * Queues: receiveq/transmitq pairs (rx = 2k, tx = 2k + 1), then the control queue when CTRL_VQ is negotiated.
 * Each pair runs in its own worker; all ports of one switch share one worker (DataPlane.shareThread), where the
 * switch copies a frame straight from the sender's transmit chain into the receiver's receive chain (one copy).
 *
 * @example
 * ```ts
 * import { VhostUserServer } from 'vhost-ts';
 * import { netDevice } from 'vhost-ts/devices/net';
 * await VhostUserServer.start(netDevice({ backend: { kind: 'tap', name: 'vts0' } }), { socketPath: '/tmp/net.sock' });
 * ```
 */
import { ProtocolFeature } from '../../vhost/protocol.js';
import { checkPollSetting, type PollSetting } from '../../vhost/poll-window.js';
import {
  bit,
  type FrontendLink,
  type QueueContext,
  type QueueHandler,
  type ThreadContext,
  type ThreadHandler,
  type VhostUserDevice,
  VIRTIO_F_IN_ORDER,
} from '../../vhost/device.js';
import type { DescriptorChain, Virtqueue } from '../../virtqueue/index.js';
import { handleControl } from './control.js';
import { ChainFrame, RxQueue } from './datapath.js';
import { Forwarder } from './forwarding.js';
import { applyActivePairs, initTapQueues, tapQueuesBytes } from './tap-queues.js';
import { openPort, rarpFrame, type PortBackend, type PortHooks } from './ports.js';
import { joinSwitch, type MacEntry, type SwitchPortOptions } from './switch.js';
import { KEPT_AT, MAX_CARRIED, RESTORED_AT, RX_MODE_BYTES, SwitchPort } from './switch-port.js';
import {
  CONFIG_SIZE,
  encodeConfig,
  NET_HDR_SIZE,
  formatMac,
  randomMac,
  VIRTIO_ID_NET,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_CTRL_MAC_ADDR,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
} from './spec.js';

export type NetBackendSpec =
  /** verify: check every frame against the first, byte for byte (tests; costs a copy per frame). */
  | { kind: 'sink'; verify?: boolean }
  | { kind: 'source'; frameSize?: number }
  | { kind: 'tap'; name: string }
  | { kind: 'switch'; name: string };

export interface NetOptions {
  backend: NetBackendSpec;
  /** Default: a random locally administered address. */
  mac?: Uint8Array;
  mtu?: number;
  /** Queue pairs (default 1). */
  queuePairs?: number;
  queueSize?: number;
  /** Busy-poll each queue this many microseconds after it served chains (default 0), or 'adaptive' (see DataPlane.pollUs). */
  pollUs?: PollSetting;
}

/** Per pair counters: tx frames, tx bytes, tx dropped, rx frames, rx bytes, rx dropped, sink mismatches. */
export const NET_STATS = 7;
export interface NetStats {
  txFrames: number;
  txBytes: number;
  txDropped: number;
  rxFrames: number;
  rxBytes: number;
  rxDropped: number;
  /** Sink with verify: frames that differed from the first one (DPDK's txonly sends one template). */
  sinkMismatches: number;
}

/** What each queue handler gets (structured-cloneable). */
export interface NetQueueOptions {
  backend: NetBackendSpec;
  /** A switch port: which, and the switch's shared tables. */
  switchPort: SwitchPortOptions | null;
  queuePairs: number;
  stats: SharedArrayBuffer;
  /**
   * Int32 [0] promisc, [1] allmulti, [2] active pairs, [5] RARP announcement pending (a bit per pair),
   * [6] and [7] a switch port's learned addresses (switch-port.ts); bytes 12..17 the current MAC (the control
   * queue updates it).
   */
  rxMode: SharedArrayBuffer;
  /** A multi-queue tap's queues, attached or not (tap-queues.ts). */
  tapQueues: SharedArrayBuffer;
}

export interface NetDevice extends VhostUserDevice<NetQueueOptions> {
  readonly mac: string;
  stats(): NetStats;
  /**
   * Report link up or down to the guest: the config space's status, and a config-change notice to the frontend
   * when it gave us a backend channel. Returns whether the frontend was told.
   */
  setLink(up: boolean): boolean;
  /** Whether the link is up, as the guest is told. */
  readonly linkUp: boolean;
  /** On a switch: the addresses it learned, and on which port. Throws RangeError for other backends. */
  macTable(): MacEntry[];
}

export function netDevice(opts: NetOptions): NetDevice {
  const pairs = opts.queuePairs ?? 1;
  if (!Number.isInteger(pairs) || pairs < 1 || pairs > 64) throw new RangeError(`queue pairs ${pairs}: 1 to 64`);
  if (opts.backend.kind === 'switch' && pairs !== 1) throw new RangeError('switch ports have one queue pair');
  const mac = opts.mac ?? randomMac();
  const mtu = opts.mtu ?? 1500;
  if (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535) throw new RangeError(`MTU ${mtu}: 68 to 65535`);
  const stats = new SharedArrayBuffer(8 * NET_STATS * pairs);
  const rxMode = new SharedArrayBuffer(RX_MODE_BYTES);
  const tapQueues = new SharedArrayBuffer(tapQueuesBytes(pairs));
  initTapQueues(tapQueues);
  const mode = new Int32Array(rxMode, 0, 8);
  const macBytes = new Uint8Array(rxMode, 12, 6);
  const restored = new Uint8Array(rxMode, RESTORED_AT, 6 * MAX_CARRIED);
  /** A switch port's learned addresses: the switch's own table while the port is on it, else what it kept. */
  const learned = (): Uint8Array[] => {
    if (!switchPort) return [];
    const live = joinSwitch(switchPort.name).learnedOn(switchPort.port, MAX_CARRIED);
    if (live.length > 0) return live;
    return Array.from({ length: Atomics.load(mode, 7) }, (_, i) => new Uint8Array(rxMode, KEPT_AT + 6 * i, 6).slice());
  };
  const resetMode = () => {
    Atomics.store(mode, 0, 1); // promiscuous until the driver says otherwise (as QEMU's virtio-net starts)
    Atomics.store(mode, 1, 1);
    Atomics.store(mode, 2, 1);
    macBytes.set(mac);
  };
  resetMode();
  let linkUp = true;
  let frontend: FrontendLink | null = null;
  let features =
    bit(VIRTIO_NET_F_MAC) |
    bit(VIRTIO_NET_F_MTU) |
    bit(VIRTIO_NET_F_STATUS) |
    bit(VIRTIO_NET_F_MRG_RXBUF) |
    bit(VIRTIO_NET_F_CSUM) |
    bit(VIRTIO_NET_F_GUEST_CSUM) |
    bit(VIRTIO_NET_F_HOST_TSO4) |
    bit(VIRTIO_NET_F_HOST_TSO6) |
    bit(VIRTIO_NET_F_HOST_ECN) |
    bit(VIRTIO_NET_F_GUEST_TSO4) |
    bit(VIRTIO_NET_F_GUEST_TSO6) |
    bit(VIRTIO_NET_F_GUEST_ECN) |
    bit(VIRTIO_NET_F_CTRL_VQ) |
    bit(VIRTIO_NET_F_CTRL_RX) |
    bit(VIRTIO_NET_F_CTRL_MAC_ADDR) |
    // Every queue hands its chains back in the order it took them: a frame is pushed (or unpopped) before the next
    // pop, whichever the port. DPDK guests then use their in-order paths, as they do with DPDK's vhost.
    bit(VIRTIO_F_IN_ORDER);
  if (pairs > 1) features |= bit(VIRTIO_NET_F_MQ);
  const switchPort = opts.backend.kind === 'switch' ? joinSwitch(opts.backend.name).addPort(() => `port of ${formatMac(macBytes)}`) : null;
  const groups = Array.from({ length: pairs }, (_, k) => [2 * k, 2 * k + 1]);
  groups[0].push(2 * pairs); // the control queue shares the first pair's worker
  return {
    name: `net(${opts.backend.kind})`,
    deviceId: VIRTIO_ID_NET,
    numQueues: 2 * pairs + 1,
    maxQueueSize: opts.queueSize ?? 1024,
    features,
    protocolFeatures: bit(ProtocolFeature.RARP),
    configSize: CONFIG_SIZE,
    mac: formatMac(mac),
    readConfig: (offset, length) => encodeConfig({ mac: macBytes.slice(), linkUp, queuePairs: pairs, mtu }).slice(offset, offset + length),
    reset: resetMode,
    // What the driver set through the control queue: the destination of a migration starts from it.
    state: {
      kind: 'net',
      save: () => ({
        mac: macBytes.slice(),
        promiscuous: Atomics.load(mode, 0) === 1,
        allMulticast: Atomics.load(mode, 1) === 1,
        activePairs: Atomics.load(mode, 2),
        // A switch port: the addresses the switch learned on it (the guest's, and any behind it: a bridge).
        learned: learned(),
      }),
      load(s: object) {
        const st = s as { mac?: Uint8Array; promiscuous?: boolean; allMulticast?: boolean; activePairs?: number; learned?: Uint8Array[] };
        if (!st.mac || st.mac.length !== 6) throw new RangeError(`a net state with a MAC of ${st.mac?.length ?? 0} bytes`);
        const active = st.activePairs ?? 1;
        if (!(active >= 1 && active <= pairs)) throw new RangeError(`a net state with ${active} active queue pairs; this device has ${pairs}`);
        const loaded = st.learned ?? [];
        if (loaded.length > MAX_CARRIED || loaded.some((m) => m.length !== 6)) throw new RangeError(`a net state with ${loaded.length} learned addresses (at most ${MAX_CARRIED}, 6 bytes each)`);
        macBytes.set(st.mac);
        Atomics.store(mode, 0, st.promiscuous ? 1 : 0);
        Atomics.store(mode, 1, st.allMulticast ? 1 : 0);
        Atomics.store(mode, 2, active);
        // The switch's table belongs to its thread: the port announces these there on its next pass, and the
        // switch learns them on this port as it learns any sender.
        if (switchPort) {
          loaded.forEach((m, i) => restored.set(m, 6 * i));
          Atomics.store(mode, 6, loaded.length);
        }
      },
    },
    sendRarp(guestMac) {
      macBytes.set(guestMac);
      // Each pair's worker announces once, on its next pass (the guest's next kick on that pair).
      Atomics.store(mode, 5, (1 << Math.min(pairs, 31)) - 1);
    },
    dataPlane: {
      module: new URL(import.meta.url),
      options: { backend: opts.backend, switchPort, queuePairs: pairs, stats, rxMode, tapQueues },
      groups,
      // Every port of a switch in one thread: forwarding never crosses threads.
      ...(opts.backend.kind === 'switch' ? { shareThread: `switch ${opts.backend.name}` } : {}),
      pollUs: checkPollSetting(opts.pollUs ?? 0, 'net'),
    },
    stats() {
      const s = new Float64Array(stats);
      const sum = (k: number) => Array.from({ length: pairs }, (_, p) => s[p * NET_STATS + k]).reduce((a, b) => a + b, 0);
      return {
        txFrames: sum(0),
        txBytes: sum(1),
        txDropped: sum(2),
        rxFrames: sum(3),
        rxBytes: sum(4),
        rxDropped: sum(5),
        sinkMismatches: sum(6),
      };
    },
    setLink(up) {
      linkUp = up;
      return frontend?.configChanged() ?? false;
    },
    get linkUp() {
      return linkUp;
    },
    macTable() {
      if (opts.backend.kind !== 'switch') throw new RangeError(`a ${opts.backend.kind} backend has no MAC table`);
      return joinSwitch(opts.backend.name).macTable();
    },
    bindFrontend(f) {
      frontend = f;
    },
  };
}

/** Per queue pair, in the thread that serves it: the backend port and the receive side. */
interface Pair {
  port: PortBackend | null;
  rx: RxQueue | null;
  rxCtx: QueueContext<NetQueueOptions> | null;
  stats: Float64Array;
  refs: number;
}

/**
 * The data half, one per thread: a pair's two queues (and, for a switch, every port's) meet here, by
 * ctx.device and pair number.
 */
export function createThreadHandler(thread: ThreadContext): ThreadHandler<NetQueueOptions> {
  const pairs = new Map<number, Pair>();
  const forwarders = new Map<string, Forwarder>();

  const forwarderOf = (o: SwitchPortOptions): Forwarder => {
    let f = forwarders.get(o.name);
    if (!f) {
      f = new Forwarder(o.name, o, thread);
      forwarders.set(o.name, f);
    }
    return f;
  };

  const openBackend = (o: NetQueueOptions, hooks: PortHooks): PortBackend => {
    if (o.backend.kind !== 'switch') return openPort(o.backend, hooks);
    const sp = o.switchPort!;
    const f = forwarderOf(sp);
    return new SwitchPort(f, sp.port, hooks, () => {
      // The last port gone: the switch's thread lets go of the uplink until a port comes back.
      if (f.size > 0) return;
      f.close();
      forwarders.delete(sp.name);
    });
  };
  // forEach with one callback: this runs after every batch, and iterating a Map with for-of allocates.
  const endOfBatch = (f: Forwarder) => f.endOfBatch();

  return {
    createQueueHandler(ctx) {
      const o = ctx.options;
      const index = ctx.queueIndex;
      if (index === 2 * o.queuePairs) return controlHandler(ctx);
      const pairIndex = index >> 1;
      const key = ctx.device * 128 + pairIndex;
      let pair = pairs.get(key);
      if (!pair) {
        pair = { port: null, rx: null, rxCtx: null, stats: new Float64Array(o.stats, 8 * NET_STATS * pairIndex, NET_STATS), refs: 0 };
        pairs.set(key, pair);
      }
      const p = pair;
      p.refs++;
      const hooks: PortHooks = {
        features: ctx.features,
        pair: pairIndex,
        queuePairs: o.queuePairs,
        stats: p.stats,
        rxMode: o.rxMode,
        tapQueues: o.tapQueues,
        rx: () => p.rx,
        publishRx: () => p.rxCtx?.publish(),
        watch: ctx.watch,
        log: ctx.log,
      };
      p.port ??= openBackend(o, hooks);
      const release = () => {
        if (--p.refs > 0) return;
        p.port?.close();
        pairs.delete(key);
      };
      return (index & 1) === 0 ? receiveHandler(ctx, p, release) : transmitHandler(ctx, p, release);
    },
    endOfBatch() {
      forwarders.forEach(endOfBatch);
    },
  };
}

/**
 * After migration (SEND_RARP), each pair announces the guest's MAC once, on its next pass; the first pair also
 * announces the addresses a loaded device state restored (a switch port's learned ones).
 */
function announcer(o: NetQueueOptions, pairIndex: number, pair: Pair): () => void {
  const mode = new Int32Array(o.rxMode, 0, 8);
  const mine = 1 << Math.min(pairIndex, 30);
  return () => {
    if (pairIndex === 0 && Atomics.load(mode, 6) > 0) {
      const n = Atomics.exchange(mode, 6, 0);
      for (let i = 0; i < n; i++) pair.port!.announce(rarpFrame(new Uint8Array(o.rxMode, RESTORED_AT + 6 * i, 6)));
    }
    if ((Atomics.load(mode, 5) & mine) === 0) return;
    Atomics.and(mode, 5, ~mine);
    pair.port!.announce(rarpFrame(new Uint8Array(o.rxMode, 12, 6)));
  };
}

/** receiveq: the backend fills it; a kick means the driver posted buffers. */
function receiveHandler(ctx: QueueContext<NetQueueOptions>, pair: Pair, release: () => void): QueueHandler {
  const has = (f: number) => (ctx.features & bit(f)) !== 0n;
  pair.rx = new RxQueue(ctx.queue, has(VIRTIO_NET_F_MRG_RXBUF), has(VIRTIO_NET_F_GUEST_CSUM), has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6));
  pair.rxCtx = ctx;
  const announce = announcer(ctx.options, ctx.queueIndex >> 1, pair);
  return {
    needsKicks: pair.port!.rxNeedsKicks ?? true,
    process: () => {
      announce();
      pair.port!.rxReady();
    },
    stop: () => {
      pair.rx = null;
      pair.rxCtx = null;
      release();
    },
  };
}

/**
 * Frames forwarded between flushes of the backend and publishes of the transmit queue (DPDK's burst size), unless
 * the port says otherwise (PortBackend.burst).
 */
const TX_BURST = 32;

/**
 * Read one byte of each cache line a burst's frames start with, in one tight loop before any is forwarded: the
 * guest wrote them on another CPU, and these loads do not depend on one another, so their cache misses overlap
 * instead of each frame waiting for its own in turn.
 */
function touchFrames(chains: DescriptorChain[], n: number): void {
  let t = 0;
  for (let i = 0; i < n; i++) {
    const c = chains[i];
    const buf = c.memory.buffers[c.segBuffer[0]];
    const off = c.segOffset[0];
    const len = c.segLength[0];
    if (len > 0) t += buf[off] + buf[off + (len < 128 ? len : 128) - 1];
    if (len <= NET_HDR_SIZE && c.count > 1) t += c.memory.buffers[c.segBuffer[1]][c.segOffset[1]];
  }
  touched.sum = t;
}

/** Where touchFrames leaves its sum, so that the compiler cannot drop its loads. */
const touched = { sum: 0 };

/** transmitq: every chain is a frame for the backend. */
function transmitHandler(ctx: QueueContext<NetQueueOptions>, pair: Pair, release: () => void): QueueHandler {
  const frame = new ChainFrame();
  const stats = pair.stats;
  const port = pair.port!;
  const announce = announcer(ctx.options, ctx.queueIndex >> 1, pair);
  const burst: DescriptorChain[] = [];
  const burstSize = port.burst ?? TX_BURST;
  const readsFrames = port.readsFrames ?? true;
  return {
    process(queue: Virtqueue) {
      announce();
      for (;;) {
        let n = 0;
        let bad: unknown = null;
        try {
          while (n < burstSize) {
            const c = queue.pop();
            if (c === null) break;
            burst[n++] = c;
          }
        } catch (e) {
          // The guest broke the ring after these chains: they are still its frames, sent before the queue stops.
          bad = e;
        }
        if (n === 0) {
          if (bad !== null) throw bad;
          return;
        }
        if (readsFrames) touchFrames(burst, n);
        if (port.prepare) {
          port.prepare(n, burst[0].readableBytes);
          // And the used elements these n chains go back in (for the sink, measured: no difference either way).
          queue.claimWrites(n, 0);
        }
        for (let i = 0; i < n; i++) {
          const chain = burst[i];
          if (!frame.reset(chain)) {
            stats[2]++; // shorter than a header, or over 64 KiB: dropped, counted, queue goes on
          } else {
            stats[0]++;
            stats[1] += frame.length;
            if (!port.transmit(frame)) stats[2]++;
          }
          queue.push(chain, 0);
        }
        port.flush();
        if (bad !== null) throw bad;
        if (n < burstSize) return;
        // A long run is handed on in bursts: the receivers (and the sender's freed buffers) get the first frames
        // while the rest are still being forwarded, instead of all at the end.
        ctx.publish();
      }
    },
    stop: release,
  };
}

function controlHandler(ctx: QueueContext<NetQueueOptions>): QueueHandler {
  const mode = new Int32Array(ctx.options.rxMode, 0, 3);
  const queues = new Int32Array(ctx.options.tapQueues);
  return {
    process(queue) {
      for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
        const active = Atomics.load(mode, 2);
        queue.push(chain, handleControl(chain, ctx.options.rxMode, ctx.options.queuePairs));
        // VQ_PAIRS_SET: the tap's queues follow at once, before a frame is steered to a pair the driver left.
        if (Atomics.load(mode, 2) !== active) applyActivePairs(queues, Atomics.load(mode, 2), ctx.log);
      }
    },
  };
}
