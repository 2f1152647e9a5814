// Console ports added and removed at run time, in a booted guest: `vhost-ts console --control` serves QEMU 11.1's
// vhost-user-test-device-pci (virtio-id 3) and `vhost-ts ctl PATH console-add-port NAME socket:PATH` adds a named
// port while the guest runs. The guest's virtio_console driver creates it (/sys/class/virtio-ports/vportNpM/name
// says the name), the guest writes to /dev/vportNpM and the socket's client receives it (and answers back);
// `console-remove-port` takes it away again and the guest's port goes. On packed rings (what the guest takes by
// default) the removed number stays taken until a reset; on split rings (--no-packed) a later add reuses it.
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { featureBitScript, RING_PACKED_BIT } from '../../harness/guest-features.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { startBackend, vhostTsBin, type BackendProcess } from '../helpers/backend-process.js';

const run = promisify(execFile);

/** `vhost-ts ctl CTL ARGS`: its output, or its error message and exit status (bounded). */
async function ctl(path: string, ...args: string[]): Promise<{ code: number; out: string }> {
  try {
    const { stdout } = await run(process.execPath, [vhostTsBin, 'ctl', path, ...args], { timeout: 20_000 });
    return { code: 0, out: stdout.trim() };
  } catch (e) {
    const err = e as { code?: number; stderr?: string };
    return { code: typeof err.code === 'number' ? err.code : -1, out: String(err.stderr ?? e).trim() };
  }
}

/** A client on a port's socket that keeps what it receives. */
async function client(path: string) {
  const socket: Socket = connect(path);
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  socket.on('error', () => {});
  let received = '';
  let waiters: (() => void)[] = [];
  socket.on('data', (d: Buffer) => {
    received += d.toString();
    for (const w of waiters) w();
  });
  const ended = new Promise<void>((resolve) => socket.once('end', () => resolve()));
  const waitFor = (text: string, ms: number) =>
    new Promise<void>((resolve, reject) => {
      const check = () => {
        if (!received.includes(text)) return;
        clearTimeout(timer);
        waiters = waiters.filter((w) => w !== check);
        resolve();
      };
      const timer = setTimeout(() => {
        waiters = waiters.filter((w) => w !== check);
        reject(new Error(`"${text}" not on ${path} within ${ms} ms; got ${JSON.stringify(received)}`));
      }, ms);
      waiters.push(check);
      check();
    });
  return { socket, received: () => received, waitFor, ended };
}

/**
 * Guest script lines: wait until a port named NAME exists and set $VAR to its vportNpM (bounded, 60 s), report it
 * and its number.
 */
const waitForPort = (name: string, v: string): string[] => [
  `${v}=; n=0; until [ -n "$${v}" ] || [ $n -gt 600 ]; do for f in /sys/class/virtio-ports/*/name; do [ "$(cat $f 2>/dev/null)" = ${name} ] && ${v}=$(basename $(dirname $f)); done; [ -n "$${v}" ] || sleep 0.1; n=$((n+1)); done`,
  `echo "RESULT port ${name} $${v} $(ls /dev/$${v} 2>&1)"`,
];
/** Wait (bounded) until vportNpM is gone from sysfs, and report whether it and its /dev node are. */
const waitForGone = (v: string): string[] => [
  `n=0; while [ -e /sys/class/virtio-ports/$${v} ] && [ $n -lt 600 ]; do n=$((n+1)); sleep 0.1; done`,
  `echo "RESULT gone $${v} sysfs:$([ -e /sys/class/virtio-ports/$${v} ] && echo present || echo absent) dev:$([ -e /dev/$${v} ] && echo present || echo absent)"`,
];
/** Write a line to the port and read one back, on one open (bounded: the host answers). */
const talk = (v: string, line: string): string[] => [
  `exec 3<>/dev/$${v}; echo "${line}" >&3`,
  `n=0; back=; until [ -n "$back" ] || [ $n -gt 300 ]; do read -r back <&3 || sleep 0.1; n=$((n+1)); done; exec 3>&-`,
  `echo "RESULT back $back"`,
];

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('console ports added and removed at run time, in a guest', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-console-ports-guest-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /**
   * `vhost-ts console` with the console on a file and room for named ports, its control API on a socket; the guest
   * runs `script` and at each `RESULT step NAME` line `steps[NAME](ctl)` runs on the host (the guest waits for its
   * effect by itself, bounded). A failing step stops the guest and is the test's error.
   */
  async function withGuest(o: { tag: string; maxPorts: number; split: boolean; script: string[]; steps: Record<string, (ctlPath: string) => Promise<void>> }) {
    const sock = join(dir, `${o.tag}.sock`);
    const ctlPath = join(dir, `${o.tag}.ctl`);
    const args = ['console', '--socket-path', sock, '--console', `file:${join(dir, `${o.tag}-hvc0.log`)}`, '--max-ports', String(o.maxPorts), '--control', ctlPath, ...(o.split ? ['--no-packed'] : [])];
    const backend: BackendProcess = await startBackend([vhostTsBin, ...args], (l) => l.includes('control API on'), 30_000);
    const abort = new AbortController();
    const failures: unknown[] = [];
    const running: Promise<void>[] = [];
    let guest: ReturnType<typeof runGuest> | undefined;
    try {
      guest = runGuest({
        setup,
        signal: abort.signal,
        timeoutMs: 240_000,
        devices: [{ kind: 'console', socket: sock, numQueues: 2 * o.maxPorts + 2 }],
        script: ['n=0; until [ -e /dev/hvc0 ]; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done', featureBitScript(3, RING_PACKED_BIT, 'packed'), ...o.script].join('\n'),
        onConsoleLine: (line) => {
          if (process.env.CONSOLE_DEBUG) console.log('guest:', line);
          const step = /^RESULT step (\S+)/.exec(line)?.[1];
          const fn = step ? o.steps[step] : undefined;
          if (fn) {
            running.push(
              fn(ctlPath).catch((e: unknown) => {
                failures.push(e);
                abort.abort();
              }),
            );
          }
        },
      });
      const result = await guest.catch((e: unknown) => e as Error);
      await Promise.all(running);
      if (failures.length > 0) throw failures[0];
      if (result instanceof Error) throw result;
      return { run: result, log: backend.log() };
    } finally {
      abort.abort();
      await guest?.catch(() => {});
      await backend.kill();
    }
  }

  it('packed rings: a port added through vhost-ts ctl appears in the guest, carries data both ways, and goes when removed', async () => {
    const port = join(dir, 'added.sock');
    const replies: Record<string, { code: number; out: string }> = {};
    let c: Awaited<ReturnType<typeof client>> | undefined;
    try {
      const { run: r, log } = await withGuest({
        tag: 'packed',
        maxPorts: 3,
        split: false,
        script: [
          'echo "RESULT named-before $(cat /sys/class/virtio-ports/*/name 2>/dev/null | wc -l)"',
          'echo "RESULT step add"',
          ...waitForPort('org.vhost-ts.added', 'p'),
          ...talk('p', 'hello through an added port'),
          'echo "RESULT step remove"',
          ...waitForGone('p'),
          'echo "RESULT step again"',
          ...waitForPort('org.vhost-ts.second', 'q'),
          ...waitForGone('q'),
        ],
        steps: {
          add: async (path) => {
            replies.add = await ctl(path, 'console-add-port', 'org.vhost-ts.added', `socket:${port}`);
            c = await client(port);
            await c.waitFor('hello through an added port\n', 120_000);
            c.socket.write('answer from the host\n');
          },
          remove: async (path) => {
            replies.remove = await ctl(path, 'console-remove-port', 'org.vhost-ts.added', '--json');
            replies.removeAgain = await ctl(path, 'console-remove-port', 'org.vhost-ts.added');
            await c!.ended; // the backend closed the port's socket
          },
          again: async (path) => {
            // Port 1 was removed on packed rings: the next add takes port 2, and a third finds none free. Then the
            // second goes too, which the guest waits for.
            replies.second = await ctl(path, 'console-add-port', 'org.vhost-ts.second', 'pty');
            replies.full = await ctl(path, 'console-add-port', 'org.vhost-ts.third', `file:${join(dir, 'third.log')}`);
            replies.stdio = await ctl(path, 'console-add-port', 'org.vhost-ts.tty', 'stdio');
            replies.removeSecond = await ctl(path, 'console-remove-port', 'org.vhost-ts.second');
          },
        },
      });
      expect(r.exitCode, r.console.slice(-3000)).toBe(0);
      expect(r.results).toContain('packed 1');
      expect(r.results).toContain('named-before 0');
      expect(replies.add).toEqual({ code: 0, out: `port 1 (org.vhost-ts.added): socket ${port}; in the guest /dev/vport*p1, /sys/class/virtio-ports/vport*p1/name` });
      // The guest's driver made the port from DEVICE_ADD and named it from PORT_NAME: vport<N>p1, with its /dev node.
      const added = r.results.find((l) => l.startsWith('port org.vhost-ts.added '))!;
      expect(added).toMatch(/^port org\.vhost-ts\.added (vport\d+p1) \/dev\/\1$/);
      expect(c!.received()).toBe('hello through an added port\n');
      expect(r.results).toContain('back answer from the host');
      expect(replies.remove).toEqual({ code: 0, out: JSON.stringify({ done: {}, result: 'done' }, null, 2) });
      // (The guest may already have asked for the next port by then: the list of named ports varies.)
      expect(replies.removeAgain.code).toBe(1);
      expect(replies.removeAgain.out).toMatch(/^vhost-ts ctl: no port named "org\.vhost-ts\.added"; this console's named ports: /);
      const vport = /(vport\d+p1)/.exec(added)![1];
      expect(r.results).toContain(`gone ${vport} sysfs:absent dev:absent`);
      expect(replies.second.code).toBe(0);
      expect(replies.second.out).toMatch(/^port 2 \(org\.vhost-ts\.second\): pty \/dev\/pts\/\d+;/);
      const vport2 = /^port org\.vhost-ts\.second (vport\d+p2) \/dev\/\1$/.exec(r.results.find((l) => l.startsWith('port org.vhost-ts.second ')) ?? '')?.[1];
      expect(vport2).toBeDefined();
      expect(replies.removeSecond).toEqual({ code: 0, out: 'done' });
      expect(r.results).toContain(`gone ${vport2} sysfs:absent dev:absent`);
      expect(replies.full.code).toBe(1);
      expect(replies.full.out).toMatch(/^vhost-ts ctl: no free port number for "org.vhost-ts.third": max_nr_ports is 3 .* larger --max-ports\. Port 1 was removed, but on packed rings its number is free again only once the guest's driver resets the device/);
      expect(replies.stdio).toMatchObject({ code: 1, out: expect.stringMatching(/^vhost-ts ctl: stdio cannot be a backend added at run time/) });
      // The backend's own account, and nothing the guest sent was taken for hostile.
      expect(log).toMatch(/port 1 \(org\.vhost-ts\.added\): socket .*: added/);
      expect(log).toMatch(/port 1 \(org\.vhost-ts\.added\): removed/);
      expect(log).not.toMatch(/ignored from the guest|queue stopped/);
    } finally {
      c?.socket.destroy();
    }
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);

  it('split rings (--no-packed): the removed port\'s number is reused by the next add, data both ways on its queues', async () => {
    const first = join(dir, 'first.sock');
    const second = join(dir, 'second.sock');
    const replies: Record<string, { code: number; out: string }> = {};
    const clients: Awaited<ReturnType<typeof client>>[] = [];
    try {
      const { run: r, log } = await withGuest({
        tag: 'split',
        maxPorts: 2,
        split: true,
        script: [
          'echo "RESULT step add"',
          ...waitForPort('org.vhost-ts.first', 'p'),
          ...talk('p', 'to the first'),
          'echo "RESULT step replace"',
          ...waitForGone('p'),
          ...waitForPort('org.vhost-ts.second', 'q'),
          ...talk('q', 'to the second'),
        ],
        steps: {
          add: async (path) => {
            replies.first = await ctl(path, 'console-add-port', 'org.vhost-ts.first', `socket:${first}`);
            const c = await client(first);
            clients.push(c);
            await c.waitFor('to the first\n', 120_000);
            c.socket.write('back from the first\n');
          },
          replace: async (path) => {
            replies.remove = await ctl(path, 'console-remove-port', 'org.vhost-ts.first');
            replies.second = await ctl(path, 'console-add-port', 'org.vhost-ts.second', `socket:${second}`);
            const c = await client(second);
            clients.push(c);
            await c.waitFor('to the second\n', 120_000);
            c.socket.write('back from the second\n');
          },
        },
      });
      expect(r.exitCode, r.console.slice(-3000)).toBe(0);
      expect(r.results).toContain('packed 0');
      expect(replies.first.out).toMatch(/^port 1 \(org\.vhost-ts\.first\)/);
      expect(replies.remove).toEqual({ code: 0, out: 'done' });
      expect(replies.second.out).toMatch(/^port 1 \(org\.vhost-ts\.second\)/); // the same number again
      const p = /^port org\.vhost-ts\.first (vport\d+p1) /.exec(r.results.find((l) => l.startsWith('port org.vhost-ts.first '))!)![1];
      expect(r.results).toContain(`gone ${p} sysfs:absent dev:absent`);
      expect(r.results).toContain(`port org.vhost-ts.second ${p} /dev/${p}`);
      expect(r.results.filter((l) => l.startsWith('back '))).toEqual(['back back from the first', 'back back from the second']);
      expect(clients.map((c) => c.received())).toEqual(['to the first\n', 'to the second\n']);
      expect(log).not.toMatch(/ignored from the guest|queue stopped/);
    } finally {
      for (const c of clients) c.socket.destroy();
    }
    expect(liveQemuPids()).toEqual([]);
  }, 300_000);
});
