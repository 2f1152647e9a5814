import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, describe, expect, it } from 'vitest';
import {
  FrontendError,
  TestGuestMemory,
  VhostUserFrontend,
  VIRTIO_RING_F_EVENT_IDX,
} from '../../src/frontend/index.js';
import {
  close,
  eventfdWrite,
  fdCount,
  mmapShared,
  munmap,
  sendMessage,
  unixAccept,
  unixListen,
  unixSocketPair,
  viewOf,
} from '../../src/sys/index.js';
import {
  decodeFrontendMessage,
  encodeBackendMessage,
  encodeReply,
  type FrontendMessage,
  type FrontendMessageOf,
  type ReplyPayload,
} from '../../src/vhost/codec.js';
import { Connection } from '../../src/vhost/connection.js';
import { FrontendRequest, ProtocolFeature } from '../../src/vhost/protocol.js';
import { GuestMemory, SplitQueue } from '../../src/virtqueue/index.js';

const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-frontend-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const MiB = 1024 * 1024;
const bit = (n: number): bigint => 1n << BigInt(n);
const pf = (...fs: ProtocolFeature[]): bigint => fs.reduce((m, f) => m | bit(f), 0n);

describe('TestGuestMemory', () => {
  it('is the same memory through the driver view and a second mapping of its fd', () => {
    const before = fdCount();
    const mem = new TestGuestMemory({ regions: [{ guestPhysAddr: 0, size: 4 * MiB }] });
    expect(mem.regions).toHaveLength(1);
    const r = mem.regions[0];
    expect(r.userAddr).toBe(r.hostAddr);
    expect(r.mmapOffset).toBe(0);

    const other = mmapShared(r.fd, r.size, 0);
    const view = new Uint8Array(viewOf(other, r.size));
    mem.write(0x1234, Uint8Array.of(1, 2, 3));
    expect([...view.subarray(0x1234, 0x1237)]).toEqual([1, 2, 3]);
    view.set([9, 8, 7], 3 * MiB);
    expect([...mem.read(3 * MiB, 3)]).toEqual([9, 8, 7]);
    munmap(other, r.size);

    mem.close();
    mem.close();
    expect(fdCount()).toBe(before);
    expect(() => mem.read(0, 1)).toThrow(FrontendError);
  });

  it('backs several regions with one file at increasing mmap offsets', () => {
    const before = fdCount();
    const mem = new TestGuestMemory({
      regions: [
        { guestPhysAddr: 0x1_0000_0000, size: 2 * MiB },
        { guestPhysAddr: 0, size: 1 * MiB },
      ],
      singleFile: true,
    });
    expect(mem.fds).toHaveLength(1);
    const [low, high] = mem.regions;
    expect(low.guestPhysAddr).toBe(0);
    expect(high.guestPhysAddr).toBe(0x1_0000_0000);
    expect(low.fd).toBe(high.fd);
    expect(high.mmapOffset).toBe(1 * MiB);

    // A back-end maps the file and finds the high region at its offset.
    const whole = mmapShared(mem.fds[0], 3 * MiB, 0);
    const view = new Uint8Array(viewOf(whole, 3 * MiB));
    mem.write(0x1_0000_0010, Uint8Array.of(0xaa));
    expect(view[1 * MiB + 0x10]).toBe(0xaa);
    munmap(whole, 3 * MiB);

    expect(mem.userAddr(0x1_0000_0010)).toBe(high.userAddr + 0x10);
    // The allocator never hands out guest address 0, and spills into the next region when one is full.
    const a = mem.alloc(16);
    expect(a).toBeGreaterThan(0);
    expect(mem.alloc(1 * MiB - 8192)).toBeLessThan(1 * MiB);
    expect(mem.alloc(8192)).toBeGreaterThanOrEqual(0x1_0000_0000);
    mem.close();
    expect(fdCount()).toBe(before);
  });

  it('refuses regions that are not page multiples', () => {
    expect(() => new TestGuestMemory({ regions: [{ guestPhysAddr: 0, size: 1000 }] })).toThrow(RangeError);
  });
});

// ---------------------------------------------------------------------------------------------------------
// A minimal back-end written here: framing by the back-end's Connection, decoding by the codec, and the
// replies the test asks for. It keeps every fd it receives (to inspect them) and closes them on close().

type Behaviour = (msg: FrontendMessage) => ReplyPayload | 'default' | 'silent' | 'hangup';

interface FakeOptions {
  features?: bigint;
  protocolFeatures?: bigint;
  behaviour?: Behaviour;
}

class FakeBackend {
  readonly messages: FrontendMessage[] = [];
  readonly fds: number[] = [];
  protocolFeatures = 0n;
  status = 0;
  private readonly conn: Connection;

  constructor(
    fd: number,
    private readonly opts: FakeOptions = {},
  ) {
    this.conn = new Connection(fd, {
      onMessage: (raw) => {
        const msg = decodeFrontendMessage(raw.header, raw.payload, raw.fds);
        this.fds.push(...raw.fds);
        this.messages.push(msg);
        this.answer(msg, new DataView(raw.header.buffer).getUint32(0, true));
      },
      onClose: () => {},
    });
    this.conn.start();
  }

  of<T extends FrontendMessage['type']>(type: T): FrontendMessageOf<T>[] {
    return this.messages.filter((m) => m.type === type) as FrontendMessageOf<T>[];
  }

  private answer(msg: FrontendMessage, request: FrontendRequest): void {
    const chosen = this.opts.behaviour?.(msg) ?? 'default';
    if (chosen === 'silent') return;
    if (chosen === 'hangup') return this.conn.close();
    const reply = chosen === 'default' ? this.defaultReply(msg) : chosen;
    if (reply) this.conn.send(encodeReply(request, reply));
  }

  private defaultReply(msg: FrontendMessage): ReplyPayload | null {
    switch (msg.type) {
      case 'GET_FEATURES':
        return { kind: 'features', features: this.opts.features ?? 0n };
      case 'GET_PROTOCOL_FEATURES':
        return { kind: 'features', features: this.opts.protocolFeatures ?? 0n };
      case 'SET_PROTOCOL_FEATURES':
        this.protocolFeatures = msg.features;
        return null;
      case 'GET_QUEUE_NUM':
        return { kind: 'u64', value: 2 };
      case 'GET_MAX_MEM_SLOTS':
        return { kind: 'u64', value: 8 };
      case 'GET_STATUS':
        return { kind: 'u64', value: this.status };
      case 'SET_STATUS':
        this.status = msg.status;
        break;
      case 'GET_VRING_BASE':
        return { kind: 'vring-state', index: msg.index, num: 7 };
      case 'GET_CONFIG':
        return { kind: 'config', offset: msg.offset, configFlags: 0, data: new Uint8Array(msg.size).fill(0x5a) };
      default:
        break;
    }
    const replyAck = (this.protocolFeatures & bit(ProtocolFeature.REPLY_ACK)) !== 0n;
    return msg.needReply && replyAck ? { kind: 'ack', status: 0 } : null;
  }

  close(): void {
    this.conn.close();
    for (const fd of this.fds.splice(0)) close(fd);
  }
}

function pair(opts: FakeOptions = {}, timeoutMs?: number): { frontend: VhostUserFrontend; backend: FakeBackend } {
  const [a, b] = unixSocketPair();
  return { frontend: new VhostUserFrontend(a, { timeoutMs }), backend: new FakeBackend(b, opts) };
}

const OFFER = bit(VIRTIO_RING_F_EVENT_IDX) | bit(28) | bit(30) | bit(32);

describe('VhostUserFrontend against a fake back-end', () => {
  it('runs QEMU’s start sequence, and the back-end maps the memory and serves the ring it describes', async () => {
    const before = fdCount();
    const { frontend, backend } = pair({
      features: OFFER,
      protocolFeatures: pf(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ, ProtocolFeature.STATUS, ProtocolFeature.PAGEFAULT),
    });
    const memory = new TestGuestMemory({ regions: [{ guestPhysAddr: 0, size: 8 * MiB }] });
    memory.write(0x100, new TextEncoder().encode('marker'));

    const [q] = await frontend.start({ queues: [{ index: 0, size: 8 }], memory, features: ~bit(28), ring: 'split' });

    expect(backend.messages.map((m) => m.type)).toEqual([
      'GET_FEATURES',
      'GET_PROTOCOL_FEATURES',
      'SET_PROTOCOL_FEATURES',
      'GET_QUEUE_NUM',
      'SET_BACKEND_REQ_FD',
      'SET_OWNER',
      'SET_VRING_ERR',
      'SET_FEATURES',
      'GET_STATUS',
      'SET_STATUS',
      'SET_MEM_TABLE',
      'SET_VRING_NUM',
      'SET_VRING_BASE',
      'SET_VRING_ADDR',
      'SET_VRING_KICK',
      'SET_VRING_CALL',
      'SET_VRING_ENABLE',
      'GET_STATUS',
      'SET_STATUS',
    ]);
    // REPLY_ACK is asked for everywhere it can be, and not on the message that turns it on.
    for (const m of backend.messages) {
      if (m.type === 'SET_PROTOCOL_FEATURES' || m.type.startsWith('GET_')) expect(m.needReply, m.type).toBe(false);
      else expect(m.needReply, m.type).toBe(true);
    }
    expect(backend.of('SET_PROTOCOL_FEATURES')[0].features).toBe(
      pf(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ, ProtocolFeature.STATUS),
    );
    expect(backend.of('SET_FEATURES')[0].features).toBe(OFFER & ~bit(28));
    expect(frontend.queueNum).toBe(2);
    expect(backend.status).toBe(1 | 2 | 4 | 8);
    expect(q.eventIdx).toBe(true);

    // The memory table: the region as mapped here, with an fd that maps to the same pages.
    const [region] = backend.of('SET_MEM_TABLE')[0].regions;
    expect(region).toMatchObject({ guestPhysAddr: 0, size: 8 * MiB, userAddr: memory.regions[0].userAddr, mmapOffset: 0 });
    const mapped = mmapShared(region.fd, region.size, region.mmapOffset);
    const window = new Uint8Array(viewOf(mapped, region.size));
    expect(new TextDecoder().decode(window.subarray(0x100, 0x106))).toBe('marker');

    // Play the device on that mapping: ring addresses arrive as front-end user addresses.
    const deviceMemory = GuestMemory.fromBuffers([{ guestPhysAddr: 0, bytes: window, userAddr: region.userAddr }]);
    const addr = backend.of('SET_VRING_ADDR')[0];
    expect(deviceMemory.userToGuest(addr.descUserAddr)).toBe(q.layout.descAddr);
    const device = new SplitQueue({
      index: 0,
      size: backend.of('SET_VRING_NUM')[0].num,
      memory: deviceMemory,
      descAddr: deviceMemory.userToGuest(addr.descUserAddr),
      availAddr: deviceMemory.userToGuest(addr.availUserAddr),
      usedAddr: deviceMemory.userToGuest(addr.usedUserAddr),
      eventIdx: true,
      indirect: false,
      lastAvailIdx: backend.of('SET_VRING_BASE')[0].num,
    });
    const callFd = backend.of('SET_VRING_CALL')[0].fd!;

    const chains = q.addWritable(2, 16);
    q.add({ readable: [new TextEncoder().encode('ping')], writable: [4] });
    q.kick();
    const served: number[] = [];
    for (let chain = device.pop(); chain !== null; chain = device.pop()) {
      const w = chain.writer();
      const n = w.fill(chain.head + 0x10, chain.writableBytes);
      served.push(chain.head);
      device.push(chain, n);
    }
    expect(served).toHaveLength(3);
    expect(device.publish()).toBe(true);
    eventfdWrite(callFd, 1);

    const used = await q.waitForUsed(3, 1000);
    expect(used.map((u) => u.id)).toEqual(served);
    expect(used[0].chain).toBe(chains[0]);
    expect([...q.written(used[0].chain!, used[0].len)]).toEqual(new Array(16).fill(chains[0].head + 0x10));
    expect(used[2].len).toBe(4);

    // The error eventfd reaches waitForError; nothing more on the ring times out with what it had.
    eventfdWrite(backend.of('SET_VRING_ERR')[0].fd!, 1);
    await expect(q.waitForError(1000)).resolves.toBe(1);
    const timeout = await q.waitForUsed(1, 30).catch((e: FrontendError) => e);
    expect(timeout).toBeInstanceOf(FrontendError);
    expect((timeout as FrontendError).code).toBe('TIMEOUT');
    expect((timeout as FrontendError).used).toEqual([]);

    // Stopping: disable, then GET_VRING_BASE, then a zero status.
    backend.messages.length = 0;
    await expect(frontend.stop()).resolves.toEqual([7]);
    expect(backend.messages.map((m) => m.type)).toEqual(['SET_VRING_ENABLE', 'GET_VRING_BASE', 'SET_STATUS']);
    expect(backend.status).toBe(0);

    munmap(mapped, region.size);
    frontend.close();
    backend.close();
    memory.close();
    expect(fdCount()).toBe(before);
  });

  it('uses ADD_MEM_REG with CONFIGURE_MEM_SLOTS, and skips protocol features when they are masked out', async () => {
    const before = fdCount();
    {
      const { frontend, backend } = pair({
        features: OFFER,
        protocolFeatures: pf(ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.XEN_MMAP),
      });
      const memory = new TestGuestMemory({
        regions: [
          { guestPhysAddr: 0, size: 2 * MiB },
          { guestPhysAddr: 0x1_0000_0000, size: 2 * MiB },
        ],
      });
      await frontend.start({ queues: [{ index: 0, size: 4 }], memory, ring: 'split' });
      expect(backend.of('SET_PROTOCOL_FEATURES')[0].features).toBe(pf(ProtocolFeature.CONFIGURE_MEM_SLOTS));
      expect(frontend.maxMemSlots).toBe(8);
      expect(backend.of('SET_MEM_TABLE')).toHaveLength(0);
      expect(backend.of('ADD_MEM_REG').map((m) => m.region.guestPhysAddr)).toEqual([0, 0x1_0000_0000]);
      expect(backend.of('ADD_MEM_REG').every((m) => m.needReply === false)).toBe(true);
      frontend.close();
      backend.close();
      memory.close();
    }
    {
      const { frontend, backend } = pair({ features: OFFER, protocolFeatures: pf(ProtocolFeature.REPLY_ACK) });
      await frontend.start({ queues: [{ index: 0, size: 4 }], features: ~bit(30) & ~bit(VIRTIO_RING_F_EVENT_IDX), ring: 'split' });
      const types = backend.messages.map((m) => m.type);
      expect(types).not.toContain('GET_PROTOCOL_FEATURES');
      expect(types).not.toContain('SET_VRING_ENABLE'); // legacy: rings run once kicked
      expect(frontend.queues[0].eventIdx).toBe(false);
      frontend.close(); // closes the memory it made, and the queues
      backend.close();
    }
    expect(fdCount()).toBe(before);
  });

  it('round-trips the typed requests', async () => {
    const { frontend, backend } = pair({ features: OFFER, protocolFeatures: pf(ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG) });
    await frontend.init();
    await expect(frontend.getConfig(4, 8)).resolves.toEqual(new Uint8Array(8).fill(0x5a));
    await frontend.setConfig(0, Uint8Array.of(1, 2));
    expect(backend.of('SET_CONFIG')[0]).toMatchObject({ offset: 0, size: 2, needReply: true });
    await expect(frontend.getVringBase(1)).resolves.toBe(7);
    await frontend.setVringEnable(1, true);
    expect(backend.of('SET_VRING_ENABLE')[0]).toMatchObject({ index: 1, num: 1 });
    await frontend.reset();
    expect(backend.messages.at(-1)!.type).toBe('RESET_OWNER');
    const reply = await frontend.request({ type: 'GET_QUEUE_NUM' });
    expect(reply).toMatchObject({ kind: 'u64', value: 2 });
    await expect(frontend.request({ type: 'SET_OWNER' })).resolves.toBeNull();
    frontend.close();
    backend.close();
  });

  it('reports a failed REPLY_ACK as NACK with the status', async () => {
    const { frontend, backend } = pair({
      features: OFFER,
      protocolFeatures: pf(ProtocolFeature.REPLY_ACK),
      behaviour: (m) => (m.type === 'SET_MEM_TABLE' ? { kind: 'ack', status: -22 } : 'default'),
    });
    const error = await frontend.start({ queues: [{ index: 0, size: 4 }], ring: 'split' }).catch((e: FrontendError) => e);
    expect(error).toBeInstanceOf(FrontendError);
    expect((error as FrontendError).code).toBe('NACK');
    expect((error as FrontendError).status).toBe(-22);
    expect((error as Error).message).toContain('SET_MEM_TABLE');
    // A refusal leaves the stream in step: the connection is still usable.
    await expect(frontend.getFeatures()).resolves.toBe(OFFER);
    frontend.close();
    backend.close();
  });

  it('times out on a missing reply, then refuses to go on', async () => {
    const { frontend, backend } = pair({ behaviour: (m) => (m.type === 'GET_FEATURES' ? 'silent' : 'default') }, 50);
    const error = await frontend.getFeatures().catch((e: FrontendError) => e);
    expect((error as FrontendError).code).toBe('TIMEOUT');
    expect((error as Error).message).toMatch(/GET_FEATURES.*50 ms/);
    await expect(frontend.getQueueNum()).rejects.toMatchObject({ code: 'BROKEN' });
    frontend.close();
    await expect(frontend.getQueueNum()).rejects.toMatchObject({ code: 'CLOSED' });
    backend.close();
  });

  it('rejects with EOF when the back-end hangs up before replying', async () => {
    const { frontend, backend } = pair({ behaviour: (m) => (m.type === 'GET_PROTOCOL_FEATURES' ? 'hangup' : 'default'), features: bit(30) });
    const error = await frontend.init().catch((e: FrontendError) => e);
    expect((error as FrontendError).code).toBe('EOF');
    expect((error as Error).message).toContain('GET_PROTOCOL_FEATURES');
    frontend.close();
    backend.close();
  });

  it('rejects a reply to the wrong request and closes the fds a reply should not carry', async () => {
    const before = fdCount();
    const [a, b] = unixSocketPair();
    const frontend = new VhostUserFrontend(a);
    const pending = frontend.getQueueNum();
    const wrong = encodeReply(FrontendRequest.GET_FEATURES, { kind: 'features', features: 1n });
    sendMessage(b, wrong, wrong.length, []);
    await expect(pending).rejects.toMatchObject({ code: 'UNEXPECTED_REPLY' });
    await expect(frontend.getQueueNum()).rejects.toMatchObject({ code: 'BROKEN' });
    frontend.close();

    const [c, d] = unixSocketPair();
    const second = new VhostUserFrontend(c);
    const reply = second.getQueueNum();
    const [extra, extraPeer] = unixSocketPair();
    const withFd = encodeReply(FrontendRequest.GET_QUEUE_NUM, { kind: 'u64', value: 1 });
    sendMessage(d, withFd, withFd.length, [extra]);
    close(extra);
    await expect(reply).rejects.toMatchObject({ code: 'BAD_FDS' });
    second.close();
    for (const fd of [b, d, extraPeer]) close(fd);
    expect(fdCount()).toBe(before);
  });

  it('answers back-end channel requests and hands them out', async () => {
    const before = fdCount();
    const { frontend, backend } = pair({ features: bit(30), protocolFeatures: pf(ProtocolFeature.BACKEND_REQ, ProtocolFeature.REPLY_ACK) });
    frontend.onBackendMessage = (m) => (m.type === 'VRING_ERR' ? -1 : 0);
    await frontend.init();
    const channel = backend.of('SET_BACKEND_REQ_FD')[0].fd;
    const waiting = frontend.waitForBackendMessage('CONFIG_CHANGE_MSG', 1000);
    for (const msg of [
      encodeBackendMessage({ type: 'CONFIG_CHANGE_MSG', needReply: true }),
      encodeBackendMessage({ type: 'VRING_ERR', index: 0, num: 0, needReply: true }),
    ]) {
      sendMessage(channel, msg.bytes, msg.bytes.length, msg.fds);
    }
    await expect(waiting).resolves.toMatchObject({ type: 'CONFIG_CHANGE_MSG', needReply: true });
    await expect(frontend.waitForBackendMessage('VRING_ERR', 1000)).resolves.toMatchObject({ index: 0 });

    // Our acks come back on the channel: status 0, then -1 as onBackendMessage said.
    const got: Uint8Array[] = [];
    const acks = new Connection(channel, { onMessage: (raw) => void got.push(raw.payload), onClose: () => {} });
    acks.start();
    while (got.length < 2) await sleep(5);
    acks.close();
    backend.fds.splice(backend.fds.indexOf(channel), 1);
    expect(got.map((p) => new DataView(p.buffer).getBigInt64(0, true))).toEqual([0n, -1n]);

    await expect(frontend.waitForBackendMessage('CONFIG_CHANGE_MSG', 20)).rejects.toMatchObject({ code: 'TIMEOUT' });
    frontend.close();
    backend.close();
    expect(fdCount()).toBe(before);
  });

  it('connect() retries until the socket accepts, and gives up at its deadline', async () => {
    const path = join(dir, 'late.sock');
    const connecting = VhostUserFrontend.connect(path, { connectTimeoutMs: 2000 });
    await sleep(50);
    const listener = unixListen(path);
    const frontend = await connecting;
    const accepted = unixAccept(listener);
    expect(accepted).toBeGreaterThanOrEqual(0);
    frontend.close();
    close(accepted);
    close(listener);

    const started = Date.now();
    await expect(VhostUserFrontend.connect(join(dir, 'never.sock'), { connectTimeoutMs: 60 })).rejects.toMatchObject({
      code: 'TIMEOUT',
    });
    expect(Date.now() - started).toBeLessThan(1000);
  });
});
