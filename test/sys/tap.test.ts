import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import {
  IFF_MULTI_QUEUE,
  IFF_NO_PI,
  IFF_TAP,
  IFF_VNET_HDR,
  IovecArray,
  SysError,
  TAP_VNET_HDR_BYTES,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  TUN_F_UFO,
  addressOf,
  close,
  fdCount,
  openTap,
  readv,
  setTapOffload,
  tapInfo,
  writev,
  type Tap,
} from '../../src/sys/index.js';
import { createNetns, netnsUnavailable, run, tunUnavailable, type Netns } from '../net/netns.js';


const skipReason = tunUnavailable() ?? (await netnsUnavailable());
if (skipReason !== null) console.warn(`tap tests skipped: ${skipReason}`);

// Everything we create is named vts*: taps vts<pid>t<n>, namespaces vtstap<pid>-<n>.
let tapCounter = 0;
const tapName = () => `vts${process.pid % 100_000}t${tapCounter++}`;

const OUR_MAC = [0x02, 0x76, 0x74, 0x73, 0x00, 0x02];
const BROADCAST = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
const OUR_IP = [10, 213, 0, 2];
const NS_IP = [10, 213, 0, 1];
const ETH_ARP = 0x0806;
const ETH_IP = 0x0800;
const ETH_HDR = 14;
const IP_HDR = 20;
const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function onesSum(bytes: Uint8Array, start: number, end: number, seed = 0): number {
  let sum = seed;
  for (let i = start; i < end; i += 2) sum += (bytes[i] << 8) | (i + 1 < end ? bytes[i + 1] : 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return sum;
}

function pseudoHeaderSum(src: number[], dst: number[], protocol: number, length: number): number {
  const header = new Uint8Array([...src, ...dst, 0, protocol, length >> 8, length & 0xff]);
  return onesSum(header, 0, header.length);
}

function ethernet(dst: number[], type: number, payload: number[]): Uint8Array {
  return new Uint8Array([...dst, ...OUR_MAC, type >> 8, type & 0xff, ...payload]);
}

function arp(op: number, targetMac: number[], targetIp: number[]): number[] {
  return [0, 1, 0x08, 0x00, 6, 4, 0, op, ...OUR_MAC, ...OUR_IP, ...targetMac, ...targetIp];
}

function ipv4(dstMac: number[], protocol: number, payload: Uint8Array): Uint8Array {
  const total = IP_HDR + payload.length;
  const frame = ethernet(dstMac, ETH_IP, [
    0x45, 0, total >> 8, total & 0xff, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0, ...OUR_IP, ...NS_IP,
    ...payload,
  ]);
  const checksum = ~onesSum(frame, ETH_HDR, ETH_HDR + IP_HDR) & 0xffff;
  frame[ETH_HDR + 10] = checksum >> 8;
  frame[ETH_HDR + 11] = checksum & 0xff;
  return frame;
}

function icmpEcho(id: number, seq: number, data: number[]): Uint8Array {
  const icmp = new Uint8Array([8, 0, 0, 0, id >> 8, id & 0xff, seq >> 8, seq & 0xff, ...data]);
  const checksum = ~onesSum(icmp, 0, icmp.length) & 0xffff;
  icmp[2] = checksum >> 8;
  icmp[3] = checksum & 0xff;
  return icmp;
}

function udp(srcPort: number, dstPort: number, data: number[]): Uint8Array {
  const length = 8 + data.length;
  return new Uint8Array([srcPort >> 8, srcPort & 0xff, dstPort >> 8, dstPort & 0xff, length >> 8, length & 0xff, 0, 0, ...data]);
}

const u16 = (bytes: Uint8Array, at: number) => (bytes[at] << 8) | bytes[at + 1];
const le16 = (bytes: Uint8Array, at: number) => bytes[at] | (bytes[at + 1] << 8);
const slice = (bytes: Uint8Array, at: number, length: number) => [...bytes.subarray(at, at + length)];

/** A tap with the vnet header plus the preallocated buffers a device would use: header and frame in separate iovecs. */
class TapPort {
  readonly hdrIn = new Uint8Array(TAP_VNET_HDR_BYTES);
  readonly frameIn = new Uint8Array(2048);
  readonly hdrOut = new Uint8Array(TAP_VNET_HDR_BYTES);
  private readonly iov = new IovecArray(2);

  constructor(readonly tap: Tap) {}

  send(frame: Uint8Array, hdr: Uint8Array = new Uint8Array(TAP_VNET_HDR_BYTES)): void {
    this.hdrOut.set(hdr);
    this.iov.set(0, addressOf(this.hdrOut), TAP_VNET_HDR_BYTES);
    this.iov.set(1, addressOf(frame), frame.length);
    expect(writev(this.tap.fd, this.iov, 2)).toBe(TAP_VNET_HDR_BYTES + frame.length);
  }

  /**
   * Reads frames until match accepts one; answers the namespace's ARP requests for our address on the way
   * (its IPv6 autoconfiguration chatter is skipped).
   */
  async receive(match: (frame: Uint8Array, hdr: Uint8Array) => boolean, timeoutMs = 5_000): Promise<{ hdr: Uint8Array; frame: Uint8Array }> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      this.hdrIn.fill(0xee);
      this.iov.set(0, addressOf(this.hdrIn), TAP_VNET_HDR_BYTES);
      this.iov.set(1, addressOf(this.frameIn), this.frameIn.length);
      const n = readv(this.tap.fd, this.iov, 2);
      if (n < 0) {
        await sleep(5);
        continue;
      }
      expect(n).toBeGreaterThan(TAP_VNET_HDR_BYTES + ETH_HDR);
      const frame = this.frameIn.slice(0, n - TAP_VNET_HDR_BYTES);
      const hdr = this.hdrIn.slice();
      if (u16(frame, 12) === ETH_ARP && u16(frame, 20) === 1 && slice(frame, 38, 4).join() === OUR_IP.join()) {
        this.send(ethernet(slice(frame, 6, 6), ETH_ARP, arp(2, slice(frame, 6, 6), slice(frame, 28, 4))));
      }
      if (match(frame, hdr)) return { hdr, frame };
    }
    throw new Error(`no matching frame on ${this.tap.name} within ${timeoutMs} ms`);
  }
}

/** A vnet-hdr tap moved into a fresh namespace as 10.213.0.1/24 and brought up; everything removed afterwards. */
async function withTapInNetns(body: (port: TapPort, netns: Netns) => Promise<void>): Promise<void> {
  const tap = openTap(tapName(), { vnetHdr: true });
  let tapOpen = true;
  let netns: Netns | undefined;
  try {
    netns = await createNetns('vtstap');
    await netns.moveLink(tap.name);
    await netns.addAddress(tap.name, '10.213.0.1/24');
    await netns.setLinkUp(tap.name, true);
    await body(new TapPort(tap), netns);
    close(tap.fd);
    tapOpen = false;
    // Non-persistent: the last fd going away unregisters the interface (inside the namespace).
    expect(await netns.hasLink(tap.name)).toBe(false);
  } finally {
    if (tapOpen) close(tap.fd);
    await netns?.close();
  }
}

async function hostHasLink(name: string): Promise<boolean> {
  return (await run(['ip', '-o', 'link', 'show', 'dev', name])).code === 0;
}

async function nsMac(netns: Netns, ifname: string): Promise<number[]> {
  const result = await netns.exec(['ip', '-j', 'link', 'show', 'dev', ifname]);
  expect(result.code).toBe(0);
  const [link] = JSON.parse(result.stdout) as { address: string }[];
  return link.address.split(':').map((x) => parseInt(x, 16));
}

async function udpCounter(netns: Netns, field: string): Promise<number> {
  const result = await netns.exec(['cat', '/proc/net/snmp']);
  const lines = result.stdout.split('\n').filter((line) => line.startsWith('Udp: '));
  const names = lines[0].split(/\s+/);
  return Number(lines[1].split(/\s+/)[names.indexOf(field)]);
}

describe.skipIf(skipReason !== null)(`tap${skipReason === null ? '' : ` (skipped: ${skipReason})`}`, () => {
  it('creates a vnet-hdr tap that the kernel reports as such and removes it when the fd closes', async () => {
    const before = fdCount();
    const name = tapName();
    const tap = openTap(name, { vnetHdr: true });
    try {
      expect(tap.name).toBe(name);
      const info = tapInfo(tap.fd);
      expect(info.name).toBe(name);
      expect(info.flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)).toBe(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
      expect(info.vnetHdrBytes).toBe(12);
      expect(await hostHasLink(name)).toBe(true);
      // Nothing queued on a link that is down: non-blocking read reports EAGAIN as -1.
      const iov = new IovecArray(1);
      const buf = new Uint8Array(64);
      iov.set(0, addressOf(buf), buf.length);
      expect(readv(tap.fd, iov, 1)).toBe(-1);
      expect(() => readv(tap.fd, iov, 2)).toThrow(RangeError);
    } finally {
      close(tap.fd);
    }
    expect(await hostHasLink(name)).toBe(false);
    expect(fdCount()).toBe(before);
  });

  it('adds queues to a multi-queue tap; a single-queue tap in use refuses a second open', async () => {
    const before = fdCount();
    const name = tapName();
    const first = openTap(name, { vnetHdr: true, multiQueue: true });
    const fds = [first.fd];
    try {
      const second = openTap(name, { vnetHdr: true, multiQueue: true });
      fds.push(second.fd);
      expect(second.name).toBe(name);
      expect(tapInfo(second.fd).flags & IFF_MULTI_QUEUE).toBe(IFF_MULTI_QUEUE);
      // Mixing queue modes is rejected, and the failed open leaves no fd behind.
      const mixed = fdCount();
      expect(() => openTap(name, { vnetHdr: true })).toThrow(/TUNSETIFF.*EINVAL/);
      expect(fdCount()).toBe(mixed);

      close(fds.shift()!);
      expect(await hostHasLink(name)).toBe(true);
    } finally {
      for (const fd of fds) close(fd);
    }
    expect(await hostHasLink(name)).toBe(false);

    const single = openTap(tapName(), { vnetHdr: false });
    try {
      expect(tapInfo(single.fd).flags & IFF_VNET_HDR).toBe(0);
      let error: unknown;
      try {
        openTap(single.name, { vnetHdr: false });
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(SysError);
      expect((error as SysError).code).toBe('EBUSY');
      expect((error as SysError).syscall).toBe('ioctl(TUNSETIFF)');
    } finally {
      close(single.fd);
    }
    expect(() => openTap('vts-name-too-long', { vnetHdr: true })).toThrow(/ENAMETOOLONG/);
    expect(fdCount()).toBe(before);
  });

  it('accepts TUNSETOFFLOAD flags and rejects unknown ones', () => {
    const tap = openTap(tapName(), { vnetHdr: true });
    try {
      setTapOffload(tap.fd, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO);
      setTapOffload(tap.fd, TUN_F_CSUM);
      setTapOffload(tap.fd, 0);
      expect(() => setTapOffload(tap.fd, 0x8000)).toThrow(/TUNSETOFFLOAD.*EINVAL/);
    } finally {
      close(tap.fd);
    }
  });

  it('answers an ARP request and an ICMP echo written with a 12-byte virtio-net header', async () => {
    await withTapInNetns(async (port, netns) => {
      const nsMacAddress = await nsMac(netns, port.tap.name);

      port.send(ethernet(BROADCAST, ETH_ARP, arp(1, [0, 0, 0, 0, 0, 0], NS_IP)));
      const reply = await port.receive((f) => u16(f, 12) === ETH_ARP && u16(f, 20) === 2);
      expect(slice(reply.hdr, 0, 10)).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
      expect(slice(reply.frame, 0, 6)).toEqual(OUR_MAC);
      expect(slice(reply.frame, 6, 6)).toEqual(nsMacAddress);
      expect(slice(reply.frame, 22, 6)).toEqual(nsMacAddress); // sender hardware address
      expect(slice(reply.frame, 28, 4)).toEqual(NS_IP);
      expect(slice(reply.frame, 32, 6)).toEqual(OUR_MAC);
      expect(slice(reply.frame, 38, 4)).toEqual(OUR_IP);

      const data = Array.from({ length: 56 }, (_, i) => i);
      port.send(ipv4(nsMacAddress, 1, icmpEcho(0x7674, 1, data)));
      const echo = await port.receive((f) => u16(f, 12) === ETH_IP && f[ETH_HDR + 9] === 1 && f[ETH_HDR + IP_HDR] === 0);
      expect(slice(echo.hdr, 0, 10)).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
      const icmp = ETH_HDR + IP_HDR;
      expect(slice(echo.frame, ETH_HDR + 12, 4)).toEqual(NS_IP);
      expect(slice(echo.frame, ETH_HDR + 16, 4)).toEqual(OUR_IP);
      expect(u16(echo.frame, icmp + 4)).toBe(0x7674);
      expect(u16(echo.frame, icmp + 6)).toBe(1);
      expect(slice(echo.frame, icmp + 8, data.length)).toEqual(data);
      expect(onesSum(echo.frame, icmp, echo.frame.length)).toBe(0xffff);
    });
  });

  it('passes checksum offload through the header in both directions once TUN_F_CSUM is set', async () => {
    await withTapInNetns(async (port, netns) => {
      const nsMacAddress = await nsMac(netns, port.tap.name);
      const sendFromNs = (port: number) =>
        netns.exec(['bash', '-c', `printf vhost-ts > /dev/udp/${OUR_IP.join('.')}/${port}`]);
      const isUdpTo = (dstPort: number) => (f: Uint8Array) =>
        u16(f, 12) === ETH_IP && f[ETH_HDR + 9] === 17 && u16(f, ETH_HDR + IP_HDR + 2) === dstPort;

      // Default offloads: the kernel checksums in software and the header says nothing.
      expect((await sendFromNs(7001)).code).toBe(0);
      const plain = await port.receive(isUdpTo(7001));
      expect(plain.hdr[0]).toBe(0);
      const udpAt = ETH_HDR + IP_HDR;
      const udpLength = u16(plain.frame, udpAt + 4);
      const seed = pseudoHeaderSum(NS_IP, OUR_IP, 17, udpLength);
      expect(onesSum(plain.frame, udpAt, udpAt + udpLength, seed)).toBe(0xffff);

      // With TUN_F_CSUM the kernel hands over a partial checksum and where to finish it.
      setTapOffload(port.tap.fd, TUN_F_CSUM);
      expect((await sendFromNs(7002)).code).toBe(0);
      const partial = await port.receive(isUdpTo(7002));
      expect(partial.hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM).toBe(VIRTIO_NET_HDR_F_NEEDS_CSUM);
      const csumStart = le16(partial.hdr, 6);
      const csumOffset = le16(partial.hdr, 8);
      expect([csumStart, csumOffset]).toEqual([udpAt, 6]);
      const finished = ~onesSum(partial.frame, csumStart, partial.frame.length) & 0xffff;
      partial.frame[csumStart + csumOffset] = finished >> 8;
      partial.frame[csumStart + csumOffset + 1] = finished & 0xff;
      expect(onesSum(partial.frame, udpAt, udpAt + u16(partial.frame, udpAt + 4), seed)).toBe(0xffff);

      // Toward the namespace: a bad checksum without NEEDS_CSUM is dropped as a checksum error...
      const payload = [...Buffer.from('to the namespace')];
      const closedPort = 9;
      const bad = ipv4(nsMacAddress, 17, udp(41000, closedPort, payload));
      bad[udpAt + 6] = 0x12;
      bad[udpAt + 7] = 0x34;
      const errorsBefore = await udpCounter(netns, 'InCsumErrors');
      port.send(bad);
      const deadline = Date.now() + 5_000;
      while ((await udpCounter(netns, 'InCsumErrors')) === errorsBefore && Date.now() < deadline) await sleep(20);
      expect(await udpCounter(netns, 'InCsumErrors')).toBe(errorsBefore + 1);

      // ...while the same datagram with NEEDS_CSUM and the pseudo-header seed is taken in, and the closed
      // port answers with an ICMP port unreachable quoting our datagram.
      const good = ipv4(nsMacAddress, 17, udp(41001, closedPort, payload));
      const datagramLength = 8 + payload.length;
      const partialSeed = pseudoHeaderSum(OUR_IP, NS_IP, 17, datagramLength);
      good[udpAt + 6] = partialSeed >> 8;
      good[udpAt + 7] = partialSeed & 0xff;
      const hdr = new Uint8Array(TAP_VNET_HDR_BYTES);
      hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
      hdr[6] = udpAt; // csum_start, little-endian
      hdr[8] = 6; // csum_offset
      port.send(good, hdr);
      const unreachable = await port.receive(
        (f) => u16(f, 12) === ETH_IP && f[ETH_HDR + 9] === 1 && f[ETH_HDR + IP_HDR] === 3,
      );
      const icmp = ETH_HDR + IP_HDR;
      expect(unreachable.frame[icmp + 1]).toBe(3); // port unreachable
      const quotedUdp = icmp + 8 + IP_HDR;
      expect(u16(unreachable.frame, quotedUdp)).toBe(41001);
      expect(u16(unreachable.frame, quotedUdp + 2)).toBe(closedPort);
    });
  });

  it('sets the link up and down by ioctl, and names a tap in the namespace it is opened in', async () => {
    const netns = await createNetns('vtstap');
    try {
      // A child inside the namespace, so that the kernel-named tapN never appears outside it.
      const tapModule = fileURLToPath(new URL('../../src/sys/tap.ts', import.meta.url));
      const script = `
        import { execFileSync, spawnSync } from 'node:child_process';
        const { openTap, setTapLinkUp } = await import(${JSON.stringify(tapModule)});
        const { close } = await import(${JSON.stringify(tapModule.replace(/tap\.ts$/, 'fd.ts'))});
        const show = (name) => execFileSync('ip', ['-o', 'link', 'show', 'dev', name], { encoding: 'utf8' });
        const tap = openTap('', { vnetHdr: true });
        const initial = show(tap.name);
        setTapLinkUp(tap.name, true);
        const up = show(tap.name);
        setTapLinkUp(tap.name, false);
        const down = show(tap.name);
        close(tap.fd);
        const gone = spawnSync('ip', ['link', 'show', 'dev', tap.name]).status !== 0;
        console.log(JSON.stringify({ name: tap.name, initial, up, down, gone }));
      `;
      const result = await netns.exec([process.execPath, '--import', 'tsx', '--input-type=module', '-e', script], 20_000);
      expect(result.stderr).toBe('');
      expect(result.code).toBe(0);
      const out = JSON.parse(result.stdout) as { name: string; initial: string; up: string; down: string; gone: boolean };
      const flags = (line: string) => /<([^>]*)>/.exec(line)![1].split(',');
      expect(out.name).toMatch(/^tap\d+$/);
      expect(flags(out.initial)).not.toContain('UP');
      expect(flags(out.up)).toContain('UP');
      expect(flags(out.down)).not.toContain('UP');
      expect(out.gone).toBe(true);
    } finally {
      await netns.close();
    }
  });
});
