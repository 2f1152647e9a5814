/**
 * vhost-user message codec: bytes + fds ⇄ typed messages, for both directions and both channels. Owns all
 * wire validation, driven by the request tables in protocol.ts: flags, header size vs payload vs layout, fd
 * count, region count, vring index, config bounds, u64 values beyond 2^53. A violation throws
 * VhostProtocolError before any handler sees the message. Pure: no I/O, and it never closes an fd (on error
 * the caller closes the fds it received). Unknown request numbers decode as { type: 'UNKNOWN' }.
 *
 *   back-end:  decodeFrontendMessage, encodeReply, encodeBackendMessage, decodeBackendAck
 *   front-end: encodeFrontendMessage, decodeReply, decodeBackendMessage, encodeBackendAck (test front-end)
 */

import { VhostProtocolError } from './errors.js';
import {
  BACKEND_REQUESTS,
  BackendRequest,
  CONFIG_HEADER_SIZE,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FLAG_RESERVED_MASK,
  FLAG_VERSION_MASK,
  FRONTEND_REQUESTS,
  FrontendRequest,
  HEADER_SIZE,
  MAX_CONFIG_SIZE,
  MAX_MEM_REGIONS_BASELINE,
  MAX_PAYLOAD,
  MEM_REGION_SIZE,
  PAYLOAD_SIZE,
  VERSION,
  VRING_INDEX_MASK,
  VRING_NOFD_MASK,
  backendRequestName,
  frontendRequestName,
  type BackendRequestName,
  type FrontendRequestName,
  type PayloadKind,
  type ReplyKind,
  type RequestSpec,
} from './protocol.js';

export const headerSize = HEADER_SIZE;

export interface Header {
  request: number;
  flags: number;
  size: number;
}

// ---------------------------------------------------------------------------------------------------------
// Message types, derived from the tables: a new row gets its message type for free.

export interface MemoryRegionDesc {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}
export interface MemoryRegion extends MemoryRegionDesc {
  fd: number;
}

type NoFields = Record<never, never>;

/** Decoded fields per payload layout ('u64' and 'mem-region' depend on the row, see PayloadFieldsOf). */
interface LayoutFields {
  none: NoFields;
  features: { features: bigint };
  u64: NoFields;
  mac: { mac: Uint8Array };
  'vring-state': { index: number; num: number };
  'vring-addr': {
    index: number;
    ringFlags: number;
    descUserAddr: number;
    usedUserAddr: number;
    availUserAddr: number;
    logGuestAddr: number;
  };
  'vring-fd': { index: number };
  'vring-area': { index: number; size: number; offset: number };
  'mem-table': { regions: MemoryRegion[] };
  'mem-region': NoFields;
  log: { mmapSize: number; mmapOffset: number };
  iotlb: { iova: number; size: number; userAddr: number; perm: number; iotlbType: number };
  config: { offset: number; size: number; configFlags: number; data: Uint8Array };
  'config-query': { offset: number; size: number; configFlags: number };
  inflight: { mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number };
  uuid: { uuid: Uint8Array };
  'device-state': { direction: number; phase: number };
  'shmem-map': { shmid: number; fdOffset: number; shmOffset: number; len: number; mapFlags: number };
  opaque: { payload: Uint8Array };
}

type Simplify<T> = { [K in keyof T]: T[K] } & {};
type PayloadFieldsOf<S extends RequestSpec> = S extends { payload: 'u64'; field: infer F extends string }
  ? { [K in F]: number }
  : S extends { payload: 'mem-region'; fds: 'per-region' }
    ? { region: MemoryRegion }
    : S extends { payload: 'mem-region' }
      ? { region: MemoryRegionDesc }
      : LayoutFields[S['payload']];
type FdFieldsOf<S extends RequestSpec> = S['fds'] extends 1
  ? { fd: number }
  : S['fds'] extends 'optional' | 'unless-nofd'
    ? { fd: number | null }
    : NoFields;
type MessagesOf<T extends Record<string, RequestSpec>> = {
  [N in keyof T]: Simplify<
    { type: N; flags: number; needReply: boolean } & PayloadFieldsOf<T[N]> & FdFieldsOf<T[N]>
  >;
}[keyof T];

/** A request number not in the table: the session answers it (REPLY_ACK failure) and closes the fds. */
export interface UnknownMessage {
  type: 'UNKNOWN';
  flags: number;
  needReply: boolean;
  request: number;
  payload: Uint8Array;
  fds: number[];
}

export type FrontendMessage = MessagesOf<typeof FRONTEND_REQUESTS> | UnknownMessage;
export type BackendMessage = MessagesOf<typeof BACKEND_REQUESTS> | UnknownMessage;
export type FrontendMessageOf<N extends FrontendMessage['type']> = Extract<FrontendMessage, { type: N }>;
export type BackendMessageOf<N extends BackendMessage['type']> = Extract<BackendMessage, { type: N }>;

/** What the encoders take: a message without the raw flags; needReply defaults to false. */
type InputOf<M> = M extends unknown ? Simplify<Omit<M, 'flags' | 'needReply'> & { needReply?: boolean }> : never;
export type FrontendMessageInput = InputOf<FrontendMessage>;
export type BackendMessageInput = InputOf<BackendMessage>;

// ---------------------------------------------------------------------------------------------------------
// Headers

export function readHeader(bytes: Uint8Array): Header {
  if (bytes.length < HEADER_SIZE) {
    throw new VhostProtocolError('BAD_SIZE', 'HEADER', `header is ${bytes.length} bytes, expected ${HEADER_SIZE}`);
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  return { request: v.getUint32(0, true), flags: v.getUint32(4, true), size: v.getUint32(8, true) };
}

function writeHeader(bytes: Uint8Array, request: number, flags: number, size: number): void {
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  v.setUint32(0, request, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, size, true);
}

/** Checks common to every message; returns the header. `reply`: whether this must be a reply. */
function checkHeader(header: Uint8Array, payload: Uint8Array, name: string, reply: boolean): Header {
  const h = readHeader(header);
  const what = reply ? `reply to ${name}` : name;
  if ((h.flags & FLAG_VERSION_MASK) !== VERSION) {
    throw new VhostProtocolError('BAD_FLAGS', name, `${what} has protocol version ${h.flags & FLAG_VERSION_MASK}, expected ${VERSION}`);
  }
  if ((h.flags & FLAG_RESERVED_MASK) !== 0) {
    throw new VhostProtocolError('BAD_FLAGS', name, `${what} sets reserved flag bits (flags 0x${h.flags.toString(16)})`);
  }
  if (reply !== ((h.flags & FLAG_REPLY) !== 0)) {
    const msg = reply ? `${what} lacks the REPLY flag (0x4)` : `${what} is a request but sets the REPLY flag (0x4)`;
    throw new VhostProtocolError('BAD_FLAGS', name, msg);
  }
  if (h.size > MAX_PAYLOAD) {
    throw new VhostProtocolError('BAD_SIZE', name, `${what} announces a ${h.size}-byte payload; the limit is ${MAX_PAYLOAD}`);
  }
  if (payload.length !== h.size) {
    throw new VhostProtocolError('BAD_SIZE', name, `${what} announces ${h.size} payload bytes but ${payload.length} were read`);
  }
  return h;
}

// ---------------------------------------------------------------------------------------------------------
// Readers and writers. u64 addresses/sizes become numbers: anything ≥ 2^53 is refused, not rounded.

const TWO_32 = 0x1_0000_0000;
const HI_LIMIT = 0x20_0000; // hi word of 2^53

function hex64(hi: number, lo: number): string {
  return hi === 0 ? lo.toString(16) : hi.toString(16) + lo.toString(16).padStart(8, '0');
}

class Reader {
  private readonly view: DataView;
  constructor(
    readonly bytes: Uint8Array,
    readonly name: string,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  u8(off: number): number {
    return this.view.getUint8(off);
  }
  u16(off: number): number {
    return this.view.getUint16(off, true);
  }
  u32(off: number): number {
    return this.view.getUint32(off, true);
  }
  big(off: number): bigint {
    return this.view.getBigUint64(off, true);
  }
  /** A u64 address, size, offset or count. */
  u64(off: number, what: string): number {
    const lo = this.u32(off);
    const hi = this.u32(off + 4);
    if (hi >= HI_LIMIT) {
      throw this.bad(
        `${what} is 0x${hex64(hi, lo)}, beyond 2^53: no address, size or offset of ours can be that large ` +
          `(user space and guest RAM sit far below it), so the value is corrupt`,
      );
    }
    return hi * TWO_32 + lo;
  }
  /** A u64 status: 0 success, anything else failure; small negative values (-errno) survive. */
  status(off: number): number {
    const lo = this.u32(off);
    const hi = this.u32(off + 4);
    if (hi === 0xffff_ffff && lo >= 0x8000_0000) return lo - TWO_32;
    if (hi >= HI_LIMIT) throw this.bad(`status 0x${hex64(hi, lo)} is neither a small number nor a small negative one`);
    return hi * TWO_32 + lo;
  }
  copy(off: number, len: number): Uint8Array {
    return this.bytes.slice(off, off + len);
  }
  vringIndex(off: number): number {
    const index = this.u32(off);
    if (index > VRING_INDEX_MASK) throw this.bad(`vring index ${index} is beyond ${VRING_INDEX_MASK}`);
    return index;
  }
  bad(message: string): VhostProtocolError {
    return new VhostProtocolError('BAD_PAYLOAD', this.name, `${this.name}: ${message}`);
  }
}

class Writer {
  private readonly view: DataView;
  constructor(readonly bytes: Uint8Array) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  u8(off: number, v: number): void {
    this.view.setUint8(off, int(v, 0xff));
  }
  u16(off: number, v: number): void {
    this.view.setUint16(off, int(v, 0xffff), true);
  }
  u32(off: number, v: number): void {
    this.view.setUint32(off, int(v, 0xffff_ffff), true);
  }
  u64(off: number, v: number): void {
    int(v, Number.MAX_SAFE_INTEGER);
    this.view.setUint32(off, v >>> 0, true);
    this.view.setUint32(off + 4, Math.floor(v / TWO_32), true);
  }
  big(off: number, v: bigint): void {
    if (v < 0n || v >= 1n << 64n) throw new RangeError(`${v} does not fit a u64`);
    this.view.setBigUint64(off, v, true);
  }
  status(off: number, v: number): void {
    if (!Number.isSafeInteger(v) || v < -0x8000_0000) throw new RangeError(`bad status ${v}`);
    this.view.setUint32(off, v >>> 0, true);
    this.view.setUint32(off + 4, v < 0 ? 0xffff_ffff : Math.floor(v / TWO_32), true);
  }
  put(off: number, data: Uint8Array, len: number): void {
    if (data.length !== len) throw new RangeError(`expected ${len} bytes, got ${data.length}`);
    this.bytes.set(data, off);
  }
}

function int(v: number, max: number): number {
  if (!Number.isSafeInteger(v) || v < 0 || v > max) throw new RangeError(`${v} is not an integer in 0..${max}`);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Payload layouts: one codec per PayloadKind. Size bounds come from PAYLOAD_SIZE; `decode` refines them
// where the payload says its own length (region count, config size) and checks contents.

type Fields = Record<string, unknown>;

interface Layout {
  /** Payload length when encoding `m` (default: the exact size, or the max bound). */
  length?(m: Fields): number;
  decode(r: Reader, spec: RequestSpec, fds: readonly number[]): Fields;
  encode(w: Writer, m: Fields, spec: RequestSpec): void;
}

const num = (m: Fields, k: string): number => m[k] as number;
const bytesOf = (m: Fields, k: string): Uint8Array => m[k] as Uint8Array;

function readRegion(r: Reader, off: number): MemoryRegionDesc {
  return {
    guestPhysAddr: r.u64(off, 'region guest address'),
    size: r.u64(off + 8, 'region size'),
    userAddr: r.u64(off + 16, 'region user address'),
    mmapOffset: r.u64(off + 24, 'region mmap offset'),
  };
}

function writeRegion(w: Writer, off: number, region: MemoryRegionDesc): void {
  w.u64(off, region.guestPhysAddr);
  w.u64(off + 8, region.size);
  w.u64(off + 16, region.userAddr);
  w.u64(off + 24, region.mmapOffset);
}

/** u64 holding a vring index in bits 0-7 and NOFD in bit 8; nothing else may be set. */
function readIndexNofd(r: Reader): number {
  const lo = r.u32(0);
  const hi = r.u32(4);
  if (hi !== 0 || (lo & ~(VRING_INDEX_MASK | VRING_NOFD_MASK)) !== 0) {
    throw r.bad(`0x${hex64(hi, lo)} sets bits other than the vring index (0-7) and NOFD (8)`);
  }
  return lo & VRING_INDEX_MASK;
}

function writeIndexNofd(w: Writer, m: Fields): void {
  w.u32(0, int(num(m, 'index'), VRING_INDEX_MASK) | (m.fd === null ? VRING_NOFD_MASK : 0));
  w.u32(4, 0);
}

function readConfigHeader(r: Reader, dataOptional: boolean): { offset: number; size: number; configFlags: number } {
  const offset = r.u32(0);
  const size = r.u32(4);
  const configFlags = r.u32(8);
  if (size > MAX_CONFIG_SIZE) throw r.bad(`config size ${size} exceeds ${MAX_CONFIG_SIZE}`);
  if (offset + size > MAX_CONFIG_SIZE) {
    throw r.bad(`config range ${offset}..${offset + size} runs past the ${MAX_CONFIG_SIZE}-byte config space`);
  }
  const len = r.bytes.length;
  if (len !== CONFIG_HEADER_SIZE + size && !(dataOptional && len === CONFIG_HEADER_SIZE)) {
    throw new VhostProtocolError(
      'BAD_SIZE',
      r.name,
      `${r.name} carries ${len} payload bytes for a ${size}-byte config access, expected ${CONFIG_HEADER_SIZE + size}`,
    );
  }
  return { offset, size, configFlags };
}

function writeConfigHeader(w: Writer, m: Fields, size: number): void {
  const offset = num(m, 'offset');
  if (size > MAX_CONFIG_SIZE || offset + size > MAX_CONFIG_SIZE) {
    throw new RangeError(`config range ${offset}..${offset + size} runs past ${MAX_CONFIG_SIZE}`);
  }
  w.u32(0, offset);
  w.u32(4, size);
  w.u32(8, num(m, 'configFlags'));
}

const LAYOUTS: Record<PayloadKind, Layout> = {
  none: { decode: () => ({}), encode: () => {} },
  features: {
    decode: (r) => ({ features: r.big(0) }),
    encode: (w, m) => w.big(0, m.features as bigint),
  },
  u64: {
    decode: (r, spec) => ({ [spec.field!]: r.u64(0, spec.field!) }),
    encode: (w, m, spec) => w.u64(0, num(m, spec.field!)),
  },
  mac: {
    decode: (r) => ({ mac: r.copy(0, 6) }),
    encode: (w, m) => w.put(0, bytesOf(m, 'mac'), 6),
  },
  'vring-state': {
    decode: (r) => ({ index: r.vringIndex(0), num: r.u32(4) }),
    encode: (w, m) => {
      w.u32(0, int(num(m, 'index'), VRING_INDEX_MASK));
      w.u32(4, num(m, 'num'));
    },
  },
  'vring-addr': {
    decode: (r) => ({
      index: r.vringIndex(0),
      ringFlags: r.u32(4),
      descUserAddr: r.u64(8, 'descriptor table address'),
      usedUserAddr: r.u64(16, 'used ring address'),
      availUserAddr: r.u64(24, 'available ring address'),
      logGuestAddr: r.u64(32, 'log guest address'),
    }),
    encode: (w, m) => {
      w.u32(0, int(num(m, 'index'), VRING_INDEX_MASK));
      w.u32(4, num(m, 'ringFlags'));
      w.u64(8, num(m, 'descUserAddr'));
      w.u64(16, num(m, 'usedUserAddr'));
      w.u64(24, num(m, 'availUserAddr'));
      w.u64(32, num(m, 'logGuestAddr'));
    },
  },
  'vring-fd': {
    decode: (r) => ({ index: readIndexNofd(r) }),
    encode: writeIndexNofd,
  },
  'vring-area': {
    decode: (r) => ({ index: readIndexNofd(r), size: r.u64(8, 'area size'), offset: r.u64(16, 'area offset') }),
    encode: (w, m) => {
      writeIndexNofd(w, m);
      w.u64(8, num(m, 'size'));
      w.u64(16, num(m, 'offset'));
    },
  },
  'mem-table': {
    length: (m) => 8 + (m.regions as unknown[]).length * MEM_REGION_SIZE,
    decode: (r, _spec, fds) => {
      const count = r.u32(0);
      if (count < 1 || count > MAX_MEM_REGIONS_BASELINE) {
        throw r.bad(`${count} memory regions, expected 1..${MAX_MEM_REGIONS_BASELINE}`);
      }
      // Exactly the regions announced; or, as some front-ends send it, the whole 8-slot C struct.
      const exact = 8 + count * MEM_REGION_SIZE;
      const full = 8 + MAX_MEM_REGIONS_BASELINE * MEM_REGION_SIZE;
      if (r.bytes.length !== exact && r.bytes.length !== full) {
        throw new VhostProtocolError(
          'BAD_SIZE',
          r.name,
          `${r.name} announces ${count} regions in ${r.bytes.length} bytes, expected ${exact} (or ${full})`,
        );
      }
      const regions: MemoryRegion[] = [];
      for (let i = 0; i < count; i++) regions.push({ ...readRegion(r, 8 + i * MEM_REGION_SIZE), fd: fds[i] ?? -1 });
      return { regions };
    },
    encode: (w, m) => {
      const regions = m.regions as MemoryRegion[];
      if (regions.length < 1 || regions.length > MAX_MEM_REGIONS_BASELINE) {
        throw new RangeError(`SET_MEM_TABLE takes 1..${MAX_MEM_REGIONS_BASELINE} regions, not ${regions.length}`);
      }
      w.u32(0, regions.length);
      regions.forEach((region, i) => writeRegion(w, 8 + i * MEM_REGION_SIZE, region));
    },
  },
  'mem-region': {
    decode: (r, spec, fds) => {
      const region = readRegion(r, 8);
      return { region: spec.fds === 'per-region' ? { ...region, fd: fds[0] ?? -1 } : region };
    },
    encode: (w, m) => writeRegion(w, 8, m.region as MemoryRegionDesc),
  },
  log: {
    decode: (r) => ({ mmapSize: r.u64(0, 'log size'), mmapOffset: r.u64(8, 'log offset') }),
    encode: (w, m) => {
      w.u64(0, num(m, 'mmapSize'));
      w.u64(8, num(m, 'mmapOffset'));
    },
  },
  iotlb: {
    decode: (r) => ({
      iova: r.u64(0, 'IOVA'),
      size: r.u64(8, 'IOTLB size'),
      userAddr: r.u64(16, 'IOTLB user address'),
      perm: r.u8(24),
      iotlbType: r.u8(25),
    }),
    encode: (w, m) => {
      w.u64(0, num(m, 'iova'));
      w.u64(8, num(m, 'size'));
      w.u64(16, num(m, 'userAddr'));
      w.u8(24, num(m, 'perm'));
      w.u8(25, num(m, 'iotlbType'));
    },
  },
  config: {
    length: (m) => CONFIG_HEADER_SIZE + bytesOf(m, 'data').length,
    decode: (r) => {
      const h = readConfigHeader(r, false);
      return { ...h, data: r.copy(CONFIG_HEADER_SIZE, h.size) };
    },
    encode: (w, m) => {
      const data = bytesOf(m, 'data');
      if (num(m, 'size') !== data.length) throw new RangeError(`config size ${num(m, 'size')} ≠ data length ${data.length}`);
      writeConfigHeader(w, m, data.length);
      w.put(CONFIG_HEADER_SIZE, data, data.length);
    },
  },
  'config-query': {
    length: (m) => CONFIG_HEADER_SIZE + num(m, 'size'), // QEMU sends the (zeroed) buffer along
    decode: (r) => readConfigHeader(r, true),
    encode: (w, m) => writeConfigHeader(w, m, num(m, 'size')),
  },
  inflight: {
    length: () => 24,
    decode: (r) => ({
      mmapSize: r.u64(0, 'inflight mmap size'),
      mmapOffset: r.u64(8, 'inflight mmap offset'),
      numQueues: r.u16(16),
      queueSize: r.u16(18),
    }),
    encode: (w, m) => {
      w.u64(0, num(m, 'mmapSize'));
      w.u64(8, num(m, 'mmapOffset'));
      w.u16(16, num(m, 'numQueues'));
      w.u16(18, num(m, 'queueSize'));
    },
  },
  uuid: {
    decode: (r) => ({ uuid: r.copy(0, 16) }),
    encode: (w, m) => w.put(0, bytesOf(m, 'uuid'), 16),
  },
  'device-state': {
    decode: (r) => ({ direction: r.u32(0), phase: r.u32(4) }),
    encode: (w, m) => {
      w.u32(0, num(m, 'direction'));
      w.u32(4, num(m, 'phase'));
    },
  },
  'shmem-map': {
    decode: (r) => ({
      shmid: r.u8(0),
      fdOffset: r.u64(8, 'fd offset'),
      shmOffset: r.u64(16, 'shared memory offset'),
      len: r.u64(24, 'mapping length'),
      mapFlags: r.u64(32, 'mapping flags'),
    }),
    encode: (w, m) => {
      w.u8(0, num(m, 'shmid'));
      w.u64(8, num(m, 'fdOffset'));
      w.u64(16, num(m, 'shmOffset'));
      w.u64(24, num(m, 'len'));
      w.u64(32, num(m, 'mapFlags'));
    },
  },
  opaque: {
    length: (m) => bytesOf(m, 'payload').length,
    decode: (r) => ({ payload: r.copy(0, r.bytes.length) }),
    encode: (w, m) => w.put(0, bytesOf(m, 'payload'), w.bytes.length),
  },
};

function sizeText(rule: number | { min: number; max: number }): string {
  return typeof rule === 'number' ? `${rule}` : `${rule.min}..${rule.max}`;
}

// ---------------------------------------------------------------------------------------------------------
// Generic request decode/encode over a table (front-end requests, back-end requests).

interface Channel {
  table: Readonly<Record<string, RequestSpec>>;
  number(name: string): number;
  name(request: number): string;
}

const frontendChannel: Channel = {
  table: FRONTEND_REQUESTS,
  number: (name) => FrontendRequest[name as FrontendRequestName],
  name: frontendRequestName,
};

const backendChannel: Channel = {
  table: BACKEND_REQUESTS,
  number: (name) => BackendRequest[name as BackendRequestName],
  name: backendRequestName,
};

function fdCountText(n: number): string {
  return n === 1 ? '1 fd' : `${n} fds`;
}

function decodeRequest(ch: Channel, header: Uint8Array, payload: Uint8Array, fds: readonly number[]): Fields {
  const request = readHeader(header).request;
  const name = ch.name(request);
  const h = checkHeader(header, payload, name, false);
  const base = { flags: h.flags, needReply: (h.flags & FLAG_NEED_REPLY) !== 0 };
  const spec = Object.hasOwn(ch.table, name) ? ch.table[name] : undefined;
  if (spec === undefined) return { type: 'UNKNOWN', ...base, request, payload: payload.slice(), fds: [...fds] };
  const rule = PAYLOAD_SIZE[spec.payload];
  const fits = typeof rule === 'number' ? h.size === rule : h.size >= rule.min && h.size <= rule.max;
  if (!fits) {
    throw new VhostProtocolError('BAD_SIZE', name, `${name} carries a ${h.size}-byte payload, expected ${sizeText(rule)}`);
  }
  const r = new Reader(payload, name);
  const fields = LAYOUTS[spec.payload].decode(r, spec, fds);

  // fd count, from the table (and for 'unless-nofd' the NOFD bit, for 'per-region' the region count).
  let min: number;
  let max: number;
  let expected: string;
  switch (spec.fds) {
    case 0:
    case 1:
      min = max = spec.fds;
      expected = `${spec.fds}`;
      break;
    case 'optional':
      [min, max, expected] = [0, 1, '0 or 1'];
      break;
    case 'per-region': {
      const regions = (fields.regions as unknown[] | undefined)?.length ?? 1;
      min = max = regions;
      expected = `${regions} (one per memory region)`;
      break;
    }
    case 'unless-nofd': {
      const nofd = (r.u32(0) & VRING_NOFD_MASK) !== 0;
      min = max = nofd ? 0 : 1;
      expected = nofd ? '0 (the NOFD flag is set)' : '1 (or 0 with the NOFD flag)';
      break;
    }
  }
  if (fds.length < min || fds.length > max) {
    throw new VhostProtocolError('BAD_FDS', name, `${name} carried ${fdCountText(fds.length)}, expected ${expected}`);
  }
  if (spec.fds === 1) fields.fd = fds[0];
  else if (spec.fds === 'optional' || spec.fds === 'unless-nofd') fields.fd = fds[0] ?? null;
  return { type: name, ...base, ...fields };
}

function encodeRequest(ch: Channel, msg: Fields): { bytes: Uint8Array; fds: number[] } {
  const flags = VERSION | (msg.needReply === true ? FLAG_NEED_REPLY : 0);
  if (msg.type === 'UNKNOWN') {
    const payload = bytesOf(msg, 'payload');
    const bytes = new Uint8Array(HEADER_SIZE + payload.length);
    writeHeader(bytes, num(msg, 'request'), flags, payload.length);
    bytes.set(payload, HEADER_SIZE);
    return { bytes, fds: [...(msg.fds as number[])] };
  }
  const name = msg.type as string;
  const spec = Object.hasOwn(ch.table, name) ? ch.table[name] : undefined;
  if (spec === undefined) throw new RangeError(`unknown message type ${name}`);
  const layout = LAYOUTS[spec.payload];
  const rule = PAYLOAD_SIZE[spec.payload];
  const size = layout.length?.(msg) ?? (typeof rule === 'number' ? rule : rule.max);
  if (size > MAX_PAYLOAD) throw new RangeError(`${name} payload of ${size} bytes exceeds ${MAX_PAYLOAD}`);
  const bytes = new Uint8Array(HEADER_SIZE + size);
  writeHeader(bytes, ch.number(name), flags, size);
  layout.encode(new Writer(bytes.subarray(HEADER_SIZE)), msg, spec);

  let fds: number[];
  if (spec.fds === 0) fds = [];
  else if (spec.fds === 'per-region') {
    fds = msg.regions !== undefined ? (msg.regions as MemoryRegion[]).map((r) => r.fd) : [(msg.region as MemoryRegion).fd];
  } else fds = msg.fd === null || msg.fd === undefined ? [] : [num(msg, 'fd')];
  return { bytes, fds };
}

/**
 * Decode and validate one front-end request. `header` is the 12 header bytes, `payload` exactly the
 * header's size bytes, `fds` the descriptors that arrived with it (the caller closes them if this throws).
 */
export function decodeFrontendMessage(header: Uint8Array, payload: Uint8Array, fds: readonly number[]): FrontendMessage {
  return decodeRequest(frontendChannel, header, payload, fds) as FrontendMessage;
}

/** Front-end side: one request as bytes (header + payload) and the fds to send with it. */
export function encodeFrontendMessage(msg: FrontendMessageInput): { bytes: Uint8Array; fds: number[] } {
  return encodeRequest(frontendChannel, msg as Fields);
}

/** Front-end side: decode a back-end channel request. */
export function decodeBackendMessage(header: Uint8Array, payload: Uint8Array, fds: readonly number[]): BackendMessage {
  return decodeRequest(backendChannel, header, payload, fds) as BackendMessage;
}

/** Back-end side: a request for the back-end channel (CONFIG_CHANGE_MSG, VRING_CALL, ...). */
export function encodeBackendMessage(msg: BackendMessageInput): { bytes: Uint8Array; fds: number[] } {
  return encodeRequest(backendChannel, msg as Fields);
}

// ---------------------------------------------------------------------------------------------------------
// Replies to front-end requests.

/** What the back-end can reply. 'ack' is the REPLY_ACK u64 status (0 = success, non-zero or -errno failure). */
export type ReplyPayload =
  | { kind: 'features'; features: bigint }
  | { kind: 'u64'; value: number }
  | { kind: 'ack'; status: number }
  | { kind: 'vring-state'; index: number; num: number }
  | { kind: 'config'; offset: number; configFlags: number; data: Uint8Array }
  | { kind: 'config-error' } // GET_CONFIG failure: empty payload
  /** SET_DEVICE_STATE_FD: a status (0: fine) and whether the back-end returns an fd of its own (we never do). */
  | { kind: 'status-fd'; status: number; noFd: boolean }
  /** GET_INFLIGHT_FD: the region's description; `fd` goes in the ancillary data (the caller sends it). */
  | { kind: 'inflight'; mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number; fd: number };

/** A decoded reply; replies the codec does not interpret ('inflight', 'fd', ...) come back 'raw'. */
export type Reply =
  | { kind: 'features'; request: FrontendRequest; features: bigint }
  | { kind: 'u64'; request: FrontendRequest; value: number }
  | { kind: 'ack'; request: FrontendRequest; status: number }
  | { kind: 'vring-state'; request: FrontendRequest; index: number; num: number }
  | { kind: 'config'; request: FrontendRequest; offset: number; size: number; configFlags: number; data: Uint8Array }
  | { kind: 'config-error'; request: FrontendRequest }
  | { kind: 'raw'; request: FrontendRequest; replyKind: ReplyKind; payload: Uint8Array; fds: number[] };

const FDLESS_REPLIES: readonly ReplyKind[] = ['features', 'u64', 'ack', 'vring-state', 'config'];

/** The reply kind a request gets: its table reply, else the REPLY_ACK status. */
function replyKindOf(request: number): ReplyKind {
  const name = frontendRequestName(request);
  const table: Readonly<Record<string, RequestSpec>> = FRONTEND_REQUESTS;
  return Object.hasOwn(table, name) ? (table[name]!.reply ?? 'ack') : 'ack';
}

function replyLength(p: ReplyPayload): number {
  switch (p.kind) {
    case 'config':
      return CONFIG_HEADER_SIZE + p.data.length;
    case 'config-error':
      return 0;
    case 'inflight':
      return 24; // QEMU checks sizeof(VhostUserInflight), padding included
    default:
      return 8;
  }
}

/**
 * Back-end side: the reply to `request`. Writes into `out` (returning the used prefix) when given, else
 * allocates. Throws RangeError when the payload kind is not what `request` is answered with.
 */
export function encodeReply(request: FrontendRequest, payload: ReplyPayload, out?: Uint8Array): Uint8Array {
  const expected = replyKindOf(request);
  const ok = payload.kind === expected || (payload.kind === 'config-error' && expected === 'config');
  if (!ok) throw new RangeError(`${frontendRequestName(request)} is answered with '${expected}', not '${payload.kind}'`);
  const size = replyLength(payload);
  const total = HEADER_SIZE + size;
  let bytes: Uint8Array;
  if (out === undefined) bytes = new Uint8Array(total);
  else {
    if (out.length < total) throw new RangeError(`reply needs ${total} bytes, out has ${out.length}`);
    bytes = out.subarray(0, total);
    bytes.fill(0);
  }
  writeHeader(bytes, request, VERSION | FLAG_REPLY, size);
  const w = new Writer(bytes.subarray(HEADER_SIZE));
  switch (payload.kind) {
    case 'features':
      w.big(0, payload.features);
      break;
    case 'u64':
      w.u64(0, payload.value);
      break;
    case 'ack':
      w.status(0, payload.status);
      break;
    case 'vring-state':
      w.u32(0, int(payload.index, VRING_INDEX_MASK));
      w.u32(4, payload.num);
      break;
    case 'config':
      writeConfigHeader(w, payload, payload.data.length);
      w.put(CONFIG_HEADER_SIZE, payload.data, payload.data.length);
      break;
    case 'config-error':
      break;
    case 'status-fd':
      w.u64(0, (payload.status & 0xff) | (payload.noFd ? 0x100 : 0));
      break;
    case 'inflight':
      w.u64(0, payload.mmapSize);
      w.u64(8, payload.mmapOffset);
      w.u16(16, payload.numQueues);
      w.u16(18, payload.queueSize);
      break;
  }
  return bytes;
}

/** Back-end side shorthand: the REPLY_ACK status for `request` (0 = success). */
export function encodeAck(request: FrontendRequest, status: number, out?: Uint8Array): Uint8Array {
  return encodeReply(request, { kind: 'ack', status }, out);
}

/** Front-end side: decode and validate the reply to `expected`. */
export function decodeReply(
  header: Uint8Array,
  payload: Uint8Array,
  expected: FrontendRequest,
  fds: readonly number[] = [],
): Reply {
  const name = frontendRequestName(expected);
  const h = checkHeader(header, payload, name, true);
  if (h.request !== expected) {
    throw new VhostProtocolError(
      'UNEXPECTED_REPLY',
      name,
      `awaited the reply to ${name} but got one to ${frontendRequestName(h.request)}`,
    );
  }
  const kind = replyKindOf(expected);
  const r = new Reader(payload, name);
  const sized = (n: number): void => {
    if (h.size !== n) throw new VhostProtocolError('BAD_SIZE', name, `reply to ${name} has ${h.size} payload bytes, expected ${n}`);
  };
  if (FDLESS_REPLIES.includes(kind) && fds.length !== 0) {
    throw new VhostProtocolError('BAD_FDS', name, `reply to ${name} carried ${fdCountText(fds.length)}, expected 0`);
  }
  switch (kind) {
    case 'features':
      sized(8);
      return { kind, request: expected, features: r.big(0) };
    case 'u64':
      sized(8);
      return { kind, request: expected, value: r.u64(0, 'value') };
    case 'ack':
      sized(8);
      return { kind, request: expected, status: r.status(0) };
    case 'vring-state':
      sized(8);
      return { kind, request: expected, index: r.vringIndex(0), num: r.u32(4) };
    case 'config': {
      if (h.size === 0) return { kind: 'config-error', request: expected };
      if (h.size < CONFIG_HEADER_SIZE) sized(CONFIG_HEADER_SIZE);
      const c = readConfigHeader(r, false);
      return { kind, request: expected, ...c, data: r.copy(CONFIG_HEADER_SIZE, c.size) };
    }
    default:
      return { kind: 'raw', request: expected, replyKind: kind, payload: payload.slice(), fds: [...fds] };
  }
}

// ---------------------------------------------------------------------------------------------------------
// Replies on the back-end channel: always a u64 status (sent when the back-end set NEED_REPLY).

/** Front-end side: acknowledge a back-end request (0 = success). */
export function encodeBackendAck(request: BackendRequest, status: number): Uint8Array {
  const bytes = new Uint8Array(HEADER_SIZE + 8);
  writeHeader(bytes, request, VERSION | FLAG_REPLY, 8);
  new Writer(bytes.subarray(HEADER_SIZE)).status(0, status);
  return bytes;
}

/** Back-end side: the front-end's status reply to a back-end request; returns the status (0 = success). */
export function decodeBackendAck(header: Uint8Array, payload: Uint8Array, expected: BackendRequest): number {
  const name = backendRequestName(expected);
  const h = checkHeader(header, payload, name, true);
  if (h.request !== expected) {
    throw new VhostProtocolError('UNEXPECTED_REPLY', name, `awaited the reply to ${name} but got one to ${backendRequestName(h.request)}`);
  }
  if (h.size !== 8) throw new VhostProtocolError('BAD_SIZE', name, `reply to ${name} has ${h.size} payload bytes, expected 8`);
  return new Reader(payload, name).status(0);
}
