// Named console ports added and removed at run time (ConsoleDevice.addPort / removePort, the control API's
// console_add_port and console_remove_port), against our own frontend playing the Linux driver: the exact control
// messages (DEVICE_ADD, then PORT_NAME and PORT_OPEN after PORT_READY, DEVICE_REMOVE), the added port's data both
// ways, what happens to output the guest wrote and no client took, the refusals, reuse of a removed port's number,
// ports added before the driver is up, and the saved state that describes them.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BACKLOG_BYTES, consoleDevice, ConsolePortError, type ConsoleDevice, type ConsoleOptions } from '../../src/devices/console/index.js';
import {
  NO_PORT,
  VIRTIO_CONSOLE_CONSOLE_PORT,
  VIRTIO_CONSOLE_DEVICE_ADD,
  VIRTIO_CONSOLE_DEVICE_READY,
  VIRTIO_CONSOLE_DEVICE_REMOVE,
  VIRTIO_CONSOLE_PORT_NAME,
  VIRTIO_CONSOLE_PORT_OPEN,
  VIRTIO_CONSOLE_PORT_READY,
  VIRTIO_CONSOLE_RESIZE,
  encodeControl,
} from '../../src/devices/console/spec.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { attach } from '../helpers/socket-client.js';
import { eventfdRead } from '../../src/sys/index.js';
import { loadDeviceState, saveDeviceState } from '../../src/vhost/device-state.js';
import { VhostUserServer, type DeviceStateHooks, type Logger } from '../../src/vhost/index.js';

interface Control {
  id: number;
  event: number;
  value: number;
  extra: Buffer;
}
const triple = (m: Control): number[] => [m.id, m.event, m.value];

describe('console ports added and removed at run time', () => {
  let dir: string;
  let server: VhostUserServer | undefined;
  let fe: VhostUserFrontend | undefined;
  let dev: ConsoleDevice | undefined;
  let logs: string[];
  const clients: Socket[] = [];
  const devices: ConsoleDevice[] = [];

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-console-ports-'));
    logs = [];
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.destroy();
    fe?.close();
    await server?.close();
    dev?.close();
    for (const d of devices.splice(0)) d.close();
    fe = server = dev = undefined;
    rmSync(dir, { recursive: true, force: true });
  });

  const log = (m: string) => logs.push(m);
  const socketEnd = (name: string) => ({ kind: 'socket' as const, path: join(dir, name) });

  /** The console on a file and port 1 (org.test.data) on a socket; max_nr_ports 3: port 2 free. */
  function create(extra: Partial<ConsoleOptions> = {}): ConsoleDevice {
    dev = consoleDevice({
      console: { kind: 'file', path: join(dir, 'hvc0.log') },
      ports: [{ name: 'org.test.data', backend: socketEnd('data.sock') }],
      maxPorts: 3,
      cols: 100,
      rows: 40,
      log,
      ...extra,
    });
    return dev;
  }

  /** Serve `dev` and start every queue; the driver posts its control receive buffers. */
  async function connectDriver(ring?: 'split' | 'packed') {
    const vlog: Logger = { info() {}, warn: log, error: log };
    server ??= await VhostUserServer.start(dev!, { socketPath: join(dir, 'c.sock'), log: vlog });
    fe = await VhostUserFrontend.connect(join(dir, 'c.sock'));
    const queues = await fe.start({ queues: Array.from({ length: dev!.numQueues }, (_, index) => ({ index, size: 64 })), ...(ring ? { ring } : {}) });
    const [, , crx, ctx] = queues;
    for (let i = 0; i < 32; i++) crx.add({ writable: [4096] });
    crx.kick();
    // Port n ≥ 1: rx 2n+2, tx 2n+3.
    const rx = (n: number) => queues[n === 0 ? 0 : 2 * n + 2];
    const tx = (n: number) => queues[n === 0 ? 1 : 2 * n + 3];
    return { crx, ctx, rx, tx, queues };
  }
  type Driver = Awaited<ReturnType<typeof connectDriver>>;

  /** The next `n` control messages from the device (the buffers are posted again). */
  async function controls(crx: TestQueue, n: number): Promise<Control[]> {
    const used = await crx.waitForUsed(n);
    const out = used.map((u) => {
      const b = Buffer.from(crx.written(u.chain!, u.len));
      return { id: b.readUInt32LE(0), event: b.readUInt16LE(4), value: b.readUInt16LE(6), extra: b.subarray(8) };
    });
    for (let i = 0; i < n; i++) crx.add({ writable: [4096] });
    crx.kick();
    return out;
  }

  /** No control message within a short, bounded wait. */
  async function noControls(crx: TestQueue): Promise<void> {
    await expect(crx.waitForUsed(1, 200)).rejects.toThrow(/0 of 1 used elements/);
  }

  async function send(ctx: TestQueue, msg: Uint8Array): Promise<void> {
    ctx.add({ readable: [msg] });
    ctx.kick();
    await ctx.waitForUsed(1);
  }

  /** DEVICE_READY, and PORT_READY for ports 0 and 1 as Linux answers their DEVICE_ADD. */
  async function bringUp(d: Driver): Promise<void> {
    await send(d.ctx, encodeControl(NO_PORT, VIRTIO_CONSOLE_DEVICE_READY, 1));
    expect((await controls(d.crx, 2)).map(triple)).toEqual([
      [0, VIRTIO_CONSOLE_DEVICE_ADD, 0],
      [1, VIRTIO_CONSOLE_DEVICE_ADD, 0],
    ]);
    await send(d.ctx, encodeControl(0, VIRTIO_CONSOLE_PORT_READY, 1));
    await controls(d.crx, 3); // CONSOLE_PORT, RESIZE, PORT_OPEN
    await send(d.ctx, encodeControl(1, VIRTIO_CONSOLE_PORT_READY, 1));
    await controls(d.crx, 2); // PORT_NAME, PORT_OPEN
  }

  /** The guest writes `bytes` on port n's transmit queue. */
  function guestWrites(d: Driver, n: number, bytes: Buffer): void {
    d.tx(n).add({ readable: [bytes] });
    d.tx(n).kick();
  }

  /** Host input on port n as the guest reads it: one receive buffer. */
  async function guestReads(d: Driver, n: number): Promise<string> {
    d.rx(n).add({ writable: [4096] });
    d.rx(n).kick();
    const [u] = await d.rx(n).waitForUsed(1);
    return Buffer.from(d.rx(n).written(u.chain!, u.len)).toString();
  }

  it('a port added while the driver runs: DEVICE_ADD, then after PORT_READY its name and PORT_OPEN 1 (a client is attached); data both ways', async () => {
    create();
    const d = await connectDriver();
    await bringUp(d);
    const added = await dev!.addPort({ name: 'org.test.added', backend: socketEnd('added.sock') });
    expect(added).toMatchObject({ id: 2, name: 'org.test.added', backend: `socket ${join(dir, 'added.sock')}`, hostOpen: false, guestOpen: false });
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_DEVICE_ADD, 0]]);
    // A client attaches before the guest has answered: its open state goes with the name, after PORT_READY.
    const c = await attach(join(dir, 'added.sock'));
    clients.push(c.socket);
    await noControls(d.crx);
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_READY, 1));
    const [name, open] = await controls(d.crx, 2);
    expect([triple(name), triple(open)]).toEqual([
      [2, VIRTIO_CONSOLE_PORT_NAME, 0],
      [2, VIRTIO_CONSOLE_PORT_OPEN, 1],
    ]);
    expect(name.extra.toString()).toBe('org.test.added'); // no NUL: the message's length ends it
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_OPEN, 1)); // the guest opens /dev/vport0p2

    guestWrites(d, 2, Buffer.from('from the guest\n'));
    expect((await c.until(15)).toString()).toBe('from the guest\n');
    await d.tx(2).waitForUsed(1);
    c.socket.write('from the host');
    expect(await guestReads(d, 2)).toBe('from the host');
    expect(dev!.ports().map((p) => [p.id, p.name])).toEqual([
      [0, ''],
      [1, 'org.test.data'],
      [2, 'org.test.added'],
    ]);
    expect(dev!.ports()[2]).toMatchObject({ hostOpen: true, guestOpen: true, bytesFromGuest: 15, bytesToGuest: 13 });
    // The other ports carry on as before.
    const c1 = await attach(join(dir, 'data.sock'));
    clients.push(c1.socket);
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[1, VIRTIO_CONSOLE_PORT_OPEN, 1]]);
    expect(logs.filter((l) => /ignored/.test(l))).toEqual([]);
    expect(logs).toContain(`port 2 (org.test.added): socket ${join(dir, 'added.sock')}: added`);
  });

  it('remove: output taken reaches the client before end-of-file; output not taken goes back to the guest unread, before DEVICE_REMOVE', async () => {
    create();
    const d = await connectDriver();
    await bringUp(d);
    await dev!.addPort({ name: 'org.test.added', backend: socketEnd('added.sock') });
    await controls(d.crx, 1);
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_READY, 1));
    await controls(d.crx, 2); // PORT_NAME, PORT_OPEN 0
    const c = await attach(join(dir, 'added.sock'));
    clients.push(c.socket);
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_PORT_OPEN, 1]]);
    // The client stops reading: the socket fills, the device holds a chain, then leaves the rest in the ring.
    c.socket.pause();
    const chunk = 32768;
    const chains = 48;
    const all: Buffer[] = [];
    for (let i = 0; i < chains; i++) {
      const b = Buffer.alloc(chunk, 0x41 + (i % 26));
      all.push(b);
      d.tx(2).add({ readable: [b] });
    }
    d.tx(2).kick();
    let before = -1;
    for (let i = 0; i < 100; i++) {
      await new Promise((r) => setTimeout(r, 20));
      const now = dev!.ports()[2].bytesFromGuest;
      if (now === before) break;
      before = now;
    }
    const taken = dev!.ports()[2].bytesFromGuest;
    expect(taken).toBeGreaterThan(0);
    expect(taken).toBeLessThan(chains * chunk); // backed up: some chains were still in the ring

    dev!.removePort('org.test.added');
    // Every chain of the port is back with the guest when removePort returns (the one held, the ones never taken,
    // all with 0 bytes written): published before the guest can see DEVICE_REMOVE, after which the device must not
    // touch the ring. (waitForUsed takes what is in the used ring at once; 1 ms leaves no time for more.)
    const used = await d.tx(2).waitForUsed(chains, 1);
    expect(used.every((u) => u.len === 0)).toBe(true);
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_DEVICE_REMOVE, 0]]);
    expect(dev!.ports().map((p) => p.id)).toEqual([0, 1]);
    expect(existsSync(join(dir, 'added.sock'))).toBe(false);
    // The client gets exactly what the device took, in order, then end-of-file.
    c.socket.resume();
    await c.closed;
    expect(c.data().equals(Buffer.concat(all).subarray(0, taken))).toBe(true);
    expect(logs.find((l) => l.startsWith('port 2 (org.test.added): removed'))).toBe(
      `port 2 (org.test.added): removed; ${chains * chunk - taken} bytes the guest wrote and no client took were given back to it unread`,
    );
    // Late messages from the guest about the removed port (it had not taken the removal in yet) are not hostile.
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_OPEN, 0));
    // Kicks on the removed port's queues find no port: nothing is taken, nothing breaks.
    d.tx(2).add({ readable: [Buffer.from('nobody')] });
    d.tx(2).kick();
    await expect(d.tx(2).waitForUsed(1, 200)).rejects.toThrow(/0 of 1/);
    expect(logs.filter((l) => /ignored/.test(l))).toEqual([]);
    for (const q of d.queues) expect(eventfdRead(q.errFd)).toBe(0);
  });

  it('remove without a client: the output waiting for one in the backlog is dropped, and the log says how much', async () => {
    create();
    const d = await connectDriver();
    await bringUp(d);
    guestWrites(d, 1, Buffer.alloc(1000, 0x61)); // port 1 has no client: backlog
    await d.tx(1).waitForUsed(1);
    expect(dev!.ports()[1].backlogged).toBe(1000);
    dev!.removePort('org.test.data');
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[1, VIRTIO_CONSOLE_DEVICE_REMOVE, 0]]);
    expect(logs).toContain('port 1 (org.test.data): removed; 1000 bytes of output waiting for a client were dropped');
    expect(BACKLOG_BYTES).toBeGreaterThan(1000);
  });

  it('refusals are errors with a reason, change nothing, and the device keeps serving', async () => {
    create();
    const d = await connectDriver();
    await bringUp(d);
    const refused = async (p: Promise<unknown> | (() => void), code: string, text: RegExp) => {
      const run = typeof p === 'function' ? Promise.resolve().then(p) : p;
      const e = await run.then(() => null, (err: unknown) => err);
      expect(e).toBeInstanceOf(ConsolePortError);
      expect((e as ConsolePortError).code).toBe(code);
      expect((e as Error).message).toMatch(text);
    };
    await refused(() => dev!.removePort(''), 'CONSOLE_PORT', /port 0, the console port .* cannot be removed/);
    await refused(() => dev!.removePort('org.test.none'), 'UNKNOWN_PORT', /no port named "org.test.none"; this console's named ports: org.test.data \(port 1\)/);
    await refused(dev!.addPort({ name: 'org.test.data', backend: socketEnd('x.sock') }), 'NAME_TAKEN', /a port named "org.test.data" exists already/);
    await refused(dev!.addPort({ name: 'with space', backend: socketEnd('x.sock') }), 'BAD_NAME', /printable ASCII/);
    await refused(dev!.addPort({ name: 'org.test.tty', backend: { kind: 'stdio' } }), 'BAD_BACKEND', /stdio cannot be a backend added at run time/);
    await refused(dev!.addPort({ name: 'org.test.same', backend: socketEnd('data.sock') }), 'BAD_BACKEND', /is the backend of another port/);
    await refused(dev!.addPort({ name: 'org.test.nodir', backend: socketEnd('no/such/dir.sock') }), 'BAD_BACKEND', /socket:.*no\/such\/dir\.sock: listen E[A-Z]+/);
    await refused(dev!.addPort({ name: 'org.test.nofile', backend: { kind: 'file', path: join(dir, 'no/such/file') } }), 'BAD_BACKEND', /ENOENT/);
    // None of that reached the guest, and port 2 is still free.
    await noControls(d.crx);
    expect(dev!.ports().map((p) => p.id)).toEqual([0, 1]);
    expect((await dev!.addPort({ name: 'org.test.nodir', backend: { kind: 'pty' } })).backend).toMatch(/^pty \/dev\/pts\/\d+$/);
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_DEVICE_ADD, 0]]);
    await refused(dev!.addPort({ name: 'org.test.more', backend: socketEnd('more.sock') }), 'NO_FREE_SLOT', /max_nr_ports is 3 .* start vhost-ts console with a larger --max-ports$/);
    // Still serving: port 1 takes output.
    const c = await attach(join(dir, 'data.sock'));
    clients.push(c.socket);
    await controls(d.crx, 1);
    guestWrites(d, 1, Buffer.from('still here'));
    expect((await c.until(10)).toString()).toBe('still here');
    for (const q of d.queues) expect(eventfdRead(q.errFd)).toBe(0);
  });

  it('split rings: a removed port\'s number is taken by the next add once no other is free, and its queues carry on', async () => {
    create({ maxPorts: 3 });
    const d = await connectDriver('split');
    await bringUp(d);
    await dev!.addPort({ name: 'org.test.first', backend: socketEnd('first.sock') });
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_DEVICE_ADD, 0]]);
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_READY, 1));
    await controls(d.crx, 2);
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_OPEN, 1));
    const c1 = await attach(join(dir, 'first.sock'));
    clients.push(c1.socket);
    await controls(d.crx, 1);
    guestWrites(d, 2, Buffer.from('to the first'));
    expect((await c1.until(12)).toString()).toBe('to the first');
    await d.tx(2).waitForUsed(1);

    dev!.removePort('org.test.first');
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_DEVICE_REMOVE, 0]]);
    await c1.closed;
    const second = await dev!.addPort({ name: 'org.test.second', backend: socketEnd('second.sock') });
    expect(second.id).toBe(2);
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_DEVICE_ADD, 0]]);
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_READY, 1));
    const [name, open] = await controls(d.crx, 2);
    expect([triple(name), name.extra.toString(), triple(open)]).toEqual([[2, VIRTIO_CONSOLE_PORT_NAME, 0], 'org.test.second', [2, VIRTIO_CONSOLE_PORT_OPEN, 0]]);
    // The guest opens the new port; the new client gets the new port's output, and its input reaches the guest.
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_OPEN, 1));
    const c2 = await attach(join(dir, 'second.sock'));
    clients.push(c2.socket);
    await controls(d.crx, 1);
    guestWrites(d, 2, Buffer.from('to the second'));
    expect((await c2.until(13)).toString()).toBe('to the second');
    c2.socket.write('from the second');
    expect(await guestReads(d, 2)).toBe('from the second');
    expect(c1.data().toString()).toBe('to the first');
    expect(logs.filter((l) => /ignored/.test(l))).toEqual([]);
  });

  it('packed rings: a removed port\'s number stays taken until the driver resets the device', async () => {
    create({ maxPorts: 3 });
    let d = await connectDriver('packed');
    await bringUp(d);
    await dev!.addPort({ name: 'org.test.first', backend: socketEnd('first.sock') });
    await controls(d.crx, 1);
    dev!.removePort('org.test.first');
    expect((await controls(d.crx, 1)).map(triple)).toEqual([[2, VIRTIO_CONSOLE_DEVICE_REMOVE, 0]]);
    const e = await dev!.addPort({ name: 'org.test.second', backend: socketEnd('second.sock') }).catch((err: Error) => err);
    expect((e as ConsolePortError).code).toBe('NO_FREE_SLOT');
    expect((e as Error).message).toMatch(/Port 2 was removed, but on packed rings its number is free again only once the guest's driver resets the device/);
    // A new driver (the frontend reconnects: the device is reset, the rings start afresh): free again.
    fe!.close();
    await new Promise((r) => setTimeout(r, 100));
    d = await connectDriver('packed');
    expect((await dev!.addPort({ name: 'org.test.second', backend: socketEnd('second.sock') })).id).toBe(2);
    await send(d.ctx, encodeControl(NO_PORT, VIRTIO_CONSOLE_DEVICE_READY, 1));
    expect((await controls(d.crx, 3)).map(triple)).toEqual([
      [0, VIRTIO_CONSOLE_DEVICE_ADD, 0],
      [1, VIRTIO_CONSOLE_DEVICE_ADD, 0],
      [2, VIRTIO_CONSOLE_DEVICE_ADD, 0],
    ]);
  });

  it('before the driver is up: added ports are announced with the others at DEVICE_READY, removed ones never', async () => {
    create({ maxPorts: 4 });
    // No frontend at all yet.
    expect((await dev!.addPort({ name: 'org.test.early', backend: socketEnd('early.sock') })).id).toBe(2);
    const d = await connectDriver();
    // Connected, the driver not ready yet.
    await dev!.addPort({ name: 'org.test.gone', backend: socketEnd('gone.sock') });
    dev!.removePort('org.test.gone');
    await noControls(d.crx);
    await send(d.ctx, encodeControl(NO_PORT, VIRTIO_CONSOLE_DEVICE_READY, 1));
    expect((await controls(d.crx, 3)).map(triple)).toEqual([
      [0, VIRTIO_CONSOLE_DEVICE_ADD, 0],
      [1, VIRTIO_CONSOLE_DEVICE_ADD, 0],
      [2, VIRTIO_CONSOLE_DEVICE_ADD, 0],
    ]);
    await noControls(d.crx);
    await send(d.ctx, encodeControl(0, VIRTIO_CONSOLE_PORT_READY, 1));
    expect((await controls(d.crx, 3)).map(triple)).toEqual([
      [0, VIRTIO_CONSOLE_CONSOLE_PORT, 1],
      [0, VIRTIO_CONSOLE_RESIZE, 0],
      [0, VIRTIO_CONSOLE_PORT_OPEN, 1], // a file is always open
    ]);
    await send(d.ctx, encodeControl(2, VIRTIO_CONSOLE_PORT_READY, 1));
    const [name] = await controls(d.crx, 2);
    expect([triple(name), name.extra.toString()]).toEqual([[2, VIRTIO_CONSOLE_PORT_NAME, 0], 'org.test.early']);
  });

  describe('device state', () => {
    const options = (maxPorts = 4): ConsoleOptions => ({
      console: { kind: 'file', path: join(dir, 'hvc0.log') },
      ports: [{ name: 'org.test.data', backend: socketEnd('data.sock') }],
      maxPorts,
      log,
    });
    const fresh = (o: ConsoleOptions): ConsoleDevice & { state: DeviceStateHooks } => {
      const d = consoleDevice(o);
      devices.push(d);
      return d as ConsoleDevice & { state: DeviceStateHooks };
    };

    it('describes the ports added at run time, which a new console opens again from it', async () => {
      const first = fresh(options());
      await first.addPort({ name: 'org.test.added', backend: socketEnd('added.sock') });
      const saved = saveDeviceState(first);
      first.close();
      const second = fresh(options());
      loadDeviceState(second, saved);
      expect(second.ports().map((p) => [p.id, p.name, p.backend])).toEqual([
        [0, '', `file ${join(dir, 'hvc0.log')}`],
        [1, 'org.test.data', `socket ${join(dir, 'data.sock')}`],
        [2, 'org.test.added', `socket ${join(dir, 'added.sock')}`],
      ]);
      expect(logs).toContain(`port 2 (org.test.added): socket ${join(dir, 'added.sock')}: added again from the saved state`);
      // It serves: a client can attach to the port's socket.
      const c = await attach(join(dir, 'added.sock'));
      clients.push(c.socket);
    });

    it('refuses a state that does not fit: another name under a number, a port removed since, a number beyond max_nr_ports', async () => {
      const first = fresh(options());
      await first.addPort({ name: 'org.test.added', backend: { kind: 'file', path: join(dir, 'added.log') } });
      const withAdded = saveDeviceState(first);
      first.removePort('org.test.data');
      const withoutData = saveDeviceState(first);
      first.close();

      const renamed = fresh({ ...options(), ports: [{ name: 'org.test.other', backend: socketEnd('data.sock') }] });
      expect(() => loadDeviceState(renamed, withAdded)).toThrow('the console state does not fit this console: port 1 is "org.test.data" there and "org.test.other" here');
      expect(renamed.ports().map((p) => p.id)).toEqual([0, 1]); // nothing opened
      renamed.close();
      const same = fresh(options());
      expect(() => loadDeviceState(same, withoutData)).toThrow(/this console has port 1 \(org\.test\.data\), which the state does not \(removed at run time before it was saved\)/);
      same.close();
      const small = fresh(options(2));
      expect(() => loadDeviceState(small, withAdded)).toThrow(/it has port 2 \(org\.test\.added\), beyond max_nr_ports 2: start with --max-ports 3 or more/);
      // A state saved before ports had names (all of them given at start) still loads.
      const old = fresh(options());
      old.state!.load({ ports: [{ id: 0, guestOpen: true }, { id: 1, guestOpen: false, backlog: new Uint8Array([1, 2, 3]) }] });
      expect(old.ports()[1].backlogged).toBe(3);
    });
  });
});
