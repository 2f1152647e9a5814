// A tap backend whose link goes down and up under a transmitting guest: the host's trouble, not the guest's. The
// frames are dropped and counted, the guest's queue keeps running (no error eventfd), and traffic resumes.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { netDevice } from '../../src/devices/net/index.js';
import { NET_HDR_SIZE } from '../../src/devices/net/spec.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { eventfdRead } from '../../src/sys/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';
import { createNetns, netnsUnavailable, tunUnavailable, type Netns } from './netns.js';

const skipReason = tunUnavailable() ?? (await netnsUnavailable());
if (skipReason !== null) console.warn(`SKIPPED: tap link tests: ${skipReason}`);

const GUEST_MAC = [0x52, 0x54, 0x00, 0x76, 0x74, 0x01];
const GUEST_IP = [10, 213, 7, 2];
const NS_IP = [10, 213, 7, 1];

/** A broadcast ARP request from the guest for the namespace's address, with a zero virtio-net header. */
function arpRequest(): Uint8Array {
  const frame = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, ...GUEST_MAC, 0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1, ...GUEST_MAC, ...GUEST_IP, 0, 0, 0, 0, 0, 0, ...NS_IP];
  const out = new Uint8Array(NET_HDR_SIZE + 60);
  out.set(frame, NET_HDR_SIZE);
  return out;
}

const isArpReplyToUs = (f: Uint8Array) => f[12] === 0x08 && f[13] === 0x06 && f[21] === 2 && f.subarray(0, 6).join() === GUEST_MAC.join();

describe.skipIf(skipReason !== null)('net device on a tap whose link goes down and up', () => {
  const quiet: Logger = { info() {}, warn() {}, error() {} };
  const logs: string[] = [];
  let dir: string;
  let server: VhostUserServer;
  let fe: VhostUserFrontend;
  let netns: Netns;
  let rx: TestQueue;
  let tx: TestQueue;
  const dev = netDevice({ backend: { kind: 'tap', name: `vts${process.pid % 100_000}l` }, mac: new Uint8Array(GUEST_MAC) });

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-taplink-'));
    const socket = join(dir, 'n.sock');
    server = await VhostUserServer.start(dev, { socketPath: socket, log: { ...quiet, warn: (m) => logs.push(m), info: (m) => logs.push(m), error: (m) => logs.push(m) } });
    fe = await VhostUserFrontend.connect(socket);
    // No offloads: the namespace's replies come as plain frames.
    [rx, tx] = await fe.start({ features: ~((1n << 15n) - 1n), queues: [0, 1, 2].map((index) => ({ index, size: 256 })) });
    // The worker opened the tap in our namespace; move it into one of its own, down at first.
    netns = await createNetns('vtslink');
    await netns.moveLink(`vts${process.pid % 100_000}l`);
    await netns.addAddress(`vts${process.pid % 100_000}l`, '10.213.7.1/24');
  }, 30_000);

  afterAll(async () => {
    fe?.close();
    await server?.close();
    await netns?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Transmit `n` ARP requests; resolves when the device has returned every chain. */
  async function send(n: number): Promise<void> {
    for (let i = 0; i < n; i++) tx.add({ readable: [arpRequest()] });
    tx.kick();
    await tx.waitForUsed(n, 10_000);
  }

  /** Post receive buffers until an ARP reply to the guest arrives in one (bounded). */
  async function awaitArpReply(): Promise<void> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      rx.add({ writable: [2048] });
      rx.kick();
      const [u] = await rx.waitForUsed(1, Math.max(1, deadline - Date.now()));
      if (isArpReplyToUs(rx.written(u.chain!, u.len).subarray(NET_HDR_SIZE))) return;
      // IPv6 chatter of the namespace's side on the way: keep looking, and ask again.
      await send(1);
    }
  }

  it('drops and counts frames while the link is down, and traffic resumes both ways when it is up again', async () => {
    const tap = `vts${process.pid % 100_000}l`;
    for (let round = 0; round < 2; round++) {
      const before = dev.stats().txDropped;
      await send(20);
      expect(dev.stats().txDropped - before, 'frames written to a down tap are dropped and counted').toBe(20);

      await netns.setLinkUp(tap, true);
      await send(1);
      await awaitArpReply();
      expect(dev.stats().rxFrames).toBeGreaterThan(0);
      await netns.setLinkUp(tap, false);
    }
    expect(eventfdRead(tx.errFd), 'the transmit queue was never marked broken').toBe(0);
    expect(eventfdRead(rx.errFd)).toBe(0);
    expect(logs.some((l) => /tap vts\d+l: writing a frame failed with EIO \(its link is down\)/.test(l)), logs.join('\n')).toBe(true);
    expect(logs.some((l) => /transmitting again, \d+ frames dropped meanwhile/.test(l)), logs.join('\n')).toBe(true);
    expect(logs.some((l) => /queue stopped/.test(l)), logs.join('\n')).toBe(false);
  }, 60_000);
});
