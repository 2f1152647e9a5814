// The control API (proto/vhost_ts/control.proto on a Unix socket): stats that count what a real frontend did
// (libblkio through qemu-io), the CLI that prints them, blk-resize with the config change the frontend is told
// of, and malformed messages answered or cut off while the device keeps serving.
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { ControlClient, ControlServer } from '../../src/control/index.js';
import { encodeFrame, Request } from '../../src/control/proto.js';
import { blkDevice, type BlkDevice } from '../../src/devices/blk/index.js';
import { VhostUserFrontend } from '../../src/frontend/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';
import { blkioImage, qemuIo, runQemuTool } from '../devices/qemu-tools.js';
import { vhostTsBin } from '../helpers/backend-process.js';

const run = promisify(execFile);

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('control API', () => {
  let setup: HarnessSetup;
  let dir: string;
  let image: string;
  let blk: BlkDevice;
  let server: VhostUserServer;
  let control: ControlServer;
  let socket: string;
  let ctl: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-control-'));
    image = join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, 16 << 20);
    socket = join(dir, 'blk.sock');
    ctl = join(dir, 'blk.ctl');
    blk = blkDevice({ path: image });
    server = await VhostUserServer.start(blk, { socketPath: socket, log: { info() {}, warn() {}, error() {} } });
    control = await ControlServer.start(ctl, [server]);
  }, 15 * 60_000);
  afterAll(async () => {
    await control?.close();
    await server?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('counts the 256 requests of a libblkio client writing 1 MiB in 4 KiB requests, and the CLI prints them', async () => {
    const writes = Array.from({ length: 256 }, (_, i) => `write -P 0x5a ${i * 4096} 4k`);
    // Write-back, or qemu-io (write-through by default) follows every write with a flush.
    const done = await runQemuTool(setup, 'qemu-io', ['-t', 'writeback', '--image-opts', blkioImage(socket), ...writes.flatMap((c) => ['-c', c])]);
    expect(done.code, done.stderr).toBe(0);
    const client = await ControlClient.connect(ctl);
    try {
      const answer = await client.call({ stats: {} });
      expect(answer.error ?? '').toBe('');
      type Q = { index: number; chains: number; bytes: number; kicks: number; notifications: number; broken: boolean };
      const [frontend] = (answer.stats as { frontends: { device: string; queues: Q[] }[] }).frontends;
      expect(frontend.device).toBe('blk');
      const q0 = frontend.queues.find((x) => x.index === 0)!;
      // The 256 writes, and the flush qemu-io sends when it closes the disk.
      expect(q0.chains).toBe(257);
      expect(q0.bytes).toBe(257); // a status byte each
      expect(blk.stats().bytesWritten).toBe(1 << 20);
      expect(q0.kicks).toBeGreaterThanOrEqual(1);
      expect(q0.notifications).toBeGreaterThanOrEqual(1);
      expect(q0.broken).toBe(false);
      const list = await client.call({ list: {} });
      expect(JSON.stringify(list.list)).toContain('"device":"blk"');
    } finally {
      client.close();
    }
    const { stdout } = await run(process.execPath, [vhostTsBin, 'ctl', ctl, 'stats', '--json']);
    const printed = JSON.parse(stdout) as { stats: { frontends: { queues: { chains: number }[] }[] } };
    expect(printed.stats.frontends[0].queues[0].chains).toBe(257);
  }, 120_000);

  it('blk-resize grows the image and tells the frontend (CONFIG_CHANGE_MSG); GET_CONFIG has the new capacity', async () => {
    const fe = await VhostUserFrontend.connect(socket);
    try {
      await fe.start({ queues: [{ index: 0, size: 64 }] });
      const before = new DataView((await fe.getConfig(0, 8)).buffer).getUint32(0, true);
      expect(before).toBe((16 << 20) / 512);
      const { stdout } = await run(process.execPath, [vhostTsBin, 'ctl', ctl, 'blk-resize', '32M']);
      expect(stdout.trim()).toBe('done');
      const msg = await fe.waitForBackendMessage('CONFIG_CHANGE_MSG');
      expect(msg.type).toBe('CONFIG_CHANGE_MSG');
      const after = new DataView((await fe.getConfig(0, 8)).buffer).getUint32(0, true);
      expect(after).toBe((32 << 20) / 512);
      expect(statSync(image).size).toBe(32 << 20);
      // Shrinking is refused, with the reason.
      await expect(run(process.execPath, [vhostTsBin, 'ctl', ctl, 'blk-resize', '8M'])).rejects.toThrow(/only growing is supported/);
    } finally {
      fe.close();
    }
  });

  it('answers malformed messages with an error, closes on a broken frame, and the device keeps serving', async () => {
    const raw = async (bytes: Uint8Array): Promise<{ data: Buffer; closed: boolean }> => {
      const s: Socket = connect(ctl);
      await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
      const chunks: Buffer[] = [];
      s.on('data', (d) => chunks.push(d));
      const closed = new Promise<boolean>((r) => s.once('close', () => r(true)));
      s.write(bytes);
      const got = await Promise.race([closed, new Promise<boolean>((r) => setTimeout(() => r(false), 1000))]);
      s.destroy();
      return { data: Buffer.concat(chunks), closed: got };
    };
    // Garbage in a well-formed frame: an error reply, the connection stays.
    const garbage = await raw(Uint8Array.of(4, 0xff, 0xff, 0xff, 0xff));
    expect(garbage.data.toString()).toMatch(/malformed request/);
    expect(garbage.closed).toBe(false);
    // A call this backend does not know (field 15).
    const unknown = await raw(Uint8Array.of(3, 0x7a, 0x01, 0x00));
    expect(unknown.data.toString()).toMatch(/unknown or missing call/);
    // A frame longer than 1 MiB: an error, then the connection is closed.
    const oversize = await raw(Uint8Array.of(0xff, 0xff, 0xff, 0x0f));
    expect(oversize.data.toString()).toMatch(/at most/);
    expect(oversize.closed).toBe(true);
    // A truncated frame: nothing to answer yet; the client hangs up and nothing breaks.
    const truncated = await raw(Uint8Array.of(50, 1, 2, 3));
    expect(truncated.data.length).toBe(0);
    // The API and the device both still work.
    const client = await ControlClient.connect(ctl);
    expect((await client.call({ list: {} })).error ?? '').toBe('');
    client.close();
    const ok = await qemuIo(setup, socket, ['read -P 0x5a 0 4k']);
    expect(ok.code, ok.stderr).toBe(0);
    void encodeFrame(Request, { id: 1, list: {} });
  }, 60_000);
});
