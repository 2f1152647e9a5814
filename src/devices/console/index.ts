/**
 * virtio-console (virtio 1.2 §5.3), all of it: the console port (the guest's /dev/hvc0), named ports
 * (/dev/virtio-ports/NAME) with MULTIPORT and its control queues, the terminal size (SIZE: config space without
 * MULTIPORT, RESIZE messages with it) and emergency writes (EMERG_WRITE). Each port is wired to a host end: a Unix
 * socket, a pty, this process's terminal, or a file.
 *
 * The queues run on the main thread beside the host ends (a console moves kilobytes, not gigabits), so the
 * handlers and the ports share plain objects.
 *
 * Flow control: the guest's output is taken only while its host end keeps up; while no client is attached it
 * goes to a bounded backlog (BACKLOG_BYTES per port, delivered when one attaches). The console port must always
 * be drained (Linux's hvc spins until its output is taken), so there the oldest backlog bytes are dropped, and
 * counted; a named port waits instead (and the guest, told the host side is closed, blocks its writers). Host
 * input is read only while it fits in a bounded buffer the guest has not taken yet.
 *
 * @example
 * ```ts
 * import { VhostUserServer } from 'vhost-ts';
 * import { consoleDevice } from 'vhost-ts/devices/console';
 * const dev = consoleDevice({ console: { kind: 'pty' }, ports: [{ name: 'org.example.log', backend: { kind: 'file', path: 'guest.log' } }] });
 * await VhostUserServer.start(dev, { socketPath: '/tmp/console.sock' });
 * console.log(dev.qemuArgs('/tmp/console.sock').join(' '));
 * ```
 */
import type { FrontendLink, QueueContext, QueueHandler, VhostUserDevice } from '../../vhost/device.js';
import { bit } from '../../vhost/device.js';
import type { DescriptorChain, Virtqueue } from '../../virtqueue/index.js';
import type { WindowSize } from '../../sys/index.js';
import { describeHostEnd, openHostEnd, type HostEnd, type HostEndSpec } from './host-ends.js';
import {
  CONFIG_EMERG_WR,
  CONFIG_SIZE,
  CONTROL_EVENT_NAMES,
  CONTROL_SIZE,
  MAX_PORTS,
  NO_PORT,
  VIRTIO_CONSOLE_CONSOLE_PORT,
  VIRTIO_CONSOLE_DEVICE_ADD,
  VIRTIO_CONSOLE_DEVICE_READY,
  VIRTIO_CONSOLE_F_EMERG_WRITE,
  VIRTIO_CONSOLE_F_MULTIPORT,
  VIRTIO_CONSOLE_F_SIZE,
  VIRTIO_CONSOLE_PORT_NAME,
  VIRTIO_CONSOLE_PORT_OPEN,
  VIRTIO_CONSOLE_PORT_READY,
  VIRTIO_CONSOLE_RESIZE,
  VIRTIO_ID_CONSOLE,
  encodeConfig,
  encodeControl,
  portOfQueue,
  queuesFor,
  resizePayload,
} from './spec.js';

export { parseHostEnd, describeHostEnd, type HostEndSpec } from './host-ends.js';

/** Guest output kept per port while no client is attached (and host input read ahead of the guest). */
export const BACKLOG_BYTES = 64 * 1024;

export interface ConsolePortOptions {
  /** The name the guest sees (/sys/class/virtio-ports/vportNpM/name, /dev/virtio-ports/NAME with udev). */
  name: string;
  backend: HostEndSpec;
}

export interface ConsoleOptions {
  /** Port 0, the guest's console (/dev/hvc0). */
  console: HostEndSpec;
  /** Named ports 1, 2, … */
  ports?: ConsolePortOptions[];
  /** The console's size; default the console end's own (a terminal's), else 80×24. */
  cols?: number;
  rows?: number;
  /** max_nr_ports in config space (default 1 + ports): room for ports added later. */
  maxPorts?: number;
  /** Called when the user types the detach key on a stdio end. */
  onDetach?: () => void;
  /** Where the device's own messages go (default stderr). */
  log?: (message: string) => void;
}

export interface ConsolePortStats {
  id: number;
  name: string;
  backend: string;
  /** A client is attached to the host end. */
  hostOpen: boolean;
  /** The guest has the port open (always, for the console port once the driver set it up). */
  guestOpen: boolean;
  bytesToGuest: number;
  bytesFromGuest: number;
  /** Guest output in the backlog, waiting for a client. */
  backlogged: number;
  /** Host input read and not yet taken by the guest (bounded: the host end is not read beyond BACKLOG_BYTES). */
  heldForGuest: number;
  /** Guest output dropped because the backlog was full (console port only). */
  dropped: number;
}

export interface ConsoleDevice extends VhostUserDevice<Record<string, never>> {
  ports(): ConsolePortStats[];
  /** Change the console's size: the guest is told (RESIZE, or config change without MULTIPORT). */
  resize(cols: number, rows: number): void;
  /** The port's host end description, e.g. "pty /dev/pts/3". */
  describe(port: number): string;
  /** QEMU's options for this device on a socket: the chardev and vhost-user-test-device-pci (QEMU 10.2+). */
  qemuArgs(socketPath: string, id?: string): string[];
  /** Close every host end (sockets, ptys, files; stdio back to cooked mode). */
  close(): void;
}

/** Most bad control messages logged per connection; the rest are counted only. */
const BAD_MESSAGE_LOG_LIMIT = 20;

class Port {
  added = false;
  ready = false;
  guestOpen = false;
  // Guest -> host.
  tx: QueueContext | null = null;
  backedUp = false;
  /**
   * The chain whose bytes the host end still holds in this process: given back to the guest only once they
   * reached the kernel, so a backend killed meanwhile leaves it in the ring for its successor to send again.
   */
  held: DescriptorChain | null = null;
  /**
   * Which write the held chain waits for. Chain objects are pooled, so the flush callback of an earlier write
   * (Node runs even synchronous writes' callbacks later) must not release a later chain in the same object.
   */
  writes = 0;
  heldWrite = 0;
  readonly backlog: Uint8Array[] = [];
  backlogBytes = 0;
  dropped = 0;
  droppedSinceLog = 0;
  // Host -> guest.
  rx: QueueContext | null = null;
  readonly pending: Uint8Array[] = [];
  pendingBytes = 0;
  pendingOffset = 0; // bytes of pending[0] already delivered
  inputPaused = false;
  bytesToGuest = 0;
  bytesFromGuest = 0;
  end!: HostEnd;

  constructor(
    readonly id: number,
    readonly name: string,
    readonly isConsole: boolean,
  ) {}
}

export function consoleDevice(opts: ConsoleOptions): ConsoleDevice {
  const named = opts.ports ?? [];
  const maxPorts = opts.maxPorts ?? 1 + named.length;
  if (!Number.isInteger(maxPorts) || maxPorts < 1 + named.length || maxPorts > MAX_PORTS) {
    throw new RangeError(`max ports ${maxPorts}: at least ${1 + named.length} (the console and each named port), at most ${MAX_PORTS}`);
  }
  const names = new Set<string>();
  for (const p of named) {
    if (!/^[\x21-\x7e]{1,255}$/.test(p.name)) throw new RangeError(`port name "${p.name}": 1 to 255 printable ASCII characters, no spaces`);
    if (names.has(p.name)) throw new RangeError(`port name "${p.name}" is given twice`);
    names.add(p.name);
  }
  const log = opts.log ?? ((m: string) => process.stderr.write(`console: ${m}\n`));

  const ports: Port[] = [new Port(0, '', true), ...named.map((p, i) => new Port(i + 1, p.name, false))];
  const specs: HostEndSpec[] = [opts.console, ...named.map((p) => p.backend)];
  let multiport = false;
  let frontend: FrontendLink | null = null;
  let ctrlRx: QueueContext | null = null;
  const ctrlOut: Uint8Array[] = [];
  let badMessages = 0;
  /** Ports the guest had open, from a loaded state (null: none loaded). */
  let loadedOpen: boolean[] | null = null;
  let size: WindowSize = { cols: 80, rows: 24 };

  const bad = (what: string): void => {
    if (++badMessages <= BAD_MESSAGE_LOG_LIMIT) log(`ignored from the guest: ${what}${badMessages === BAD_MESSAGE_LOG_LIMIT ? ' (further ones are not logged)' : ''}`);
  };

  // ---- Guest -> host -----------------------------------------------------------------------------------------

  const out = (port: Port, bytes: Uint8Array, flushed?: () => void): void => {
    port.bytesFromGuest += bytes.length;
    if (port.end.connected) {
      if (!port.end.write(bytes, flushed)) port.backedUp = true;
      return;
    }
    port.backlog.push(bytes);
    port.backlogBytes += bytes.length;
    // Only the console port gets here with a full backlog (named ports stop taking chains first).
    while (port.backlogBytes > BACKLOG_BYTES) {
      const first = port.backlog[0];
      const over = port.backlogBytes - BACKLOG_BYTES;
      if (first.length <= over) {
        port.backlog.shift();
        port.backlogBytes -= first.length;
        port.dropped += first.length;
        port.droppedSinceLog += first.length;
      } else {
        port.backlog[0] = first.subarray(over);
        port.backlogBytes -= over;
        port.dropped += over;
        port.droppedSinceLog += over;
      }
    }
  };

  /** Whether the port takes another chain of guest output now. */
  const takesOutput = (port: Port): boolean =>
    port.end.connected ? !port.backedUp : port.isConsole || port.backlogBytes < BACKLOG_BYTES;

  const serveTx = (port: Port, queue: Virtqueue): void => {
    while (takesOutput(port) && port.held === null) {
      const chain = queue.pop();
      if (chain === null) return;
      const bytes = readAll(chain);
      const write = ++port.writes;
      out(port, bytes, () => releaseHeld(port, write));
      if (port.end.connected && port.end.unflushed > 0) {
        port.held = chain;
        port.heldWrite = write;
        return;
      }
      queue.push(chain, 0);
    }
  };

  /** The host end flushed the bytes of `write`: they are with the kernel now, so the guest may have its chain back. */
  const releaseHeld = (port: Port, write: number): void => {
    const chain = port.held;
    if (chain === null || port.heldWrite !== write) return; // given back at once, or to the ring on stop
    port.held = null;
    const ctx = port.tx;
    if (ctx === null) return;
    ctx.queue.push(chain, 0);
    ctx.publish();
    if (!port.backedUp) ctx.resume();
  };

  const attached = (port: Port, open: boolean): void => {
    log(`port ${port.id}${port.name ? ` (${port.name})` : ''}: ${port.end.description}: client ${open ? 'attached' : 'gone'}`);
    port.backedUp = false;
    if (open && port.backlogBytes > 0) {
      const n = port.backlogBytes;
      const lost = port.droppedSinceLog;
      for (const b of port.backlog.splice(0)) if (!port.end.write(b)) port.backedUp = true;
      port.backlogBytes = 0;
      port.droppedSinceLog = 0;
      log(`port ${port.id}: ${n} bytes of output delivered from the backlog${lost > 0 ? `; ${lost} older bytes were dropped while no client was attached (backlog ${BACKLOG_BYTES} bytes)` : ''}`);
    }
    if (multiport && port.ready) sendControl(port.id, VIRTIO_CONSOLE_PORT_OPEN, open ? 1 : 0);
    port.tx?.resume();
  };

  // ---- Host -> guest -----------------------------------------------------------------------------------------

  const input = (port: Port, bytes: Uint8Array): void => {
    if (bytes.length === 0) return;
    port.pending.push(bytes.slice());
    port.pendingBytes += bytes.length;
    if (port.pendingBytes >= BACKLOG_BYTES && !port.inputPaused) {
      port.inputPaused = true;
      port.end.pauseInput();
    }
    deliverIn(port);
  };

  const deliverIn = (port: Port): void => {
    const ctx = port.rx;
    // A named port the guest has not opened discards what it receives (Linux's discard_port_data): hold it.
    if (ctx === null || port.pendingBytes === 0 || (multiport && !port.guestOpen)) return;
    const q = ctx.queue;
    let delivered = false;
    while (port.pendingBytes > 0) {
      const chain = q.pop();
      if (chain === null) {
        // Buffers taken outside the queue's own processing leave notifications as they were: re-arm, look again.
        if (q.enableNotification()) continue;
        break;
      }
      const n = fillFromPending(port, chain);
      q.push(chain, n);
      port.bytesToGuest += n;
      delivered = true;
    }
    if (delivered) ctx.publish();
    if (port.inputPaused && port.pendingBytes < BACKLOG_BYTES / 2) {
      port.inputPaused = false;
      port.end.resumeInput();
    }
  };

  // ---- Control queues ----------------------------------------------------------------------------------------

  const sendControl = (id: number, event: number, value: number, extra?: Uint8Array): void => {
    // The latest PORT_OPEN or RESIZE of a port replaces one not yet delivered: a client reconnecting in a loop
    // while the guest reads nothing cannot grow the queue.
    if (event === VIRTIO_CONSOLE_PORT_OPEN || event === VIRTIO_CONSOLE_RESIZE) {
      const i = ctrlOut.findIndex((m) => controlId(m) === id && controlEvent(m) === event);
      if (i >= 0) ctrlOut.splice(i, 1);
    }
    ctrlOut.push(encodeControl(id, event, value, extra));
    deliverControl();
  };

  const deliverControl = (): void => {
    const ctx = ctrlRx;
    if (ctx === null) return;
    const q = ctx.queue;
    let delivered = false;
    while (ctrlOut.length > 0) {
      const chain = q.pop();
      if (chain === null) {
        if (q.enableNotification()) continue;
        break;
      }
      // One message per buffer: Linux reads each buffer as exactly one.
      const msg = ctrlOut[0];
      if (chain.writableBytes < msg.length) {
        log(`control receive buffer of ${chain.writableBytes} bytes cannot hold a ${msg.length}-byte message; returned empty`);
        q.push(chain, 0);
        delivered = true;
        continue;
      }
      ctrlOut.shift();
      q.push(chain, chain.writer().write(msg));
      delivered = true;
    }
    if (delivered) ctx.publish();
  };

  const sendResize = (port: Port): void => {
    if (port.isConsole && port.ready) sendControl(port.id, VIRTIO_CONSOLE_RESIZE, 0, resizePayload(size.cols, size.rows));
  };

  const portReady = (port: Port): void => {
    port.ready = true;
    if (port.isConsole) {
      sendControl(port.id, VIRTIO_CONSOLE_CONSOLE_PORT, 1);
      // With MULTIPORT the guest takes the size from RESIZE only, never from config space.
      sendResize(port);
    }
    if (port.name) sendControl(port.id, VIRTIO_CONSOLE_PORT_NAME, 0, new TextEncoder().encode(port.name));
    sendControl(port.id, VIRTIO_CONSOLE_PORT_OPEN, port.end.connected ? 1 : 0);
  };

  const controlMessage = (chain: DescriptorChain): void => {
    if (chain.readableBytes !== CONTROL_SIZE) {
      bad(`a control message of ${chain.readableBytes} bytes (want ${CONTROL_SIZE})`);
      return;
    }
    const r = chain.reader();
    const id = r.readUint(4);
    const event = r.readUint(2);
    const value = r.readUint(2);
    const what = `${CONTROL_EVENT_NAMES[event] ?? `event ${event}`} for port ${id === NO_PORT ? '(none)' : id}, value ${value}`;
    if (!multiport) return bad(`${what}: MULTIPORT was not negotiated`);
    if (event === VIRTIO_CONSOLE_DEVICE_READY) {
      if (value !== 1) return log('the guest driver failed to set up the device (DEVICE_READY 0)');
      for (const p of ports) {
        if (p.added) continue;
        p.added = true;
        sendControl(p.id, VIRTIO_CONSOLE_DEVICE_ADD, 0);
      }
      return;
    }
    if (event !== VIRTIO_CONSOLE_PORT_READY && event !== VIRTIO_CONSOLE_PORT_OPEN) return bad(`${what}: not an event a driver sends`);
    if (id >= maxPorts) return bad(`${what}: beyond max_nr_ports ${maxPorts}`);
    const port = ports[id];
    if (port === undefined || !port.added) return bad(`${what}: no such port was added`);
    if (event === VIRTIO_CONSOLE_PORT_READY) {
      if (value !== 1) return log(`port ${id}: the guest failed to set it up (PORT_READY 0)`);
      return portReady(port);
    }
    if (!port.ready) return bad(`${what}: before PORT_READY`);
    const open = value !== 0;
    if (open === port.guestOpen) return;
    port.guestOpen = open;
    if (open) deliverIn(port);
  };

  // ---- Queue handlers ----------------------------------------------------------------------------------------

  const createQueueHandler = (ctx: QueueContext): QueueHandler => {
    const where = portOfQueue(ctx.queueIndex);
    if (where === 'control-rx') {
      ctrlRx = ctx;
      return {
        process: () => deliverControl(),
        stop: () => {
          ctrlRx = null;
        },
      };
    }
    if (where === 'control-tx') {
      // A driver that set the device up before this backend started (we were restarted under a running guest)
      // sends DEVICE_READY and PORT_OPEN no more: take the device as ready, assume its ports open, and add the
      // ports again, which a driver answers with PORT_READY (Linux: "already added"), so names, the console
      // port, sizes and the host side's open state are sent anew: the guest sees the host side close and
      // reopen as clients attach to this backend.
      if (ctx.resumed && multiport) {
        log('the driver set the device up before this backend started: adding its ports again');
        for (const p of ports) {
          p.added = true;
          // A saved state knows which ports the guest has open; without one, all are taken as open.
          p.guestOpen = loadedOpen ? loadedOpen[p.id] : true;
          sendControl(p.id, VIRTIO_CONSOLE_PORT_OPEN, 0);
          sendControl(p.id, VIRTIO_CONSOLE_DEVICE_ADD, 0);
        }
      }
      return {
        process(queue) {
          for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
            controlMessage(chain);
            queue.push(chain, 0);
          }
        },
      };
    }
    const port = ports[where.port];
    if (port === undefined) {
      // A queue of a port number we never add: the guest posts buffers there, but nothing flows.
      return { process() {} };
    }
    if (where.dir === 'rx') {
      port.rx = ctx;
      return {
        process: () => deliverIn(port),
        stop: () => {
          port.rx = null;
        },
      };
    }
    port.tx = ctx;
    return {
      process: (queue) => serveTx(port, queue),
      stop: (queue) => {
        // Its bytes may never reach the client: the ring keeps the chain for whoever serves the queue next (a
        // client may see them twice, never not at all).
        if (port.held !== null) queue.unpop(port.held);
        port.held = null;
        port.tx = null;
      },
    };
  };

  // ---- Host ends ---------------------------------------------------------------------------------------------

  const opened: HostEnd[] = [];
  try {
    for (const port of ports) {
      port.end = openHostEnd(specs[port.id], {
        input: (bytes) => input(port, bytes),
        connection: (open) => attached(port, open),
        resize: (s) => port.isConsole && resize(s.cols, s.rows),
        drain: () => {
          port.backedUp = false;
          port.tx?.resume();
        },
        detach: () => opts.onDetach?.(),
        log,
      });
      opened.push(port.end);
    }
  } catch (e) {
    for (const end of opened) end.close();
    throw e;
  }
  const own = ports[0].end.size();
  size = { cols: opts.cols ?? (own && own.cols > 0 ? own.cols : 80), rows: opts.rows ?? (own && own.rows > 0 ? own.rows : 24) };
  ports[0].end.setSize?.(size);

  function resize(cols: number, rows: number): void {
    if (!(cols > 0 && cols <= 0xffff && rows > 0 && rows <= 0xffff)) throw new RangeError(`console size ${cols}x${rows}: 1 to 65535 each`);
    if (cols === size.cols && rows === size.rows) return;
    size = { cols, rows };
    if (multiport) sendResize(ports[0]);
    else frontend?.configChanged();
  }

  const reset = (): void => {
    multiport = false;
    badMessages = 0;
    ctrlOut.length = 0;
    for (const p of ports) {
      p.added = false;
      p.ready = false;
      p.guestOpen = false;
    }
  };

  return {
    name: 'console',
    deviceId: VIRTIO_ID_CONSOLE,
    numQueues: queuesFor(maxPorts),
    maxQueueSize: 1024,
    features: bit(VIRTIO_CONSOLE_F_SIZE) | bit(VIRTIO_CONSOLE_F_MULTIPORT) | bit(VIRTIO_CONSOLE_F_EMERG_WRITE),
    configSize: CONFIG_SIZE,
    readConfig: (offset, length) => encodeConfig(size.cols, size.rows, maxPorts).slice(offset, offset + length),
    writeConfig(offset, data) {
      // emerg_wr: one character for port 0, even before the driver is ready. QEMU writes the whole config.
      const at = CONFIG_EMERG_WR - offset;
      if (at >= 0 && at < data.length) out(ports[0], data.slice(at, at + 1));
    },
    featuresNegotiated(features) {
      multiport = (features & bit(VIRTIO_CONSOLE_F_MULTIPORT)) !== 0n;
      // Without MULTIPORT the driver makes port 0 its console at once; no control messages follow.
      if (!multiport) ports[0].guestOpen = true;
    },
    reset,
    bindFrontend(f) {
      frontend = f;
    },
    // For a planned restart (--state-file): which ports the guest has open, and the output waiting for clients.
    state: {
      kind: 'console',
      save: () => ({
        ports: ports.map((p) => ({ id: p.id, guestOpen: p.guestOpen, backlog: concatBytes(p.backlog, p.backlogBytes), dropped: p.dropped })),
      }),
      load(s: object) {
        const st = s as { ports?: { id: number; guestOpen?: boolean; backlog?: Uint8Array; dropped?: number }[] };
        const saved = st.ports ?? [];
        if (saved.some((p) => ports[p.id] === undefined)) throw new RangeError(`a console state with ports ${saved.map((p) => p.id).join(', ')}; this console has ${ports.length}`);
        loadedOpen = ports.map(() => false);
        for (const p of saved) {
          const port = ports[p.id];
          loadedOpen[p.id] = p.guestOpen ?? false;
          if (p.backlog && p.backlog.length > 0) {
            port.backlog.push(p.backlog.slice());
            port.backlogBytes += p.backlog.length;
          }
          port.dropped += p.dropped ?? 0;
        }
      },
    },
    dataPlane: { options: {}, thread: 'main', createQueueHandler, groups: [Array.from({ length: queuesFor(maxPorts) }, (_, i) => i)] },
    ports: () =>
      ports.map((p) => ({
        id: p.id,
        name: p.name,
        backend: p.end.description,
        hostOpen: p.end.connected,
        guestOpen: p.guestOpen,
        bytesToGuest: p.bytesToGuest,
        bytesFromGuest: p.bytesFromGuest,
        backlogged: p.backlogBytes,
        heldForGuest: p.pendingBytes,
        dropped: p.dropped,
      })),
    resize,
    describe: (port) => ports[port]?.end.description ?? describeHostEnd(specs[port]),
    qemuArgs: (socketPath, id) => consoleQemuArgs(socketPath, maxPorts, id),
    close() {
      for (const p of ports) p.end.close();
    },
  };
}

/**
 * QEMU's options for a console device on `socketPath`: QEMU has no vhost-user console device of its own, so the
 * generic one (QEMU 10.2+) with the console's ID, queue count and config size.
 */
export function consoleQemuArgs(socketPath: string, maxPorts: number, id = 'console0'): string[] {
  return [
    '-chardev',
    `socket,id=${id},path=${socketPath}`,
    '-device',
    `vhost-user-test-device-pci,chardev=${id},virtio-id=${VIRTIO_ID_CONSOLE},num_vqs=${queuesFor(maxPorts)},config_size=${CONFIG_SIZE}`,
  ];
}

/** A chain's device-readable bytes, copied out (the host end writes asynchronously). */
function concatBytes(parts: readonly Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function readAll(chain: DescriptorChain): Uint8Array {
  const bytes = new Uint8Array(chain.readableBytes);
  chain.reader().read(bytes);
  return bytes;
}

/** Move pending host input into a receive chain's writable part; returns the bytes written. */
function fillFromPending(port: Port, chain: DescriptorChain): number {
  const w = chain.writer();
  let total = 0;
  while (port.pending.length > 0 && w.remaining > 0) {
    const first = port.pending[0];
    const n = w.write(first.subarray(port.pendingOffset));
    total += n;
    port.pendingOffset += n;
    port.pendingBytes -= n;
    if (port.pendingOffset === first.length) {
      port.pending.shift();
      port.pendingOffset = 0;
    }
  }
  return total;
}

const controlId = (m: Uint8Array): number => new DataView(m.buffer, m.byteOffset).getUint32(0, true);
const controlEvent = (m: Uint8Array): number => new DataView(m.buffer, m.byteOffset).getUint16(4, true);
