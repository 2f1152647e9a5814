/**
 * One well-behaved frontend session against an rng backend: negotiate, map memfd memory, start queue 0, read
 * random bytes, stop the ring, disconnect. Used by protocol tests to prove the server still serves.
 */
import * as sys from '../../src/sys/index.js';
import { FrontendRequest, ProtocolFeature } from '../../src/vhost/protocol.js';
import { GuestMemory, SplitQueueDriver, splitRingLayout, splitWindows } from '../../src/virtqueue/index.js';
import { RawFrontend } from './raw-frontend.js';

export async function rngSession(path: string, bytesWanted = 8192): Promise<Uint8Array> {
  const fe = RawFrontend.connect(path);
  const size = 4 << 20;
  const memfd = sys.memfdCreate('guest', size);
  const addr = sys.mmapShared(memfd, size, 0);
  const kick = sys.eventfdCreate();
  const call = sys.eventfdCreate();
  try {
    const mem = new GuestMemory([
      { guestPhysAddr: 0, size, userAddr: addr, mmapOffset: 0, hostAddr: addr, windows: splitWindows(new Uint8Array(sys.viewOf(addr, size))) },
    ]);
    const offered = await fe.request({ type: 'GET_FEATURES' }, FrontendRequest.GET_FEATURES);
    if (offered.kind !== 'features') throw new Error('bad GET_FEATURES reply');
    await fe.request({ type: 'GET_PROTOCOL_FEATURES' }, FrontendRequest.GET_PROTOCOL_FEATURES);
    fe.send({ type: 'SET_PROTOCOL_FEATURES', features: 1n << BigInt(ProtocolFeature.REPLY_ACK) });
    fe.send({ type: 'SET_OWNER' });
    const ack = async (m: Parameters<RawFrontend['send']>[0] & { type: keyof typeof FrontendRequest }) => {
      const r = await fe.request({ ...m, needReply: true } as never, FrontendRequest[m.type]);
      if (r.kind !== 'ack' || r.status !== 0) throw new Error(`${m.type} was refused`);
    };
    await ack({ type: 'SET_FEATURES', features: offered.features });
    await ack({ type: 'SET_MEM_TABLE', regions: [{ guestPhysAddr: 0, size, userAddr: addr, mmapOffset: 0, fd: memfd }] });
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
    await ack({ type: 'SET_VRING_KICK', index: 0, fd: kick });
    await ack({ type: 'SET_VRING_ENABLE', index: 0, num: 1 });
    const bufAddr = 0x100000;
    const chunk = 4096;
    const chains = Math.ceil(bytesWanted / chunk);
    for (let i = 0; i < chains; i++) driver.add([], [[bufAddr + i * chunk, chunk]]);
    if (driver.publish()) sys.eventfdWrite(kick, 1);
    let used = 0;
    let total = 0;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        w.close();
        reject(new Error(`only ${used} of ${chains} chains came back within 5 s`));
      }, 5000);
      const w = sys.watchReadable(call, () => {
        sys.eventfdRead(call);
        while (driver.nextUsed() >= 0) {
          used++;
          total += driver.lastUsedLen;
        }
        if (used === chains) {
          clearTimeout(timer);
          w.close();
          resolve();
        }
      });
    });
    if (total !== chains * chunk) throw new Error(`backend reported ${total} bytes written, expected ${chains * chunk}`);
    const base = await fe.request({ type: 'GET_VRING_BASE', index: 0, num: 0 }, FrontendRequest.GET_VRING_BASE);
    if (base.kind !== 'vring-state' || base.num !== chains) throw new Error(`GET_VRING_BASE said ${JSON.stringify(base)}`);
    const out = new Uint8Array(chains * chunk);
    mem.read(bufAddr, out);
    return out;
  } finally {
    fe.close();
    sys.close(kick);
    sys.close(call);
    sys.close(memfd);
    sys.munmap(addr, size);
  }
}
