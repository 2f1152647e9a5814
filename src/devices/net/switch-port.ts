/** A guest's queue pair on the switch, in the switch's thread. */
import type { ChainFrame, FrameSource } from './datapath.js';
import type { Forwarder, SwitchMember } from './forwarding.js';
import type { PortBackend, PortHooks } from './ports.js';
import { BytesFrame } from './datapath.js';

/**
 * A switch port's learned addresses travel in its device state (at most MAX_CARRIED), through its rx-mode memory:
 * Int32 [6] and the addresses from RESTORED_AT, loaded and still to announce; Int32 [7] and the addresses from
 * KEPT_AT, what the switch had learned on the port when it left the switch (which forgets them then, before QEMU
 * asks a stopped device for its state).
 */
export const MAX_CARRIED = 16;
export const RESTORED_AT = 32;
export const KEPT_AT = RESTORED_AT + 6 * MAX_CARRIED;
export const RX_MODE_BYTES = KEPT_AT + 6 * MAX_CARRIED;

export class SwitchPort implements PortBackend, SwitchMember {
  private readonly mode: Int32Array;
  private readonly mac: Uint8Array;

  constructor(
    private readonly sw: Forwarder,
    private readonly port: number,
    private readonly hooks: PortHooks,
    /** After the port left the switch. */
    private readonly onClose: () => void = () => {},
  ) {
    this.mode = new Int32Array(hooks.rxMode, 0, 3);
    this.mac = new Uint8Array(hooks.rxMode, 12, 6);
    sw.attach(port, this);
  }

  /**
   * Half DPDK's burst: the receiving guest gets each half sooner and works on it while the rest are forwarded.
   * Measured in the two-port DPDK loop with 16 and 32 in one process, switched every 100 ms: +19 to +26% without
   * polling, +0 to +9% with --poll-us 200 (8, 12 and 24 did worse polling; the sink loses 2 to 6% at 16, so the
   * other ports keep 32).
   */
  readonly burst = 16;

  transmit(frame: ChainFrame): boolean {
    this.sw.forward(this.port, frame, frame.hdrBuf, frame.hdrOff);
    return true;
  }

  prepare(count: number, bytes: number): void {
    this.sw.prepare(this.port, count, bytes);
  }

  claimWrites(count: number, bytes: number): void {
    this.hooks.rx()?.queue.claimWrites(count, bytes);
  }

  // Receivers are published per burst of the sender, not per frame: one notification per receiver per burst.
  flush(): void {
    this.sw.flush();
  }

  rxReady(): void {
    // Nothing waits here: frames for a port without buffers were dropped when they arrived.
  }

  /** Frames for a port are delivered when they arrive; its receive queue needs no kicks. */
  readonly rxNeedsKicks = false;

  announce(frame: Uint8Array): void {
    this.sw.forward(this.port, new BytesFrame().set(frame), null);
  }

  receive(frame: FrameSource, header: Uint8Array | null, headerOff: number): boolean {
    const rx = this.hooks.rx();
    const s = this.hooks.stats;
    if (rx === null || !this.accepts(frame) || rx.deliver(frame, header, headerOff) !== 'delivered') {
      s[5]++;
      return false;
    }
    s[3]++;
    s[4] += frame.length;
    return true;
  }

  publish(): void {
    this.hooks.publishRx();
  }

  close(): void {
    const kept = this.sw.learnedOn(this.port, new Uint8Array(this.hooks.rxMode, KEPT_AT, 6 * MAX_CARRIED), MAX_CARRIED);
    Atomics.store(new Int32Array(this.hooks.rxMode, 0, 8), 7, kept);
    this.sw.detach(this.port);
    this.onClose();
  }

  /** The device's receive filter (CTRL_RX): our MAC, broadcast and multicast, or everything when promiscuous. */
  private accepts(frame: FrameSource): boolean {
    if (this.mode[0] === 1) return true;
    const b = frame.headBuf;
    const o = frame.headOff;
    if (frame.headLen < 6) {
      if (frame.byteAt(0) & 1) return true;
      for (let i = 0; i < 6; i++) if (frame.byteAt(i) !== this.mac[i]) return false;
      return true;
    }
    if (b[o] & 1) return true;
    const m = this.mac;
    return b[o] === m[0] && b[o + 1] === m[1] && b[o + 2] === m[2] && b[o + 3] === m[3] && b[o + 4] === m[4] && b[o + 5] === m[5];
  }
}
