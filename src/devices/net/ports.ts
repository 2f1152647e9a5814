/**
 * What a virtio-net queue pair is connected to. A port takes the guest's transmitted frames (`transmit`) and fills
 * the receive queue when it has frames and the guest has buffers (`rxReady` is called when buffers arrive).
 * No port queues frames in JS: with no receive buffers a tap is simply not read (the kernel queue holds them) and
 * a switch drops (counted), as a hardware switch does.
 */
import type { RxQueue } from './datapath.js';
import { BytesFrame, type ChainFrame } from './datapath.js';
import { ETH_HEADER, NET_HDR_NUM_BUFFERS, NET_HDR_SIZE } from './spec.js';
import { TapPort } from './tap-port.js';

export interface PortHooks {
  features: bigint;
  pair: number;
  queuePairs: number;
  /** Counters of this pair (see NET_STATS). */
  stats: Float64Array;
  rxMode: SharedArrayBuffer;
  /** Which tap queues are attached (see tap-queues.ts). */
  tapQueues: SharedArrayBuffer;
  /** The pair's receive side, once its queue has started. */
  rx(): RxQueue | null;
  /** Make frames delivered outside the receive queue's own processing visible to the guest (and notify). */
  publishRx(): void;
  watch(fd: number, onReadable: () => void): { close(): void };
  log(message: string): void;
}

export interface PortBackend {
  /** Frames transmitted between flushes and publishes of the transmit queue. Default TX_BURST (32, DPDK's). */
  readonly burst?: number;
  /** False: transmit() never reads the frame's bytes (a sink), so they need not be brought into cache. Default true. */
  readonly readsFrames?: boolean;
  /** False: the receive queue needs no kicks (frames are delivered as they arrive, or dropped). Default true. */
  readonly rxNeedsKicks?: boolean;
  /** A frame the guest sent; false when it was dropped. The frame's bytes are only valid during the call. */
  transmit(frame: ChainFrame): boolean;
  /**
   * A burst of `count` frames, the first `bytes` long with its virtio-net header, is about to be transmitted:
   * time to claim the receive buffers they will go to (Virtqueue.claimWrites).
   */
  prepare?(count: number, bytes: number): void;
  /** End of a transmit batch (flush what was batched, publish receive queues touched). */
  flush(): void;
  /** The guest posted receive buffers: deliver what is waiting. */
  rxReady(): void;
  /** Send a frame on the guest's behalf (the RARP announcement after migration). */
  announce(frame: Uint8Array): void;
  close(): void;
}

import type { NetBackendSpec } from './index.js';

/** A port of any kind but a switch's (switch ports need their switch's forwarder: see SwitchPort). */
export function openPort(spec: Exclude<NetBackendSpec, { kind: 'switch' }>, hooks: PortHooks): PortBackend {
  switch (spec.kind) {
    case 'sink':
      return new SinkPort(hooks, spec.verify ?? false);
    case 'source':
      return new SourcePort(hooks, spec.frameSize ?? 64);
    case 'tap':
      return new TapPort(spec.name, hooks);
  }
}

/**
 * Drops every frame. With `verify`, checks each against the first, byte for byte (DPDK's txonly sends one
 * template): a test aid that costs a copy per frame, off for benchmarks.
 */
class SinkPort implements PortBackend {
  private first: Uint8Array | null = null;
  private readonly scratch = new Uint8Array(65536 + 18);

  readonly readsFrames: boolean;

  constructor(
    private readonly hooks: PortHooks,
    private readonly verify: boolean,
  ) {
    this.readsFrames = verify;
  }

  transmit(frame: ChainFrame): boolean {
    if (!this.verify) return true;
    if (this.first === null) {
      this.first = new Uint8Array(frame.length);
      frame.copyTo(this.first, 0, 0, frame.length);
      return true;
    }
    if (frame.length !== this.first.length) {
      this.hooks.stats[6]++;
      return true;
    }
    frame.copyTo(this.scratch, 0, 0, frame.length);
    const a = this.scratch;
    const b = this.first;
    for (let i = 0; i < b.length; i++) {
      if (a[i] !== b[i]) {
        this.hooks.stats[6]++;
        break;
      }
    }
    return true;
  }

  flush(): void {}
  rxReady(): void {}
  announce(): void {}
  close(): void {}
}

/**
 * Frames the source delivers between publishes of the receive queue (DPDK's burst). Measured in the DPDK loop
 * (testpmd rxonly) against publishing once at the end of a pass, both in one process, switched every 100 ms:
 * +7 to +9% with --poll-us 200, +39 to +52% without (every 16: +4 to +8%, every 64: +6 to +10%, polling).
 */
const SOURCE_BURST = 32;

/** Fills every receive buffer the guest posts with a generated UDP broadcast frame of a fixed size. */
class SourcePort implements PortBackend {
  /**
   * A virtio-net header (num_buffers 1, the rest zero) and the frame, one view of exactly those bytes: what
   * RxQueue.deliverCopies copies, and RxQueue.deliver with one set(); `frame` is its frame.
   */
  private readonly packet: Uint8Array;
  private readonly frame: BytesFrame;

  constructor(
    private readonly hooks: PortHooks,
    size: number,
  ) {
    if (size < 60 || size > 65535) throw new RangeError(`source frame size ${size}: 60 to 65535`);
    this.packet = new Uint8Array(NET_HDR_SIZE + size);
    this.packet.set(sourceFrame(size), NET_HDR_SIZE);
    this.packet[NET_HDR_NUM_BUFFERS] = 1; // one buffer a frame, as deliverCopies copies it
    this.frame = new BytesFrame().set(this.packet, size, NET_HDR_SIZE);
  }

  readonly readsFrames = false;
  transmit(): boolean {
    return true;
  }
  flush(): void {}
  announce(): void {}

  rxReady(): void {
    const rx = this.hooks.rx();
    if (!rx) return;
    const s = this.hooks.stats;
    const len = this.frame.length;
    for (;;) {
      const n = rx.deliverCopies(this.packet, SOURCE_BURST);
      s[3] += n;
      s[4] += n * len;
      if (n === SOURCE_BURST) {
        // Handed on in bursts, not all at the end: the guest takes the first frames (and posts their buffers
        // again) while the rest are being filled. What is left the framework publishes after the pass.
        this.hooks.publishRx();
        continue;
      }
      // The ring ran dry, or the next chain's first buffer is too short for the frame: deliver() spreads it over
      // chains (MRG_RXBUF), drops it, or finds no buffers.
      const r = rx.deliver(this.frame, this.packet, 0);
      if (r !== 'delivered') {
        if (r === 'too-big') s[5]++;
        return;
      }
      s[3]++;
      s[4] += len;
    }
  }

  close(): void {}
}

/** Broadcast Ethernet/IPv4/UDP frame of `size` bytes (no FCS), payload a counting pattern. */
export function sourceFrame(size: number): Uint8Array {
  const f = new Uint8Array(size);
  f.fill(0xff, 0, 6); // broadcast destination
  f.set([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc], 6);
  f[12] = 0x08; // IPv4
  f[13] = 0x00;
  const ip = ETH_HEADER;
  const ipLen = size - ETH_HEADER;
  f.set([0x45, 0, ipLen >> 8, ipLen & 0xff, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 255, 255, 255, 255], ip);
  let sum = 0;
  for (let i = 0; i < 20; i += 2) sum += (f[ip + i] << 8) | f[ip + i + 1];
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  f[ip + 10] = ~sum >> 8 & 0xff;
  f[ip + 11] = ~sum & 0xff;
  const udp = ip + 20;
  const udpLen = ipLen - 20;
  f.set([0x04, 0xd2, 0x16, 0x2e, udpLen >> 8, udpLen & 0xff, 0, 0], udp);
  for (let i = udp + 8; i < size; i++) f[i] = i & 0xff;
  return f;
}

/** RARP "reverse request" from `mac` (what QEMU and DPDK broadcast so switches learn a migrated guest's port). */
export function rarpFrame(mac: Uint8Array): Uint8Array {
  const f = new Uint8Array(60);
  f.fill(0xff, 0, 6);
  f.set(mac, 6);
  f.set([0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3], 12); // ethertype RARP; htype 1, ptype IPv4, hlen 6, plen 4, op 3
  f.set(mac, 22); // sender hardware address; sender IP 0.0.0.0
  f.set(mac, 32); // target hardware address; target IP 0.0.0.0
  return f;
}
