/**
 * virtio-console (virtio 1.2 §5.3), all of it: the console port (the guest's /dev/hvc0), named ports
 * (/dev/virtio-ports/NAME) with MULTIPORT and its control queues, the terminal size (SIZE: config space without
 * MULTIPORT, RESIZE messages with it) and emergency writes (EMERG_WRITE). Each port is wired to a host end: a Unix
 * socket, a pty, this process's terminal, or a file.
 *
 * The queues run on the main thread beside the host ends (a console moves kilobytes, not gigabits), so the
 * handlers and the ports share plain objects.
 *
 * Named ports can be added and removed at run time ({@link ConsoleDevice.addPort}, {@link ConsoleDevice.removePort}:
 * the control API's console_add_port and console_remove_port), into the port numbers below max_nr_ports, which is
 * fixed when the device is created (its queues exist from the start).
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
import { resolve } from 'node:path';
import type { FrontendLink, QueueContext, QueueHandler, VhostUserDevice } from '../../vhost/device.js';
import { bit } from '../../vhost/device.js';
import type { DescriptorChain, Virtqueue } from '../../virtqueue/index.js';
import type { WindowSize } from '../../sys/index.js';
import { describeHostEnd, openHostEnd, parseHostEnd, type HostEnd, type HostEndSpec } from './host-ends.js';
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
  VIRTIO_CONSOLE_DEVICE_REMOVE,
  VIRTIO_CONSOLE_F_EMERG_WRITE,
  VIRTIO_CONSOLE_F_MULTIPORT,
  VIRTIO_CONSOLE_F_SIZE,
  VIRTIO_CONSOLE_PORT_NAME,
  VIRTIO_CONSOLE_PORT_OPEN,
  VIRTIO_CONSOLE_PORT_READY,
  VIRTIO_CONSOLE_RESIZE,
  VIRTIO_F_RING_PACKED,
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

/** A call to addPort or removePort that cannot be done; the device is unchanged and keeps serving. */
export class ConsolePortError extends Error {
  override readonly name = 'ConsolePortError';
  constructor(
    readonly code: 'BAD_NAME' | 'NAME_TAKEN' | 'BAD_BACKEND' | 'NO_FREE_SLOT' | 'UNKNOWN_PORT' | 'CONSOLE_PORT',
    message: string,
  ) {
    super(message);
  }
}

export interface ConsoleDevice extends VhostUserDevice<Record<string, never>> {
  /** The ports there are now, by number. */
  ports(): ConsolePortStats[];
  /**
   * Add a named port at run time, into the lowest free port number (one no port held since the driver set the
   * device up, when there is one). A driver that set the device up is told at once (DEVICE_ADD; its name and
   * open state follow its PORT_READY, as at start-up); otherwise the port is announced with the others when the
   * driver sends DEVICE_READY. The backend serves before the guest hears of the port (a socket listens).
   * Rejects with a {@link ConsolePortError} (a name in use or not valid, stdio, a socket another port listens on,
   * every number below max_nr_ports taken) or the backend's own error (a path that cannot be opened).
   */
  addPort(port: ConsolePortOptions): Promise<ConsolePortStats>;
  /**
   * Remove a named port: the guest is told (DEVICE_REMOVE) and its device goes; the host end closes (a socket's
   * client gets what was written to it, then end-of-file). What the guest wrote that the backend had not taken is
   * given back to it unread, as QEMU's virtio-serial does on unplug, and output waiting for a client in the
   * backlog is dropped (both counted in the log); host input the guest had not taken is dropped too (Linux drops
   * what an unplugged port had not read). Port 0, the console port, cannot be removed. The number is free again for a
   * later addPort: at once on split rings, on packed rings once the driver has reset the device.
   */
  removePort(name: string): void;
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

/**
 * A port number's queues (port 0: 0 and 1; port n ≥ 1: 2n+2 and 2n+3), which exist for the device's life, and the
 * port that holds the number now, if any.
 */
class Slot {
  rx: QueueContext | null = null;
  tx: QueueContext | null = null;
  port: Port | null = null;
  /** An addPort is opening its host end for this number. */
  reserved = false;
  /** A port held the number since the driver set the device up (a new port prefers a number that none did). */
  used = false;
  /** A port was removed from here: late messages of the guest about it are expected, not hostile. */
  vacated = false;
  /** The port is being removed: the transmit ring's chains are given back unread. */
  discarding = false;
  discarded = 0;
}

class Port {
  added = false;
  ready = false;
  guestOpen = false;
  /** Removed at run time: events of its closing host end are not the port's any more. */
  removed = false;
  // Guest -> host.
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
  readonly pending: Uint8Array[] = [];
  pendingBytes = 0;
  pendingOffset = 0; // bytes of pending[0] already delivered
  inputPaused = false;
  bytesToGuest = 0;
  bytesFromGuest = 0;
  end!: HostEnd;

  constructor(
    readonly slot: Slot,
    readonly id: number,
    readonly name: string,
    readonly spec: HostEndSpec,
  ) {}

  get isConsole(): boolean {
    return this.id === 0;
  }

  get tx(): QueueContext | null {
    return this.slot.tx;
  }

  get rx(): QueueContext | null {
    return this.slot.rx;
  }
}

/** What Linux and udev take as a port's name. */
const NAME_PATTERN = /^[\x21-\x7e]{1,255}$/;

export function consoleDevice(opts: ConsoleOptions): ConsoleDevice {
  const named = opts.ports ?? [];
  const maxPorts = opts.maxPorts ?? 1 + named.length;
  if (!Number.isInteger(maxPorts) || maxPorts < 1 + named.length || maxPorts > MAX_PORTS) {
    throw new RangeError(`max ports ${maxPorts}: at least ${1 + named.length} (the console and each named port), at most ${MAX_PORTS}`);
  }
  const names = new Set<string>();
  for (const p of named) {
    if (!NAME_PATTERN.test(p.name)) throw new RangeError(`port name "${p.name}": 1 to 255 printable ASCII characters, no spaces`);
    if (names.has(p.name)) throw new RangeError(`port name "${p.name}" is given twice`);
    names.add(p.name);
  }
  const log = opts.log ?? ((m: string) => process.stderr.write(`console: ${m}\n`));

  const slots: Slot[] = Array.from({ length: maxPorts }, () => new Slot());
  /** The ports there are, in number order. */
  const present = (): Port[] => slots.flatMap((s) => (s.port ? [s.port] : []));
  let multiport = false;
  let packedRings = false;
  /** The driver sent DEVICE_READY (or set the device up before this backend started): new ports are added at once. */
  let driverReady = false;
  let frontend: FrontendLink | null = null;
  let ctrlRx: QueueContext | null = null;
  const ctrlOut: Uint8Array[] = [];
  let badMessages = 0;
  /** Ports the guest had open, by number, from a loaded state (null: none loaded). */
  let loadedOpen: Map<number, boolean> | null = null;
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
      driverReady = true;
      for (const p of present()) announce(p);
      return;
    }
    if (event !== VIRTIO_CONSOLE_PORT_READY && event !== VIRTIO_CONSOLE_PORT_OPEN) return bad(`${what}: not an event a driver sends`);
    if (id >= maxPorts) return bad(`${what}: beyond max_nr_ports ${maxPorts}`);
    const slot = slots[id];
    const port = slot.port;
    // A port removed here (and maybe added again) may hear from the guest about the old one until the guest has
    // taken the removal in: nothing to act on, and nothing wrong.
    if (port === null || !port.added) return slot.vacated ? undefined : bad(`${what}: no such port was added`);
    if (event === VIRTIO_CONSOLE_PORT_READY) {
      if (value !== 1) return log(`port ${id}: the guest failed to set it up (PORT_READY 0)`);
      return portReady(port);
    }
    if (!port.ready) return slot.vacated ? undefined : bad(`${what}: before PORT_READY`);
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
        driverReady = true;
        for (const p of present()) {
          p.added = true;
          p.slot.used = true;
          // A saved state knows which ports the guest has open; without one, all are taken as open.
          p.guestOpen = loadedOpen ? (loadedOpen.get(p.id) ?? false) : true;
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
    // A port number's queues serve whichever port holds the number; with none there, nothing flows (the guest
    // has no port there to post buffers for, or is reclaiming those of one just removed: hands off).
    const slot = slots[where.port];
    if (where.dir === 'rx') {
      slot.rx = ctx;
      return {
        process: () => {
          if (slot.port) deliverIn(slot.port);
        },
        stop: () => {
          slot.rx = null;
        },
      };
    }
    slot.tx = ctx;
    return {
      process: (queue) => {
        if (slot.discarding) discardOutput(slot, queue);
        else if (slot.port) serveTx(slot.port, queue);
      },
      stop: (queue) => {
        // Its bytes may never reach the client: the ring keeps the chain for whoever serves the queue next (a
        // client may see them twice, never not at all).
        const port = slot.port;
        if (port !== null && port.held !== null) queue.unpop(port.held);
        if (port !== null) port.held = null;
        slot.tx = null;
      },
    };
  };

  /** A port being removed: what the guest wrote and we did not take goes back unread (QEMU's discard_vq_data). */
  const discardOutput = (slot: Slot, queue: Virtqueue): void => {
    for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
      slot.discarded += chain.readableBytes;
      queue.push(chain, 0);
    }
  };

  /** DEVICE_ADD for a port the driver has not been told of; its name and open state follow its PORT_READY. */
  const announce = (port: Port): void => {
    if (port.added) return;
    port.added = true;
    port.slot.used = true;
    sendControl(port.id, VIRTIO_CONSOLE_DEVICE_ADD, 0);
  };

  // ---- Host ends ---------------------------------------------------------------------------------------------

  /** A port with its host end open (not yet in its slot). Events of the end stop counting once it is removed. */
  const openPort = (id: number, name: string, spec: HostEndSpec): Port => {
    const port = new Port(slots[id], id, name, spec);
    port.end = openHostEnd(spec, {
      input: (bytes) => port.removed || input(port, bytes),
      connection: (open) => port.removed || attached(port, open),
      resize: (s) => port.removed || (port.isConsole && resize(s.cols, s.rows)),
      drain: () => {
        if (port.removed) return;
        port.backedUp = false;
        port.tx?.resume();
      },
      detach: () => opts.onDetach?.(),
      log,
    });
    return port;
  };

  try {
    [{ name: '', backend: opts.console }, ...named].forEach((p, id) => {
      slots[id].port = openPort(id, p.name, p.backend);
    });
  } catch (e) {
    for (const p of present()) p.end.close();
    throw e;
  }
  const console0 = slots[0].port!;
  const own = console0.end.size();
  size = { cols: opts.cols ?? (own && own.cols > 0 ? own.cols : 80), rows: opts.rows ?? (own && own.rows > 0 ? own.rows : 24) };
  console0.end.setSize?.(size);

  const stats = (p: Port): ConsolePortStats => ({
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
  });

  /** Why a named port with this name and backend cannot join the ports there are (and those being added), or null. */
  const conflict = (name: string, spec: HostEndSpec, others: readonly { name: string; spec: HostEndSpec }[]): ConsolePortError | null => {
    if (!NAME_PATTERN.test(name)) return new ConsolePortError('BAD_NAME', `port name "${name}": 1 to 255 printable ASCII characters, no spaces`);
    const taken = others.find((o) => o.name === name);
    if (taken) return new ConsolePortError('NAME_TAKEN', `a port named "${name}" exists already`);
    if (spec.kind === 'stdio') {
      return new ConsolePortError('BAD_BACKEND', 'stdio cannot be a backend added at run time (the terminal is set up when the program starts: give it with --port there); use socket:PATH, pty or file:PATH');
    }
    if (spec.kind === 'socket' && others.some((o) => o.spec.kind === 'socket' && resolvePath(o.spec.path) === resolvePath(spec.path))) {
      return new ConsolePortError('BAD_BACKEND', `socket:${spec.path} is the backend of another port of this console`);
    }
    return null;
  };
  const adding = new Map<string, { name: string; spec: HostEndSpec }>();
  let closed = false;

  async function addPort(p: ConsolePortOptions): Promise<ConsolePortStats> {
    const refused = conflict(p.name, p.backend, [...present(), ...adding.values()]);
    if (refused) throw refused;
    // On packed rings a number whose port was removed stays taken until the driver resets the device: Linux takes
    // back the buffers of a removed port without taking them out of a packed ring (virtqueue_detach_unused_buf
    // rewinds only a split ring's avail index), so a new port there would fill guest memory the driver freed.
    // Measured with Debian 12's kernel: reused anyway, the device popped the old port's buffer ids 1, 2, 3... where
    // a fresh fill has 63, 62...; the data came out right only because the slab gave each id its old page back.
    const free = slots.filter((s) => s.port === null && !s.reserved && !(packedRings && s.vacated));
    const slot = free.find((s) => !s.used) ?? free[0];
    if (slot === undefined) {
      const stale = slots.filter((s) => s.port === null && s.vacated).map((s) => slots.indexOf(s));
      throw new ConsolePortError(
        'NO_FREE_SLOT',
        `no free port number for "${p.name}": max_nr_ports is ${maxPorts} (the console and ${maxPorts - 1} named ports) and it is fixed when the device is created: start vhost-ts console with a larger --max-ports` +
          (stale.length > 0 && packedRings
            ? `. Port ${stale.join(', ')} was removed, but on packed rings its number is free again only once the guest's driver resets the device (it leaves a removed port's buffers in the ring); with split rings (--no-packed) it is free at once`
            : ''),
      );
    }
    const id = slots.indexOf(slot);
    slot.reserved = true;
    adding.set(p.name, { name: p.name, spec: p.backend });
    let port: Port | null = null;
    try {
      port = openPort(id, p.name, p.backend);
      await port.end.ready;
    } catch (e) {
      port?.end.close();
      throw new ConsolePortError('BAD_BACKEND', `port "${p.name}" on ${describeHostEnd(p.backend)}: ${(e as Error).message}`);
    } finally {
      slot.reserved = false;
      adding.delete(p.name);
    }
    if (closed) {
      port.end.close();
      throw new ConsolePortError('BAD_BACKEND', `port "${p.name}": the console closed meanwhile`);
    }
    slot.port = port;
    log(`port ${id} (${p.name}): ${port.end.description}: added`);
    if (multiport && driverReady) announce(port);
    // Nothing of the guest's should be waiting in a new port's rings; if something is, it is this port's now.
    slot.tx?.resume();
    return stats(port);
  }

  function removePort(name: string): void {
    if (name === '') throw new ConsolePortError('CONSOLE_PORT', 'port 0, the console port (the guest\'s /dev/hvc0), cannot be removed; name a named port');
    const port = present().find((p) => p.name === name);
    if (port === undefined) {
      const names = present().filter((p) => p.name !== '').map((p) => `${p.name} (port ${p.id})`);
      throw new ConsolePortError('UNKNOWN_PORT', `no port named "${name}"; this console's named ports: ${names.length > 0 ? names.join(', ') : 'none'}`);
    }
    const slot = port.slot;
    port.removed = true;
    // The guest's output first, and published before the guest hears of the removal: once it has, Linux takes back
    // the buffers we have not used (rewinding a split ring's avail index), and we must not touch the rings again.
    const tx = slot.tx;
    if (tx !== null) {
      if (port.held !== null) {
        // Its bytes are with the host end already: they go out as it closes.
        tx.queue.push(port.held, 0);
        port.held = null;
        tx.publish();
      }
      slot.discarding = true;
      try {
        tx.resume(); // serves the queue now (its thread is this one): discardOutput, then publish
      } finally {
        slot.discarding = false;
      }
    }
    const discarded = slot.discarded;
    const backlogged = port.backlogBytes;
    const unread = port.pendingBytes;
    slot.discarded = 0;
    slot.port = null;
    slot.vacated = true;
    // Control messages for the port that the guest has not taken yet are of no use now.
    for (let i = ctrlOut.length - 1; i >= 0; i--) if (controlId(ctrlOut[i]) === port.id) ctrlOut.splice(i, 1);
    if (multiport && port.added) sendControl(port.id, VIRTIO_CONSOLE_DEVICE_REMOVE, 0);
    port.end.close(true);
    const lost = [
      discarded > 0 ? `${discarded} bytes the guest wrote and no client took were given back to it unread` : '',
      backlogged > 0 ? `${backlogged} bytes of output waiting for a client were dropped` : '',
      unread > 0 ? `${unread} bytes of input the guest had not read were dropped` : '',
    ].filter((l) => l !== '');
    log(`port ${port.id} (${name}): removed${lost.length > 0 ? `; ${lost.join('; ')}` : ''}`);
  }

  function resize(cols: number, rows: number): void {
    if (!(cols > 0 && cols <= 0xffff && rows > 0 && rows <= 0xffff)) throw new RangeError(`console size ${cols}x${rows}: 1 to 65535 each`);
    if (cols === size.cols && rows === size.rows) return;
    size = { cols, rows };
    if (multiport) sendResize(console0);
    else frontend?.configChanged();
  }

  const reset = (): void => {
    multiport = false;
    packedRings = false;
    driverReady = false;
    badMessages = 0;
    ctrlOut.length = 0;
    for (const s of slots) {
      s.used = false;
      s.vacated = false;
    }
    for (const p of present()) {
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
      if (at >= 0 && at < data.length) out(console0, data.slice(at, at + 1));
    },
    featuresNegotiated(features) {
      multiport = (features & bit(VIRTIO_CONSOLE_F_MULTIPORT)) !== 0n;
      packedRings = (features & bit(VIRTIO_F_RING_PACKED)) !== 0n;
      // Without MULTIPORT the driver makes port 0 its console at once; no control messages follow.
      if (!multiport) console0.guestOpen = true;
    },
    reset,
    bindFrontend(f) {
      frontend = f;
    },
    // For a planned restart (--state-file): the ports (those added at run time too), which of them the guest has
    // open, and the output waiting for clients.
    state: {
      kind: 'console',
      save: () => ({
        ports: present().map((p) => ({
          id: p.id,
          name: p.name,
          backend: describeHostEnd(p.spec),
          guestOpen: p.guestOpen,
          backlog: concatBytes(p.backlog, p.backlogBytes),
          dropped: p.dropped,
        })),
      }),
      load: (s: object) => loadState(s as SavedConsole),
    },
    dataPlane: { options: {}, thread: 'main', createQueueHandler, groups: [Array.from({ length: queuesFor(maxPorts) }, (_, i) => i)] },
    ports: () => present().map(stats),
    addPort,
    removePort,
    resize,
    describe: (port) => slots[port]?.port?.end.description ?? '',
    qemuArgs: (socketPath, id) => consoleQemuArgs(socketPath, maxPorts, id),
    close() {
      closed = true;
      for (const p of present()) p.end.close();
    },
  };

  /**
   * A saved state must describe these ports: each port of this console by its number and name (the names of a
   * state saved before ports had them are not checked), and what it lacks are ports added at run time, which are
   * opened again from their recorded backend. A port this console has and the state does not (removed at run
   * time), a different name under a number, or a number beyond max_nr_ports is a mismatch: refused, nothing
   * changed.
   */
  function loadState(st: SavedConsole): void {
    const saved = st.ports ?? [];
    const mismatch = (why: string) => new RangeError(`the console state does not fit this console: ${why}`);
    const toOpen: { id: number; name: string; spec: HostEndSpec }[] = [];
    for (const p of saved) {
      if (p.id >= maxPorts) throw mismatch(`it has port ${p.id}${p.name ? ` (${p.name})` : ''}, beyond max_nr_ports ${maxPorts}: start with --max-ports ${p.id + 1} or more`);
      const here = slots[p.id].port;
      if (here !== null) {
        if (p.name && p.name !== here.name) throw mismatch(`port ${p.id} is "${p.name}" there and "${here.name}" here`);
        continue;
      }
      if (!p.name || !p.backend) throw mismatch(`it has port ${p.id}, which this console does not`);
      let spec: HostEndSpec;
      try {
        spec = parseHostEnd(p.backend);
      } catch (e) {
        throw mismatch(`port ${p.id} (${p.name}): ${(e as Error).message}`);
      }
      const refused = conflict(p.name, spec, [...present(), ...toOpen]);
      if (refused) throw mismatch(`port ${p.id}: ${refused.message}`);
      toOpen.push({ id: p.id, name: p.name, spec });
    }
    const gone = present().filter((port) => port.id !== 0 && !saved.some((p) => p.id === port.id));
    if (gone.length > 0) {
      const which = gone.map((p) => `${p.id}${p.name ? ` (${p.name})` : ''}`).join(', ');
      throw mismatch(`this console has port ${which}, which the state does not (removed at run time before it was saved): start without that --port, or without the state`);
    }
    const opened: Port[] = [];
    try {
      for (const p of toOpen) opened.push(openPort(p.id, p.name, p.spec));
    } catch (e) {
      for (const port of opened) port.end.close();
      throw e;
    }
    for (const port of opened) {
      slots[port.id].port = port;
      log(`port ${port.id} (${port.name}): ${port.end.description}: added again from the saved state`);
    }
    loadedOpen = new Map();
    for (const p of saved) {
      const port = slots[p.id].port!;
      loadedOpen.set(p.id, p.guestOpen ?? false);
      if (p.backlog && p.backlog.length > 0) {
        port.backlog.push(p.backlog.slice());
        port.backlogBytes += p.backlog.length;
      }
      port.dropped += p.dropped ?? 0;
    }
  }
}

/** state.proto's ConsoleState as an object. */
interface SavedConsole {
  ports?: { id: number; name?: string; backend?: string; guestOpen?: boolean; backlog?: Uint8Array; dropped?: number }[];
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

const resolvePath = (p: string): string => resolve(p);

const controlId = (m: Uint8Array): number => new DataView(m.buffer, m.byteOffset).getUint32(0, true);
const controlEvent = (m: Uint8Array): number => new DataView(m.buffer, m.byteOffset).getUint16(4, true);
