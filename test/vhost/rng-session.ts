/**
 * Well-behaved frontend sessions against an rng-like backend: negotiate, map memfd memory, start queue 0.
 * `openQueue` leaves the session open for tests to poke at; `rngSession` reads random bytes and disconnects.
 */
import * as sys from '../../src/sys/index.js';
import type { FrontendMessageInput } from '../../src/vhost/codec.js';
import { FrontendRequest, ProtocolFeature } from '../../src/vhost/protocol.js';
import { GuestMemory, SplitQueueDriver, splitRingLayout, splitWindows } from '../../src/virtqueue/index.js';
import { RawFrontend } from './raw-frontend.js';

export const MEM_SIZE = 4 << 20;
export const BUF_ADDR = 0x100000;

export interface OpenQueue {
  fe: RawFrontend;
  mem: GuestMemory;
  memfd: number;
  addr: number;
  driver: SplitQueueDriver;
  kick: number;
  call: number;
  err: number;
  /** Send with NEED_REPLY and check the REPLY_ACK status is success. */
  ack(m: FrontendMessageInput): Promise<void>;
  /** Resolve when `fd` (call or err) fires, reject after the timeout. */
  waitFd(fd: number, timeoutMs?: number): Promise<void>;
  /** Wait for `count` used elements; returns their total length. */
  waitUsed(count: number, timeoutMs?: number): Promise<number>;
  close(): void;
}

export async function openQueue(path: string): Promise<OpenQueue> {
  const fe = RawFrontend.connect(path);
  const memfd = sys.memfdCreate('guest', MEM_SIZE);
  const addr = sys.mmapShared(memfd, MEM_SIZE, 0);
  const kick = sys.eventfdCreate();
  const call = sys.eventfdCreate();
  const err = sys.eventfdCreate();
  const mem = new GuestMemory([
    { guestPhysAddr: 0, size: MEM_SIZE, userAddr: addr, mmapOffset: 0, hostAddr: addr, windows: splitWindows(new Uint8Array(sys.viewOf(addr, MEM_SIZE))) },
  ]);
  const ack = async (m: FrontendMessageInput) => {
    const r = await fe.request({ ...m, needReply: true } as FrontendMessageInput, FrontendRequest[m.type as keyof typeof FrontendRequest]);
    if (r.kind !== 'ack' || r.status !== 0) throw new Error(`${m.type} was refused`);
  };
  const waitFd = (fd: number, timeoutMs = 5000) =>
    new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        w.close();
        reject(new Error(`fd ${fd} did not fire within ${timeoutMs} ms`));
      }, timeoutMs);
      const w = sys.watchReadable(fd, () => {
        sys.eventfdRead(fd);
        clearTimeout(timer);
        w.close();
        resolve();
      });
    });
  const close = () => {
    fe.close();
    for (const fd of [kick, call, err, memfd]) sys.close(fd);
    sys.munmap(addr, MEM_SIZE);
  };
  try {
    const offered = await fe.request({ type: 'GET_FEATURES' }, FrontendRequest.GET_FEATURES);
    if (offered.kind !== 'features') throw new Error('bad GET_FEATURES reply');
    await fe.request({ type: 'GET_PROTOCOL_FEATURES' }, FrontendRequest.GET_PROTOCOL_FEATURES);
    fe.send({ type: 'SET_PROTOCOL_FEATURES', features: 1n << BigInt(ProtocolFeature.REPLY_ACK) });
    fe.send({ type: 'SET_OWNER' });
    // All but RING_PACKED: this driver is a split one.
    await ack({ type: 'SET_FEATURES', features: offered.features & ~(1n << 34n) });
    await ack({ type: 'SET_MEM_TABLE', regions: [{ guestPhysAddr: 0, size: MEM_SIZE, userAddr: addr, mmapOffset: 0, fd: memfd }] });
    const layout = splitRingLayout(256, 0);
    const driver = new SplitQueueDriver(mem, layout, true);
    await ack({ type: 'SET_VRING_NUM', index: 0, num: 256 });
    await ack({ type: 'SET_VRING_BASE', index: 0, num: 0 });
    await ack({
      type: 'SET_VRING_ADDR',
      index: 0,
      ringFlags: 0,
      descUserAddr: addr + layout.descAddr,
      availUserAddr: addr + layout.availAddr,
      usedUserAddr: addr + layout.usedAddr,
      logGuestAddr: 0,
    });
    await ack({ type: 'SET_VRING_CALL', index: 0, fd: call });
    await ack({ type: 'SET_VRING_ERR', index: 0, fd: err });
    await ack({ type: 'SET_VRING_KICK', index: 0, fd: kick });
    await ack({ type: 'SET_VRING_ENABLE', index: 0, num: 1 });
    const waitUsed = async (count: number, timeoutMs = 5000) => {
      let used = 0;
      let total = 0;
      const drain = () => {
        while (driver.nextUsed() >= 0) {
          used++;
          total += driver.lastUsedLen;
        }
      };
      drain();
      while (used < count) {
        await waitFd(call, timeoutMs);
        drain();
      }
      return total;
    };
    return { fe, mem, memfd, addr, driver, kick, call, err, ack, waitFd, waitUsed, close };
  } catch (e) {
    close();
    throw e;
  }
}

export async function rngSession(path: string, bytesWanted = 8192): Promise<Uint8Array> {
  const q = await openQueue(path);
  try {
    const chunk = 4096;
    const chains = Math.ceil(bytesWanted / chunk);
    for (let i = 0; i < chains; i++) q.driver.add([], [[BUF_ADDR + i * chunk, chunk]]);
    if (q.driver.publish()) sys.eventfdWrite(q.kick, 1);
    const total = await q.waitUsed(chains);
    if (total !== chains * chunk) throw new Error(`backend reported ${total} bytes written, expected ${chains * chunk}`);
    const base = await q.fe.request({ type: 'GET_VRING_BASE', index: 0, num: 0 }, FrontendRequest.GET_VRING_BASE);
    if (base.kind !== 'vring-state' || base.num !== chains) throw new Error(`GET_VRING_BASE said ${JSON.stringify(base)}`);
    const out = new Uint8Array(chains * chunk);
    q.mem.read(BUF_ADDR, out);
    return out;
  } finally {
    q.close();
  }
}
