/**
 * A backend session: the state one frontend builds up over its connection (features, memory table, queue
 * configuration) and the queue runners that serve the data path. Messages are handled one at a time, in order;
 * each handler gets a typed message from the codec, never raw bytes.
 *
 * Failure policy:
 * - a malformed message (codec error) closes the connection;
 * - a well-formed request we cannot honour gets a REPLY_ACK failure when the frontend asked for one, and
 *   otherwise closes the connection (the frontend would go on believing it worked);
 * - a broken ring marks only its queue broken (error eventfd), the session goes on.
 */
import { closeSync, fstatSync, read, write } from 'node:fs';
import { loadDeviceState, saveDeviceState } from './device-state.js';
import { close, eventfdWrite, isEventfd, memfdCreate, mmapShared, munmap, sendMessage, viewOf } from '../sys/index.js';
import { bit, FRAMEWORK_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, type VhostUserDevice } from './device.js';
import { decodeFrontendMessage, encodeBackendMessage, encodeReply, type FrontendMessage, type FrontendMessageOf, type MemoryRegion, type MemoryRegionDesc, type ReplyPayload } from './codec.js';
import type { Connection, RawMessage } from './connection.js';
import { mapRegion, unmapRegion, type MappedRegion, type RegionDescription } from './memory-map.js';
import { FrontendRequest, ProtocolFeature, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, alwaysReplies, frontendRequestSpec } from './protocol.js';
import { QUEUE_STATS, type QueueStartConfig } from './queue-runner.js';
import type { RunnerHost } from './runner-host.js';
import { RunnerPool } from './runner-pool.js';
import { faultInjected } from './faults.js';
import { MAX_QUEUE_SIZE, packedInflightCount, packedInflightSize, splitInflightCount, splitInflightSize } from '../virtqueue/index.js';

export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

/**
 * Memory slots we accept (GET_MAX_MEM_SLOTS): 509, as libvhost-user and rust-vmm answer. QEMU takes at most 512
 * and refuses a backend whose answer shrinks across reconnects; region lookup is a binary search behind a
 * one-window cache, so the count costs the data path nothing.
 */
export const MAX_MEM_SLOTS = 509;

const pf = (f: ProtocolFeature): bigint => 1n << BigInt(f);

/** A request the session refuses; answered with a REPLY_ACK failure where possible. */
export class RequestFailed extends Error {
  override readonly name = 'RequestFailed';
}

interface QueueState {
  size: number;
  descUser: number;
  availUser: number;
  usedUser: number;
  addrSet: boolean;
  /** VHOST_VRING_F_LOG set: the ring's log_guest_addr; else -1. */
  usedLogAddr: number;
  base: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  started: boolean;
}

/** A queue as the control API shows it. */
export interface QueueStatus {
  index: number;
  started: boolean;
  size: number;
  packed: boolean;
  /** QueueStat counters (totals since the backend started, when the server keeps them). */
  stats: Float64Array;
}

function freshQueue(): QueueState {
  return { size: 0, descUser: 0, availUser: 0, usedUser: 0, addrSet: false, usedLogAddr: -1, base: 0, kickFd: -1, callFd: -1, errFd: -1, enabled: false, started: false };
}

/** The frontend's inflight region (SET_INFLIGHT_FD), mapped: one per-queue region after another. */
interface InflightMapping {
  mapAddress: number;
  mapLength: number;
  /** Where queue 0's region starts in our mapping. */
  start: number;
  numQueues: number;
  queueSize: number;
  perQueue: number;
}

type Handler<T extends FrontendMessage['type']> = (msg: FrontendMessageOf<T>) => Promise<ReplyPayload | void> | ReplyPayload | void;
type HandlerTable = { [T in FrontendMessage['type']]?: Handler<T> };

export class BackendSession {
  private features = 0n;
  private protocolFeatures = 0n;
  private status = 0;
  private regions: MappedRegion[] = [];
  private readonly queues: QueueState[];
  /** Per queue, QueueStat counters the runners keep: the server's (totals over sessions) or our own. */
  private readonly stats: SharedArrayBuffer[];
  /** Queue threads, the server's (kept across sessions) or our own. */
  private readonly pool: RunnerPool;
  private readonly ownsPool: boolean;
  /** Groups whose host this session has used (and given its memory table). */
  private readonly hosts = new Map<number, Promise<RunnerHost>>();
  private readonly groupOf: number[];
  private backendReqFd = -1;
  private inflight: InflightMapping | null = null;
  /** The dirty log (SET_LOG_BASE), mapped; and the eventfd of SET_LOG_FD. */
  private dirtyLog: { mapAddress: number; mapLength: number; address: number; length: number } | null = null;
  /** A DEVICE_STATE transfer under way: the save written out, or the load's bytes read in. */
  private stateTransfer: Promise<{ direction: 'save' | 'load'; bytes: Uint8Array }> | null = null;
  private logFd = -1;
  private readonly dropDirtyLog = faultInjected('no-dirty-log');
  private closed = false;
  private readonly handlers: HandlerTable;

  constructor(
    private readonly device: VhostUserDevice,
    private readonly conn: Connection,
    private readonly log: Logger,
    private readonly options: { packedRings: boolean; pool?: RunnerPool; stats?: SharedArrayBuffer[] } = { packedRings: true },
  ) {
    this.stats = options.stats ?? newQueueStats(device.numQueues);
    this.ownsPool = options.pool === undefined;
    this.pool = options.pool ?? new RunnerPool(device, (m) => log.warn(m));
    this.queues = Array.from({ length: device.numQueues }, freshQueue);
    this.groupOf = groupsOf(device);
    this.handlers = this.handlerTable();
    device.bindFrontend?.({ configChanged: () => this.notifyConfigChanged() });
  }

  /** The queues as they are now, for the control API. */
  queueStatus(): QueueStatus[] {
    return this.queues.map((q, index) => ({
      index,
      started: q.started,
      size: q.size,
      packed: this.packed,
      stats: new Float64Array(this.stats[index]),
    }));
  }

  /** CONFIG_CHANGE_MSG on the backend channel, when the frontend negotiated one. */
  private notifyConfigChanged(): boolean {
    if (this.closed || this.backendReqFd < 0 || !this.has(ProtocolFeature.BACKEND_REQ)) return false;
    const { bytes } = encodeBackendMessage({ type: 'CONFIG_CHANGE_MSG' });
    try {
      return sendMessage(this.backendReqFd, bytes, bytes.length, []) === bytes.length;
    } catch (e) {
      this.log.warn(`CONFIG_CHANGE_MSG not sent: ${(e as Error).message}`);
      return false;
    }
  }

  /** VIRTIO_F_RING_PACKED negotiated: the queues are packed rings. */
  private get packed(): boolean {
    return (this.features & bit(VIRTIO_F_RING_PACKED)) !== 0n;
  }

  /** Virtio features offered: the device's plus what the framework implements. */
  get offeredFeatures(): bigint {
    const offered = this.device.features | FRAMEWORK_FEATURES;
    return this.options.packedRings ? offered : offered & ~bit(VIRTIO_F_RING_PACKED);
  }

  get offeredProtocolFeatures(): bigint {
    let f =
      pf(ProtocolFeature.MQ) |
      pf(ProtocolFeature.REPLY_ACK) |
      pf(ProtocolFeature.BACKEND_REQ) |
      pf(ProtocolFeature.RESET_DEVICE) |
      pf(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
      pf(ProtocolFeature.STATUS) |
      pf(ProtocolFeature.LOG_SHMFD);
    if (this.device.configSize !== undefined && this.device.readConfig) f |= pf(ProtocolFeature.CONFIG);
    if (this.device.inflightTracking) f |= pf(ProtocolFeature.INFLIGHT_SHMFD);
    if (this.device.state) f |= pf(ProtocolFeature.DEVICE_STATE);
    return f | (this.device.protocolFeatures ?? 0n);
  }

  /** Handle one message from the connection; throws (and the caller closes the connection) on fatal errors. */
  async handle(raw: RawMessage): Promise<void> {
    let msg: FrontendMessage;
    try {
      msg = decodeFrontendMessage(raw.header, raw.payload, raw.fds);
    } catch (e) {
      for (const fd of raw.fds) close(fd);
      throw e;
    }
    const spec = frontendRequestSpec(new DataView(raw.header.buffer, raw.header.byteOffset).getUint32(0, true));
    const request = new DataView(raw.header.buffer, raw.header.byteOffset).getUint32(0, true) as FrontendRequest;
    const handler = this.handlers[msg.type] as Handler<typeof msg.type> | undefined;
    const ackWanted = msg.needReply && this.has(ProtocolFeature.REPLY_ACK) && !(spec && alwaysReplies(spec));
    if (!handler) {
      for (const fd of msgFds(msg)) close(fd);
      const what = msg.type === 'UNKNOWN' ? `unknown request ${msg.request}` : `${msg.type} is not supported by this backend`;
      if (ackWanted) {
        this.log.warn(`${what}; answered with a REPLY_ACK failure`);
        this.conn.send(encodeReply(request, { kind: 'ack', status: 1 }));
        return;
      }
      if (spec && alwaysReplies(spec)) throw new RequestFailed(`${what}, and it expects a reply: closing the connection`);
      this.log.warn(`${what}; ignored`);
      return;
    }
    let reply: ReplyPayload | void;
    try {
      reply = await handler(msg as never);
    } catch (e) {
      if (!(e instanceof RequestFailed)) throw e;
      if (ackWanted) {
        this.log.warn(`${msg.type} failed: ${e.message}`);
        this.conn.send(encodeReply(request, { kind: 'ack', status: 1 }));
        return;
      }
      throw new RequestFailed(`${msg.type} failed: ${e.message}`);
    }
    if (reply) {
      const fds = reply.kind === 'inflight' ? [reply.fd] : [];
      try {
        this.conn.send(encodeReply(request, reply), fds);
      } finally {
        for (const fd of fds) close(fd); // the frontend has its own copy now
      }
    } else if (ackWanted) this.conn.send(encodeReply(request, { kind: 'ack', status: 0 }));
  }

  /** The frontend is gone: stop every queue, unmap memory, close fds, reset the device. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.stopAll();
    this.hosts.clear();
    // The hosts let go of this session's memory before it is unmapped below.
    if (this.ownsPool) await this.pool.close();
    else await this.pool.release();
    for (const r of this.regions) unmapRegion(r);
    this.regions = [];
    this.unmapInflight();
    this.unmapLog();
    for (const q of this.queues) closeQueueFds(q);
    if (this.backendReqFd >= 0) close(this.backendReqFd);
    this.backendReqFd = -1;
    this.device.bindFrontend?.(null);
    this.device.reset?.();
  }

  private has(f: ProtocolFeature): boolean {
    return (this.protocolFeatures & pf(f)) !== 0n;
  }

  private queue(index: number): QueueState {
    const q = this.queues[index];
    if (!q) throw new RequestFailed(`queue ${index} does not exist (the device has ${this.queues.length})`);
    return q;
  }

  /**
   * {@link queue} for a request that hands over `fd` (kick, call, err): when there is no such queue, or the fd
   * is not an eventfd, nobody will own it, so it is closed and the request refused.
   */
  private queueTaking(index: number, fd: number | null, what: string): QueueState {
    const q = this.queues[index];
    if (fd !== null && (!q || !isEventfd(fd))) {
      close(fd);
      if (q) throw new RequestFailed(`queue ${index}: the ${what} fd is not an eventfd`);
    }
    return this.queue(index);
  }

  private handlerTable(): HandlerTable {
    return {
      GET_FEATURES: () => ({ kind: 'features', features: this.offeredFeatures }),
      SET_FEATURES: (m) => {
        const extra = m.features & ~this.offeredFeatures;
        if (extra !== 0n) throw new RequestFailed(`features 0x${extra.toString(16)} were never offered`);
        const logAll = (m.features & bit(VHOST_F_LOG_ALL)) !== 0n;
        const wasLogging = (this.features & bit(VHOST_F_LOG_ALL)) !== 0n;
        this.features = m.features;
        this.device.featuresNegotiated?.(m.features);
        // Migration turns logging on (and off again when it fails or is cancelled) while the queues run.
        if (logAll !== wasLogging) return this.toHosts({ op: 'logging', enabled: this.logging(logAll) });
      },
      GET_PROTOCOL_FEATURES: () => ({ kind: 'features', features: this.offeredProtocolFeatures }),
      SET_PROTOCOL_FEATURES: (m) => {
        const extra = m.features & ~this.offeredProtocolFeatures;
        if (extra !== 0n) throw new RequestFailed(`protocol features 0x${extra.toString(16)} were never offered`);
        this.protocolFeatures = m.features;
      },
      SET_OWNER: () => {},
      RESET_OWNER: () => this.resetDevice(),
      RESET_DEVICE: () => this.resetDevice(),
      GET_QUEUE_NUM: () => ({ kind: 'u64', value: this.device.numQueues }),
      GET_MAX_MEM_SLOTS: () => ({ kind: 'u64', value: MAX_MEM_SLOTS }),
      SET_MEM_TABLE: (m) => this.setMemTable(m.regions),
      ADD_MEM_REG: (m) => this.addMemRegion(m.region),
      REM_MEM_REG: (m) => this.removeMemRegion(m.region, m.fd),
      SET_VRING_NUM: (m) => {
        const q = this.queue(m.index);
        const max = Math.min(this.device.maxQueueSize, MAX_QUEUE_SIZE);
        // A packed ring may have any size; a split ring's indices wrap at 2^16, so its size must divide that.
        if (m.num === 0 || m.num > max || (!this.packed && (m.num & (m.num - 1)) !== 0)) {
          throw new RequestFailed(`queue ${m.index}: size ${m.num} is not ${this.packed ? 'between 1 and' : 'a power of 2 up to'} ${max}`);
        }
        q.size = m.num;
      },
      SET_VRING_ADDR: async (m) => {
        const q = this.queue(m.index);
        q.descUser = m.descUserAddr;
        q.availUser = m.availUserAddr;
        q.usedUser = m.usedUserAddr;
        q.addrSet = true;
        // VHOST_VRING_F_LOG: QEMU sets it on running rings when a migration starts.
        q.usedLogAddr = (m.ringFlags & 1) !== 0 ? m.logGuestAddr : -1;
        if (q.started) await this.toHost(m.index, { op: 'ringLog', index: m.index, usedLogAddr: q.usedLogAddr });
      },
      SET_VRING_BASE: (m) => {
        const q = this.queue(m.index);
        // Checked when the queue starts, against the ring layout negotiated by then (packed: avail index and wrap
        // counter in bits 0-15, used index and wrap counter in bits 16-31).
        q.base = m.num;
      },
      GET_VRING_BASE: async (m) => {
        const q = this.queue(m.index);
        await this.stopQueue(m.index);
        // The ring is stopped: the frontend expects the kick and call fds to be let go.
        closeQueueFds(q);
        q.enabled = false;
        return { kind: 'vring-state', index: m.index, num: q.base };
      },
      SET_VRING_KICK: async (m) => {
        const q = this.queueTaking(m.index, m.fd, 'kick');
        if (m.fd === null) throw new RequestFailed(`queue ${m.index}: polling mode (no kick fd) is not supported`);
        const old = q.kickFd;
        q.kickFd = m.fd;
        try {
          if (q.started) await this.toHost(m.index, { op: 'kickFd', index: m.index, fd: m.fd });
        } finally {
          // The runner let go of the old fd whether or not it could watch the new one.
          if (old >= 0) close(old);
        }
        // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts.
        if ((this.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) === 0n) q.enabled = true;
        if (!q.started) await this.startQueue(m.index);
      },
      SET_VRING_CALL: (m) => this.replaceFd(m.index, 'callFd', m.fd),
      SET_VRING_ERR: (m) => this.replaceFd(m.index, 'errFd', m.fd),
      SET_VRING_ENABLE: async (m) => {
        const q = this.queue(m.index);
        if (m.num > 1) throw new RequestFailed(`queue ${m.index}: enable value ${m.num} is not 0 or 1`);
        q.enabled = m.num === 1;
        if (q.started) await this.toHost(m.index, { op: 'enable', index: m.index, enabled: q.enabled });
      },
      GET_CONFIG: (m) => {
        const size = this.device.configSize ?? 0;
        if (!this.device.readConfig || m.offset + m.size > size) {
          this.log.warn(`GET_CONFIG ${m.offset}+${m.size} outside the ${size}-byte config space`);
          return { kind: 'config-error' };
        }
        return { kind: 'config', offset: m.offset, configFlags: m.configFlags, data: this.device.readConfig(m.offset, m.size) };
      },
      SET_CONFIG: (m) => {
        const size = this.device.configSize ?? 0;
        if (!this.device.writeConfig) throw new RequestFailed('the config space is read-only');
        if (m.offset + m.size > size) throw new RequestFailed(`config write ${m.offset}+${m.size} outside the ${size}-byte config space`);
        this.device.writeConfig(m.offset, m.data);
      },
      SET_BACKEND_REQ_FD: (m) => {
        if (this.backendReqFd >= 0) close(this.backendReqFd);
        this.backendReqFd = m.fd;
      },
      SET_STATUS: (m) => {
        this.status = m.status & 0xff;
      },
      GET_STATUS: () => ({ kind: 'u64', value: this.status }),
      SET_LOG_BASE: (m) => this.setLogBase(m),
      SET_LOG_FD: (m) => {
        if (!isEventfd(m.fd)) {
          close(m.fd);
          throw new RequestFailed('the log fd is not an eventfd');
        }
        if (this.logFd >= 0) close(this.logFd);
        this.logFd = m.fd;
      },
      SET_DEVICE_STATE_FD: (m) => this.setDeviceStateFd(m),
      CHECK_DEVICE_STATE: () => this.checkDeviceState(),
      GET_INFLIGHT_FD: (m) => this.newInflightRegion(m.numQueues, m.queueSize),
      SET_INFLIGHT_FD: (m) => this.setInflightRegion(m),
      SEND_RARP: (m) => {
        if (!this.device.sendRarp || !this.has(ProtocolFeature.RARP)) throw new RequestFailed('SEND_RARP without the RARP protocol feature');
        this.device.sendRarp(m.mac);
        this.log.info(`SEND_RARP: the guest (${[...m.mac].map((b) => b.toString(16).padStart(2, '0')).join(':')}) is announced on its next pass`);
      },
    };
  }

  private async replaceFd(index: number, which: 'callFd' | 'errFd', fd: number | null): Promise<void> {
    const q = this.queueTaking(index, fd, which === 'callFd' ? 'call' : 'error');
    const old = q[which];
    q[which] = fd ?? -1;
    try {
      if (q.started) await this.toHost(index, { op: which, index, fd: q[which] });
    } finally {
      if (old >= 0) close(old);
    }
  }

  /**
   * SET_LOG_BASE (LOG_SHMFD): map the frontend's dirty log and hand it to every queue thread; the old one is
   * unmapped once none uses it. QEMU waits for the reply before it turns logging on.
   */
  private async setLogBase(m: FrontendMessageOf<'SET_LOG_BASE'>): Promise<ReplyPayload> {
    if (m.fd === null) throw new RequestFailed('SET_LOG_BASE without a log fd: only the shared-memory log (LOG_SHMFD) is supported');
    let mapped: { mapAddress: number; mapLength: number; address: number; length: number };
    try {
      if (!this.has(ProtocolFeature.LOG_SHMFD)) throw new RequestFailed('LOG_SHMFD was not negotiated');
      const mapLength = m.mmapOffset + m.mmapSize;
      if (m.mmapSize === 0 || !Number.isSafeInteger(mapLength)) throw new RequestFailed(`a log of ${m.mmapSize} bytes at offset ${m.mmapOffset}`);
      const mapAddress = mapFrontendFile(m.fd, mapLength, 'the log');
      mapped = { mapAddress, mapLength, address: mapAddress + m.mmapOffset, length: m.mmapSize };
    } finally {
      close(m.fd);
    }
    const old = this.dirtyLog;
    this.dirtyLog = mapped;
    await this.toHosts({ op: 'log', address: mapped.address, length: mapped.length });
    if (old) munmap(old.mapAddress, old.mapLength);
    return { kind: 'ack', status: 0 };
  }

  private unmapLog(): void {
    if (this.dirtyLog) munmap(this.dirtyLog.mapAddress, this.dirtyLog.mapLength);
    this.dirtyLog = null;
    if (this.logFd >= 0) close(this.logFd);
    this.logFd = -1;
  }

  /**
   * SET_DEVICE_STATE_FD (stopped phase only): save writes the state into the fd and closes it, load reads it to
   * the end; both run after the reply, since the frontend reads or writes the other end only then.
   */
  private setDeviceStateFd(m: FrontendMessageOf<'SET_DEVICE_STATE_FD'>): ReplyPayload {
    const device = this.device;
    if (!device.state || !this.has(ProtocolFeature.DEVICE_STATE) || m.phase !== 0 || m.direction > 1) {
      close(m.fd);
      throw new RequestFailed(`device state transfer ${m.direction === 0 ? 'save' : 'load'} in phase ${m.phase}: only the stopped phase of a device with state`);
    }
    const fd = m.fd;
    if (m.direction === 0) {
      const positions = this.queues.map((q, index) => ({ index, vringBase: q.base, packed: this.packed, inflight: this.inflightCount(index) }));
      const bytes = saveDeviceState(device as VhostUserDevice & { state: NonNullable<VhostUserDevice['state']> }, positions);
      this.stateTransfer = writeAll(fd, bytes).then(() => ({ direction: 'save' as const, bytes }));
    } else {
      this.stateTransfer = readAll(fd).then((bytes) => ({ direction: 'load' as const, bytes }));
    }
    this.stateTransfer.catch(() => {}); // CHECK_DEVICE_STATE reports it
    return { kind: 'status-fd', status: 0, noFd: true };
  }

  private async checkDeviceState(): Promise<ReplyPayload> {
    const transfer = this.stateTransfer;
    this.stateTransfer = null;
    try {
      if (!transfer) throw new Error('no device state transfer was started');
      const { direction, bytes } = await transfer;
      if (direction === 'load') loadDeviceState(this.device as VhostUserDevice & { state: NonNullable<VhostUserDevice['state']> }, bytes);
      this.log.info(`device state ${direction === 'save' ? 'saved' : 'loaded'} (${bytes.length} bytes)`);
      return { kind: 'ack', status: 0 };
    } catch (e) {
      this.log.warn(`device state transfer failed: ${(e as Error).message}`);
      return { kind: 'ack', status: 1 };
    }
  }

  /** A request for every queue thread this session uses. */
  private async toHosts(req: Parameters<RunnerHost['request']>[0]): Promise<void> {
    for (const host of this.hosts.values()) await (await host).request(req);
  }

  private inflightQueueBytes(queueSize: number): number {
    return this.packed ? packedInflightSize(queueSize) : splitInflightSize(queueSize);
  }

  private checkInflightShape(numQueues: number, queueSize: number): void {
    if (!this.has(ProtocolFeature.INFLIGHT_SHMFD)) throw new RequestFailed('INFLIGHT_SHMFD was not negotiated');
    if (numQueues < 1 || numQueues > this.queues.length) {
      throw new RequestFailed(`inflight region for ${numQueues} queues; the device has ${this.queues.length}`);
    }
    if (queueSize < 1 || queueSize > MAX_QUEUE_SIZE) throw new RequestFailed(`inflight queue size ${queueSize} is not between 1 and ${MAX_QUEUE_SIZE}`);
  }

  /**
   * GET_INFLIGHT_FD: a fresh, zeroed region (version 0: each queue's part is initialised when the queue starts,
   * at the ring's position then). The frontend keeps it and hands it to every backend that serves this device
   * after us, until the guest resets the device.
   */
  private newInflightRegion(numQueues: number, queueSize: number): ReplyPayload {
    this.checkInflightShape(numQueues, queueSize);
    const mmapSize = numQueues * this.inflightQueueBytes(queueSize);
    const fd = memfdCreate('vhost-ts inflight', mmapSize);
    return { kind: 'inflight', mmapSize, mmapOffset: 0, numQueues, queueSize, fd };
  }

  private setInflightRegion(m: FrontendMessageOf<'SET_INFLIGHT_FD'>): void {
    try {
      this.checkInflightShape(m.numQueues, m.queueSize);
      if (this.queues.some((q) => q.started)) throw new RequestFailed('SET_INFLIGHT_FD while queues run');
      const perQueue = this.inflightQueueBytes(m.queueSize);
      if (m.mmapSize < m.numQueues * perQueue) {
        throw new RequestFailed(`inflight region of ${m.mmapSize} bytes; ${m.numQueues} queues of ${m.queueSize} need ${m.numQueues * perQueue}`);
      }
      if (m.mmapOffset % 8 !== 0) throw new RequestFailed(`inflight region offset ${m.mmapOffset} is not 8-byte aligned`);
      const mapLength = m.mmapOffset + m.mmapSize;
      const mapAddress = mapFrontendFile(m.fd, mapLength, 'the inflight region');
      this.unmapInflight();
      this.inflight = { mapAddress, mapLength, start: mapAddress + m.mmapOffset, numQueues: m.numQueues, queueSize: m.queueSize, perQueue };
    } finally {
      close(m.fd);
    }
  }

  private unmapInflight(): void {
    if (this.inflight) munmap(this.inflight.mapAddress, this.inflight.mapLength);
    this.inflight = null;
  }

  /** Chains the inflight region records for this queue (0 without a region): the device state's summary. */
  private inflightCount(index: number): number {
    const r = this.inflightFor(index, 0);
    if (!r) return 0;
    const region = new Uint8Array(viewOf(r.address, r.length));
    return this.packed ? packedInflightCount(region, r.descNum) : splitInflightCount(region, r.descNum);
  }

  /** This queue's part of the inflight region, when the frontend gave one that covers it. */
  private inflightFor(index: number, size: number): QueueStartConfig['inflight'] {
    const r = this.inflight;
    if (!r || index >= r.numQueues) return null;
    if (size > r.queueSize) throw new RequestFailed(`queue ${index}: size ${size} is larger than the inflight region's ${r.queueSize}`);
    return { address: r.start + index * r.perQueue, length: r.perQueue, descNum: r.queueSize };
  }

  private async setMemTable(regions: MemoryRegion[]): Promise<void> {
    const mapped: MappedRegion[] = [];
    try {
      checkNoOverlap(regions);
      for (const r of regions) mapped.push(mapRegion(r, r.fd));
    } catch (e) {
      for (const m of mapped) unmapRegion(m);
      if (e instanceof RequestFailed) throw e;
      throw new RequestFailed(`cannot map guest memory: ${(e as Error).message}`);
    } finally {
      for (const r of regions) close(r.fd);
    }
    await this.replaceMemory(mapped);
  }

  private async addMemRegion(r: MemoryRegion): Promise<void> {
    let m: MappedRegion;
    try {
      if (this.regions.length >= MAX_MEM_SLOTS) throw new RequestFailed(`all ${MAX_MEM_SLOTS} memory slots are in use`);
      checkNoOverlap([...this.regions, r]);
      m = mapRegion(r, r.fd);
    } catch (e) {
      if (e instanceof RequestFailed) throw e;
      throw new RequestFailed(`cannot map guest memory region: ${(e as Error).message}`);
    } finally {
      close(r.fd);
    }
    await this.replaceMemory([...this.regions, m], false);
    this.log.info(`memory region added at guest 0x${m.guestPhysAddr.toString(16)}, ${m.size >> 20} MiB (${this.regions.length} regions)`);
  }

  private async removeMemRegion(r: MemoryRegionDesc, fd: number | null): Promise<void> {
    if (fd !== null) close(fd);
    const i = this.regions.findIndex((x) => x.guestPhysAddr === r.guestPhysAddr && x.size === r.size && x.userAddr === r.userAddr);
    if (i < 0) throw new RequestFailed(`no memory region at guest address 0x${r.guestPhysAddr.toString(16)} of size ${r.size}`);
    const removed = this.regions[i];
    await this.replaceMemory(this.regions.filter((_, j) => j !== i), false);
    unmapRegion(removed);
    this.log.info(`memory region removed at guest 0x${removed.guestPhysAddr.toString(16)} (${this.regions.length} regions)`);
  }

  /**
   * Install a new region table everywhere, then unmap what is no longer used. Runners must drop their views of
   * the old mappings before the munmap: touching one afterwards is SIGSEGV.
   */
  private async replaceMemory(next: MappedRegion[], unmapOld = true): Promise<void> {
    const old = this.regions;
    this.regions = next;
    for (const host of this.hosts.values()) await (await host).request({ op: 'memory', regions: next });
    if (unmapOld) for (const r of old) unmapRegion(r);
  }

  private async resetDevice(): Promise<void> {
    await this.stopAll();
    for (let i = 0; i < this.queues.length; i++) {
      closeQueueFds(this.queues[i]);
      this.queues[i] = freshQueue();
    }
    this.features = 0n;
    this.status = 0;
    // The frontend gets a new region after a reset (QEMU frees its copy).
    this.unmapInflight();
    await this.toHosts({ op: 'log', address: 0, length: 0 });
    this.unmapLog();
    this.device.reset?.();
  }

  private async stopAll(): Promise<void> {
    for (let i = 0; i < this.queues.length; i++) {
      try {
        await this.stopQueue(i);
      } catch (e) {
        this.log.warn(`queue ${i}: ${(e as Error).message}`);
      }
    }
  }

  private async stopQueue(index: number): Promise<void> {
    const q = this.queues[index];
    if (!q.started) return;
    q.started = false;
    const last = await this.toHost(index, { op: 'stop', index });
    if (last >= 0) q.base = last;
  }

  private async startQueue(index: number): Promise<void> {
    const q = this.queue(index);
    if (q.size === 0 || !q.addrSet) throw new RequestFailed(`queue ${index}: kick fd set before the ring size and addresses`);
    const descAddr = this.userToGuest(q.descUser);
    const availAddr = this.userToGuest(q.availUser);
    const usedAddr = this.userToGuest(q.usedUser);
    if (descAddr < 0 || availAddr < 0 || usedAddr < 0) {
      throw new RequestFailed(`queue ${index}: ring addresses are not in guest memory`);
    }
    if (!this.packed && q.base > 0xffff) throw new RequestFailed(`queue ${index}: base ${q.base} does not fit a split ring's 16-bit index`);
    const config: QueueStartConfig = {
      index,
      size: q.size,
      descAddr,
      availAddr,
      usedAddr,
      base: q.base,
      packed: this.packed,
      eventIdx: (this.features & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n,
      indirect: (this.features & bit(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n,
      features: this.features,
      kickFd: q.kickFd,
      callFd: q.callFd,
      errFd: q.errFd,
      enabled: q.enabled,
      inflight: this.inflightFor(index, q.size),
      usedLogAddr: q.usedLogAddr,
      stats: this.stats[index],
    };
    try {
      await this.toHost(index, { op: 'start', config });
    } catch (e) {
      // The ring is unusable: tell the frontend through the error eventfd too (QEMU marks NEEDS_RESET).
      if (q.errFd >= 0) eventfdWrite(q.errFd, 1);
      throw new RequestFailed(`queue ${index}: ${(e as Error).message}`);
    }
    q.started = true;
    this.log.info(`queue ${index} started: ${this.packed ? 'packed' : 'split'} ring of ${q.size}${config.inflight ? ', requests in flight tracked' : ''}`);
  }

  private userToGuest(userAddr: number): number {
    for (const r of this.regions) {
      if (userAddr >= r.userAddr && userAddr - r.userAddr < r.size) return r.guestPhysAddr + (userAddr - r.userAddr);
    }
    return -1;
  }

  private async toHost(index: number, req: Parameters<RunnerHost['request']>[0]): Promise<number> {
    return (await this.host(index)).request(req);
  }

  /** Whether the queue threads mark the dirty log when the frontend asks for logging (a test may break it: faults.ts). */
  private logging(asked: boolean): boolean {
    if (asked && this.dropDirtyLog) this.log.warn('fault injected (VHOST_TS_FAULTS=no-dirty-log): the dirty log is left unmarked');
    return asked && !this.dropDirtyLog;
  }

  /** The runner host of a queue's group, from the pool, given the current memory table on first use. */
  private host(index: number): Promise<RunnerHost> {
    const group = this.groupOf[index];
    let host = this.hosts.get(group);
    if (!host) {
      host = this.pool.host(group).then(async (h) => {
        if (this.regions.length > 0) await h.request({ op: 'memory', regions: this.regions });
        if (this.dirtyLog) await h.request({ op: 'log', address: this.dirtyLog.address, length: this.dirtyLog.length });
        if ((this.features & bit(VHOST_F_LOG_ALL)) !== 0n) await h.request({ op: 'logging', enabled: this.logging(true) });
        return h;
      });
      this.hosts.set(group, host);
      // A host that failed to start is forgotten, so the next request retries and reports the same error.
      host.catch(() => this.hosts.delete(group));
    }
    return host;
  }
}

/**
 * Map `mapLength` bytes of a frontend's file from its start, shared, once it is seen to hold them: past the end of
 * its file a shared mapping is SIGBUS.
 */
function mapFrontendFile(fd: number, mapLength: number, what: string): number {
  const st = fstatSync(fd);
  if (!st.isFile() || st.size < mapLength) throw new RequestFailed(`the fd of ${what} holds ${st.size} bytes, ${what} needs ${mapLength}`);
  return mmapShared(fd, mapLength, 0);
}

/** Write all of `bytes` to `fd` off the main thread (a pipe the frontend drains), then close it. */
function writeAll(fd: number, bytes: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (at: number): void => {
      if (at >= bytes.length) {
        closeSync(fd);
        return resolve();
      }
      write(fd, bytes, at, bytes.length - at, null, (e, n) => {
        // QEMU's pipes block; a non-blocking fd from another frontend says EAGAIN while it is full.
        if (e?.code === 'EAGAIN') return void setTimeout(() => step(at), 1);
        if (e) {
          closeSync(fd);
          return reject(e);
        }
        step(at + n);
      });
    };
    step(0);
  });
}

/** Read `fd` to its end (at most 64 MiB, the most a device state may be), then close it. */
function readAll(fd: number): Promise<Uint8Array> {
  const chunks: Buffer[] = [];
  let total = 0;
  return new Promise((resolve, reject) => {
    const step = (): void => {
      const buf = Buffer.alloc(1 << 16);
      read(fd, buf, 0, buf.length, null, (e, n) => {
        if (e?.code === 'EAGAIN') return void setTimeout(step, 1);
        if (e || total + n > 64 << 20) {
          closeSync(fd);
          return reject(e ?? new Error('a device state over 64 MiB'));
        }
        if (n === 0) {
          closeSync(fd);
          return resolve(Buffer.concat(chunks, total));
        }
        chunks.push(buf.subarray(0, n));
        total += n;
        step();
      });
    };
    step();
  });
}

/** Zeroed QueueStat counters for `n` queues. */
export function newQueueStats(n: number): SharedArrayBuffer[] {
  return Array.from({ length: n }, () => new SharedArrayBuffer(8 * QUEUE_STATS));
}

function closeQueueFds(q: QueueState): void {
  for (const k of ['kickFd', 'callFd', 'errFd'] as const) {
    if (q[k] >= 0) close(q[k]);
    q[k] = -1;
  }
}

function msgFds(msg: FrontendMessage): number[] {
  if (msg.type === 'UNKNOWN') return msg.fds;
  const fds: number[] = [];
  const m = msg as { fd?: number | null; regions?: { fd: number }[]; region?: { fd?: number } };
  if (typeof m.fd === 'number') fds.push(m.fd);
  if (m.regions) for (const r of m.regions) fds.push(r.fd);
  if (m.region && typeof m.region.fd === 'number') fds.push(m.region.fd);
  return fds;
}

function groupsOf(device: VhostUserDevice): number[] {
  const groupOf = Array.from({ length: device.numQueues }, (_, i) => i);
  device.dataPlane.groups?.forEach((g, gi) => {
    for (const q of g) if (q >= 0 && q < device.numQueues) groupOf[q] = device.numQueues + gi;
  });
  return groupOf;
}

function checkNoOverlap(regions: readonly RegionDescription[]): void {
  const sorted = [...regions].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i].guestPhysAddr < sorted[i - 1].guestPhysAddr + sorted[i - 1].size) {
      throw new RequestFailed(`memory region at 0x${sorted[i].guestPhysAddr.toString(16)} overlaps another`);
    }
  }
}

