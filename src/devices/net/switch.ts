/**
 * A learning L2 switch inside one vhost-ts process, as the main thread sees it: its name, its ports (virtio-net
 * devices, each on its own vhost-user socket), an optional host tap as uplink, and the addresses it learned. The
 * forwarding itself runs in one worker thread that serves every port's queues (see forwarding.ts): a frame is
 * copied once, from the sender's transmit chain straight into the receiver's receive chain.
 */
import { close, openTap, type Tap } from '../../sys/index.js';
import { MacTable } from './mac-table.js';

export const AGEING_MS = 300_000;

/** A learned address, as the control API shows it. */
export interface MacEntry {
  mac: string;
  port: string;
  ageMs: number;
}

/**
 * Shared between the main thread and the switch's thread: Int32 [0] the uplink tap's fd (-1: none), [1] bumped
 * on every uplink change; Float64 [1] frames dropped (no receive buffers, filtered), [2] frames flooded.
 */
export const SWITCH_CONTROL_BYTES = 24;
export const UPLINK_PORT = 0;

/** What a switch port's queues need to find their switch in the switch's thread (structured-cloneable). */
export interface SwitchPortOptions {
  name: string;
  /** This port's number on the switch (the uplink is 0). */
  port: number;
  table: SharedArrayBuffer;
  control: SharedArrayBuffer;
}

export class Switch {
  readonly table = MacTable.create();
  readonly control = new SharedArrayBuffer(SWITCH_CONTROL_BYTES);
  private readonly ctl = new Int32Array(this.control, 0, 2);
  private readonly counters = new Float64Array(this.control, 8, 2);
  private readonly labels = new Map<number, () => string>();
  private nextPort = UPLINK_PORT + 1;
  private uplink: Tap | null = null;

  constructor(readonly name: string) {
    this.ctl[0] = -1;
  }

  /** A new port: the options its queues take to the switch's thread. `label` names it in the MAC table. */
  addPort(label: () => string): SwitchPortOptions {
    const port = this.nextPort++;
    this.labels.set(port, label);
    return { name: this.name, port, table: this.table.shared, control: this.control };
  }

  /** Connect a host tap interface as the uplink (frames to unknown MACs also go there); returns its name. */
  attachUplink(tapName: string): string {
    if (this.uplink) throw new Error(`switch ${this.name} already has an uplink (${this.uplink.name})`);
    this.uplink = openTap(tapName, { vnetHdr: true });
    Atomics.store(this.ctl, 0, this.uplink.fd);
    Atomics.add(this.ctl, 1, 1);
    return this.uplink.name;
  }

  get uplinkName(): string | null {
    return this.uplink?.name ?? null;
  }

  /**
   * Detach and close the uplink. The switch's thread lets go of its own copy of the fd when it next runs or
   * ends; close the ports' servers first, so that the tap is gone when this returns.
   */
  close(): void {
    if (!this.uplink) return;
    Atomics.store(this.ctl, 0, -1);
    Atomics.add(this.ctl, 1, 1);
    close(this.uplink.fd);
    this.uplink = null;
  }

  get dropped(): number {
    return this.counters[0];
  }

  get flooded(): number {
    return this.counters[1];
  }

  macCount(now = Date.now()): number {
    return this.macTable(now).length;
  }

  /** The addresses learned on one port and not aged out, at most `max`. */
  learnedOn(port: number, max: number): Uint8Array[] {
    const out = new Uint8Array(6 * max);
    const n = this.table.copyPort(port, Date.now() - AGEING_MS, out, max);
    return Array.from({ length: n }, (_, i) => out.slice(6 * i, 6 * i + 6));
  }

  /** The learned addresses still in use. */
  macTable(now = Date.now()): MacEntry[] {
    const out: MacEntry[] = [];
    for (const e of this.table.entries()) {
      if (now - e.seen > AGEING_MS) continue;
      const label = e.port === UPLINK_PORT ? `uplink ${this.uplink?.name ?? '(detached)'}` : this.labels.get(e.port)?.();
      if (label === undefined) continue;
      out.push({ mac: e.mac, port: label, ageMs: Math.max(0, now - e.seen) });
    }
    return out;
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
