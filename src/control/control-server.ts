/**
 * The control API on a Unix socket (`--control PATH`): list frontends and queues, per-queue stats, and the calls
 * a device answers (blk: resize; net: link, MAC table; console: resize, add and remove a named port). Messages are proto/vhost_ts/control.proto, length-delimited. A malformed
 * message gets an error Response; one that breaks the framing (a length beyond 1 MiB) closes the connection. The
 * devices never notice either.
 *
 * @example
 * ```ts
 * const servers = [await VhostUserServer.start(blkDevice({ path: 'disk.img' }), { socketPath: '/tmp/blk.sock' })];
 * const control = await ControlServer.start('/tmp/blk.ctl', servers);
 * // vhost-ts ctl /tmp/blk.ctl stats --json
 * ```
 */
import { lstatSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import type { BlkDevice } from '../devices/blk/index.js';
import { parseHostEnd, type ConsoleDevice } from '../devices/console/index.js';
import type { NetDevice } from '../devices/net/index.js';
import { QueueStat, type Logger, type VhostUserServer } from '../vhost/index.js';
import { encodeFrame, Request, Response, splitFrames } from './proto.js';

interface RequestObject {
  id?: number;
  call?: 'list' | 'stats' | 'blkResize' | 'netLink' | 'macTable' | 'consoleResize' | 'consoleAddPort' | 'consoleRemovePort';
  blkResize?: { sizeBytes?: number };
  netLink?: { up?: boolean; endpoint?: string };
  consoleResize?: { cols?: number; rows?: number };
  consoleAddPort?: { name?: string; backend?: string };
  consoleRemovePort?: { name?: string };
}

export class ControlServer {
  private readonly clients = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    private readonly path: string,
    private readonly targets: readonly VhostUserServer[],
    private readonly log: Logger,
  ) {}

  /** Listen on `path` (a stale socket file is replaced) for clients of the backends in `targets`. */
  static async start(path: string, targets: readonly VhostUserServer[], log?: Logger): Promise<ControlServer> {
    removeStaleSocket(path);
    const logger = log ?? targets[0]?.log ?? { info() {}, warn() {}, error() {} };
    const server = createServer();
    const control = new ControlServer(server, path, targets, logger);
    server.on('connection', (s) => control.serve(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    logger.info(`control API on ${path}`);
    return control;
  }

  async close(): Promise<void> {
    for (const c of this.clients) c.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
    try {
      unlinkSync(this.path);
    } catch {
      // gone already
    }
  }

  private serve(socket: Socket): void {
    this.clients.add(socket);
    socket.on('close', () => this.clients.delete(socket));
    socket.on('error', () => {});
    let pending: Buffer = Buffer.alloc(0);
    // Some calls finish later (a console port's socket must listen first): answers still go out in request order.
    let answered: Promise<void> = Promise.resolve();
    socket.on('data', (d: Buffer) => {
      let frames: Buffer[];
      try {
        ({ frames, rest: pending } = splitFrames(pending.length === 0 ? d : Buffer.concat([pending, d])));
      } catch (e) {
        this.log.warn(`control client: ${(e as Error).message}; connection closed`);
        socket.end(encodeFrame(Response, { id: 0, error: `${(e as Error).message}: connection closed` }));
        return;
      }
      for (const f of frames) {
        const reply = this.answer(f);
        answered = answered.then(async () => {
          const r = await reply;
          if (!socket.destroyed) socket.write(encodeFrame(Response, r));
        });
      }
    });
  }

  /** The Response to one framed Request. */
  private async answer(frame: Buffer): Promise<object> {
    let req: RequestObject;
    try {
      req = Request.toObject(Request.decode(frame), { longs: Number, oneofs: true }) as RequestObject;
    } catch (e) {
      return { id: 0, error: `malformed request: ${(e as Error).message}` };
    }
    const id = req.id ?? 0;
    try {
      switch (req.call) {
        case 'list':
          return { id, list: { frontends: this.targets.map((t) => this.frontend(t)) } };
        case 'stats':
          return { id, stats: { frontends: this.targets.map((t) => this.stats(t)) } };
        case 'blkResize':
          return { id, ...this.blkResize(req.blkResize?.sizeBytes ?? 0) };
        case 'netLink':
          return { id, ...this.netLink(req.netLink?.up ?? false, req.netLink?.endpoint ?? '') };
        case 'macTable':
          return { id, macTable: { entries: this.net().flatMap(({ device }) => device.macTable()) } };
        case 'consoleResize':
          return { id, ...this.consoleResize(req.consoleResize?.cols ?? 0, req.consoleResize?.rows ?? 0) };
        case 'consoleAddPort':
          return { id, ...(await this.consoleAddPort(req.consoleAddPort?.name ?? '', req.consoleAddPort?.backend ?? '')) };
        case 'consoleRemovePort':
          return { id, ...this.consoleRemovePort(req.consoleRemovePort?.name ?? '') };
        default:
          return { id, error: 'unknown or missing call: this backend answers list, stats, blk_resize, net_link, mac_table, console_resize, console_add_port and console_remove_port' };
      }
    } catch (e) {
      return { id, error: (e as Error).message };
    }
  }

  private frontend(t: VhostUserServer): object {
    return {
      device: t.device.name,
      endpoint: t.endpoint,
      connected: t.connected,
      queues: t.queueStatus().map((q) => ({ index: q.index, started: q.started, size: q.size, packed: q.packed })),
    };
  }

  private stats(t: VhostUserServer): object {
    return {
      device: t.device.name,
      endpoint: t.endpoint,
      queues: t
        .queueStatus()
        .map((q) => {
          const s = q.stats;
          return {
            index: q.index,
            chains: s[QueueStat.chains],
            bytes: s[QueueStat.bytes],
            kicks: s[QueueStat.kicks],
            notifications: s[QueueStat.notifications],
            suppressed: s[QueueStat.suppressed],
            broken: s[QueueStat.broken] !== 0,
          };
        }),
    };
  }

  /** The net devices served here (device ID 1), with their endpoints. */
  private net(): { device: NetDevice; endpoint: string }[] {
    const found = this.targets
      .filter((t) => t.device.deviceId === 1 && typeof (t.device as Partial<NetDevice>).setLink === 'function')
      .map((t) => ({ device: t.device as NetDevice, endpoint: t.endpoint }));
    if (found.length === 0) throw new Error('this backend serves no net device');
    return found;
  }

  private netLink(up: boolean, endpoint: string): object {
    const devices = this.net().filter((n) => endpoint === '' || n.endpoint === endpoint);
    if (devices.length === 0) return { error: `no net device on ${endpoint}` };
    for (const { device } of devices) device.setLink(up);
    this.log.info(`link ${up ? 'up' : 'down'}${endpoint ? ` on ${endpoint}` : ''}`);
    return { done: {} };
  }

  /** The console device served here (device ID 3). */
  private console(): ConsoleDevice | null {
    return this.targets.map((t) => t.device).find((d): d is ConsoleDevice => d.deviceId === 3 && typeof (d as Partial<ConsoleDevice>).addPort === 'function') ?? null;
  }

  private consoleResize(cols: number, rows: number): object {
    const con = this.console();
    if (!con) return { error: 'this backend serves no console device' };
    if (!(cols >= 1 && cols <= 0xffff && rows >= 1 && rows <= 0xffff)) return { error: `a size of ${cols}x${rows}: 1 to 65535 each` };
    con.resize(cols, rows);
    return { done: {} };
  }

  private async consoleAddPort(name: string, backend: string): Promise<object> {
    const con = this.console();
    if (!con) return { error: 'this backend serves no console device' };
    if (name === '') return { error: 'console_add_port needs the name of the port' };
    let spec;
    try {
      spec = parseHostEnd(backend);
    } catch {
      return { error: `a port backend of "${backend}": use socket:PATH, pty or file:PATH` };
    }
    const port = await con.addPort({ name, backend: spec });
    this.log.info(`console port ${port.id} (${port.name}) added: ${port.backend}`);
    return { consolePort: { id: port.id, name: port.name, backend: port.backend } };
  }

  private consoleRemovePort(name: string): object {
    const con = this.console();
    if (!con) return { error: 'this backend serves no console device' };
    con.removePort(name);
    this.log.info(`console port ${name} removed`);
    return { done: {} };
  }

  private blkResize(sizeBytes: number): object {
    const blk = this.targets.map((t) => t.device).find((d): d is BlkDevice => d.deviceId === 2 && typeof (d as Partial<BlkDevice>).resize === 'function');
    if (!blk) return { error: 'this backend serves no blk device' };
    blk.resize(sizeBytes);
    this.log.info(`disk resized to ${sizeBytes} bytes`);
    return { done: {} };
  }
}

function removeStaleSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // nothing there
  }
}
