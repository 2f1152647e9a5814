/**
 * A learning L2 switch inside one vhost-ts process: its ports are virtio-net devices (each its own vhost-user
 * socket) and optionally a host tap as uplink. Source MACs are learned per port and aged out; frames to a known
 * unicast MAC go to that port, everything else floods. All ports run on the main thread, so forwarding is one
 * copy: from the sender's transmit chain straight into the receiver's receive chains.
 */
import { close, openTap, read, watchReadable, write, type FdWatch } from '../../sys/index.js';
import { BytesFrame, type ChainFrame, type FrameSource } from './datapath.js';
import type { PortBackend, PortHooks } from './ports.js';
import { ETH_HEADER, MAX_FRAME, NET_HDR_SIZE } from './spec.js';

export const AGEING_MS = 300_000;

interface Entry {
  port: Member;
  seen: number;
}

/** Anything attached to a switch: a guest port or the uplink. */
interface Member {
  /** Take a frame from the switch; false when it was dropped (no buffers, filtered). */
  receive(frame: FrameSource, header: Uint8Array | null): boolean;
  /** Publish what receive() delivered during this forwarding batch (one notification). */
  publish(): void;
  /** What the port is, for the MAC table: the guest's MAC, or the uplink's tap. */
  label(): string;
}

/** A learned address, as the control API shows it. */
export interface MacEntry {
  mac: string;
  port: string;
  ageMs: number;
}

export class Switch {
  readonly members = new Set<Member>();
  private readonly table = new Map<number, Entry>();
  private readonly dirty = new Set<Member>();
  private uplink: TapUplink | null = null;
  /** Frames dropped because the destination had no receive buffers or was filtered. */
  dropped = 0;
  flooded = 0;

  constructor(readonly name: string) {}

  /** Forward a frame that arrived on `from`. */
  forward(from: Member, frame: FrameSource, header: Uint8Array | null, now = Date.now()): void {
    const src = macKey(frame, 6);
    if ((frame.byteAt(6) & 1) === 0) {
      const e = this.table.get(src);
      if (e) {
        e.port = from;
        e.seen = now;
      } else this.table.set(src, { port: from, seen: now });
    }
    if ((frame.byteAt(0) & 1) === 0) {
      const e = this.table.get(macKey(frame, 0));
      if (e && now - e.seen <= AGEING_MS && this.members.has(e.port)) {
        if (e.port !== from) this.deliver(e.port, frame, header);
        return;
      }
      if (e) this.table.delete(macKey(frame, 0));
    }
    this.flooded++;
    for (const m of this.members) if (m !== from) this.deliver(m, frame, header);
  }

  /** End of a batch: make deliveries visible to the receiving guests (one notification each). */
  flush(): void {
    for (const m of this.dirty) m.publish();
    this.dirty.clear();
  }

  attach(m: Member): void {
    this.members.add(m);
  }

  detach(m: Member): void {
    this.members.delete(m);
    this.dirty.delete(m);
    for (const [k, e] of this.table) if (e.port === m) this.table.delete(k);
  }

  /** Connect a host tap interface as the uplink (frames to unknown MACs also go there). */
  attachUplink(tapName: string): string {
    if (this.uplink) throw new Error(`switch ${this.name} already has an uplink (${this.uplink.name})`);
    this.uplink = new TapUplink(tapName, this);
    this.attach(this.uplink);
    return this.uplink.name;
  }

  close(): void {
    if (this.uplink) {
      this.detach(this.uplink);
      this.uplink.close();
      this.uplink = null;
    }
  }

  macCount(): number {
    return this.table.size;
  }

  /** The learned addresses still in use. */
  macTable(now = Date.now()): MacEntry[] {
    const out: MacEntry[] = [];
    for (const [key, e] of this.table) {
      if (now - e.seen > AGEING_MS || !this.members.has(e.port)) continue;
      const hex = key.toString(16).padStart(12, '0');
      out.push({ mac: hex.match(/../g)!.join(':'), port: e.port.label(), ageMs: now - e.seen });
    }
    return out;
  }

  private deliver(m: Member, frame: FrameSource, header: Uint8Array | null): void {
    if (m.receive(frame, header)) this.dirty.add(m);
    else this.dropped++;
  }
}

const switches = new Map<string, Switch>();

/** The switch of that name in this process, created on first use. */
export function joinSwitch(name: string): Switch {
  let s = switches.get(name);
  if (!s) {
    s = new Switch(name);
    switches.set(name, s);
  }
  return s;
}

export function findSwitch(name: string): Switch | undefined {
  return switches.get(name);
}

function macKey(frame: FrameSource, at: number): number {
  return (
    (frame.byteAt(at) * 0x100 + frame.byteAt(at + 1)) * 0x100000000 +
    (((frame.byteAt(at + 2) << 24) | (frame.byteAt(at + 3) << 16) | (frame.byteAt(at + 4) << 8) | frame.byteAt(at + 5)) >>> 0)
  );
}

/** A guest's queue pair on the switch. */
export class SwitchPort implements PortBackend, Member {
  private readonly mode: Int32Array;
  private readonly mac: Uint8Array;

  constructor(
    private readonly sw: Switch,
    private readonly hooks: PortHooks,
  ) {
    this.mode = new Int32Array(hooks.rxMode, 0, 3);
    this.mac = new Uint8Array(hooks.rxMode, 12, 6);
    sw.attach(this);
  }

  transmit(frame: ChainFrame): boolean {
    this.sw.forward(this, frame, frame.header);
    return true;
  }

  label(): string {
    return `port of ${[...this.mac].map((b) => b.toString(16).padStart(2, '0')).join(':')}`;
  }

  flush(): void {
    this.sw.flush();
  }

  rxReady(): void {
    // Nothing waits here: frames for a port without buffers were dropped when they arrived.
  }

  announce(frame: Uint8Array): void {
    this.sw.forward(this, new BytesFrame().set(frame), null);
    this.sw.flush();
  }

  receive(frame: FrameSource, header: Uint8Array | null): boolean {
    const rx = this.hooks.rx();
    const s = this.hooks.stats;
    if (!rx || !this.accepts(frame)) {
      s[5]++;
      return false;
    }
    const r = rx.deliver(frame, header);
    if (r !== 'delivered') {
      s[5]++;
      return false;
    }
    s[3]++;
    s[4] += frame.length;
    return true;
  }

  close(): void {
    this.sw.detach(this);
  }

  /** The device's receive filter (CTRL_RX): our MAC, broadcast and multicast, or everything when promiscuous. */
  private accepts(frame: FrameSource): boolean {
    if (Atomics.load(this.mode, 0) === 1 || frame.byteAt(0) & 1) return true;
    for (let i = 0; i < 6; i++) if (frame.byteAt(i) !== this.mac[i]) return false;
    return true;
  }

  publish(): void {
    this.hooks.publishRx();
  }
}

/** The uplink: a host tap; frames from it enter the switch, frames for it are written to it. */
class TapUplink implements Member {
  readonly name: string;
  private readonly fd: number;
  private readonly watch: FdWatch;
  private readonly bounce = new Uint8Array(NET_HDR_SIZE + MAX_FRAME);
  private readonly frame = new BytesFrame();
  private readonly out = new Uint8Array(NET_HDR_SIZE + MAX_FRAME);

  label(): string {
    return `uplink ${this.name}`;
  }

  constructor(
    name: string,
    private readonly sw: Switch,
  ) {
    const tap = openTap(name, { vnetHdr: true });
    this.fd = tap.fd;
    this.name = tap.name;
    this.watch = watchReadable(this.fd, () => this.pump());
  }

  receive(frame: FrameSource, header: Uint8Array | null): boolean {
    // One copy into a contiguous buffer, then one write: a flooded frame may go to several members.
    const out = this.out;
    if (header) out.set(header, 0);
    else out.fill(0, 0, NET_HDR_SIZE);
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
      this.frame.set(this.bounce.subarray(NET_HDR_SIZE), len - NET_HDR_SIZE);
      this.sw.forward(this, this.frame, this.bounce.subarray(0, NET_HDR_SIZE));
    }
    this.sw.flush();
  }
}

