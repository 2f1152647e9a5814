import { describe, expect, it } from 'vitest';
import {
  decodeBackendAck,
  decodeBackendMessage,
  decodeFrontendMessage,
  decodeReply,
  encodeAck,
  encodeBackendAck,
  encodeBackendMessage,
  encodeFrontendMessage,
  encodeReply,
  headerSize,
  readHeader,
  type BackendMessageInput,
  type FrontendMessage,
  type FrontendMessageInput,
  type ReplyPayload,
} from '../../src/vhost/codec.js';
import { VhostProtocolError, type VhostProtocolErrorCode } from '../../src/vhost/errors.js';
import {
  BACKEND_REQUESTS,
  BackendRequest,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FRONTEND_REQUESTS,
  FrontendRequest,
  MAX_PAYLOAD,
  VERSION,
  VRING_NOFD_MASK,
  alwaysReplies,
} from '../../src/vhost/protocol.js';

const split = (bytes: Uint8Array): [Uint8Array, Uint8Array] => [bytes.subarray(0, headerSize), bytes.subarray(headerSize)];

/** A raw message: header fields as given, payload as given. */
function raw(request: number, payload: Uint8Array = new Uint8Array(0), flags = VERSION, size = payload.length) {
  const header = new Uint8Array(headerSize);
  const v = new DataView(header.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, size, true);
  return { header, payload };
}

function u64s(...values: (number | bigint)[]): Uint8Array {
  const out = new Uint8Array(values.length * 8);
  const v = new DataView(out.buffer);
  values.forEach((x, i) => v.setBigUint64(i * 8, BigInt(x), true));
  return out;
}

function u32s(...values: number[]): Uint8Array {
  const out = new Uint8Array(values.length * 4);
  const v = new DataView(out.buffer);
  values.forEach((x, i) => v.setUint32(i * 4, x, true));
  return out;
}

const cat = (...parts: Uint8Array[]): Uint8Array => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
};

function rejects(code: VhostProtocolErrorCode, f: () => unknown, message?: RegExp): VhostProtocolError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(VhostProtocolError);
    const err = e as VhostProtocolError;
    expect(err.code).toBe(code);
    if (message) expect(err.message).toMatch(message);
    return err;
  }
  throw new Error('expected a VhostProtocolError');
}

const region = (i: number, fd: number) => ({
  guestPhysAddr: 0x1_0000_0000 * i,
  size: 0x4000_0000,
  userAddr: 0x7f00_0000_0000 + 0x4000_0000 * i,
  mmapOffset: 0x1000 * i,
  fd,
});

// One sample per front-end request; the test below checks that none is missing.
const FRONTEND_SAMPLES: FrontendMessageInput[] = [
  { type: 'GET_FEATURES' },
  { type: 'SET_FEATURES', features: (1n << 63n) | (1n << 32n) | (1n << 30n) | 1n },
  { type: 'SET_OWNER' },
  { type: 'RESET_OWNER' },
  { type: 'SET_MEM_TABLE', regions: [region(0, 10), region(1, 11), region(2, 12)], needReply: true },
  { type: 'SET_LOG_BASE', mmapSize: 0x20000, mmapOffset: 0, fd: 13 },
  { type: 'SET_LOG_FD', fd: 14 },
  { type: 'SET_VRING_NUM', index: 1, num: 256 },
  {
    type: 'SET_VRING_ADDR',
    index: 0,
    ringFlags: 1,
    descUserAddr: 0x7f12_3456_0000,
    usedUserAddr: 0x7f12_3456_2000,
    availUserAddr: 0x7f12_3456_1000,
    logGuestAddr: Number.MAX_SAFE_INTEGER,
  },
  { type: 'SET_VRING_BASE', index: 255, num: 0x8000_8000 },
  { type: 'GET_VRING_BASE', index: 2, num: 0 },
  { type: 'SET_VRING_KICK', index: 0, fd: 20 },
  { type: 'SET_VRING_CALL', index: 1, fd: null },
  { type: 'SET_VRING_ERR', index: 2, fd: 22 },
  { type: 'GET_PROTOCOL_FEATURES' },
  { type: 'SET_PROTOCOL_FEATURES', features: 0xfffffn },
  { type: 'GET_QUEUE_NUM' },
  { type: 'SET_VRING_ENABLE', index: 3, num: 1 },
  { type: 'SEND_RARP', mac: new Uint8Array([0x52, 0x54, 0, 0x12, 0x34, 0x56]) },
  { type: 'NET_SET_MTU', mtu: 9000 },
  { type: 'SET_BACKEND_REQ_FD', fd: 23 },
  { type: 'IOTLB_MSG', iova: 0x1000, size: 0x2000, userAddr: 0x7f00_0000_0000, perm: 3, iotlbType: 2 },
  { type: 'SET_VRING_ENDIAN', index: 0, num: 1 },
  { type: 'GET_CONFIG', offset: 0, size: 60, configFlags: 0 },
  { type: 'SET_CONFIG', offset: 20, size: 4, configFlags: 1, data: new Uint8Array([1, 2, 3, 4]) },
  { type: 'CREATE_CRYPTO_SESSION', payload: new Uint8Array([9, 8, 7]) },
  { type: 'CLOSE_CRYPTO_SESSION', sessionId: 42 },
  { type: 'POSTCOPY_ADVISE' },
  { type: 'POSTCOPY_LISTEN' },
  { type: 'POSTCOPY_END' },
  { type: 'GET_INFLIGHT_FD', mmapSize: 0, mmapOffset: 0, numQueues: 4, queueSize: 256 },
  { type: 'SET_INFLIGHT_FD', mmapSize: 0x10000, mmapOffset: 0, numQueues: 4, queueSize: 256, fd: 24 },
  { type: 'GPU_SET_SOCKET', fd: 25 },
  { type: 'RESET_DEVICE' },
  { type: 'VRING_KICK', index: 1, num: 0 },
  { type: 'GET_MAX_MEM_SLOTS' },
  { type: 'ADD_MEM_REG', region: region(3, 26) },
  { type: 'REM_MEM_REG', region: { guestPhysAddr: 0, size: 0x1000, userAddr: 0x1000, mmapOffset: 0 }, fd: null },
  { type: 'SET_STATUS', status: 0xf },
  { type: 'GET_STATUS' },
  { type: 'GET_SHARED_OBJECT', uuid: new Uint8Array(16).map((_, i) => i) },
  { type: 'SET_DEVICE_STATE_FD', direction: 1, phase: 0, fd: 27 },
  { type: 'CHECK_DEVICE_STATE' },
  { type: 'GET_SHMEM_CONFIG' },
  { type: 'UNKNOWN', request: 1000, payload: new Uint8Array([1, 2, 3]), fds: [30, 31] },
];

const BACKEND_SAMPLES: BackendMessageInput[] = [
  { type: 'IOTLB_MSG', iova: 0x1000, size: 0, userAddr: 0, perm: 1, iotlbType: 1, needReply: true },
  { type: 'CONFIG_CHANGE_MSG', needReply: true },
  { type: 'VRING_HOST_NOTIFIER_MSG', index: 2, size: 0x1000, offset: 0x3000, fd: 40 },
  { type: 'VRING_CALL', index: 1, num: 0 },
  { type: 'VRING_ERR', index: 1, num: 0 },
  { type: 'SHARED_OBJECT_ADD', uuid: new Uint8Array(16).fill(1) },
  { type: 'SHARED_OBJECT_REMOVE', uuid: new Uint8Array(16).fill(2) },
  { type: 'SHARED_OBJECT_LOOKUP', uuid: new Uint8Array(16).fill(3) },
  { type: 'SHMEM_MAP', shmid: 1, fdOffset: 0, shmOffset: 0x10000, len: 0x1000, mapFlags: 1, fd: 41 },
  { type: 'SHMEM_UNMAP', shmid: 1, fdOffset: 0, shmOffset: 0x10000, len: 0x1000, mapFlags: 0 },
];

function expected<T extends { needReply?: boolean }>(input: T) {
  const { needReply, ...rest } = input;
  return { ...rest, flags: VERSION | (needReply ? FLAG_NEED_REPLY : 0), needReply: needReply === true };
}

describe('request round trip', () => {
  it('has a sample for every front-end and back-end request', () => {
    expect(new Set(FRONTEND_SAMPLES.map((s) => s.type))).toEqual(new Set([...Object.keys(FRONTEND_REQUESTS), 'UNKNOWN']));
    expect(new Set(BACKEND_SAMPLES.map((s) => s.type))).toEqual(new Set(Object.keys(BACKEND_REQUESTS)));
  });

  it.each(FRONTEND_SAMPLES.map((s) => [s.type, s] as const))('front-end %s', (_, input) => {
    const { bytes, fds } = encodeFrontendMessage(input);
    const [header, payload] = split(bytes);
    const h = readHeader(header);
    expect(h.size).toBe(payload.length);
    if (input.type !== 'UNKNOWN') expect(h.request).toBe(FrontendRequest[input.type]);
    const msg = decodeFrontendMessage(header, payload, fds);
    expect(msg).toEqual(expected(input));
  });

  it.each(BACKEND_SAMPLES.map((s) => [s.type, s] as const))('back-end %s', (_, input) => {
    const { bytes, fds } = encodeBackendMessage(input);
    const [header, payload] = split(bytes);
    expect(readHeader(header).request).toBe(BackendRequest[input.type as keyof typeof BackendRequest]);
    expect(decodeBackendMessage(header, payload, fds)).toEqual(expected(input));
  });

  it('puts fds in wire order: regions, NOFD bit when fd is null', () => {
    const mem = encodeFrontendMessage({ type: 'SET_MEM_TABLE', regions: [region(0, 7), region(1, 5)] });
    expect(mem.fds).toEqual([7, 5]);
    expect(readHeader(mem.bytes).size).toBe(8 + 2 * 32);
    const call = encodeFrontendMessage({ type: 'SET_VRING_CALL', index: 3, fd: null });
    expect(call.fds).toEqual([]);
    expect(new DataView(call.bytes.buffer).getUint32(headerSize, true)).toBe(3 | VRING_NOFD_MASK);
  });

  it('narrows on type', () => {
    const { bytes, fds } = encodeFrontendMessage({ type: 'SET_VRING_KICK', index: 4, fd: 9 });
    const msg: FrontendMessage = decodeFrontendMessage(...split(bytes), fds);
    if (msg.type !== 'SET_VRING_KICK') throw new Error('wrong type');
    const fd: number | null = msg.fd;
    expect([msg.index, fd]).toEqual([4, 9]);
  });

  it('accepts SET_MEM_TABLE sent as the whole 8-slot C struct', () => {
    const payload = cat(u32s(1, 0), u64s(0, 0x1000, 0x7f00_0000_0000, 0), new Uint8Array(7 * 32));
    const m = raw(FrontendRequest.SET_MEM_TABLE, payload);
    const msg = decodeFrontendMessage(m.header, m.payload, [3]);
    expect(msg).toMatchObject({ type: 'SET_MEM_TABLE', regions: [{ guestPhysAddr: 0, size: 0x1000, fd: 3 }] });
  });

  it('accepts GET_CONFIG without the data buffer, and the 20-byte inflight layout', () => {
    const q = raw(FrontendRequest.GET_CONFIG, u32s(0, 8, 0));
    expect(decodeFrontendMessage(q.header, q.payload, [])).toMatchObject({ type: 'GET_CONFIG', offset: 0, size: 8 });
    const i = raw(FrontendRequest.GET_INFLIGHT_FD, cat(u64s(0, 0), new Uint8Array([2, 0, 0, 1])));
    expect(decodeFrontendMessage(i.header, i.payload, [])).toMatchObject({ numQueues: 2, queueSize: 256 });
  });

  it('decodes unknown requests as UNKNOWN, fds and all', () => {
    const m = raw(77, new Uint8Array([1, 2]), VERSION | FLAG_NEED_REPLY);
    expect(decodeFrontendMessage(m.header, m.payload, [5])).toEqual({
      type: 'UNKNOWN',
      request: 77,
      flags: VERSION | FLAG_NEED_REPLY,
      needReply: true,
      payload: new Uint8Array([1, 2]),
      fds: [5],
    });
  });
});

describe('request validation', () => {
  const decode = (m: { header: Uint8Array; payload: Uint8Array }, fds: number[] = []) => () =>
    decodeFrontendMessage(m.header, m.payload, fds);

  it('BAD_FLAGS: version, REPLY on a request, reserved bits', () => {
    rejects('BAD_FLAGS', decode(raw(FrontendRequest.GET_FEATURES, undefined, 0)), /version 0, expected 1/);
    rejects('BAD_FLAGS', decode(raw(FrontendRequest.GET_FEATURES, undefined, 2)));
    rejects('BAD_FLAGS', decode(raw(FrontendRequest.GET_FEATURES, undefined, VERSION | FLAG_REPLY)), /REPLY flag/);
    rejects('BAD_FLAGS', decode(raw(FrontendRequest.GET_FEATURES, undefined, VERSION | 0x10)), /reserved/);
    rejects('BAD_FLAGS', decode(raw(999, undefined, VERSION | FLAG_REPLY)));
  });

  it('BAD_SIZE: header vs payload vs table, and the 4 KiB limit', () => {
    rejects('BAD_SIZE', () => readHeader(new Uint8Array(11)));
    rejects('BAD_SIZE', decode(raw(FrontendRequest.SET_FEATURES, u64s(1), VERSION, 16)), /announces 16 payload bytes but 8/);
    rejects('BAD_SIZE', decode(raw(FrontendRequest.SET_FEATURES, u32s(1))), /SET_FEATURES carries a 4-byte payload, expected 8/);
    rejects('BAD_SIZE', decode(raw(FrontendRequest.GET_FEATURES, u64s(0))));
    rejects('BAD_SIZE', decode(raw(FrontendRequest.SET_VRING_ADDR, new Uint8Array(32))));
    rejects('BAD_SIZE', decode(raw(999, new Uint8Array(MAX_PAYLOAD + 1))), /limit is 4096/);
    // SET_MEM_TABLE: the count says 2 regions, the payload holds 1.
    rejects('BAD_SIZE', decode(raw(FrontendRequest.SET_MEM_TABLE, cat(u32s(2, 0), new Uint8Array(32))), [1, 2]), /2 regions in 40 bytes/);
    // SET_CONFIG: size field says 8, 4 data bytes follow.
    rejects('BAD_SIZE', decode(raw(FrontendRequest.SET_CONFIG, cat(u32s(0, 8, 0), new Uint8Array(4)))));
    rejects('BAD_SIZE', decode(raw(FrontendRequest.SET_CONFIG, cat(u32s(0, 257, 0), new Uint8Array(257)))));
  });

  it('BAD_FDS: counts from the table', () => {
    const kick = (value: number) => raw(FrontendRequest.SET_VRING_KICK, u64s(value));
    const err = rejects('BAD_FDS', decode(kick(0), [3, 4]));
    expect(err.message).toBe('SET_VRING_KICK carried 2 fds, expected 1 (or 0 with the NOFD flag)');
    expect(err.request).toBe('SET_VRING_KICK');
    rejects('BAD_FDS', decode(kick(0), []));
    rejects('BAD_FDS', decode(kick(VRING_NOFD_MASK), [3]), /NOFD flag is set/);
    expect(decodeFrontendMessage(kick(VRING_NOFD_MASK | 5).header, kick(VRING_NOFD_MASK | 5).payload, [])).toMatchObject({
      index: 5,
      fd: null,
    });
    rejects('BAD_FDS', decode(raw(FrontendRequest.GET_FEATURES), [3]), /carried 1 fd, expected 0/);
    rejects('BAD_FDS', decode(raw(FrontendRequest.SET_LOG_FD), []));
    rejects('BAD_FDS', decode(raw(FrontendRequest.SET_BACKEND_REQ_FD), [1, 2]));
    const rem = raw(FrontendRequest.REM_MEM_REG, cat(u64s(0), u64s(0, 0x1000, 0x1000, 0)));
    expect(decodeFrontendMessage(rem.header, rem.payload, [8])).toMatchObject({ type: 'REM_MEM_REG', fd: 8 });
    rejects('BAD_FDS', decode(rem, [8, 9]), /expected 0 or 1/);
    const mem = encodeFrontendMessage({ type: 'SET_MEM_TABLE', regions: [region(0, 1), region(1, 2)] });
    rejects('BAD_FDS', () => decodeFrontendMessage(...split(mem.bytes), [1]), /carried 1 fd, expected 2 \(one per memory region\)/);
    const add = encodeFrontendMessage({ type: 'ADD_MEM_REG', region: region(0, 1) });
    rejects('BAD_FDS', () => decodeFrontendMessage(...split(add.bytes), []));
  });

  it('BAD_PAYLOAD: region count, vring index, stray bits, config bounds', () => {
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.SET_MEM_TABLE, cat(u32s(0, 0), new Uint8Array(32)))), /0 memory regions/);
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.SET_MEM_TABLE, cat(u32s(9, 0), new Uint8Array(256)))), /9 memory regions, expected 1..8/);
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.SET_VRING_NUM, u32s(256, 128))), /vring index 256/);
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.SET_VRING_ADDR, cat(u32s(0x1000, 0), new Uint8Array(32)))));
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.SET_VRING_CALL, u64s(0x200)), [1]), /bits other than/);
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.SET_VRING_CALL, u64s(1n << 40n)), [1]));
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.GET_CONFIG, u32s(0, 300, 0))), /config size 300 exceeds 256/);
    rejects('BAD_PAYLOAD', decode(raw(FrontendRequest.SET_CONFIG, cat(u32s(250, 10, 0), new Uint8Array(10)))), /runs past/);
  });

  it('refuses u64 addresses and sizes ≥ 2^53, accepts 2^53 - 1', () => {
    const addr = (log: bigint) => raw(FrontendRequest.SET_VRING_ADDR, cat(u32s(0, 0), u64s(0x1000, 0x2000, 0x3000, log)));
    expect(decodeFrontendMessage(addr(2n ** 53n - 1n).header, addr(2n ** 53n - 1n).payload, [])).toMatchObject({
      logGuestAddr: Number.MAX_SAFE_INTEGER,
    });
    rejects('BAD_PAYLOAD', decode(addr(2n ** 53n)), /log guest address is 0x20000000000000, beyond 2\^53/);
    rejects('BAD_PAYLOAD', decode(addr(2n ** 64n - 1n)));
    const mem = raw(FrontendRequest.SET_MEM_TABLE, cat(u32s(1, 0), u64s(0, 2n ** 60n, 0, 0)));
    rejects('BAD_PAYLOAD', decode(mem, [3]), /region size/);
    const mtu = raw(FrontendRequest.NET_SET_MTU, u64s(2n ** 63n));
    rejects('BAD_PAYLOAD', decode(mtu));
    // Feature masks are bigint: all 64 bits survive.
    const f = raw(FrontendRequest.SET_FEATURES, u64s(2n ** 64n - 1n));
    expect(decodeFrontendMessage(f.header, f.payload, [])).toMatchObject({ features: 2n ** 64n - 1n });
  });

  it('validates back-end channel requests the same way', () => {
    const m = raw(BackendRequest.VRING_HOST_NOTIFIER_MSG, u64s(VRING_NOFD_MASK | 1, 0x1000, 0));
    expect(decodeBackendMessage(m.header, m.payload, [])).toMatchObject({ index: 1, fd: null });
    rejects('BAD_FDS', () => decodeBackendMessage(m.header, m.payload, [4]));
    const c = raw(BackendRequest.CONFIG_CHANGE_MSG, undefined, VERSION | FLAG_REPLY);
    rejects('BAD_FLAGS', () => decodeBackendMessage(c.header, c.payload, []));
    const u = raw(99);
    expect(decodeBackendMessage(u.header, u.payload, [])).toMatchObject({ type: 'UNKNOWN', request: 99 });
  });
});

describe('replies', () => {
  const cases: [FrontendRequest, ReplyPayload][] = [
    [FrontendRequest.GET_FEATURES, { kind: 'features', features: (1n << 63n) | (1n << 30n) }],
    [FrontendRequest.GET_PROTOCOL_FEATURES, { kind: 'features', features: 0xb_fe0bn }],
    [FrontendRequest.GET_QUEUE_NUM, { kind: 'u64', value: 2 }],
    [FrontendRequest.GET_MAX_MEM_SLOTS, { kind: 'u64', value: 509 }],
    [FrontendRequest.GET_STATUS, { kind: 'u64', value: 0xf }],
    [FrontendRequest.GET_VRING_BASE, { kind: 'vring-state', index: 1, num: 0x1234 }],
    [FrontendRequest.GET_CONFIG, { kind: 'config', offset: 0, configFlags: 0, data: new Uint8Array([8, 0, 0, 0]) }],
    [FrontendRequest.GET_CONFIG, { kind: 'config-error' }],
    [FrontendRequest.SET_MEM_TABLE, { kind: 'ack', status: 0 }],
    [FrontendRequest.SET_VRING_ADDR, { kind: 'ack', status: 1 }],
    [FrontendRequest.SET_FEATURES, { kind: 'ack', status: -22 }],
    [FrontendRequest.CHECK_DEVICE_STATE, { kind: 'ack', status: 0 }],
  ];

  it.each(cases.map(([r, p]) => [FrontendRequest[r], p.kind, r, p] as const))('%s %s', (_, __, request, payload) => {
    const bytes = encodeReply(request, payload);
    const h = readHeader(bytes);
    expect(h).toMatchObject({ request, flags: VERSION | FLAG_REPLY, size: bytes.length - headerSize });
    const reply = decodeReply(...split(bytes), request);
    const { kind, ...fields } = payload;
    expect(reply).toMatchObject({ kind, request, ...fields });
    if (payload.kind === 'config') expect(reply).toMatchObject({ size: payload.data.length });
  });

  it('writes into a caller buffer', () => {
    const out = new Uint8Array(64).fill(0xee);
    const bytes = encodeAck(FrontendRequest.SET_VRING_KICK, 0, out);
    expect(bytes.buffer).toBe(out.buffer);
    expect(bytes.length).toBe(headerSize + 8);
    expect(decodeReply(...split(bytes), FrontendRequest.SET_VRING_KICK)).toEqual({
      kind: 'ack',
      request: FrontendRequest.SET_VRING_KICK,
      status: 0,
    });
    expect(() => encodeAck(FrontendRequest.SET_VRING_KICK, 0, new Uint8Array(10))).toThrow(RangeError);
  });

  it('refuses a reply kind the request is not answered with', () => {
    expect(() => encodeReply(FrontendRequest.GET_FEATURES, { kind: 'u64', value: 1 })).toThrow(RangeError);
    expect(() => encodeReply(FrontendRequest.SET_OWNER, { kind: 'features', features: 1n })).toThrow(RangeError);
    expect(() => encodeReply(FrontendRequest.GET_VRING_BASE, { kind: 'ack', status: 0 })).toThrow(RangeError);
    expect(encodeReply(999 as FrontendRequest, { kind: 'ack', status: 1 }).length).toBe(20); // unknown: ack
  });

  it('validates REPLY flag, request match, sizes', () => {
    const ack = encodeAck(FrontendRequest.SET_OWNER, 0);
    rejects('UNEXPECTED_REPLY', () => decodeReply(...split(ack), FrontendRequest.SET_FEATURES), /awaited the reply to SET_FEATURES but got one to SET_OWNER/);
    const req = encodeFrontendMessage({ type: 'GET_FEATURES' }).bytes;
    rejects('BAD_FLAGS', () => decodeReply(...split(req), FrontendRequest.GET_FEATURES), /lacks the REPLY flag/);
    const short = raw(FrontendRequest.GET_QUEUE_NUM, u32s(1), VERSION | FLAG_REPLY);
    rejects('BAD_SIZE', () => decodeReply(short.header, short.payload, FrontendRequest.GET_QUEUE_NUM));
    const big = raw(FrontendRequest.GET_QUEUE_NUM, u64s(2n ** 53n), VERSION | FLAG_REPLY);
    rejects('BAD_PAYLOAD', () => decodeReply(big.header, big.payload, FrontendRequest.GET_QUEUE_NUM));
    rejects('BAD_FDS', () => decodeReply(...split(ack), FrontendRequest.SET_OWNER, [3]));
  });

  it('hands uninterpreted replies back raw, with their fds', () => {
    const m = raw(FrontendRequest.GET_INFLIGHT_FD, cat(u64s(0x1000, 0), u32s(0x01000002), u32s(0)), VERSION | FLAG_REPLY);
    expect(decodeReply(m.header, m.payload, FrontendRequest.GET_INFLIGHT_FD, [6])).toMatchObject({
      kind: 'raw',
      replyKind: 'inflight',
      fds: [6],
    });
  });

  it('marks the requests that always reply', () => {
    const always = Object.entries(FRONTEND_REQUESTS)
      .filter(([, spec]) => alwaysReplies(spec))
      .map(([name]) => name);
    expect(always).toEqual(expect.arrayContaining(['GET_FEATURES', 'GET_PROTOCOL_FEATURES', 'GET_VRING_BASE', 'GET_CONFIG', 'GET_QUEUE_NUM']));
    expect(always).not.toContain('SET_LOG_BASE');
    expect(always).not.toContain('SET_MEM_TABLE');
  });
});

describe('back-end channel acks', () => {
  it('round-trips a status', () => {
    const bytes = encodeBackendAck(BackendRequest.CONFIG_CHANGE_MSG, 0);
    expect(decodeBackendAck(...split(bytes), BackendRequest.CONFIG_CHANGE_MSG)).toBe(0);
    const fail = encodeBackendAck(BackendRequest.IOTLB_MSG, -1);
    expect(decodeBackendAck(...split(fail), BackendRequest.IOTLB_MSG)).toBe(-1);
    rejects('UNEXPECTED_REPLY', () => decodeBackendAck(...split(fail), BackendRequest.VRING_CALL));
  });
});
