// Test utility: Ethernet frames as a guest sends and reads them (ARP, UDP), and a receiver that keeps receive
// queues stocked with buffers and collects every frame the device puts in them, for tests that wait on a frame
// by what it is rather than by where or when it lands.
import { NET_HDR_SIZE } from '../../src/devices/net/spec.js';
import { FrontendError, type TestQueue } from '../../src/frontend/index.js';
import { run, type Netns } from './netns.js';

export type Mac = readonly number[];
export type Ip4 = readonly number[];

export const BROADCAST: Mac = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

export const macText = (mac: Mac | Uint8Array): string => [...mac].map((b) => b.toString(16).padStart(2, '0')).join(':');
export const ipText = (ip: Ip4 | Uint8Array): string => [...ip].join('.');

/** A frame behind a zeroed 12-byte virtio-net header (no offloads), as a guest transmits it. */
export function withNetHeader(frame: Uint8Array): Uint8Array {
  const out = new Uint8Array(NET_HDR_SIZE + frame.length);
  out.set(frame, NET_HDR_SIZE);
  return out;
}

/** A broadcast ARP request "who has `target`? tell `senderIp`" from `sender`, padded to the 60-byte minimum. */
export function arpRequest(sender: Mac, senderIp: Ip4, target: Ip4): Uint8Array {
  const f = new Uint8Array(60);
  f.set([...BROADCAST, ...sender, 0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1, ...sender, ...senderIp, 0, 0, 0, 0, 0, 0, ...target]);
  return f;
}

export interface ParsedFrame {
  dst: string;
  src: string;
  ethertype: number;
  /** ARP over Ethernet/IPv4: opcode (1 request, 2 reply) and addresses. */
  arp?: { op: number; senderMac: string; senderIp: string; targetIp: string };
  /** IPv4/UDP: addresses and ports. */
  udp?: { srcIp: string; dstIp: string; dstPort: number };
}

export function parseFrame(f: Uint8Array): ParsedFrame {
  const out: ParsedFrame = { dst: macText(f.subarray(0, 6)), src: macText(f.subarray(6, 12)), ethertype: (f[12] << 8) | f[13] };
  if (out.ethertype === 0x0806 && f.length >= 42) {
    out.arp = { op: (f[20] << 8) | f[21], senderMac: macText(f.subarray(22, 28)), senderIp: ipText(f.subarray(28, 32)), targetIp: ipText(f.subarray(38, 42)) };
  } else if (out.ethertype === 0x0800 && f.length >= 34 && f[23] === 17) {
    const l4 = 14 + (f[14] & 0x0f) * 4;
    if (f.length >= l4 + 4) out.udp = { srcIp: ipText(f.subarray(26, 30)), dstIp: ipText(f.subarray(30, 34)), dstPort: (f[l4 + 2] << 8) | f[l4 + 3] };
  }
  return out;
}

export interface Received {
  /** The receive queue's index. */
  queue: number;
  /** The frame without its virtio-net header. */
  bytes: Uint8Array;
  frame: ParsedFrame;
}

/**
 * Owns some receive queues: posts `buffers` receive buffers on each, takes every frame the device returns
 * (reposting a buffer for each) and keeps them all, in arrival order per queue, in {@link seen}. Waiting is on
 * the queues' call eventfds, bounded by each call's timeout. Closing the frontend ends it.
 */
export class Receiver {
  readonly seen: Received[] = [];
  private readonly taken = new Set<Received>();
  private readonly wakers = new Set<() => void>();
  private failure: Error | null = null;

  constructor(
    queues: readonly TestQueue[],
    buffers = 64,
    private readonly bufferSize = 2048,
  ) {
    for (const q of queues) {
      for (let i = 0; i < buffers; i++) q.add({ writable: [bufferSize] });
      q.kick();
      this.arm(q);
    }
  }

  private arm(q: TestQueue): void {
    q.waitForUsed(1, 600_000).then(
      ([u]) => {
        const bytes = q.written(u.chain!, u.len).subarray(NET_HDR_SIZE);
        this.seen.push({ queue: q.index, bytes, frame: parseFrame(bytes) });
        q.add({ writable: [this.bufferSize] });
        q.kick();
        this.wake();
        this.arm(q);
      },
      (e: unknown) => {
        if (e instanceof FrontendError && e.code === 'CLOSED') return;
        if (e instanceof FrontendError && e.code === 'TIMEOUT') return this.arm(q);
        this.failure = e as Error;
        this.wake();
      },
    );
  }

  private wake(): void {
    for (const w of [...this.wakers]) w();
  }

  /** Frames seen so far that match. */
  matching(pred: (f: ParsedFrame) => boolean): Received[] {
    return this.seen.filter((r) => pred(r.frame));
  }

  /**
   * The first frame that matches and was not returned by an earlier call, waiting for it up to `timeoutMs`;
   * rejects saying what came instead.
   */
  async next(what: string, pred: (f: ParsedFrame) => boolean, timeoutMs = 10_000): Promise<Received> {
    let found: Received | undefined;
    await this.until(what, () => (found = this.seen.find((r) => !this.taken.has(r) && pred(r.frame))) !== undefined, timeoutMs);
    this.taken.add(found!);
    return found!;
  }

  /** Wait until `cond()` holds, looking again after every frame, up to `timeoutMs`; rejects saying what came. */
  async until(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.failure) throw this.failure;
      if (cond()) return;
      const left = deadline - Date.now();
      if (left <= 0) {
        const got = this.seen.map((r) => `  q${r.queue}: ${JSON.stringify(r.frame)}`).join('\n') || '  nothing';
        throw new Error(`${what}: not received within ${timeoutMs} ms; received:\n${got}`);
      }
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.wakers.delete(done);
          resolve();
        };
        const timer = setTimeout(done, left);
        this.wakers.add(done);
      });
    }
  }
}

/** Why the host side cannot send UDP from a namespace here (bash's /dev/udp), or null. */
export async function bashUnavailable(): Promise<string | null> {
  const r = await run(['bash', '-c', 'exit 0'], 5_000);
  return r.code === 0 ? null : `bash is needed to send UDP from the namespace (/dev/udp): ${r.stderr.trim() || `exit ${r.code}`}`;
}

/**
 * The namespace's kernel sends one UDP datagram to each destination, in order, from one process (so they leave
 * through a single-queue tap in that order): `ip:port`, with bash's /dev/udp.
 */
export async function sendUdpFromNetns(netns: Netns, to: readonly { ip: Ip4; port: number }[]): Promise<void> {
  const script = to.map(({ ip, port }) => `printf x >/dev/udp/${ipText(ip)}/${port}`).join('; ');
  const r = await netns.exec(['bash', '-c', script]);
  if (r.code !== 0) throw new Error(`sending UDP in ${netns.name} failed (exit ${r.code}): ${r.stderr.trim()}`);
}

/** A permanent neighbour entry, so that the namespace's kernel sends to `ip` at `mac` without asking (no ARP). */
export async function addNeighbour(netns: Netns, ifname: string, ip: Ip4, mac: Mac): Promise<void> {
  const r = await run(['ip', '-n', netns.name, 'neigh', 'replace', ipText(ip), 'lladdr', macText(mac), 'dev', ifname, 'nud', 'permanent']);
  if (r.code !== 0) throw new Error(`ip neigh replace ${ipText(ip)} in ${netns.name}: ${r.stderr.trim()}`);
}

/** No IPv6 on interfaces made from now on in the namespace: no router solicitations or MLD reports in the way. */
export async function disableIpv6(netns: Netns): Promise<void> {
  // Where IPv6 is not built in there is nothing to silence: a missing file is fine.
  await netns.exec(['bash', '-c', 'for f in all default; do p=/proc/sys/net/ipv6/conf/$f/disable_ipv6; [ -e $p ] && echo 1 >$p; done; true']);
}

export interface LinkInfo {
  address: string;
  rxPackets: number;
  txPackets: number;
  /** `ip -d`'s tun details (type, multi_queue, vnet_hdr ...). */
  linkinfo: { info_kind?: string; info_data?: Record<string, unknown> } | undefined;
}

/** The interface as the namespace's kernel sees it: its MAC and packet counters (`ip -d -s -j link show`). */
export async function linkInfo(netns: Netns, ifname: string): Promise<LinkInfo> {
  const r = await run(['ip', '-n', netns.name, '-d', '-s', '-j', 'link', 'show', 'dev', ifname]);
  if (r.code !== 0) throw new Error(`ip link show ${ifname} in ${netns.name}: ${r.stderr.trim()}`);
  const [l] = JSON.parse(r.stdout) as { address: string; stats64: { rx: { packets: number }; tx: { packets: number } }; linkinfo?: LinkInfo['linkinfo'] }[];
  return { address: l.address, rxPackets: l.stats64.rx.packets, txPackets: l.stats64.tx.packets, linkinfo: l.linkinfo };
}
