/**
 * Our own vhost-user front-end: the QEMU side, for tests and benchmarks. It speaks the protocol through the same
 * codec the back-end uses, sends what QEMU sends in the order QEMU sends it (hw/virtio/vhost-user.c
 * vhost_user_backend_init, hw/virtio/vhost.c vhost_dev_init / vhost_dev_start / vhost_dev_stop), and turns
 * every way a back-end can misbehave (no reply, EOF, a failed REPLY_ACK, a malformed reply) into a
 * FrontendError that says which request it was.
 *
 * Replies are matched to requests in order, as the protocol has no request ids: after a timeout or a malformed
 * reply the stream can no longer be trusted, so the front-end turns BROKEN and refuses further requests.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import {
  SysError,
  close,
  memfdCreate,
  mmapShared,
  munmap,
  sendMessage,
  viewOf,
  unixConnect,
  unixSocketPair,
  watchReadable,
  type FdWatch,
} from '../sys/index.js';
import {
  decodeBackendMessage,
  decodeReply,
  encodeBackendAck,
  encodeFrontendMessage,
  readHeader,
  type BackendMessage,
  type FrontendMessageInput,
  type MemoryRegion,
  type MemoryRegionDesc,
  type Reply,
} from '../vhost/codec.js';
import {
  FLAG_NEED_REPLY,
  FRONTEND_REQUESTS,
  FrontendRequest,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  frontendRequestName,
  type BackendRequest,
  type RequestSpec,
} from '../vhost/protocol.js';
import { PACKED_INITIAL_BASE } from '../virtqueue/index.js';
import { FrontendError } from './errors.js';
import { TestGuestMemory, TestQueue, type TestQueueOptions } from './guest.js';
import { MessageReader, type RawMessage } from './reader.js';

const bit = (n: number): bigint => 1n << BigInt(n);

export const VIRTIO_RING_F_EVENT_IDX = 29;
export const VIRTIO_F_RING_PACKED = 34;

/** The ring layout tests use unless they ask: VHOST_TS_TEST_RING=packed runs a whole suite on packed rings. */
export function testRing(): 'split' | 'packed' {
  const env = process.env.VHOST_TS_TEST_RING;
  if (env === undefined || env === '' || env === 'split') return 'split';
  if (env === 'packed') return 'packed';
  throw new FrontendError('UNSUPPORTED', `VHOST_TS_TEST_RING=${env}: use split or packed`);
}

/** Virtio device status bits (virtio 1.2 §2.1), for SET_STATUS. */
export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
export const VIRTIO_CONFIG_S_DRIVER = 2;
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;

/**
 * Protocol features this front-end can honour. The rest change the wire format (XEN_MMAP), move notifications
 * onto the socket (INBAND_NOTIFICATIONS) or need machinery a test front-end does not have (postcopy, device
 * state, shared objects, shared memory), so acking them would promise what we cannot keep.
 */
export const FRONTEND_PROTOCOL_FEATURES: bigint = [
  ProtocolFeature.MQ,
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.BACKEND_REQ,
  ProtocolFeature.CONFIG,
  ProtocolFeature.BACKEND_SEND_FD,
  ProtocolFeature.HOST_NOTIFIER,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.STATUS,
  ProtocolFeature.INFLIGHT_SHMFD,
].reduce((mask, f) => mask | bit(f), 0n);

const ALL_FEATURES = (1n << 64n) - 1n;
const DEFAULT_TIMEOUT_MS = 5000;
// A socket that is not there yet, or there but not yet listening, is worth another try; anything else is not.
const RETRY_CONNECT = new Set(['ENOENT', 'ECONNREFUSED', 'EAGAIN']);

export interface FrontendOptions {
  /** Reply timeout for every request (ms). Default 5000. */
  timeoutMs?: number;
}

export interface ConnectOptions extends FrontendOptions {
  /** How long to keep retrying while the socket is missing or not accepting (ms). Default 5000. */
  connectTimeoutMs?: number;
}

export interface RequestOptions {
  timeoutMs?: number;
}

export interface InitOptions {
  /** Mask ANDed with the back-end's offer to give the features we ack. Default: all offered. */
  features?: bigint;
  /** Mask ANDed with the offer (and FRONTEND_PROTOCOL_FEATURES). Default FRONTEND_PROTOCOL_FEATURES. */
  protocolFeatures?: bigint;
  /** Open the back-end channel when BACKEND_REQ is negotiated. Default true. */
  backendChannel?: boolean;
}

export interface StartQueueOptions extends Omit<TestQueueOptions, 'packed'> {
  /** SET_VRING_BASE: where the device starts (split: avail index; packed: the 32-bit word). Default: the start. */
  base?: number;
}

/** An inflight region (GET_INFLIGHT_FD's answer), kept by the front-end across back-end restarts. */
export interface InflightRegion {
  fd: number;
  mmapSize: number;
  mmapOffset: number;
  numQueues: number;
  queueSize: number;
}

/** What a front-end hands to the next one when its back-end died (QEMU keeps all of it across a reconnect). */
export interface FrontendHandover {
  memory: TestGuestMemory;
  queues: TestQueue[];
  inflight: InflightRegion | null;
}

export interface StartOptions extends InitOptions {
  queues: readonly StartQueueOptions[];
  /**
   * Resume these queues (a previous front-end's, from {@link VhostUserFrontend.handOver}) instead of making new
   * ones: their rings, buffers and eventfds carry on, as the guest's do when QEMU reconnects to a restarted
   * back-end. `queues` must name the same indices; `memory` must be theirs.
   */
  resume?: readonly TestQueue[];
  /**
   * With INFLIGHT_SHMFD negotiated, the region to hand the back-end (SET_INFLIGHT_FD); default: a new one from
   * GET_INFLIGHT_FD, as QEMU's vhost-user-blk gets at the first start after boot or reset.
   */
  inflight?: InflightRegion;
  /**
   * Ring layout to negotiate: 'packed' acks VIRTIO_F_RING_PACKED (the back-end must offer it), 'split' masks it
   * out. Default: the VHOST_TS_TEST_RING environment variable, else 'split' (QEMU's default too).
   */
  ring?: 'split' | 'packed';
  /** Guest RAM to use (the caller keeps ownership). Default: a fresh TestGuestMemory, closed with the front-end. */
  memory?: TestGuestMemory;
}

/** The back-end's request for its reply status on the back-end channel; return 0 (or nothing) for success. */
export type BackendMessageHandler = (msg: BackendMessage) => number | void;

interface PendingReply {
  request: FrontendRequest;
  name: string;
  resolve(reply: Reply): void;
  reject(error: Error): void;
  timer: ReturnType<typeof setTimeout>;
}

interface BackendWaiter {
  type: BackendMessage['type'];
  resolve(msg: BackendMessage): void;
  reject(error: Error): void;
  timer: ReturnType<typeof setTimeout>;
}

export class VhostUserFrontend {
  /** Features offered by GET_FEATURES (null until asked). */
  offeredFeatures: bigint | null = null;
  /** Features sent with SET_FEATURES (null until sent). */
  features: bigint | null = null;
  offeredProtocolFeatures: bigint | null = null;
  /** Protocol features sent with SET_PROTOCOL_FEATURES (0 until sent). */
  protocolFeatures = 0n;
  /** GET_QUEUE_NUM's answer, when MQ was negotiated. */
  queueNum: number | null = null;
  /** GET_MAX_MEM_SLOTS's answer, when CONFIGURE_MEM_SLOTS was negotiated. */
  maxMemSlots: number | null = null;
  /** Guest RAM the device was given by start(). */
  memory: TestGuestMemory | null = null;
  /** Queues set up by start(); closed with the front-end. */
  readonly queues: TestQueue[] = [];
  /** Every back-end channel message received, in order. Their fds stay open until close(). */
  readonly backendMessages: BackendMessage[] = [];
  /** Back-end channel messages that failed to decode (the channel carries on). */
  readonly backendErrors: Error[] = [];
  /** Answers back-end requests; its return value is the status sent when the back-end asked for a reply. */
  onBackendMessage: BackendMessageHandler | null = null;

  private readonly timeoutMs: number;
  private readonly reader: MessageReader;
  private watch: FdWatch | null = null;
  private readonly pending: PendingReply[] = [];
  private failure: FrontendError | null = null;
  private isClosed = false;
  private initialized = false;
  private ownsMemory = false;
  /** The inflight region in use (its fd is ours), when INFLIGHT_SHMFD was negotiated. */
  inflight: InflightRegion | null = null;
  private readonly logMappings: { address: number; size: number }[] = [];

  private backendFd = -1;
  private backendReader: MessageReader | null = null;
  private backendWatch: FdWatch | null = null;
  private readonly backendFds: number[] = [];
  private readonly backendWaiters: BackendWaiter[] = [];
  private readonly backendTaken = new Set<BackendMessage>();

  /** Takes ownership of `fd`, a connected non-blocking vhost-user socket. */
  constructor(
    readonly fd: number,
    options: FrontendOptions = {},
  ) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.reader = new MessageReader(fd);
  }

  /** Connect to a back-end's socket, retrying while it is missing or refuses until `connectTimeoutMs`. */
  static async connect(path: string, options: ConnectOptions = {}): Promise<VhostUserFrontend> {
    const limit = options.connectTimeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = Date.now() + limit;
    let delay = 2;
    for (;;) {
      try {
        return new VhostUserFrontend(unixConnect(path), options);
      } catch (error) {
        if (!(error instanceof SysError) || !RETRY_CONNECT.has(error.code)) throw error;
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new FrontendError('TIMEOUT', `no vhost-user back-end accepted on ${path} within ${limit} ms (${error.message})`);
        }
        await sleep(Math.min(delay, left));
        delay = Math.min(delay * 2, 50);
      }
    }
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** Whether a protocol feature was acked. */
  has(feature: ProtocolFeature): boolean {
    return (this.protocolFeatures & bit(feature)) !== 0n;
  }

  /** Whether REPLY_ACK is in force: the setters then ask for, and check, a status reply. */
  get replyAck(): boolean {
    return this.has(ProtocolFeature.REPLY_ACK);
  }

  // -------------------------------------------------------------------------------------------------------
  // The raw request

  /**
   * Send one request. Resolves with the decoded reply when the request always gets one (GET_*), when its reply
   * depends on a negotiated protocol feature that is, or when needReply is set; null otherwise (sent, nothing
   * awaited). Rejects with FrontendError TIMEOUT / EOF / BROKEN / CLOSED, or the codec's VhostProtocolError for a
   * malformed reply. fds of 'raw' replies belong to the caller.
   */
  async request(msg: FrontendMessageInput, options: RequestOptions = {}): Promise<Reply | null> {
    if (this.failure) throw this.failure;
    const { bytes, fds } = encodeFrontendMessage(msg);
    const request = readHeader(bytes).request as FrontendRequest;
    const name = frontendRequestName(request);
    const awaits = this.expectsReply(msg);
    let sent: number;
    try {
      sent = sendMessage(this.fd, bytes, bytes.length, fds);
    } catch (error) {
      if (error instanceof SysError && (error.code === 'EPIPE' || error.code === 'ECONNRESET')) {
        throw this.fail(new FrontendError('EOF', `back-end hung up; could not send ${name} (${error.code})`));
      }
      throw error;
    }
    if (sent !== bytes.length) {
      // Requests are at most a few hundred bytes: a socket that cannot take one belongs to a stuck back-end.
      throw this.fail(new FrontendError('BROKEN', `short write sending ${name}: ${sent} of ${bytes.length} bytes`));
    }
    // The back-end acts on these as it reads them, so what we track follows what we sent, not the replies.
    if (msg.type === 'SET_PROTOCOL_FEATURES') this.protocolFeatures = msg.features;
    if (msg.type === 'SET_FEATURES') this.features = msg.features;
    if (!awaits) return null;
    return this.awaitReply(request, name, options.timeoutMs ?? this.timeoutMs);
  }

  private expectsReply(msg: FrontendMessageInput): boolean {
    if (msg.type === 'UNKNOWN') return msg.needReply === true;
    const spec: RequestSpec = FRONTEND_REQUESTS[msg.type];
    if (spec.reply !== null && spec.replyIf === undefined) return true;
    if (spec.replyIf !== undefined && this.has(spec.replyIf)) return true;
    return msg.needReply === true;
  }

  private awaitReply(request: FrontendRequest, name: string, timeoutMs: number): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      const entry: PendingReply = {
        request,
        name,
        resolve,
        reject,
        timer: setTimeout(() => {
          const error = new FrontendError('TIMEOUT', `no reply to ${name} within ${timeoutMs} ms`);
          this.fail(
            new FrontendError('BROKEN', `front-end unusable: the reply to ${name} did not come within ${timeoutMs} ms`),
            entry,
            error,
          );
        }, timeoutMs),
      };
      this.pending.push(entry);
      this.watch ??= watchReadable(this.fd, () => this.onReadable());
    });
  }

  private onReadable(): void {
    let drained: ReturnType<MessageReader['drain']>;
    try {
      drained = this.reader.drain();
    } catch (error) {
      this.fail(new FrontendError('BROKEN', `reading the vhost-user socket failed: ${(error as Error).message}`));
      return;
    }
    for (const raw of drained.messages) {
      if (this.failure) {
        for (const fd of raw.fds) close(fd);
        continue;
      }
      this.deliver(raw);
    }
    if (drained.error) {
      this.fail(new FrontendError('BROKEN', `vhost-user stream out of frame: ${drained.error.message}`));
    } else if (drained.eof) {
      const awaited = this.pending[0]?.name;
      const what = awaited ? ` while awaiting the reply to ${awaited}` : '';
      this.fail(new FrontendError('EOF', `back-end closed the connection${what}`));
    }
    // Reading only while replies are due keeps an idle front-end from holding the event loop open.
    if (this.pending.length === 0 && this.watch) {
      this.watch.close();
      this.watch = null;
    }
  }

  private deliver(raw: RawMessage): void {
    const entry = this.pending.shift();
    if (!entry) {
      for (const fd of raw.fds) close(fd);
      const request = frontendRequestName(readHeader(raw.header).request);
      this.fail(new FrontendError('BROKEN', `back-end sent an unsolicited message (${request}) on the front-end socket`));
      return;
    }
    clearTimeout(entry.timer);
    let reply: Reply;
    try {
      reply = decodeReply(raw.header, raw.payload, entry.request, raw.fds);
    } catch (error) {
      for (const fd of raw.fds) close(fd);
      entry.reject(error as Error);
      this.fail(new FrontendError('BROKEN', `front-end unusable after a bad reply to ${entry.name}: ${(error as Error).message}`));
      return;
    }
    entry.resolve(reply);
  }

  /**
   * Give up on the socket: every pending reply is rejected (`first` with `firstError`, the others with
   * `error`), and later requests throw `error`. Returns `error` for throwing.
   */
  private fail(error: FrontendError, first?: PendingReply, firstError?: Error): FrontendError {
    if (!this.failure) this.failure = error;
    if (first) {
      const i = this.pending.indexOf(first);
      if (i >= 0) this.pending.splice(i, 1);
      clearTimeout(first.timer);
      first.reject(firstError ?? error);
    }
    for (const entry of this.pending.splice(0)) {
      clearTimeout(entry.timer);
      entry.reject(this.failure);
    }
    this.watch?.close();
    this.watch = null;
    return this.failure;
  }

  // -------------------------------------------------------------------------------------------------------
  // Typed requests

  /** A request without a reply body: with REPLY_ACK in force (or `ack` true), ask for the status and check it. */
  private async set(msg: FrontendMessageInput, ack = this.replyAck): Promise<void> {
    const reply = await this.request({ ...msg, needReply: ack } as FrontendMessageInput);
    if (reply?.kind === 'ack' && reply.status !== 0) {
      const error = new FrontendError('NACK', `back-end refused ${msg.type} (status ${reply.status})`);
      error.status = reply.status;
      throw error;
    }
  }

  private async get<K extends Reply['kind']>(msg: FrontendMessageInput, kind: K): Promise<Extract<Reply, { kind: K }>> {
    const reply = await this.request(msg);
    if (reply?.kind !== kind) throw new Error(`${msg.type}: expected a '${kind}' reply, got '${reply?.kind}'`);
    return reply as Extract<Reply, { kind: K }>;
  }

  /**
   * A round trip: once it resolves, the back-end has read everything sent before. GET_FEATURES, which every
   * back-end answers, as QEMU's vhost_user_write_sync does when REPLY_ACK is not there.
   */
  async sync(): Promise<void> {
    await this.get({ type: 'GET_FEATURES' }, 'features');
  }

  async getFeatures(): Promise<bigint> {
    const { features } = await this.get({ type: 'GET_FEATURES' }, 'features');
    this.offeredFeatures = features;
    return features;
  }

  async setFeatures(features: bigint): Promise<void> {
    await this.set({ type: 'SET_FEATURES', features });
  }

  async getProtocolFeatures(): Promise<bigint> {
    const { features } = await this.get({ type: 'GET_PROTOCOL_FEATURES' }, 'features');
    this.offeredProtocolFeatures = features;
    return features;
  }

  /** Never with REPLY_ACK: it is not in force until the back-end has read this very message. */
  async setProtocolFeatures(features: bigint): Promise<void> {
    await this.set({ type: 'SET_PROTOCOL_FEATURES', features }, false);
  }

  async setOwner(): Promise<void> {
    await this.set({ type: 'SET_OWNER' });
  }

  async getQueueNum(): Promise<number> {
    const { value } = await this.get({ type: 'GET_QUEUE_NUM' }, 'u64');
    this.queueNum = value;
    return value;
  }

  async getMaxMemSlots(): Promise<number> {
    const { value } = await this.get({ type: 'GET_MAX_MEM_SLOTS' }, 'u64');
    this.maxMemSlots = value;
    return value;
  }

  /** SET_MEM_TABLE with every region of `mem` (at most 8). */
  async setMemTable(mem: TestGuestMemory | readonly MemoryRegion[]): Promise<void> {
    const regions = Array.isArray(mem) ? mem : (mem as TestGuestMemory).regions;
    await this.set({ type: 'SET_MEM_TABLE', regions: regions.map(plainRegion) });
  }

  async addMemRegion(region: MemoryRegion): Promise<void> {
    await this.set({ type: 'ADD_MEM_REG', region: plainRegion(region) });
  }

  /** REM_MEM_REG; QEMU sends the region's fd along, which the back-end must close. */
  async removeMemRegion(region: MemoryRegionDesc, fd: number | null = null): Promise<void> {
    const { guestPhysAddr, size, userAddr, mmapOffset } = region;
    await this.set({ type: 'REM_MEM_REG', region: { guestPhysAddr, size, userAddr, mmapOffset }, fd });
  }

  /** Config space bytes [offset, offset+size). Throws NACK when the back-end answers with an empty payload. */
  async getConfig(offset: number, size: number, configFlags = 0): Promise<Uint8Array> {
    const reply = await this.request({ type: 'GET_CONFIG', offset, size, configFlags });
    if (reply?.kind === 'config-error') throw new FrontendError('NACK', `back-end refused GET_CONFIG ${offset}+${size}`);
    if (reply?.kind !== 'config') throw new Error(`GET_CONFIG: unexpected reply '${reply?.kind}'`);
    return reply.data;
  }

  async setConfig(offset: number, data: Uint8Array, configFlags = 0): Promise<void> {
    await this.set({ type: 'SET_CONFIG', offset, size: data.length, configFlags, data });
  }

  async setVringNum(index: number, num: number): Promise<void> {
    await this.set({ type: 'SET_VRING_NUM', index, num });
  }

  async setVringBase(index: number, num: number): Promise<void> {
    await this.set({ type: 'SET_VRING_BASE', index, num });
  }

  /** SET_VRING_ADDR; `log` sets VHOST_VRING_F_LOG with the used ring's guest address as log_guest_addr, as QEMU does. */
  async setVringAddr(queue: TestQueue, log = false): Promise<void> {
    const addr = queue.vringAddr();
    await this.set({ type: 'SET_VRING_ADDR', ...addr, ...(log ? { ringFlags: 1, logGuestAddr: queue.layout.usedAddr } : {}) });
  }

  /**
   * SET_LOG_BASE with a fresh shared log covering guest addresses up to `maxGpa` (one bit per 4 KiB page, as
   * QEMU sizes it); the log is this front-end's, unmapped on close. Returns its bytes.
   */
  async setLogBase(maxGpa: number): Promise<Uint8Array> {
    const size = Math.ceil(maxGpa / (4096 * 64)) * 8;
    const fd = memfdCreate('vhost-ts test dirty log', size);
    try {
      const address = mmapShared(fd, size, 0);
      this.logMappings.push({ address, size });
      // QEMU waits for the reply (a u64) whatever REPLY_ACK says.
      const reply = await this.request({ type: 'SET_LOG_BASE', mmapSize: size, mmapOffset: 0, fd });
      if (reply?.kind !== 'ack' || reply.status !== 0) throw new FrontendError('BROKEN', `SET_LOG_BASE: the back-end answered ${JSON.stringify(reply)}`);
      return new Uint8Array(viewOf(address, size));
    } finally {
      close(fd);
    }
  }

  /** fd null sends NOFD (polling mode for kick; no signalling for call and err). */
  async setVringKick(index: number, fd: number | null): Promise<void> {
    await this.set({ type: 'SET_VRING_KICK', index, fd });
  }

  async setVringCall(index: number, fd: number | null): Promise<void> {
    await this.set({ type: 'SET_VRING_CALL', index, fd });
  }

  async setVringErr(index: number, fd: number | null): Promise<void> {
    await this.set({ type: 'SET_VRING_ERR', index, fd });
  }

  async setVringEnable(index: number, enable: boolean): Promise<void> {
    await this.set({ type: 'SET_VRING_ENABLE', index, num: enable ? 1 : 0 });
  }

  /** Stops the ring; resolves with the next avail index the device would have read. */
  async getVringBase(index: number): Promise<number> {
    const { num } = await this.get({ type: 'GET_VRING_BASE', index, num: 0 }, 'vring-state');
    return num;
  }

  async getStatus(): Promise<number> {
    const { value } = await this.get({ type: 'GET_STATUS' }, 'u64');
    return value;
  }

  async setStatus(status: number): Promise<void> {
    await this.set({ type: 'SET_STATUS', status });
  }

  /** Device reset: RESET_DEVICE when negotiated, else the older RESET_OWNER. */
  async reset(): Promise<void> {
    await this.set({ type: this.has(ProtocolFeature.RESET_DEVICE) ? 'RESET_DEVICE' : 'RESET_OWNER' });
  }

  /**
   * Open the back-end channel: a socketpair whose far end travels with SET_BACKEND_REQ_FD. Messages arriving on
   * our end land in {@link backendMessages}; the back-end's NEED_REPLY requests are answered with the status
   * {@link onBackendMessage} returns (0 when unset).
   */
  async setBackendReqFd(): Promise<void> {
    if (this.backendFd >= 0) throw new Error('back-end channel already open');
    const [ours, theirs] = unixSocketPair();
    this.backendFd = ours;
    this.backendReader = new MessageReader(ours);
    // Watch first: the back-end may use the channel as soon as it has read the fd.
    this.backendWatch = watchReadable(ours, () => this.onBackendReadable());
    try {
      await this.set({ type: 'SET_BACKEND_REQ_FD', fd: theirs });
    } finally {
      close(theirs);
    }
  }

  /** The first back-end message of `type` not returned by an earlier call, waiting for it if need be. */
  waitForBackendMessage<T extends BackendMessage['type']>(
    type: T,
    timeoutMs = this.timeoutMs,
  ): Promise<Extract<BackendMessage, { type: T }>> {
    type M = Extract<BackendMessage, { type: T }>;
    const found = this.backendMessages.find((m) => m.type === type && !this.backendTaken.has(m));
    if (found) {
      this.backendTaken.add(found);
      return Promise.resolve(found as M);
    }
    if (this.isClosed) return Promise.reject(new FrontendError('CLOSED', 'front-end closed'));
    return new Promise<M>((resolve, reject) => {
      const waiter: BackendWaiter = {
        type,
        resolve: (m) => resolve(m as M),
        reject,
        timer: setTimeout(() => {
          this.backendWaiters.splice(this.backendWaiters.indexOf(waiter), 1);
          reject(new FrontendError('TIMEOUT', `no ${type} on the back-end channel within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.backendWaiters.push(waiter);
    });
  }

  private onBackendReadable(): void {
    const reader = this.backendReader!;
    let drained: ReturnType<MessageReader['drain']>;
    try {
      drained = reader.drain();
    } catch (error) {
      drained = { messages: [], eof: true, error: error as Error };
    }
    for (const raw of drained.messages) this.onBackendMessageRaw(raw);
    if (drained.error) this.backendErrors.push(drained.error);
    if (drained.eof || drained.error) {
      // Nothing more can come; the fd itself stays ours until close().
      this.backendWatch?.close();
      this.backendWatch = null;
    }
  }

  private onBackendMessageRaw(raw: RawMessage): void {
    const header = readHeader(raw.header);
    let msg: BackendMessage;
    try {
      msg = decodeBackendMessage(raw.header, raw.payload, raw.fds);
    } catch (error) {
      for (const fd of raw.fds) close(fd);
      this.backendErrors.push(error as Error);
      if (header.flags & FLAG_NEED_REPLY) this.sendBackendAck(header.request as BackendRequest, -22); // -EINVAL
      return;
    }
    this.backendFds.push(...raw.fds);
    this.backendMessages.push(msg);
    let status = 0;
    try {
      status = this.onBackendMessage?.(msg) ?? 0;
    } catch (error) {
      this.backendErrors.push(error as Error);
      status = -5; // -EIO
    }
    if (msg.needReply) this.sendBackendAck(header.request as BackendRequest, status);
    const i = this.backendWaiters.findIndex((w) => w.type === msg.type);
    if (i >= 0) {
      const [waiter] = this.backendWaiters.splice(i, 1);
      clearTimeout(waiter.timer);
      this.backendTaken.add(msg);
      waiter.resolve(msg);
    }
  }

  private sendBackendAck(request: BackendRequest, status: number): void {
    const bytes = encodeBackendAck(request, status);
    try {
      sendMessage(this.backendFd, bytes, bytes.length, []);
    } catch (error) {
      this.backendErrors.push(error as Error);
    }
  }

  // -------------------------------------------------------------------------------------------------------
  // QEMU's sequences

  /**
   * What QEMU does when the device is created (vhost_user_backend_init, then vhost_dev_init): GET_FEATURES;
   * with VHOST_USER_F_PROTOCOL_FEATURES offered and not masked out, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM
   * (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ); then SET_OWNER.
   * Features are only acked later, by start().
   */
  async init(options: InitOptions = {}): Promise<void> {
    if (this.initialized) throw new Error('init() already ran');
    this.initialized = true;
    const offered = await this.getFeatures();
    const mask = options.features ?? ALL_FEATURES;
    if ((offered & mask & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n) {
      const offeredProtocol = await this.getProtocolFeatures();
      await this.setProtocolFeatures(offeredProtocol & (options.protocolFeatures ?? FRONTEND_PROTOCOL_FEATURES));
      if (this.has(ProtocolFeature.MQ)) await this.getQueueNum();
      if (this.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)) await this.getMaxMemSlots();
      if (this.has(ProtocolFeature.BACKEND_REQ) && options.backendChannel !== false) await this.setBackendReqFd();
    }
    await this.setOwner();
  }

  /**
   * Bring the device up as QEMU's vhost_dev_start does, running init() first if it has not run: per queue
   * SET_VRING_ERR (QEMU sends it at device init); SET_FEATURES (offer & mask); with STATUS, FEATURES_OK;
   * the memory table (ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE); per queue
   * SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL; with protocol features,
   * SET_VRING_ENABLE 1 per queue; with STATUS, DRIVER_OK. With REPLY_ACK every request without a reply body asks
   * for its status (QEMU only does so for some; asking always pins a failure on the request that caused it);
   * without REPLY_ACK a final sync() stands in. Either way, when this resolves the back-end has acted on all of it.
   */
  async start(options: StartOptions): Promise<TestQueue[]> {
    if (this.memory) throw new Error('start() already ran');
    if (!this.initialized) await this.init(options);
    const offered = this.offeredFeatures!;
    const ring = options.ring ?? testRing();
    let acked = offered & (options.features ?? ALL_FEATURES);
    if (ring === 'split') acked &= ~bit(VIRTIO_F_RING_PACKED);
    else if ((acked & bit(VIRTIO_F_RING_PACKED)) === 0n) {
      throw new FrontendError('UNSUPPORTED', 'packed rings asked for, but the back-end does not offer VIRTIO_F_RING_PACKED (or the feature mask drops it)');
    }
    const packed = ring === 'packed';
    const eventIdx = (acked & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n;

    const memory = options.memory ?? new TestGuestMemory();
    // Resumed queues and their memory were handed over: this front-end owns them now.
    this.ownsMemory = options.memory === undefined || options.resume !== undefined;
    this.memory = memory;
    const queues: TestQueue[] = [];
    for (const [i, q] of options.queues.entries()) {
      if (q.eventIdx && !eventIdx) throw new FrontendError('UNSUPPORTED', `queue ${q.index}: EVENT_IDX was not negotiated`);
      const resumed = options.resume?.[i];
      if (resumed && (resumed.index !== q.index || resumed.packed !== packed)) {
        throw new Error(`queue ${q.index}: the resumed queue is queue ${resumed.index} (${resumed.packed ? 'packed' : 'split'})`);
      }
      const queue = resumed ?? new TestQueue(memory, { index: q.index, size: q.size, eventIdx: q.eventIdx ?? eventIdx, packed });
      queues.push(queue);
      this.queues.push(queue);
    }

    for (const q of queues) await this.setVringErr(q.index, q.errFd);
    await this.setFeatures(acked);
    if (this.has(ProtocolFeature.STATUS)) await this.addStatus(VIRTIO_CONFIG_S_FEATURES_OK);
    if (this.has(ProtocolFeature.INFLIGHT_SHMFD)) {
      // QEMU's vhost_dev_prepare_inflight and vhost_dev_set_inflight, before the memory table.
      this.inflight =
        options.inflight ??
        (await this.getInflightFd(this.queueNum ?? Math.max(...queues.map((q) => q.index)) + 1, Math.max(...queues.map((q) => q.size))));
      await this.setInflightFd(this.inflight);
    }
    await this.mapMemory(memory);
    for (const [i, q] of queues.entries()) {
      await this.setVringNum(q.index, q.size);
      // A resumed split ring restarts where the driver last saw used->idx (QEMU's rewind when GET_VRING_BASE
      // failed); for a packed ring QEMU has only the base of the last clean stop.
      const resumedBase = options.resume?.[i] ? (packed ? PACKED_INITIAL_BASE : q.driver.usedIdx()) : undefined;
      await this.setVringBase(q.index, options.queues[i].base ?? resumedBase ?? (packed ? PACKED_INITIAL_BASE : 0));
      await this.setVringAddr(q);
      await this.setVringKick(q.index, q.kickFd);
      await this.setVringCall(q.index, q.callFd);
    }
    if ((acked & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n) {
      for (const q of queues) await this.setVringEnable(q.index, true);
    }
    if (this.has(ProtocolFeature.STATUS)) {
      await this.addStatus(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK);
    }
    if (!this.replyAck) await this.sync();
    return queues;
  }

  /**
   * QEMU's vhost_dev_stop: SET_VRING_ENABLE 0 per queue (with protocol features), GET_VRING_BASE per queue,
   * then with STATUS a zero status. Resolves with each queue's base, in start() order.
   */
  async stop(): Promise<number[]> {
    if ((this.features ?? 0n) & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (const q of this.queues) await this.setVringEnable(q.index, false);
    }
    const bases: number[] = [];
    for (const q of this.queues) bases.push(await this.getVringBase(q.index));
    if (this.has(ProtocolFeature.STATUS)) await this.setStatus(0);
    if (!this.replyAck) await this.sync();
    return bases;
  }

  /** GET_INFLIGHT_FD: a new region from the back-end (its fd is the caller's). */
  async getInflightFd(numQueues: number, queueSize: number): Promise<InflightRegion> {
    const reply = await this.request({ type: 'GET_INFLIGHT_FD', mmapSize: 0, mmapOffset: 0, numQueues, queueSize });
    if (reply?.kind !== 'raw' || reply.fds.length !== 1 || reply.payload.length < 20) {
      if (reply?.kind === 'raw') for (const fd of reply.fds) close(fd);
      throw new FrontendError('BROKEN', 'GET_INFLIGHT_FD: the reply carries no region (payload of 24 bytes and one fd expected)');
    }
    const v = new DataView(reply.payload.buffer, reply.payload.byteOffset, reply.payload.length);
    return {
      fd: reply.fds[0],
      mmapSize: Number(v.getBigUint64(0, true)),
      mmapOffset: Number(v.getBigUint64(8, true)),
      numQueues: v.getUint16(16, true),
      queueSize: v.getUint16(18, true),
    };
  }

  async setInflightFd(region: InflightRegion): Promise<void> {
    await this.set({ type: 'SET_INFLIGHT_FD', ...region });
  }

  /**
   * The back-end died (or will be killed): hang up, and hand the guest's side (memory, queues, inflight region)
   * to the front-end that reconnects to its successor, which then owns them.
   */
  handOver(): FrontendHandover {
    if (!this.memory) throw new Error('handOver() before start()');
    const handover: FrontendHandover = { memory: this.memory, queues: this.queues.splice(0), inflight: this.inflight };
    this.inflight = null;
    this.ownsMemory = false;
    this.close();
    return handover;
  }

  private async addStatus(bits: number): Promise<void> {
    const status = await this.getStatus();
    if ((status & bits) !== bits) await this.setStatus(status | bits);
  }

  private async mapMemory(memory: TestGuestMemory): Promise<void> {
    if (!this.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      await this.setMemTable(memory);
      return;
    }
    if (this.maxMemSlots !== null && memory.regions.length > this.maxMemSlots) {
      throw new FrontendError('UNSUPPORTED', `${memory.regions.length} regions, the back-end takes ${this.maxMemSlots}`);
    }
    for (const r of memory.regions) await this.addMemRegion(r);
  }

  // -------------------------------------------------------------------------------------------------------

  /**
   * Hang up and release everything this front-end opened: the socket, the back-end channel and the fds that
   * came over it, the queues' eventfds, and the guest memory it created. Pending requests reject with CLOSED.
   */
  close(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    const closed = new FrontendError('CLOSED', 'front-end closed');
    this.fail(closed);
    this.failure = closed;
    this.reader.discard();
    close(this.fd);

    this.backendWatch?.close();
    this.backendWatch = null;
    this.backendReader?.discard();
    if (this.backendFd >= 0) close(this.backendFd);
    this.backendFd = -1;
    for (const fd of this.backendFds.splice(0)) close(fd);
    for (const w of this.backendWaiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new FrontendError('CLOSED', 'front-end closed'));
    }

    for (const q of this.queues) q.close();
    if (this.inflight) close(this.inflight.fd);
    this.inflight = null;
    for (const m of this.logMappings.splice(0)) munmap(m.address, m.size);
    if (this.ownsMemory) this.memory?.close();
  }
}

/** The codec takes exactly a MemoryRegion; TestMemoryRegion's extra hostAddr would be harmless, but stays home. */
function plainRegion(r: MemoryRegion): MemoryRegion {
  return { guestPhysAddr: r.guestPhysAddr, size: r.size, userAddr: r.userAddr, mmapOffset: r.mmapOffset, fd: r.fd };
}
