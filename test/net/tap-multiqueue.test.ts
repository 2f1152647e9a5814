// A multi-queue tap from outside: `vhost-ts net --tap NAME --queues 4` runs as a process of its own inside a
// namespace made for the test, our test frontend negotiates MQ and drives all four queue pairs and the control
// queue, and the namespace's kernel is the peer. Each pair's transmit queue reaches the kernel (it answers an ARP
// request sent on each), and what the kernel sends arrives on whichever receive queues the tap steers it to,
// none lost. Then what happens on pairs the driver has not activated: beyond VQ_PAIRS_SET, and rings disabled
// with SET_VRING_ENABLE 0 (how QEMU retires the pairs a guest stopped using).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/index.js';
import {
  VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
  VIRTIO_NET_ERR,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_OK,
} from '../../src/devices/net/spec.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { eventfdRead } from '../../src/sys/index.js';
import { startBackend, vhostTsBin, type BackendProcess } from '../helpers/backend-process.js';
import { addNeighbour, arpRequest, bashUnavailable, disableIpv6, ipText, linkInfo, macText, Receiver, sendUdpFromNetns, withNetHeader, type ParsedFrame } from './frames.js';
import { createNetns, netnsUnavailable, tunUnavailable, type Netns } from './netns.js';

const skipReason = tunUnavailable() ?? (await netnsUnavailable()) ?? (await bashUnavailable());
if (skipReason !== null) console.warn(`SKIPPED: multi-queue tap tests: ${skipReason}`);

const TAP = 'vtsmq0';
const PAIRS = 4;
const CTRL = 2 * PAIRS;
const HOST_IP = [10, 213, 10, 1];
const GUEST_IP = [10, 213, 10, 2];
const MAC = [0x52, 0x54, 0x00, 0x76, 0x76, 0x01];
/** No offloads (bits 0-14): the kernel's frames come whole, with plain headers. MQ and CTRL_VQ stay. */
const NO_OFFLOADS = ~((1n << 15n) - 1n);
const bit = (n: number) => 1n << BigInt(n);

/** The sender address a pair's ARP request uses, so that the kernel's reply says which pair it answers. */
const pairIp = (pair: number, round: number) => [10, 213, 10, 10 + 10 * round + pair];
const isArpReplyFor = (ip: readonly number[]) => (f: ParsedFrame) => f.arp?.op === 2 && f.dst === macText(MAC) && f.arp.targetIp === ipText(ip);

describe.skipIf(skipReason !== null)('vhost-ts net --tap --queues 4: a multi-queue tap, in a namespace of its own', () => {
  let dir: string;
  let netns: Netns;
  let backend: BackendProcess;
  let ctl: ControlClient;
  let fe: VhostUserFrontend;
  let queues: TestQueue[];
  let recv: Receiver;
  const rxOf = (pair: number) => queues[2 * pair];
  const txOf = (pair: number) => queues[2 * pair + 1];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-tapmq-'));
    netns = await createNetns('vtsmq');
    await disableIpv6(netns);
    const socket = join(dir, 'net.sock');
    const args = [vhostTsBin, 'net', '--tap', TAP, '--queues', String(PAIRS), '--mac', macText(MAC), '--socket-path', socket, '--control', join(dir, 'ctl.sock')];
    backend = await startBackend(args, (log) => log.includes('control API on'), 30_000, ['ip', 'netns', 'exec', netns.name]);
    fe = await VhostUserFrontend.connect(socket);
    queues = await fe.start({
      features: NO_OFFLOADS,
      queues: Array.from({ length: CTRL + 1 }, (_, index) => ({ index, size: index === CTRL ? 64 : 256 })),
    });
    // The pairs' workers opened their queues of the tap, in the backend's namespace.
    expect(await netns.hasLink(TAP), `the backend made ${TAP} in its namespace:\n${backend.log()}`).toBe(true);
    await netns.addAddress(TAP, `${ipText(HOST_IP)}/24`);
    await netns.setLinkUp(TAP, true);
    await addNeighbour(netns, TAP, GUEST_IP, MAC);
    recv = new Receiver(Array.from({ length: PAIRS }, (_, p) => rxOf(p)), 128);
    ctl = await ControlClient.connect(join(dir, 'ctl.sock'));
  }, 60_000);

  afterAll(async () => {
    ctl?.close();
    fe?.close();
    await backend?.kill();
    await netns?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue; resolves with the device's ack byte. */
  async function setPairs(n: number): Promise<number> {
    const ctrl = queues[CTRL];
    ctrl.add({ readable: [new Uint8Array([VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, n & 0xff, n >> 8])], writable: [1] });
    ctrl.kick();
    const [u] = await ctrl.waitForUsed(1);
    return ctrl.written(u.chain!, u.len)[u.len - 1];
  }

  /** Per queue index: chains completed and whether it is broken (the control API's stats). */
  async function queueStats(): Promise<Map<number, { chains: number; broken: boolean }>> {
    const answer = (await ctl.call({ stats: {} })) as { stats: { frontends: { queues: { index: number; chains: number; broken: boolean }[] }[] } };
    return new Map(answer.stats.frontends[0].queues.map((q) => [q.index, q]));
  }

  /** The kernel sends `n` UDP datagrams to the guest, each its own flow (ports from `base`); all must arrive. */
  async function udpFlows(base: number, n: number): Promise<Map<number, number>> {
    await sendUdpFromNetns(netns, Array.from({ length: n }, (_, i) => ({ ip: GUEST_IP, port: base + i })));
    const mine = (f: ParsedFrame) => f.udp !== undefined && f.udp.dstPort >= base && f.udp.dstPort < base + n;
    await recv.until(`${n} datagrams from the kernel (ports ${base}+)`, () => new Set(recv.matching(mine).map((r) => r.frame.udp!.dstPort)).size === n);
    const got = recv.matching(mine);
    expect(got, 'each datagram exactly once').toHaveLength(n);
    const perQueue = new Map<number, number>();
    for (const r of got) perQueue.set(r.queue, (perQueue.get(r.queue) ?? 0) + 1);
    return perQueue;
  }

  it('offers MQ with 4 pairs, opens the tap with a queue per pair (attached once VQ_PAIRS_SET turns the pair on), and takes VQ_PAIRS_SET 1..4', async () => {
    expect(fe.features! & bit(VIRTIO_NET_F_MQ), 'MQ negotiated').not.toBe(0n);
    expect(fe.features! & bit(VIRTIO_NET_F_CTRL_VQ), 'CTRL_VQ negotiated').not.toBe(0n);
    expect(new DataView((await fe.getConfig(8, 2)).buffer).getUint16(0, true), 'max_virtqueue_pairs').toBe(PAIRS);
    const tun = (await linkInfo(netns, TAP)).linkinfo?.info_data ?? {};
    expect(tun.multi_queue, `IFF_MULTI_QUEUE: ${JSON.stringify(tun)}`).toBe(true);
    const sysQueues = async () => (await netns.exec(['ls', `/sys/class/net/${TAP}/queues`])).stdout.split(/\s+/).filter((q) => q.startsWith('tx-')).sort();
    // Before VQ_PAIRS_SET only the first pair receives (virtio 1.2 §5.1.6.5.5): the others' tap queues are detached.
    expect(await sysQueues(), 'only the first pair attached before VQ_PAIRS_SET').toEqual(['tx-0']);
    expect(await setPairs(0)).toBe(VIRTIO_NET_ERR);
    expect(await setPairs(PAIRS + 1)).toBe(VIRTIO_NET_ERR);
    expect(await setPairs(PAIRS)).toBe(VIRTIO_NET_OK);
    // The control queue attaches them as it acks (TUNSETQUEUE), before the driver's next frame.
    expect(await sysQueues(), 'one tap queue attached per pair').toEqual(['tx-0', 'tx-1', 'tx-2', 'tx-3']);
  });

  it("each pair's transmit queue reaches the kernel, and every reply comes back on some receive queue", async () => {
    const before = await queueStats();
    for (let p = 0; p < PAIRS; p++) {
      txOf(p).add({ readable: [withNetHeader(arpRequest(MAC, pairIp(p, 0), HOST_IP))] });
      txOf(p).kick();
    }
    for (let p = 0; p < PAIRS; p++) await txOf(p).waitForUsed(1, 10_000);
    const where: string[] = [];
    for (let p = 0; p < PAIRS; p++) {
      const reply = await recv.next(`the kernel's reply to the request sent on pair ${p}`, isArpReplyFor(pairIp(p, 0)));
      where.push(`pair ${p} -> rx queue ${reply.queue}`);
    }
    console.info(`multi-queue tap: ARP replies: ${where.join(', ')}`);
    const after = await queueStats();
    for (let p = 0; p < PAIRS; p++) expect(after.get(2 * p + 1)!.chains - before.get(2 * p + 1)!.chains, `transmit queue ${2 * p + 1} served the frame`).toBe(1);
  });

  it('frames from the kernel arrive over the receive queues the tap steers them to, none lost', async () => {
    const perQueue = await udpFlows(5000, 64);
    // The tap picks a queue per flow (its flow table, else the flow's hash): nothing more is promised.
    console.info(`multi-queue tap: 64 flows from the kernel by receive queue: ${JSON.stringify(Object.fromEntries(perQueue))}`);
    for (const q of perQueue.keys()) expect(q % 2, 'only receive queues').toBe(0);
    const stats = await queueStats();
    expect([...stats.values()].filter((q) => q.broken)).toEqual([]);
    for (const q of queues) expect(eventfdRead(q.errFd), `queue ${q.index}'s error eventfd`).toBe(0);
  });

  // What the device does on the pairs beyond VQ_PAIRS_SET: the driver broke the rule by transmitting there, and
  // the device takes the frame anyway (the spec asks nothing of it); on the receive side the spec asks the device
  // not to use those queues at all (virtio 1.2 §5.1.6.5.5).
  let onRetired: string[] = [];
  it('after VQ_PAIRS_SET 2, a frame sent on pair 3 is taken (the queue is not broken); every frame from the kernel still arrives', async () => {
    expect(await setPairs(2)).toBe(VIRTIO_NET_OK);
    txOf(3).add({ readable: [withNetHeader(arpRequest(MAC, pairIp(3, 1), HOST_IP))] });
    txOf(3).kick();
    await txOf(3).waitForUsed(1, 10_000);
    const perQueue = await udpFlows(6000, 64);
    console.info(`multi-queue tap: after VQ_PAIRS_SET 2, 64 flows by receive queue: ${JSON.stringify(Object.fromEntries(perQueue))}`);
    onRetired = [...perQueue].filter(([q]) => q >= 4).map(([q, n]) => `${n} on rx queue ${q}`);
    expect((await queueStats()).get(7)!.broken).toBe(false);
    expect(eventfdRead(txOf(3).errFd)).toBe(0);
  });

  // The pairs beyond VQ_PAIRS_SET detach their tap queues (TUNSETQUEUE), so the kernel steers flows elsewhere;
  // without that, frames land on receive queues the driver no longer reads.
  it('after VQ_PAIRS_SET 2 nothing arrives on the receive queues of pairs 3 and 4 (virtio 1.2 §5.1.6.5.5)', () => {
    expect(onRetired).toEqual([]);
  });

  let intoDisabled: string[] = [];
  it('SET_VRING_ENABLE 0 on pair 3 (as QEMU retires a pair): its queues are not served until enabled again, and the frames the tap holds for it arrive then', async () => {
    expect(await setPairs(PAIRS)).toBe(VIRTIO_NET_OK);
    await fe.setVringEnable(6, false);
    await fe.setVringEnable(7, false);
    await fe.sync();
    const served = (await queueStats()).get(7)!.chains;
    txOf(3).add({ readable: [withNetHeader(arpRequest(MAC, pairIp(3, 2), HOST_IP))] });
    txOf(3).kick();
    // While it waits: the kernel's flows, some of which the tap steers to pair 3's queue. Once the sender is done
    // they all sit in the tap's queues; the enabled pairs deliver theirs at once.
    const base = 7000;
    const mine = (f: ParsedFrame) => f.udp !== undefined && f.udp.dstPort >= base && f.udp.dstPort < base + 64;
    await sendUdpFromNetns(netns, Array.from({ length: 64 }, (_, i) => ({ ip: GUEST_IP, port: base + i })));
    await recv.until('the first flows on the enabled pairs', () => recv.matching(mine).length > 0);
    expect((await queueStats()).get(7)!.chains, 'the disabled transmit queue took nothing').toBe(served);
    expect(recv.matching(isArpReplyFor(pairIp(3, 2))), 'nor did its frame go out').toEqual([]);
    const beforeEnable = recv.matching(mine);
    intoDisabled = beforeEnable.filter((r) => r.queue === 6).map((r) => `port ${r.frame.udp!.dstPort} into disabled rx queue 6`);
    await fe.setVringEnable(6, true);
    await fe.setVringEnable(7, true);
    await recv.until('all 64 flows once pair 3 is enabled again', () => new Set(recv.matching(mine).map((r) => r.frame.udp!.dstPort)).size === 64);
    expect(recv.matching(mine), 'each datagram exactly once').toHaveLength(64);
    const perQueue = new Map<number, number>();
    for (const r of recv.matching(mine)) perQueue.set(r.queue, (perQueue.get(r.queue) ?? 0) + 1);
    console.info(`multi-queue tap: with rings 6 and 7 disabled, then enabled, 64 flows by receive queue: ${JSON.stringify(Object.fromEntries(perQueue))}`);
    await txOf(3).waitForUsed(1, 10_000);
    await recv.next('the reply to the frame sent once pair 3 was enabled again', isArpReplyFor(pairIp(3, 2)));
    expect([...(await queueStats()).values()].filter((q) => q.broken)).toEqual([]);
  });

  // A disabled ring gives no chains (RingQueue.disabled), so the tap's own watch cannot fill it either. With QEMU
  // a retired pair's receive ring has no buffers (Linux fills only active pairs'), and the flows steered there
  // would sit in the kernel unread.
  it('nothing is written into a receive ring disabled with SET_VRING_ENABLE 0', () => {
    expect(intoDisabled).toEqual([]);
  });
});
