// The console device serving a real guest through QEMU's vhost-user-test-device-pci (virtio-id 3) and the guest
// kernel's virtio_console driver: the console port (hvc0) and a named port, both on socket backends.
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { consoleDevice } from '../../src/devices/console/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';

const MIB = 1 << 20;

/** A client on a socket backend that collects everything it receives. */
async function client(path: string): Promise<{ socket: Socket; received: () => Buffer; waitFor: (pred: (b: Buffer) => boolean, ms: number, what: string) => Promise<void> }> {
  const socket = connect(path);
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  const chunks: Buffer[] = [];
  let waiters: (() => void)[] = [];
  socket.on('data', (d: Buffer) => {
    chunks.push(d);
    for (const w of waiters) w();
  });
  const received = () => Buffer.concat(chunks);
  const waitFor = (pred: (b: Buffer) => boolean, ms: number, what: string) =>
    new Promise<void>((resolve, reject) => {
      const check = () => {
        if (!pred(received())) return;
        clearTimeout(timer);
        waiters = waiters.filter((w) => w !== check);
        resolve();
      };
      const timer = setTimeout(() => {
        waiters = waiters.filter((w) => w !== check);
        reject(new Error(`${what}: not within ${ms} ms; got ${received().length} bytes: ${JSON.stringify(received().subarray(-200).toString())}`));
      }, ms);
      waiters.push(check);
      check();
    });
  return { socket, received, waitFor };
}

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('console device in a guest', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-console-guest-'));
  }, 15 * 60_000);

  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('hvc0 and a named port over socket backends: lines both ways, 16 MiB each way, the size, bad-input resilience', async () => {
    const logs: string[] = [];
    const hvc = join(dir, 'hvc.sock');
    const data = join(dir, 'data.sock');
    const dev = consoleDevice({
      console: { kind: 'socket', path: hvc },
      ports: [{ name: 'org.vhost-ts.data', backend: { kind: 'socket', path: data } }],
      cols: 132,
      rows: 43,
      log: (m) => logs.push(m),
    });
    const socket = join(dir, 'console.sock');
    const server = await VhostUserServer.start(dev, { socketPath: socket, log: { info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m) } });
    const con = await client(hvc);
    const port = await client(data);
    const payload = Buffer.alloc(16 * MIB);
    for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE(((Math.imul(i, 2654435761) >>> 0) ^ 0x5a5a5a5a) >>> 0, i);
    const payloadMd5 = createHash('md5').update(payload).digest('hex');
    try {
      const guest = runGuest({
        setup,
        timeoutMs: 240_000,
        memoryMiB: 384,
        devices: [{ kind: 'console', socket, numQueues: 6 }],
        script: [
          'n=0; until [ -e /dev/hvc0 ] && [ -e /dev/vport0p1 ]; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done',
          'echo "RESULT ports $(ls /sys/class/virtio-ports | tr "\\n" " ")"',
          'echo "RESULT name $(cat /sys/class/virtio-ports/vport0p1/name)"',
          'echo "RESULT size $(stty -F /dev/hvc0 size 2>&1)"',
          'stty -F /dev/hvc0 raw -echo',
          'echo "hello from the guest" > /dev/hvc0',
          'read -r line < /dev/hvc0; echo "RESULT line $line"',
          // 16 MiB guest -> host on the named port, then host -> guest.
          `head -c ${16 * MIB} /dev/urandom > /tmp/out; echo "RESULT outmd5 $(md5sum < /tmp/out | cut -d" " -f1)"`,
          'cat /tmp/out > /dev/vport0p1',
          `echo "RESULT inmd5 $(head -c ${16 * MIB} /dev/vport0p1 | md5sum | cut -d" " -f1)"`,
        ].join('\n'),
        onConsoleLine: (line) => {
          if (process.env.CONSOLE_DEBUG) console.log('guest:', line);
        },
      });
      await con.waitFor((b) => b.includes('hello from the guest'), 120_000, 'the guest line on hvc0');
      con.socket.write('hello from the host\n');
      const run = await Promise.all([
        guest,
        (async () => {
          await port.waitFor((b) => b.length >= 16 * MIB, 120_000, '16 MiB from the guest');
          port.socket.write(payload);
        })(),
      ]).then(([r]) => r);
      expect(run.exitCode, run.console.slice(-3000)).toBe(0);
      expect(run.results).toContain('line hello from the host');
      expect(run.results).toContain('name org.vhost-ts.data');
      expect(run.results.find((r) => r.startsWith('size '))).toBe('size 43 132');
      const outMd5 = run.results.find((r) => r.startsWith('outmd5 '))!.split(' ')[1];
      expect(createHash('md5').update(port.received().subarray(0, 16 * MIB)).digest('hex')).toBe(outMd5);
      expect(run.results).toContain(`inmd5 ${payloadMd5}`);
      console.log(`console guest under ${run.accel}: booted in ${run.bootMs} ms; ${JSON.stringify(dev.ports())}`);
    } finally {
      con.socket.destroy();
      port.socket.destroy();
      await server.close();
      dev.close();
    }
    expect(logs.filter((e) => !/frontend disconnected|client (attached|gone)/.test(e))).toEqual([]);
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);
});
