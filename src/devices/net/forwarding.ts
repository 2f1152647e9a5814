/**
 * The switch's data path, in the one thread that serves all its ports' queues: learn the source, look up the
 * destination (once per frame, in a typed-array table), copy the frame from the sender's transmit chain into the
 * receiver's receive chain, and publish each receiver once per batch. Nothing is allocated per frame.
 */
import type { ThreadContext } from '../../vhost/device.js';
import { close, dup, read, write } from '../../sys/index.js';
import { BytesFrame, copyBytes, type FrameSource } from './datapath.js';
import { MacTable } from './mac-table.js';
import { ETH_HEADER, MAX_FRAME, NET_HDR_SIZE } from './spec.js';
import { AGEING_MS, UPLINK_PORT, type SwitchPortOptions } from './switch.js';

/** Anything attached to the switch: a guest's port or the uplink. */
export interface SwitchMember {
  /** Take a frame; false when it was dropped (no buffers, filtered). Bytes are valid during the call only. */
  receive(frame: FrameSource, header: Uint8Array | null, headerOff: number): boolean;
  /** Make what receive() delivered in this batch visible to the guest (one notification). */
  publish(): void;
  /** Frames are on their way: claim the next `count` receive buffers' first `bytes` (Virtqueue.claimWrites). */
  claimWrites?(count: number, bytes: number): void;
}

/**
 * How much of each receive buffer a burst claims ahead: the header and the first lines of the frame. The CPU's
 * own prefetch follows a long frame's copy from there.
 */
const CLAIM_BYTES = 256;
/** lastTo: the sender's last frame went to every other member. */
const FLOODED = -2;

const ZERO_HEADER = new Uint8Array(NET_HDR_SIZE);

export class Forwarder {
  private readonly table: MacTable;
  private readonly ctl: Int32Array;
  private readonly counters: Float64Array;
  /** By port number; null where no port is attached. */
  private readonly members: (SwitchMember | null)[] = [];
  /** The attached ports' numbers, for flooding. */
  private readonly attached: number[] = [];
  /**
   * The members delivered to since the last flush: dirty[0 .. dirtyCount), their ports in dirtyPorts. Counted, not
   * emptied with `length = 0`, which gives the array's storage back and makes the next burst's push allocate it
   * again (in the two-port DPDK loop, +5 to +9% frames with the count).
   */
  private readonly dirty: SwitchMember[] = [];
  private readonly dirtyPorts: number[] = [];
  private dirtyCount = 0;
  private readonly isDirty: boolean[] = [];
  private now = Date.now();
  /** The sender learned last in this batch (learnedHi -1: none). */
  private learnedHi = -1;
  private learnedLo = 0;
  private learnedFrom = -1;
  /** The destination looked up last in this batch and its slot (foundHi -1: none): a burst mostly goes to one. */
  private foundHi = -1;
  private foundLo = 0;
  private foundSlot = -1;
  /** By sender's port: where its last frame went (FLOODED, or -1: nowhere yet), where its next burst likely goes. */
  private readonly lastTo: number[] = [];
  private uplinkGeneration = -1;
  private uplink: TapUplink | null = null;

  constructor(
    readonly name: string,
    options: SwitchPortOptions,
    private readonly thread: ThreadContext,
  ) {
    this.table = new MacTable(options.table);
    this.ctl = new Int32Array(options.control, 0, 2);
    this.counters = new Float64Array(options.control, 8, 2);
    this.checkUplink();
  }

  get size(): number {
    return this.attached.length - (this.uplink ? 1 : 0);
  }

  attach(port: number, m: SwitchMember): void {
    if (this.members[port]) this.detach(port);
    this.members[port] = m;
    this.isDirty[port] = false;
    this.lastTo[port] = -1;
    this.attached.push(port);
  }

  /** The addresses learned on `port` and not aged out, into `out` (6 bytes each, at most `max`): how many. */
  learnedOn(port: number, out: Uint8Array, max: number): number {
    return this.table.copyPort(port, Date.now() - AGEING_MS, out, max);
  }

  detach(port: number): void {
    const m = this.members[port];
    if (!m) return;
    this.members[port] = null;
    this.attached.splice(this.attached.indexOf(port), 1);
    // Rare: the dirty list is rebuilt without m, and cut to its count so that no slot keeps the member alive.
    let k = 0;
    for (let i = 0; i < this.dirtyCount; i++) {
      if (this.dirty[i] === m) continue;
      this.dirtyPorts[k] = this.dirtyPorts[i];
      this.dirty[k++] = this.dirty[i];
    }
    this.dirtyCount = k;
    this.dirty.length = k;
    this.dirtyPorts.length = k;
    this.isDirty[port] = false;
    this.table.forgetPort(port);
    this.forgetRecent();
  }

  /** The table changed (or the clock moved): the sender and destination remembered from this batch are stale. */
  private forgetRecent(): void {
    this.learnedHi = -1;
    this.foundHi = -1;
  }

  /** Forward a frame that arrived on port `from`, with the sender's virtio-net header at header[headerOff] (null: none). */
  forward(from: number, frame: FrameSource, header: Uint8Array | null, headerOff = 0): void {
    let dHi: number, dLo: number, sHi: number, sLo: number;
    const b = frame.headBuf;
    const o = frame.headOff;
    if (frame.headLen >= 12) {
      dHi = (b[o] << 8) | b[o + 1];
      dLo = ((b[o + 2] << 24) | (b[o + 3] << 16) | (b[o + 4] << 8) | b[o + 5]) >>> 0;
      sHi = (b[o + 6] << 8) | b[o + 7];
      sLo = ((b[o + 8] << 24) | (b[o + 9] << 16) | (b[o + 10] << 8) | b[o + 11]) >>> 0;
    } else {
      // The Ethernet header split across descriptors: rare, byte by byte.
      const at = (i: number) => frame.byteAt(i);
      dHi = (at(0) << 8) | at(1);
      dLo = ((at(2) << 24) | (at(3) << 16) | (at(4) << 8) | at(5)) >>> 0;
      sHi = (at(6) << 8) | at(7);
      sLo = ((at(8) << 24) | (at(9) << 16) | (at(10) << 8) | at(11)) >>> 0;
    }
    // The group bit is the first byte's lowest: bit 8 of the high half. A burst mostly comes from one sender: its
    // address is learned once per batch (the clock only moves between batches, so a second learn would change nothing).
    if ((sHi & 0x100) === 0 && (sLo !== this.learnedLo || sHi !== this.learnedHi || from !== this.learnedFrom)) {
      this.table.learn(sHi, sLo, from, this.now);
      this.learnedHi = sHi;
      this.learnedLo = sLo;
      this.learnedFrom = from;
      this.foundHi = -1; // a learn may add or move slots
    }
    if ((dHi & 0x100) === 0) {
      let slot = this.foundSlot;
      if (dLo !== this.foundLo || dHi !== this.foundHi) {
        slot = this.table.find(dHi, dLo);
        this.foundHi = dHi;
        this.foundLo = dLo;
        this.foundSlot = slot;
      }
      if (slot >= 0) {
        const port = this.table.port[slot];
        const m = this.members[port];
        if (m && this.now - this.table.seen[slot] <= AGEING_MS) {
          if (port !== from) {
            this.lastTo[from] = port;
            this.deliver(port, m, frame, header, headerOff);
          }
          return;
        }
        this.table.forget(slot);
        this.forgetRecent();
      }
    }
    this.counters[1]++;
    this.lastTo[from] = FLOODED;
    const ports = this.attached;
    for (let i = 0; i < ports.length; i++) {
      const port = ports[i];
      if (port !== from) this.deliver(port, this.members[port]!, frame, header, headerOff);
    }
  }

  /**
   * A burst of `count` frames from port `from` is about to be forwarded: the port its last frame went to claims
   * that many receive buffers now. The guest's driver on another CPU owns their cache lines; claimed together,
   * they cross at once instead of one stall per frame (in the two-port DPDK loop, about 12% more frames).
   */
  prepare(from: number, count: number, bytes: number): void {
    const to = this.lastTo[from];
    const n = bytes < CLAIM_BYTES ? bytes : CLAIM_BYTES;
    if (to >= 0) {
      const m = this.members[to];
      if (m && m.claimWrites) m.claimWrites(count, n);
    } else if (to === FLOODED) {
      // Flooded frames are copied to every other member anyway.
      const ports = this.attached;
      for (let i = 0; i < ports.length; i++) {
        const m = this.members[ports[i]]!;
        if (ports[i] !== from && m.claimWrites) m.claimWrites(count, n);
      }
    }
  }

  /** Make what was delivered so far visible to its receivers: each published (and notified) once. */
  flush(): void {
    const n = this.dirtyCount;
    if (n === 0) return;
    const d = this.dirty;
    for (let i = 0; i < n; i++) {
      d[i].publish();
      this.isDirty[this.dirtyPorts[i]] = false;
    }
    this.dirtyCount = 0;
  }

  /** End of the thread's batch: the receivers published; the clock and the uplink looked at. */
  endOfBatch(): void {
    this.flush();
    this.now = Date.now();
    this.forgetRecent();
    if (Atomics.load(this.ctl, 1) !== this.uplinkGeneration) this.checkUplink();
  }

  close(): void {
    this.uplink?.close();
    this.uplink = null;
  }

  private deliver(port: number, m: SwitchMember, frame: FrameSource, header: Uint8Array | null, headerOff: number): void {
    if (!m.receive(frame, header, headerOff)) {
      this.counters[0]++;
      return;
    }
    if (!this.isDirty[port]) {
      this.isDirty[port] = true;
      this.dirtyPorts[this.dirtyCount] = port;
      this.dirty[this.dirtyCount++] = m;
    }
  }

  /** The main thread attached or detached the uplink tap: take our own copy of its fd, or let go of it. */
  private checkUplink(): void {
    this.uplinkGeneration = Atomics.load(this.ctl, 1);
    const fd = Atomics.load(this.ctl, 0);
    if (this.uplink) {
      this.detach(UPLINK_PORT);
      this.uplink.close();
      this.uplink = null;
    }
    if (fd < 0) return;
    try {
      this.uplink = new TapUplink(dup(fd), this, this.thread);
      this.attach(UPLINK_PORT, this.uplink);
    } catch (e) {
      this.thread.log(`switch ${this.name}: cannot use the uplink tap: ${(e as Error).message}`);
    }
  }
}

/** The uplink: a host tap; frames from it enter the switch, frames for it are written to it. */
class TapUplink implements SwitchMember {
  private readonly watch: { close(): void };
  private readonly bounce = new Uint8Array(NET_HDR_SIZE + MAX_FRAME);
  private readonly frame = new BytesFrame();
  private readonly out = new Uint8Array(NET_HDR_SIZE + MAX_FRAME);
  private closed = false;

  constructor(
    private readonly fd: number,
    private readonly sw: Forwarder,
    thread: ThreadContext,
  ) {
    this.watch = thread.watch(fd, () => this.pump());
  }

  receive(frame: FrameSource, header: Uint8Array | null, headerOff: number): boolean {
    // One copy into a contiguous buffer, then one write: a flooded frame may go to several members.
    const out = this.out;
    const hb = header ?? ZERO_HEADER;
    const ho = header === null ? 0 : headerOff;
    copyBytes(out, 0, hb, ho, NET_HDR_SIZE);
    frame.copyTo(out, NET_HDR_SIZE, 0, frame.length);
    try {
      return write(this.fd, out, NET_HDR_SIZE + frame.length) > 0;
    } catch {
      // EIO while the uplink's link is down: dropped (the switch counts it), as for a full tap queue.
      return false;
    }
  }

  publish(): void {}

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watch.close();
    close(this.fd);
  }

  private pump(): void {
    for (let n = 0; n < 256; n++) {
      let len: number;
      try {
        len = read(this.fd, this.bounce);
      } catch {
        // The tap is gone: stop watching it (an fd in error stays readable); the guests' ports go on.
        this.watch.close();
        break;
      }
      if (len < 0) break;
      if (len < NET_HDR_SIZE + ETH_HEADER) continue;
      this.frame.set(this.bounce, len - NET_HDR_SIZE, NET_HDR_SIZE);
      this.sw.forward(UPLINK_PORT, this.frame, this.bounce, 0);
    }
    // The thread's end of batch publishes the ports these frames went to.
  }
}
