// The control API's device calls against devices driven by our test frontend: a net switch's MAC table after a
// frame, the link taken down and up (config status and CONFIG_CHANGE_MSG), the console's size, and console ports
// added and removed at run time (through ControlClient and through `vhost-ts ctl`), with the refusals as replies.
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ControlClient, ControlServer } from '../../src/control/index.js';
import { consoleDevice } from '../../src/devices/console/index.js';
import { NO_PORT, VIRTIO_CONSOLE_DEVICE_ADD, VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_DEVICE_REMOVE, VIRTIO_CONSOLE_PORT_NAME, VIRTIO_CONSOLE_PORT_READY, encodeControl } from '../../src/devices/console/spec.js';
import { netDevice } from '../../src/devices/net/index.js';
import { NET_HDR_SIZE, parseMac } from '../../src/devices/net/spec.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { VhostUserServer, type VhostUserDevice } from '../../src/vhost/index.js';
import { vhostTsBin } from '../helpers/backend-process.js';

const run = promisify(execFile);

const quiet = { info() {}, warn() {}, error() {} };

let dir: string;
let server: VhostUserServer | null = null;
let control: ControlServer | null = null;
let fe: VhostUserFrontend | null = null;
let client: ControlClient | null = null;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhost-ts-control-dev-'));
});
afterEach(async () => {
  client?.close();
  fe?.close();
  await control?.close();
  await server?.close();
  client = fe = control = server = null;
  rmSync(dir, { recursive: true, force: true });
});

async function serve(device: VhostUserDevice): Promise<void> {
  server = await VhostUserServer.start(device, { socketPath: join(dir, 'dev.sock'), log: quiet });
  control = await ControlServer.start(join(dir, 'dev.ctl'), [server], quiet);
  fe = await VhostUserFrontend.connect(join(dir, 'dev.sock'));
  client = await ControlClient.connect(join(dir, 'dev.ctl'));
}

describe('control API device calls', () => {
  it('net: the MAC table shows what the switch learned; the link goes down and up for the guest', async () => {
    await serve(netDevice({ backend: { kind: 'switch', name: 'ctl-sw' }, mac: parseMac('52:54:00:00:ee:01') }));
    const [, tx] = await fe!.start({ queues: [{ index: 0, size: 64 }, { index: 1, size: 64 }] });
    // A broadcast from the guest: the switch learns its source address.
    const frame = new Uint8Array(NET_HDR_SIZE + 60);
    frame.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x00, 0xee, 0x42], NET_HDR_SIZE);
    tx.add({ readable: [frame] });
    tx.kick();
    await tx.waitForUsed(1);
    const table = await client!.call({ macTable: {} });
    expect((table.macTable as { entries: { mac: string; port: string }[] }).entries).toContainEqual(
      expect.objectContaining({ mac: '52:54:00:00:ee:42', port: 'port of 52:54:00:00:ee:01' }),
    );
    const status = async () => new DataView((await fe!.getConfig(6, 2)).buffer).getUint16(0, true);
    expect(await status()).toBe(1); // VIRTIO_NET_S_LINK_UP
    const changed = fe!.waitForBackendMessage('CONFIG_CHANGE_MSG');
    expect((await client!.call({ netLink: { up: false } })).error ?? '').toBe('');
    await changed;
    expect(await status()).toBe(0);
    await client!.call({ netLink: { up: true } });
    expect(await status()).toBe(1);
    // Calls for devices this backend does not have say so.
    expect((await client!.call({ blkResize: { sizeBytes: 1 << 20 } })).error).toMatch(/no blk device/);
    expect((await client!.call({ consoleResize: { cols: 80, rows: 24 } })).error).toMatch(/no console device/);
  });

  it('console: console_resize changes the size the guest is given', async () => {
    const dev = consoleDevice({ console: { kind: 'file', path: join(dir, 'hvc0.log') }, log: () => {} });
    try {
      await serve(dev);
      // Without MULTIPORT the size is in config space: cols, rows.
      await fe!.start({ queues: [{ index: 0, size: 16 }, { index: 1, size: 16 }], features: ~(1n << 1n) });
      const changed = fe!.waitForBackendMessage('CONFIG_CHANGE_MSG');
      expect((await client!.call({ consoleResize: { cols: 132, rows: 43 } })).error ?? '').toBe('');
      await changed;
      const cfg = new DataView((await fe!.getConfig(0, 4)).buffer);
      expect([cfg.getUint16(0, true), cfg.getUint16(2, true)]).toEqual([132, 43]);
      expect((await client!.call({ consoleResize: { cols: 0, rows: 43 } })).error).toMatch(/1 to 65535/);
    } finally {
      dev.close();
    }
  });

  it('console: console_add_port and console_remove_port, the guest told each time; refusals are error replies', async () => {
    const logs: string[] = [];
    const dev = consoleDevice({ console: { kind: 'file', path: join(dir, 'hvc0.log') }, maxPorts: 3, log: (m) => logs.push(m) });
    try {
      await serve(dev);
      const [, , crx, ctx] = await fe!.start({ queues: Array.from({ length: dev.numQueues }, (_, index) => ({ index, size: 16 })) });
      for (let i = 0; i < 16; i++) crx.add({ writable: [512] });
      crx.kick();
      const controls = async (q: TestQueue, n: number) =>
        (await q.waitForUsed(n)).map((u) => {
          const b = Buffer.from(q.written(u.chain!, u.len));
          return [b.readUInt32LE(0), b.readUInt16LE(4), b.subarray(8).toString()];
        });
      const send = async (msg: Uint8Array) => {
        ctx.add({ readable: [msg] });
        ctx.kick();
        await ctx.waitForUsed(1);
      };
      await send(encodeControl(NO_PORT, VIRTIO_CONSOLE_DEVICE_READY, 1));
      await controls(crx, 1); // port 0 added

      const sock = join(dir, 'port.sock');
      const added = await client!.call({ consoleAddPort: { name: 'org.test.ctl', backend: `socket:${sock}` } });
      expect(added.error).toBe('');
      expect(added.consolePort).toEqual({ id: 1, name: 'org.test.ctl', backend: `socket ${sock}` });
      expect(await controls(crx, 1)).toEqual([[1, VIRTIO_CONSOLE_DEVICE_ADD, '']]);
      await send(encodeControl(1, VIRTIO_CONSOLE_PORT_READY, 1));
      expect((await controls(crx, 2))[0]).toEqual([1, VIRTIO_CONSOLE_PORT_NAME, 'org.test.ctl']);
      expect(existsSync(sock)).toBe(true); // listening before the answer came

      // Refusals, each with its reason; the device is unchanged.
      const error = async (call: Record<string, unknown>) => String((await client!.call(call)).error);
      expect(await error({ consoleAddPort: { name: 'org.test.ctl', backend: 'pty' } })).toBe('a port named "org.test.ctl" exists already');
      expect(await error({ consoleAddPort: { name: 'org.test.x', backend: 'tcp:1234' } })).toBe('a port backend of "tcp:1234": use socket:PATH, pty or file:PATH');
      expect(await error({ consoleAddPort: { name: 'org.test.x', backend: 'stdio' } })).toMatch(/^stdio cannot be a backend added at run time/);
      expect(await error({ consoleAddPort: { name: '', backend: 'pty' } })).toBe('console_add_port needs the name of the port');
      expect(await error({ consoleRemovePort: { name: 'org.test.none' } })).toBe('no port named "org.test.none"; this console\'s named ports: org.test.ctl (port 1)');
      expect(await error({ consoleRemovePort: { name: '' } })).toMatch(/^port 0, the console port .* cannot be removed/);
      const second = await client!.call({ consoleAddPort: { name: 'org.test.two', backend: `file:${join(dir, 'two.log')}` } });
      expect(second.consolePort).toMatchObject({ id: 2 });
      await controls(crx, 1);
      expect(await error({ consoleAddPort: { name: 'org.test.three', backend: 'pty' } })).toMatch(/^no free port number for "org.test.three": max_nr_ports is 3 .* start vhost-ts console with a larger --max-ports$/);

      // Through the CLI, as a person or a script calls it; its errors are the replies, with exit status 1.
      const removed = await run(process.execPath, [vhostTsBin, 'ctl', join(dir, 'dev.ctl'), 'console-remove-port', 'org.test.ctl', '--json']);
      expect(JSON.parse(removed.stdout)).toEqual({ done: {}, result: 'done' });
      expect(await controls(crx, 1)).toEqual([[1, VIRTIO_CONSOLE_DEVICE_REMOVE, '']]);
      expect(existsSync(sock)).toBe(false);
      const again = await run(process.execPath, [vhostTsBin, 'ctl', join(dir, 'dev.ctl'), 'console-add-port', 'org.test.cli', `socket:${sock}`]);
      expect(again.stdout.trim()).toBe(`port 1 (org.test.cli): socket ${sock}; in the guest /dev/vport*p1, /sys/class/virtio-ports/vport*p1/name`);
      expect(await controls(crx, 1)).toEqual([[1, VIRTIO_CONSOLE_DEVICE_ADD, '']]);
      const json = await run(process.execPath, [vhostTsBin, 'ctl', join(dir, 'dev.ctl'), 'console-remove-port', 'org.test.cli']);
      expect(json.stdout.trim()).toBe('done');
      await expect(run(process.execPath, [vhostTsBin, 'ctl', join(dir, 'dev.ctl'), 'console-remove-port', 'org.test.cli'])).rejects.toThrow(/vhost-ts ctl: no port named "org.test.cli"/);
      await expect(run(process.execPath, [vhostTsBin, 'ctl', join(dir, 'dev.ctl'), 'console-add-port', 'org.test.cli'])).rejects.toThrow(/ctl console-add-port: missing or bad arguments/);
      // Still serving: the socket of a port added now takes a client.
      await client!.consoleAddPort('org.test.last', `socket:${sock}`);
      const c = connect(sock);
      await new Promise<void>((resolve, reject) => c.once('connect', resolve).once('error', reject));
      c.destroy();
      await expect(client!.consoleRemovePort('org.test.none')).rejects.toThrow(/no port named/);
      expect(logs.filter((l) => /ignored/.test(l))).toEqual([]);
    } finally {
      dev.close();
    }
  });

  it('console calls to a backend without a console say so', async () => {
    await serve(netDevice({ backend: { kind: 'switch', name: 'ctl-sw2' }, mac: parseMac('52:54:00:00:ee:02') }));
    expect((await client!.call({ consoleAddPort: { name: 'x', backend: 'pty' } })).error).toBe('this backend serves no console device');
    expect((await client!.call({ consoleRemovePort: { name: 'x' } })).error).toBe('this backend serves no console device');
  });
});
