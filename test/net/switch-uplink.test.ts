// The built-in switch's tap uplink, from outside: `vhost-ts net --switch --uplink TAP` runs as a process of its
// own inside a namespace made for the test, two guest ports are driven by our test frontend, and the namespace's
// kernel is the host on the far side of the uplink. It answers the ports' ARP requests and sends them UDP, so
// every assertion is about frames that really crossed the tap, both ways: broadcasts leave through the uplink,
// frames from the host reach only the port whose address the switch learned (and unknown ones flood), and a
// downed uplink drops frames without breaking the guests' queues, which carry on once the link is back.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/index.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { eventfdRead } from '../../src/sys/index.js';
import { startBackend, vhostTsBin, type BackendProcess } from '../helpers/backend-process.js';
import {
  addNeighbour,
  arpRequest,
  bashUnavailable,
  disableIpv6,
  ipText,
  linkInfo,
  macText,
  Receiver,
  sendUdpFromNetns,
  withNetHeader,
  type ParsedFrame,
} from './frames.js';
import { createNetns, netnsUnavailable, tunUnavailable, type Netns } from './netns.js';

const skipReason = tunUnavailable() ?? (await netnsUnavailable()) ?? (await bashUnavailable());
if (skipReason !== null) console.warn(`SKIPPED: switch uplink tests: ${skipReason}`);

// The tap lives only in the test's namespace (the backend is started inside it), so the name cannot collide.
const TAP = 'vtsuplink0';
const HOST_IP = [10, 213, 9, 1];
const MAC_A = [0x52, 0x54, 0x00, 0x76, 0x75, 0x0a];
const MAC_B = [0x52, 0x54, 0x00, 0x76, 0x75, 0x0b];
const IP_A = [10, 213, 9, 10];
const IP_B = [10, 213, 9, 11];
/** An address the namespace's kernel sends to at a MAC no port has: unknown unicast for the switch. */
const IP_NOBODY = [10, 213, 9, 99];
const MAC_NOBODY = [0x52, 0x54, 0x00, 0x76, 0x75, 0xee];
/** No offloads (bits 0-14): the kernel's frames come whole, with plain headers. */
const NO_OFFLOADS = ~((1n << 15n) - 1n);

const isArpReply = (to: readonly number[], targetIp: readonly number[]) => (f: ParsedFrame) =>
  f.arp?.op === 2 && f.dst === macText(to) && f.arp.senderIp === ipText(HOST_IP) && f.arp.targetIp === ipText(targetIp);
const isArpRequestFrom = (mac: readonly number[]) => (f: ParsedFrame) => f.arp?.op === 1 && f.src === macText(mac);
const isUdpTo = (port: number) => (f: ParsedFrame) => f.udp?.dstPort === port;

interface Port {
  fe: VhostUserFrontend;
  rx: TestQueue;
  tx: TestQueue;
  recv: Receiver;
}

describe.skipIf(skipReason !== null)('vhost-ts net --switch with a tap --uplink, in a namespace of its own', () => {
  let dir: string;
  let netns: Netns;
  let backend: BackendProcess;
  let ctl: ControlClient;
  let a: Port;
  let b: Port;
  let tapMac: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-uplink-'));
    netns = await createNetns('vtsup');
    await disableIpv6(netns);
    const sockets = [join(dir, 'a.sock'), join(dir, 'b.sock')];
    const args = [vhostTsBin, 'net', '--switch', 'sw0', '--uplink', TAP, '--mac', macText(MAC_A), '--mac', macText(MAC_B)];
    for (const s of sockets) args.push('--socket-path', s);
    args.push('--control', join(dir, 'ctl.sock'));
    backend = await startBackend(args, (log) => log.includes('control API on'), 30_000, ['ip', 'netns', 'exec', netns.name]);
    expect(await netns.hasLink(TAP), `the backend made the uplink tap ${TAP} in its namespace:\n${backend.log()}`).toBe(true);
    await netns.addAddress(TAP, `${ipText(HOST_IP)}/24`);
    await netns.setLinkUp(TAP, true);
    tapMac = (await linkInfo(netns, TAP)).address;
    const port = async (socket: string): Promise<Port> => {
      const fe = await VhostUserFrontend.connect(socket);
      const [rx, tx] = await fe.start({ features: NO_OFFLOADS, queues: [0, 1].map((index) => ({ index, size: 256 })) });
      // The ports stay promiscuous (the device's default; the test frontend never sends CTRL_RX), so a frame
      // missing from a port was withheld by the switch's learning, not by the port's receive filter.
      return { fe, rx, tx, recv: new Receiver([rx]) };
    };
    a = await port(sockets[0]);
    b = await port(sockets[1]);
    ctl = await ControlClient.connect(join(dir, 'ctl.sock'));
  }, 60_000);

  afterAll(async () => {
    ctl?.close();
    a?.fe.close();
    b?.fe.close();
    await backend?.kill();
    await netns?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** Transmit frames on a port; resolves once the switch has returned every chain (forwarded or dropped). */
  async function send(p: Port, frames: Uint8Array[]): Promise<void> {
    for (const f of frames) p.tx.add({ readable: [withNetHeader(f)] });
    p.tx.kick();
    await p.tx.waitForUsed(frames.length, 10_000);
  }

  /** Permanent neighbour entries on the host for the ports and for nobody (taking the link down flushes them). */
  async function hostKnowsPorts(): Promise<void> {
    await addNeighbour(netns, TAP, IP_A, MAC_A);
    await addNeighbour(netns, TAP, IP_B, MAC_B);
    await addNeighbour(netns, TAP, IP_NOBODY, MAC_NOBODY);
  }

  async function brokenQueues(): Promise<string[]> {
    const answer = (await ctl.call({ stats: {} })) as { stats: { frontends: { endpoint: string; queues: { index: number; broken: boolean }[] }[] } };
    return answer.stats.frontends.flatMap((f) => f.queues.filter((q) => q.broken).map((q) => `${f.endpoint} queue ${q.index}`));
  }

  it('a broadcast from a port leaves through the uplink (the host kernel answers it) and floods to the other port', async () => {
    const before = await linkInfo(netns, TAP);
    await send(a, [arpRequest(MAC_A, IP_A, HOST_IP)]);
    const reply = await a.recv.next(`the host's ARP reply to port A`, isArpReply(MAC_A, IP_A));
    expect(reply.frame.src, 'the reply came from the tap: the host kernel answered').toBe(tapMac);
    await b.recv.next(`port A's broadcast, flooded to port B`, isArpRequestFrom(MAC_A));
    const after = await linkInfo(netns, TAP);
    expect(after.rxPackets - before.rxPackets, 'the host received the broadcast through the tap').toBeGreaterThanOrEqual(1);
    expect(after.txPackets - before.txPackets, 'and sent its reply through it').toBeGreaterThanOrEqual(1);
  });

  it('frames from the host reach only the port whose MAC the switch learned; unknown unicast floods to both', async () => {
    // B speaks once too, so that the switch knows both ports (A did in the test before; say it again anyway).
    await send(a, [arpRequest(MAC_A, IP_A, HOST_IP)]);
    await a.recv.next('ARP reply to A', isArpReply(MAC_A, IP_A));
    await send(b, [arpRequest(MAC_B, IP_B, HOST_IP)]);
    await b.recv.next('ARP reply to B', isArpReply(MAC_B, IP_B));

    const table = ((await ctl.call({ macTable: {} })) as { macTable: { entries: { mac: string; port: string }[] } }).macTable.entries;
    const portOf = (mac: string) => table.find((e) => e.mac === mac)?.port ?? '(not learned)';
    expect(portOf(macText(MAC_A)), JSON.stringify(table)).toContain(macText(MAC_A));
    expect(portOf(macText(MAC_B)), JSON.stringify(table)).toContain(macText(MAC_B));
    expect(portOf(tapMac), `the host's MAC is learned on the uplink: ${JSON.stringify(table)}`).toContain(TAP);

    // The host sends, in this order, from one process through the single-queue tap: to A, to B, to nobody.
    await hostKnowsPorts();
    await sendUdpFromNetns(netns, [
      { ip: IP_A, port: 4001 },
      { ip: IP_B, port: 4002 },
      { ip: IP_NOBODY, port: 4003 },
    ]);
    expect((await a.recv.next('UDP from the host to A', isUdpTo(4001))).frame.dst).toBe(macText(MAC_A));
    expect((await b.recv.next('UDP from the host to B', isUdpTo(4002))).frame.dst).toBe(macText(MAC_B));
    // Unknown unicast floods: both ports get it, and as it came last, whatever the switch sent either port
    // before it has arrived too.
    await a.recv.next('UDP to an unknown MAC, flooded to A', isUdpTo(4003));
    await b.recv.next('UDP to an unknown MAC, flooded to B', isUdpTo(4003));

    const strays = (p: Port, other: readonly number[]) => p.recv.matching((f) => f.dst === macText(other)).map((r) => JSON.stringify(r.frame));
    expect(strays(b, MAC_A), 'frames for A that reached B').toEqual([]);
    expect(strays(a, MAC_B), 'frames for B that reached A').toEqual([]);
    expect(a.recv.matching(isUdpTo(4001))).toHaveLength(1);
    expect(b.recv.matching(isUdpTo(4002))).toHaveLength(1);
  });

  it('with the uplink down frames to it are dropped, the guests carry on, and traffic resumes once it is up', async () => {
    for (let round = 0; round < 2; round++) {
      await netns.setLinkUp(TAP, false);
      const before = await linkInfo(netns, TAP);
      const flooded = b.recv.matching(isArpRequestFrom(MAC_A)).length;
      // Returned chains mean the switch has forwarded them, the uplink's copy included (it copies from them).
      await send(a, Array.from({ length: 20 }, () => arpRequest(MAC_A, IP_A, HOST_IP)));
      // The switch still switches between its ports.
      await b.recv.until('the 20 broadcasts from A, flooded to B while the uplink is down', () => b.recv.matching(isArpRequestFrom(MAC_A)).length - flooded >= 20);
      const down = await linkInfo(netns, TAP);
      expect(down.rxPackets - before.rxPackets, 'the host received nothing while its link was down').toBe(0);

      for (const q of [a.rx, a.tx, b.rx, b.tx]) expect(eventfdRead(q.errFd), `queue ${q.index}'s error eventfd`).toBe(0);
      expect(await brokenQueues()).toEqual([]);

      const replies = a.recv.matching(isArpReply(MAC_A, IP_A)).length;
      await netns.setLinkUp(TAP, true);
      // Every earlier reply to A was taken by an earlier next(): this one is the answer to the request below.
      await send(a, [arpRequest(MAC_A, IP_A, HOST_IP)]);
      await a.recv.next(`the host's ARP reply once the uplink is up again (round ${round})`, isArpReply(MAC_A, IP_A));
      // And the host reaches the ports again on its own initiative (its neighbour table went with the link).
      // The datagram to A leaves the host after any answer to the 20 requests would have: once it is in, A
      // would have those too.
      await hostKnowsPorts();
      await sendUdpFromNetns(netns, [{ ip: IP_B, port: 4100 + round }, { ip: IP_A, port: 4200 + round }]);
      await b.recv.next(`UDP from the host to B after the uplink came back (round ${round})`, isUdpTo(4100 + round));
      await a.recv.next(`UDP from the host to A after the uplink came back (round ${round})`, isUdpTo(4200 + round));
      expect(a.recv.matching(isArpReply(MAC_A, IP_A)).length - replies, 'the 20 requests were dropped, not held and sent later').toBe(1);
    }
    expect(await brokenQueues()).toEqual([]);
    for (const q of [a.rx, a.tx, b.rx, b.tx]) expect(eventfdRead(q.errFd), `queue ${q.index}'s error eventfd`).toBe(0);
    expect(backend.log(), 'no queue was stopped').not.toMatch(/queue stopped/);
  }, 60_000);
});
