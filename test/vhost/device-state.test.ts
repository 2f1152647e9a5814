// DEVICE_STATE as QEMU drives it for a virtio-net with a vhost-user netdev: SET_DEVICE_STATE_FD (save) on the
// source's stopped device, the bytes read from the other end to EOF, CHECK_DEVICE_STATE; then the same bytes
// loaded into the destination's device. Garbage and another kind of device's state are refused at the check.
import { mkdtempSync, rmSync } from 'node:fs';
import { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { netDevice, type NetDevice } from '../../src/devices/net/index.js';
import { parseMac } from '../../src/devices/net/spec.js';
import { FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend } from '../../src/frontend/index.js';
import { close, unixSocketPair } from '../../src/sys/index.js';
import { saveDeviceState } from '../../src/vhost/device-state.js';
import { ProtocolFeature, VhostUserServer } from '../../src/vhost/index.js';
import { blkDevice } from '../../src/devices/blk/index.js';

const quiet = { info() {}, warn() {}, error() {} };
let dir: string;
const closers: (() => Promise<void> | void)[] = [];
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhost-ts-state-'));
});
afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c();
  rmSync(dir, { recursive: true, force: true });
});

async function connected(device: NetDevice, name: string): Promise<VhostUserFrontend> {
  const server = await VhostUserServer.start(device, { socketPath: join(dir, `${name}.sock`), log: quiet });
  closers.push(() => server.close());
  const fe = await VhostUserFrontend.connect(join(dir, `${name}.sock`));
  closers.push(() => fe.close());
  await fe.init({ protocolFeatures: FRONTEND_PROTOCOL_FEATURES | (1n << BigInt(ProtocolFeature.DEVICE_STATE)) });
  return fe;
}

/** SET_DEVICE_STATE_FD with one end of a socket pair; resolves with the reply word. */
async function setStateFd(fe: VhostUserFrontend, direction: 0 | 1, fd: number): Promise<bigint> {
  const reply = await fe.request({ type: 'SET_DEVICE_STATE_FD', direction, phase: 0, fd });
  close(fd);
  if (reply?.kind !== 'raw') throw new Error(`unexpected reply ${JSON.stringify(reply)}`);
  return new DataView(reply.payload.buffer, reply.payload.byteOffset).getBigUint64(0, true);
}

async function check(fe: VhostUserFrontend): Promise<number> {
  const reply = await fe.request({ type: 'CHECK_DEVICE_STATE' });
  return reply?.kind === 'ack' ? reply.status : -1;
}

describe('device state (DEVICE_STATE)', () => {
  it('net: saved on one device, loaded into another, the rx mode and MAC the driver set come along', async () => {
    const source = netDevice({ backend: { kind: 'sink', verify: false }, mac: parseMac('52:54:00:00:ff:01') });
    // What a driver set through the control queue: a MAC, promiscuous off, all-multicast on.
    source.state!.load({ mac: Uint8Array.of(0x52, 0x54, 0, 0, 0xff, 0x99), promiscuous: false, allMulticast: true, activePairs: 1 });
    const fe = await connected(source, 'src');
    expect(fe.has(ProtocolFeature.DEVICE_STATE)).toBe(true);
    const [ours, theirs] = unixSocketPair();
    const reader = new Socket({ fd: ours, readable: true, writable: false });
    const chunks: Buffer[] = [];
    reader.on('data', (d: Buffer) => chunks.push(d));
    const ended = new Promise((r) => reader.once('end', r));
    expect(await setStateFd(fe, 0, theirs)).toBe(0x100n); // success, and no fd of ours
    await ended;
    reader.destroy();
    expect(await check(fe)).toBe(0);
    const bytes = Buffer.concat(chunks);
    expect(bytes.length).toBeGreaterThan(6);

    const destination = netDevice({ backend: { kind: 'sink', verify: false }, mac: parseMac('52:54:00:00:ff:01') });
    const fe2 = await connected(destination, 'dst');
    const [ours2, theirs2] = unixSocketPair();
    expect(await setStateFd(fe2, 1, theirs2)).toBe(0x100n);
    const writer = new Socket({ fd: ours2, readable: false, writable: true });
    await new Promise<void>((r) => writer.end(bytes, () => r()));
    expect(await check(fe2)).toBe(0);
    expect(destination.state!.save()).toEqual(source.state!.save());
    expect(Buffer.from((destination.state!.save() as { mac: Uint8Array }).mac).toString('hex')).toBe('52540000ff99');
  });

  it('refuses garbage and the state of another kind of device at CHECK_DEVICE_STATE', async () => {
    const dev = netDevice({ backend: { kind: 'sink', verify: false } });
    const fe = await connected(dev, 'bad');
    const before = dev.state!.save();
    const blkState = saveDeviceState(blkDevice({ path: '', nullSize: 1 << 20 }) as never);
    for (const payload of [Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]), Buffer.from(blkState)]) {
      const [ours, theirs] = unixSocketPair();
      expect(await setStateFd(fe, 1, theirs)).toBe(0x100n);
      const writer = new Socket({ fd: ours, readable: false, writable: true });
      await new Promise<void>((r) => writer.end(payload, () => r()));
      expect(await check(fe)).toBe(1);
    }
    expect(dev.state!.save()).toEqual(before);
    // A check with no transfer under way fails too.
    expect(await check(fe)).toBe(1);
  });
});
