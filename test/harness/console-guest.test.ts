// The console device serving a real guest through QEMU's vhost-user-test-device-pci (virtio-id 3) and the guest
// kernel's virtio_console driver: the console port (hvc0) and a named port, both on socket backends.
import { createHash } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { featureBitScript, RING_PACKED_BIT } from '../../harness/guest-features.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { consoleDevice } from '../../src/devices/console/index.js';
import { setWindowSize } from '../../src/sys/index.js';
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

  it('hvc0 and a named port over socket backends: lines both ways, 16 MiB each way, the size, no warning logged', async () => {
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
    const abort = new AbortController();
    let guest: ReturnType<typeof runGuest> | undefined;
    try {
      guest = runGuest({
        setup,
        signal: abort.signal,
        timeoutMs: 240_000,
        memoryMiB: 384,
        devices: [{ kind: 'console', socket, numQueues: 6 }],
        script: [
          'n=0; until [ -e /dev/hvc0 ] && [ -e /dev/vport0p1 ]; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done',
          'echo "RESULT ports $(ls /sys/class/virtio-ports | tr "\\n" " ")"',
          // The generic vhost-user device passes our offer of packed rings through; the guest takes it.
          featureBitScript(3, RING_PACKED_BIT, 'packed'),
          'echo "RESULT name $(cat /sys/class/virtio-ports/vport0p1/name)"',
          'echo "RESULT size $(stty -F /dev/hvc0 size 2>&1)"',
          // Held open on fd 3 throughout: a tty's last close throws away input that has not been read yet.
          'exec 3<>/dev/hvc0',
          'stty raw -echo <&3',
          'echo "hello from the guest" >&3',
          'read -r line <&3; echo "RESULT line $line"',
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
      expect(run.results).toContain('packed 1');
      expect(run.results.find((r) => r.startsWith('size '))).toBe('size 43 132');
      const outMd5 = run.results.find((r) => r.startsWith('outmd5 '))!.split(' ')[1];
      expect(createHash('md5').update(port.received().subarray(0, 16 * MIB)).digest('hex')).toBe(outMd5);
      expect(run.results).toContain(`inmd5 ${payloadMd5}`);
      console.log(`console guest under ${run.accel}: booted in ${run.bootMs} ms; ${JSON.stringify(dev.ports())}`);
    } finally {
      abort.abort(); // a failed host-side step leaves the guest running otherwise
      await guest?.catch(() => {});
      con.socket.destroy();
      port.socket.destroy();
      await server.close();
      dev.close();
    }
    expect(logs.filter((e) => !/frontend disconnected|client (attached|gone)/.test(e))).toEqual([]);
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);

  it('a root login on hvc0 through the socket backend; a named port closed, reopened and reconnected loses nothing', async () => {
    const logs: string[] = [];
    const hvc = join(dir, 'login.sock');
    const data = join(dir, 'data2.sock');
    const dev = consoleDevice({ console: { kind: 'socket', path: hvc }, ports: [{ name: 'org.vhost-ts.data', backend: { kind: 'socket', path: data } }], log: (m) => logs.push(m) });
    const socket = join(dir, 'console2.sock');
    // Split rings here (the other tests run packed): QEMU's generic device takes whatever we offer.
    const server = await VhostUserServer.start(dev, { socketPath: socket, packedRings: false, log: { info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m) } });
    const con = await client(hvc);
    let port = await client(data);
    const steps: Promise<void>[] = [];
    const abort = new AbortController();
    let guest: ReturnType<typeof runGuest> | undefined;
    try {
      guest = runGuest({
        setup,
        signal: abort.signal,
        timeoutMs: 240_000,
        devices: [{ kind: 'console', socket, numQueues: 4 + 2 }],
        script: [
          'n=0; until [ -e /dev/hvc0 ] && [ -e /dev/vport0p1 ]; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done',
          // A passwordless root, and busybox's getty and login on the virtio console, as a person would meet them.
          featureBitScript(3, RING_PACKED_BIT, 'packed'),
          "echo 'root::0:0:root:/root:/bin/sh' > /etc/passwd",
          'setsid getty 0 hvc0 &',
          // The named port: open, write, close; the host client goes; reopen, write again (it waits for a client
          // or lands in the backlog), and read the new client's line on the same open port. A read while the host
          // side is closed is end-of-file (virtio-console's rule): retry. The port stays open meanwhile, because
          // Linux drops what a port had not read yet when it is closed.
          'exec 4<>/dev/vport0p1; echo part1 >&4; exec 4>&-',
          'echo "RESULT step wrote1"',
          'exec 4<>/dev/vport0p1; echo part2 >&4',
          'echo "RESULT step wrote2"',
          'n=0; back=; until [ -n "$back" ] || [ $n -gt 300 ]; do read -r back <&4 || sleep 0.1; n=$((n+1)); done',
          'exec 4>&-',
          'echo "RESULT back $back"',
          'n=0; until [ -e /tmp/logged-in ]; do n=$((n+1)); [ $n -gt 600 ] && break; sleep 0.1; done',
          'echo "RESULT login $(cat /tmp/logged-in)"',
        ].join('\n'),
        onConsoleLine: (line) => {
          if (process.env.CONSOLE_DEBUG) console.log('guest:', line);
        },
      });
      // The named port's client: part1 arrives, then it hangs up; a new client gets part2 whichever way the race
      // goes (the guest blocked until a client attached, or the bytes waited in the backlog), then sends back.
      steps.push(
        (async () => {
          await port.waitFor((b) => b.toString().startsWith('part1\n'), 120_000, 'part1');
          port.socket.destroy();
          // The guest may have reopened the port and written part2 before this client hung up: then the old client
          // has it, and the two clients together must hold each line exactly once.
          const early = port.received().subarray('part1\n'.length).toString();
          port = await client(data);
          await port.waitFor((b) => early + b.toString() === 'part2\n', 120_000, `part2 after the reconnect (the old client had ${JSON.stringify(early)})`);
          port.socket.write('back\n');
        })(),
      );
      // The login, typed on the socket as a person would.
      steps.push(
        (async () => {
          await con.waitFor((b) => /login: $/.test(b.toString()), 120_000, 'the login prompt on hvc0');
          con.socket.write('root\n');
          // ash asks the terminal for its cursor position (ESC [6n) after its prompt.
          await con.waitFor((b) => /# (\x1b\[6n)?$/.test(b.toString()), 60_000, 'a root shell prompt');
          con.socket.write('echo LOGIN-$((6*7)) $(id -u) $(tty) > /tmp/logged-in; echo DONE-$((1+1))\n');
          await con.waitFor((b) => b.toString().includes('DONE-2'), 60_000, 'the command output');
        })(),
      );
      const [run] = await Promise.all([guest, ...steps]);
      expect(run.exitCode, run.console.slice(-3000)).toBe(0);
      expect(run.results).toContain('packed 0');
      expect(run.results).toContain('back back');
      expect(run.results).toContain('login LOGIN-42 0 /dev/hvc0');
    } finally {
      abort.abort(); // a failed host-side step leaves the guest running otherwise
      await guest?.catch(() => {});
      con.socket.destroy();
      port.socket.destroy();
      await server.close();
      dev.close();
    }
    expect(logs.filter((e) => !/frontend disconnected|client (attached|gone)|delivered from the backlog/.test(e))).toEqual([]);
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);

  it('a pty console: the guest gets --cols/--rows, then the size the terminal on the pty sets', async () => {
    const logs: string[] = [];
    const dev = consoleDevice({ console: { kind: 'pty' }, cols: 100, rows: 30, log: (m) => logs.push(m) });
    const path = dev.describe(0).replace(/^pty /, '');
    const slave = openSync(path, 'r+'); // the user's terminal program
    const socket = join(dir, 'console3.sock');
    const server = await VhostUserServer.start(dev, { socketPath: socket, log: { info() {}, warn: (m) => logs.push(m), error: (m) => logs.push(m) } });
    try {
      let resized = false;
      const run = await runGuest({
        setup,
        timeoutMs: 240_000,
        devices: [{ kind: 'console', socket, numQueues: 4 }],
        script: [
          'n=0; until [ -e /dev/hvc0 ]; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done',
          'echo "RESULT size1 $(stty -F /dev/hvc0 size)"',
          'n=0; until [ "$(stty -F /dev/hvc0 size)" = "50 120" ]; do n=$((n+1)); [ $n -gt 300 ] && break; sleep 0.1; done',
          'echo "RESULT size2 $(stty -F /dev/hvc0 size)"',
        ].join('\n'),
        onConsoleLine: (line) => {
          if (line.startsWith('RESULT size1') && !resized) {
            resized = true;
            setWindowSize(slave, { cols: 120, rows: 50 }); // what xterm or screen does when its window changes
          }
        },
      });
      expect(run.exitCode, run.console.slice(-3000)).toBe(0);
      expect(run.results).toContain('size1 30 100');
      expect(run.results).toContain('size2 50 120');
    } finally {
      await server.close();
      dev.close();
      closeSync(slave);
    }
    expect(logs.filter((e) => !/frontend disconnected|client (attached|gone)/.test(e))).toEqual([]);
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);
});
