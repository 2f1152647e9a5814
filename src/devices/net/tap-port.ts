/**
 * A queue pair connected to a host tap interface opened with IFF_VNET_HDR: the guest's 12-byte virtio-net header
 * goes to the kernel unchanged, so checksum and TSO offloads pass through. Transmit is one writev straight from
 * the guest's buffers; receive reads a frame into one bounce buffer and copies it into receive chains. With no
 * receive buffers the tap is not read (the kernel's queue holds the frames): at most one frame waits here.
 */
import {
  close,
  eventfdCreate,
  eventfdRead,
  IovecArray,
  openTap,
  read,
  write,
  setTapOffload,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  writev,
} from '../../sys/index.js';
import { bit } from '../../vhost/device.js';
import { BytesFrame, type ChainFrame } from './datapath.js';
import type { PortBackend, PortHooks } from './ports.js';
import { isPairAttached, setPairAttached } from './tap-queues.js';
import { ETH_HEADER, MAX_FRAME, NET_HDR_SIZE, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6 } from './spec.js';

/** Frames read per wakeup before yielding to the worker's other queues. */
const RX_BUDGET = 256;

export class TapPort implements PortBackend {
  private readonly fd: number;
  readonly name: string;
  private readonly iov = new IovecArray(64);
  private readonly bounce = new Uint8Array(NET_HDR_SIZE + MAX_FRAME);
  private readonly frame = new BytesFrame();
  /** Length of a frame read but not yet delivered (0: none). */
  private pending = 0;
  private watch: { close(): void } | null = null;
  /** Reading failed for good (the tap is gone). */
  private readFailed = false;
  /** The error transmits fail with, while they do (logged once per episode), and the frames dropped meanwhile. */
  private failing: string | null = null;
  private failedFrames = 0;
  /** [2]: the queue pairs the driver uses (VQ_PAIRS_SET); a multi-queue tap's queues beyond them are detached. */
  private readonly mode: Int32Array;
  private readonly multiQueue: boolean;
  private readonly queues: Int32Array;
  private wakeFd = -1;
  private wakeWatch: { close(): void } | null = null;

  constructor(
    name: string,
    private readonly hooks: PortHooks,
  ) {
    this.multiQueue = hooks.queuePairs > 1;
    const tap = openTap(name, { vnetHdr: true, multiQueue: this.multiQueue });
    this.fd = tap.fd;
    this.name = tap.name;
    this.mode = new Int32Array(hooks.rxMode, 0, 3);
    this.queues = new Int32Array(hooks.tapQueues);
    Atomics.store(this.queues, 3 * hooks.pair + 1, 1); // a fresh open is attached
    Atomics.store(this.queues, 3 * hooks.pair, this.fd);
    if (this.multiQueue) {
      // The control queue attaches this pair's queue from its own thread, then wakes us here to read it.
      this.wakeFd = eventfdCreate(0, true);
      this.wakeWatch = hooks.watch(this.wakeFd, () => {
        eventfdRead(this.wakeFd);
        this.pump();
      });
      Atomics.store(this.queues, 3 * hooks.pair + 2, this.wakeFd);
    }
    // The tap may hand us only what the guest accepted.
    const f = hooks.features;
    let offload = 0;
    if (f & bit(VIRTIO_NET_F_GUEST_CSUM)) {
      offload |= TUN_F_CSUM;
      if (f & bit(VIRTIO_NET_F_GUEST_TSO4)) offload |= TUN_F_TSO4;
      if (f & bit(VIRTIO_NET_F_GUEST_TSO6)) offload |= TUN_F_TSO6;
      if (f & bit(VIRTIO_NET_F_GUEST_ECN)) offload |= TUN_F_TSO_ECN;
    }
    setTapOffload(this.fd, offload);
    // Until the driver says how many pairs it uses, only the first receives (virtio 1.2 §5.1.6.5.5).
    if (this.syncQueue()) this.resume();
  }

  /**
   * Attach the tap queue while the driver uses this pair, detach it while not, so the kernel steers frames only
   * to pairs whose receive queues the driver reads. Returns whether the pair is in use.
   */
  private syncQueue(): boolean {
    if (!this.multiQueue) return true;
    const active = this.hooks.pair < Atomics.load(this.mode, 2);
    setPairAttached(this.queues, this.hooks.pair, active, (m) => this.hooks.log(`tap ${this.name}: ${m}`));
    return active && isPairAttached(this.queues, this.hooks.pair);
  }

  transmit(frame: ChainFrame): boolean {
    if (this.multiQueue && !isPairAttached(this.queues, this.hooks.pair)) this.syncQueue();
    const c = frame.chain;
    if (c.readableCount > this.iov.capacity) return false;
    for (let i = 0; i < c.readableCount; i++) this.iov.set(i, c.hostAddress(i), c.segLength[i]);
    let sent: boolean;
    try {
      // EAGAIN (-1): the tap's queue is full; the frame is dropped as a NIC would.
      sent = writev(this.fd, this.iov, c.readableCount) > 0;
    } catch (e) {
      // EIO while the tap's link is down, EBADFD once it is deleted: the host's doing, not the guest's. Drop the
      // frame (the caller counts it) and try the next one as usual, so traffic resumes when the link is back.
      this.transmitFailed(e as Error);
      return false;
    }
    if (this.failing !== null) this.transmitResumed();
    return sent;
  }

  private transmitFailed(e: Error): void {
    this.failedFrames++;
    const why = (e as { code?: string }).code ?? e.message;
    if (this.failing === why) return;
    this.failing = why;
    const hint = why === 'EIO' ? ' (its link is down)' : why === 'EBADFD' ? ' (it was deleted)' : '';
    this.hooks.log(`tap ${this.name}: writing a frame failed with ${why}${hint}; dropping the guest's frames until it works again`);
  }

  private transmitResumed(): void {
    this.hooks.log(`tap ${this.name}: transmitting again, ${this.failedFrames} frames dropped meanwhile`);
    this.failing = null;
    this.failedFrames = 0;
  }

  flush(): void {}

  announce(frame: Uint8Array): void {
    const out = new Uint8Array(NET_HDR_SIZE + frame.length);
    out.set(frame, NET_HDR_SIZE);
    try {
      write(this.fd, out);
    } catch (e) {
      this.transmitFailed(e as Error);
    }
  }

  rxReady(): void {
    this.pump();
  }

  close(): void {
    Atomics.store(this.queues, 3 * this.hooks.pair, -1);
    Atomics.store(this.queues, 3 * this.hooks.pair + 2, -1);
    this.wakeWatch?.close();
    if (this.wakeFd >= 0) close(this.wakeFd);
    this.watch?.close();
    this.watch = null;
    close(this.fd);
  }

  private resume(): void {
    this.watch ??= this.hooks.watch(this.fd, () => this.pump());
  }

  private pause(): void {
    // Level-triggered: a readable tap we cannot drain would wake us forever.
    this.watch?.close();
    this.watch = null;
  }

  private pump(): void {
    const rx = this.hooks.rx();
    if (!rx || this.readFailed) return this.pause();
    if (!this.syncQueue()) {
      // What the detached queue held is the driver's no longer: dropped.
      if (this.pending > 0) this.hooks.stats[5]++;
      this.pending = 0;
      return this.pause();
    }
    const s = this.hooks.stats;
    let delivered = 0;
    for (let n = 0; n < RX_BUDGET; n++) {
      let len = this.pending;
      if (len === 0) {
        try {
          len = read(this.fd, this.bounce);
        } catch (e) {
          // Detached meanwhile by the control queue (VQ_PAIRS_SET): a detached queue reads EBADFD. Not gone.
          if (this.multiQueue && !isPairAttached(this.queues, this.hooks.pair)) {
            this.pause();
            break;
          }
          // The tap is gone (EBADFD) or broken: nothing more will come from it. Stop watching (an fd in error
          // stays readable and would wake us forever); the guest's queues keep running without receive traffic.
          this.hooks.log(`tap ${this.name}: reading failed with ${(e as { code?: string }).code ?? (e as Error).message}; receiving stopped`);
          this.readFailed = true;
          this.pause();
          break;
        }
        if (len < 0) break; // drained
        if (len < NET_HDR_SIZE + ETH_HEADER) {
          s[5]++;
          continue;
        }
      }
      this.frame.set(this.bounce, len - NET_HDR_SIZE, NET_HDR_SIZE);
      const r = rx.deliver(this.frame, this.bounce, 0);
      if (r === 'no-buffers') {
        this.pending = len;
        // We consumed buffers outside the queue's own processing, so avail_event is stale: re-arm it, or the
        // guest's next refill may not kick and both sides wait forever. Buffers that slipped in: go on now.
        if (rx.queue.enableNotification()) continue;
        this.pause();
        break;
      }
      this.pending = 0;
      if (r === 'too-big') s[5]++;
      else {
        s[3]++;
        s[4] += len - NET_HDR_SIZE;
        delivered++;
      }
    }
    if (this.pending === 0 && !this.readFailed) this.resume();
    if (delivered > 0) this.hooks.publishRx();
  }
}
