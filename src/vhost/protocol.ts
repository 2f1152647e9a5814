/**
 * vhost-user wire protocol constants and THE request table (QEMU docs/interop/vhost-user.rst). Owns: header
 * layout and flag bits, request numbers for both channels, protocol feature bits, and per request its payload
 * layout, fd rule and reply. The codec (codec.ts) validates and decodes from this table alone, so adding a
 * request is one row here (plus, for a new payload layout, one entry in PAYLOAD_SIZE and in the codec's
 * layout codecs). Whether the back-end *supports* a request is the session's business, not this file's.
 *
 * Byte order: the spec says "machine native"; every front-end we serve is little-endian (x86-64, arm64).
 */

/** Header: u32 request, u32 flags, u32 size (of the payload that follows). */
export const HEADER_SIZE = 12;
/** Protocol version, in the low 2 bits of flags. */
export const VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
/** Set on every reply, never on a request. */
export const FLAG_REPLY = 0x4;
/** REPLY_ACK: the sender wants a u64 status reply (unless the request already has a reply body). */
export const FLAG_NEED_REPLY = 0x8;
/** Bits no sender may set. */
export const FLAG_RESERVED_MASK = ~0xf >>> 0;

/** We refuse payloads larger than this (the largest legitimate one, SET_CONFIG, is 268 bytes). */
export const MAX_PAYLOAD = 4096;
/** SET_MEM_TABLE carries at most this many regions (and as many fds); more need CONFIGURE_MEM_SLOTS. */
export const MAX_MEM_REGIONS_BASELINE = 8;
/** One memory region description: guest address, size, user address, mmap offset (4 × u64). */
export const MEM_REGION_SIZE = 32;
/** Device config space reachable through GET_CONFIG/SET_CONFIG. */
export const MAX_CONFIG_SIZE = 256;
/** offset, size, flags (3 × u32) before the config bytes. */
export const CONFIG_HEADER_SIZE = 12;

/** Virtio feature bit (the legacy "UNUSED" bit 30) announcing GET/SET_PROTOCOL_FEATURES. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
/** Virtio feature bit: the front-end logs dirty pages (migration). */
export const VHOST_F_LOG_ALL = 26;
/** SET_VRING_ADDR ring flag: log used-ring writes at logGuestAddr. */
export const VRING_F_LOG = 0x1;
/** In the u64 of SET_VRING_KICK/CALL/ERR (and the back-end's VRING_HOST_NOTIFIER_MSG): no fd attached. */
export const VRING_NOFD_MASK = 0x100;
export const VRING_INDEX_MASK = 0xff;

/** Front-end → back-end requests. */
export enum FrontendRequest {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21, // formerly SET_SLAVE_REQ_FD
  IOTLB_MSG = 22,
  SET_VRING_ENDIAN = 23,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  CREATE_CRYPTO_SESSION = 26,
  CLOSE_CRYPTO_SESSION = 27,
  POSTCOPY_ADVISE = 28,
  POSTCOPY_LISTEN = 29,
  POSTCOPY_END = 30,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  GPU_SET_SOCKET = 33,
  RESET_DEVICE = 34,
  VRING_KICK = 35,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
  GET_SHARED_OBJECT = 41,
  SET_DEVICE_STATE_FD = 42,
  CHECK_DEVICE_STATE = 43,
  GET_SHMEM_CONFIG = 44, // QEMU 11.1, with ProtocolFeature.SHMEM
}

/** Back-end → front-end requests, sent on the channel given by SET_BACKEND_REQ_FD. */
export enum BackendRequest {
  IOTLB_MSG = 1,
  CONFIG_CHANGE_MSG = 2,
  VRING_HOST_NOTIFIER_MSG = 3,
  VRING_CALL = 4,
  VRING_ERR = 5,
  SHARED_OBJECT_ADD = 6,
  SHARED_OBJECT_REMOVE = 7,
  SHARED_OBJECT_LOOKUP = 8,
  SHMEM_MAP = 9,
  SHMEM_UNMAP = 10,
}

/** Protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES): mask = 1n << BigInt(bit). */
export enum ProtocolFeature {
  MQ = 0,
  LOG_SHMFD = 1,
  RARP = 2,
  REPLY_ACK = 3,
  MTU = 4,
  BACKEND_REQ = 5, // formerly SLAVE_REQ
  CROSS_ENDIAN = 6,
  CRYPTO_SESSION = 7,
  PAGEFAULT = 8,
  CONFIG = 9,
  BACKEND_SEND_FD = 10, // formerly SLAVE_SEND_FD
  HOST_NOTIFIER = 11,
  INFLIGHT_SHMFD = 12,
  RESET_DEVICE = 13,
  INBAND_NOTIFICATIONS = 14,
  CONFIGURE_MEM_SLOTS = 15,
  STATUS = 16,
  XEN_MMAP = 17,
  SHARED_OBJECT = 18,
  DEVICE_STATE = 19,
  /** QEMU 11: GET_VRING_BASE may leave requests in the inflight region instead of completing them (needs INFLIGHT_SHMFD). */
  GET_VRING_BASE_INFLIGHT = 20,
  GPA_ADDRESSES = 21, // QEMU 11.1
  SHMEM = 22, // QEMU 11.1: GET_SHMEM_CONFIG, BACKEND SHMEM_MAP/UNMAP (the spec's table calls it SHMEM_MAP)
}

export type FrontendRequestName = keyof typeof FrontendRequest;
export type BackendRequestName = keyof typeof BackendRequest;

/** Payload layouts (the spec's "payload can be" list, plus the few the spec leaves opaque). */
export type PayloadKind =
  | 'none' //           nothing
  | 'features' //       u64 feature mask (kept as bigint)
  | 'u64' //            u64 value, named by the row's `field`
  | 'mac' //            u64 whose first 6 bytes are a MAC address (SEND_RARP)
  | 'vring-state' //    u32 index, u32 num
  | 'vring-addr' //     u32 index, u32 flags, u64 desc, used, avail, log
  | 'vring-fd' //       u64: bits 0-7 vring index, bit 8 NOFD
  | 'vring-area' //     u64 index|NOFD, u64 size, u64 offset (back-end host notifier)
  | 'mem-table' //      u32 count, u32 padding, count × region
  | 'mem-region' //     u64 padding, region
  | 'log' //            u64 mmap size, u64 mmap offset
  | 'iotlb' //          u64 iova, size, user address; u8 perm, u8 type; padding
  | 'config' //         u32 offset, size, flags; size bytes of config
  | 'config-query' //   as config; the data bytes (zeros) may be left out
  | 'inflight' //       u64 mmap size, u64 mmap offset, u16 queues, u16 queue size (+ C padding)
  | 'uuid' //           16 bytes
  | 'device-state' //   u32 direction, u32 phase
  | 'shmem-map' //      u8 shmid, 7 padding, u64 fd offset, shm offset, len, flags
  | 'opaque'; //        bytes we carry but do not interpret (crypto sessions)

export type SizeRule = number | { readonly min: number; readonly max: number };

/**
 * Payload size per layout: exact, or bounds that the codec refines (region count, config size). Regions are
 * the plain 32-byte form: the XEN_MMAP form (8 more bytes each) is never offered, so it is refused as BAD_SIZE.
 */
export const PAYLOAD_SIZE: Readonly<Record<PayloadKind, SizeRule>> = {
  none: 0,
  features: 8,
  u64: 8,
  mac: 8,
  'vring-state': 8,
  'vring-addr': 40,
  'vring-fd': 8,
  'vring-area': 24,
  'mem-table': { min: 8 + MEM_REGION_SIZE, max: 8 + MAX_MEM_REGIONS_BASELINE * MEM_REGION_SIZE },
  'mem-region': 8 + MEM_REGION_SIZE,
  log: 16,
  iotlb: 32,
  config: { min: CONFIG_HEADER_SIZE, max: CONFIG_HEADER_SIZE + MAX_CONFIG_SIZE },
  'config-query': { min: CONFIG_HEADER_SIZE, max: CONFIG_HEADER_SIZE + MAX_CONFIG_SIZE },
  inflight: { min: 20, max: 24 },
  uuid: 16,
  'device-state': 8,
  'shmem-map': 40,
  opaque: { min: 0, max: MAX_PAYLOAD },
};

/**
 * How many fds travel with the request:
 * 0 or 1 exactly; 'optional' 0 or 1; 'per-region' one per memory region, in region order (SET_MEM_TABLE:
 * count regions; ADD_MEM_REG: one); 'unless-nofd' one, or none when the payload's VRING_NOFD_MASK bit is set.
 */
export type FdRule = 0 | 1 | 'optional' | 'per-region' | 'unless-nofd';

/**
 * The reply a request gets without being asked (NEED_REPLY not set). null: none, except a REPLY_ACK u64
 * status when NEED_REPLY is set. 'ack' is that same u64 status, sent regardless.
 */
export type ReplyKind =
  | 'features' //      u64 feature mask
  | 'u64' //           u64 count or value
  | 'ack' //           u64 status, 0 = success
  | 'vring-state' //   u32 index, u32 num
  | 'config' //        config layout; zero-length payload signals an error
  | 'inflight' //      inflight layout + 1 fd
  | 'fd' //            empty payload + 1 fd (userfaultfd)
  | 'status-fd' //     u64 status (bit 8: no fd) + 0..1 fd
  | 'shmem-config' //  u32 count, u32 padding, u64 sizes[]
  | 'opaque';

export interface RequestSpec {
  readonly payload: PayloadKind;
  readonly fds: FdRule;
  readonly reply: ReplyKind | null;
  /** The reply is only sent when this protocol feature was negotiated. */
  readonly replyIf?: ProtocolFeature;
  /** For payload 'u64': the decoded message's field name. */
  readonly field?: string;
}

/** One row per front-end request. */
export const FRONTEND_REQUESTS = {
  GET_FEATURES: { payload: 'none', fds: 0, reply: 'features' },
  SET_FEATURES: { payload: 'features', fds: 0, reply: null },
  SET_OWNER: { payload: 'none', fds: 0, reply: null },
  RESET_OWNER: { payload: 'none', fds: 0, reply: null },
  SET_MEM_TABLE: { payload: 'mem-table', fds: 'per-region', reply: null },
  SET_LOG_BASE: { payload: 'log', fds: 'optional', reply: 'ack', replyIf: ProtocolFeature.LOG_SHMFD },
  SET_LOG_FD: { payload: 'none', fds: 1, reply: null },
  SET_VRING_NUM: { payload: 'vring-state', fds: 0, reply: null },
  SET_VRING_ADDR: { payload: 'vring-addr', fds: 0, reply: null },
  SET_VRING_BASE: { payload: 'vring-state', fds: 0, reply: null },
  GET_VRING_BASE: { payload: 'vring-state', fds: 0, reply: 'vring-state' },
  SET_VRING_KICK: { payload: 'vring-fd', fds: 'unless-nofd', reply: null },
  SET_VRING_CALL: { payload: 'vring-fd', fds: 'unless-nofd', reply: null },
  SET_VRING_ERR: { payload: 'vring-fd', fds: 'unless-nofd', reply: null },
  GET_PROTOCOL_FEATURES: { payload: 'none', fds: 0, reply: 'features' },
  SET_PROTOCOL_FEATURES: { payload: 'features', fds: 0, reply: null },
  GET_QUEUE_NUM: { payload: 'none', fds: 0, reply: 'u64' },
  SET_VRING_ENABLE: { payload: 'vring-state', fds: 0, reply: null },
  SEND_RARP: { payload: 'mac', fds: 0, reply: null },
  NET_SET_MTU: { payload: 'u64', field: 'mtu', fds: 0, reply: null },
  SET_BACKEND_REQ_FD: { payload: 'none', fds: 1, reply: null },
  IOTLB_MSG: { payload: 'iotlb', fds: 0, reply: 'ack' },
  SET_VRING_ENDIAN: { payload: 'vring-state', fds: 0, reply: null },
  GET_CONFIG: { payload: 'config-query', fds: 0, reply: 'config' },
  SET_CONFIG: { payload: 'config', fds: 0, reply: null },
  CREATE_CRYPTO_SESSION: { payload: 'opaque', fds: 0, reply: 'opaque' },
  CLOSE_CRYPTO_SESSION: { payload: 'u64', field: 'sessionId', fds: 0, reply: null },
  POSTCOPY_ADVISE: { payload: 'none', fds: 0, reply: 'fd' },
  POSTCOPY_LISTEN: { payload: 'none', fds: 0, reply: null },
  POSTCOPY_END: { payload: 'none', fds: 0, reply: 'ack' },
  GET_INFLIGHT_FD: { payload: 'inflight', fds: 0, reply: 'inflight' },
  SET_INFLIGHT_FD: { payload: 'inflight', fds: 1, reply: null },
  GPU_SET_SOCKET: { payload: 'none', fds: 1, reply: null },
  RESET_DEVICE: { payload: 'none', fds: 0, reply: null },
  VRING_KICK: { payload: 'vring-state', fds: 0, reply: null },
  GET_MAX_MEM_SLOTS: { payload: 'none', fds: 0, reply: 'u64' },
  ADD_MEM_REG: { payload: 'mem-region', fds: 'per-region', reply: null },
  REM_MEM_REG: { payload: 'mem-region', fds: 'optional', reply: null }, // spec: an fd MAY come; close it
  SET_STATUS: { payload: 'u64', field: 'status', fds: 0, reply: null },
  GET_STATUS: { payload: 'none', fds: 0, reply: 'u64' },
  GET_SHARED_OBJECT: { payload: 'uuid', fds: 0, reply: 'status-fd' },
  SET_DEVICE_STATE_FD: { payload: 'device-state', fds: 1, reply: 'status-fd' },
  CHECK_DEVICE_STATE: { payload: 'none', fds: 0, reply: 'ack' },
  GET_SHMEM_CONFIG: { payload: 'none', fds: 0, reply: 'shmem-config' },
} as const satisfies Record<FrontendRequestName, RequestSpec>;

/** One row per back-end request. Replies (when NEED_REPLY is set) are a u64 status. */
export const BACKEND_REQUESTS = {
  IOTLB_MSG: { payload: 'iotlb', fds: 0, reply: null },
  CONFIG_CHANGE_MSG: { payload: 'none', fds: 0, reply: null },
  VRING_HOST_NOTIFIER_MSG: { payload: 'vring-area', fds: 'unless-nofd', reply: null },
  VRING_CALL: { payload: 'vring-state', fds: 0, reply: null },
  VRING_ERR: { payload: 'vring-state', fds: 0, reply: null },
  SHARED_OBJECT_ADD: { payload: 'uuid', fds: 0, reply: null },
  SHARED_OBJECT_REMOVE: { payload: 'uuid', fds: 0, reply: null },
  SHARED_OBJECT_LOOKUP: { payload: 'uuid', fds: 0, reply: 'status-fd' },
  SHMEM_MAP: { payload: 'shmem-map', fds: 1, reply: null },
  SHMEM_UNMAP: { payload: 'shmem-map', fds: 0, reply: null },
} as const satisfies Record<BackendRequestName, RequestSpec>;

/** True when the request gets a reply body whether or not NEED_REPLY is set (GET_* and friends). */
export function alwaysReplies(spec: RequestSpec): boolean {
  return spec.reply !== null && spec.replyIf === undefined;
}

/** The table row for a request number, or undefined for one we do not know. */
export function frontendRequestSpec(request: number): (RequestSpec & { name: FrontendRequestName }) | undefined {
  const name = frontendNames.get(request);
  return name === undefined ? undefined : { name, ...FRONTEND_REQUESTS[name] };
}

export function frontendRequestName(request: number): string {
  return frontendNames.get(request) ?? `REQUEST_${request}`;
}

export function backendRequestName(request: number): string {
  return backendNames.get(request) ?? `BACKEND_REQUEST_${request}`;
}

const frontendNames = new Map<number, FrontendRequestName>(
  (Object.keys(FRONTEND_REQUESTS) as FrontendRequestName[]).map((n) => [FrontendRequest[n], n]),
);
const backendNames = new Map<number, BackendRequestName>(
  (Object.keys(BACKEND_REQUESTS) as BackendRequestName[]).map((n) => [BackendRequest[n], n]),
);
