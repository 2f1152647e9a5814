// The control API's device calls against devices driven by our test frontend: a net switch's MAC table after a
// frame, the link taken down and up (config status and CONFIG_CHANGE_MSG), and the console's size.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ControlClient, ControlServer } from '../../src/control/index.js';
import { consoleDevice } from '../../src/devices/console/index.js';
import { netDevice } from '../../src/devices/net/index.js';
import { NET_HDR_SIZE, parseMac } from '../../src/devices/net/spec.js';
import { VhostUserFrontend } from '../../src/frontend/index.js';
import { VhostUserServer, type VhostUserDevice } from '../../src/vhost/index.js';

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
});
