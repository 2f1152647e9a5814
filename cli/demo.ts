/**
 * `vhost-ts demo` (`npm start`): a full Debian guest whose disk, network and console are all served by vhost-ts,
 * in this one process. Interactive, the guest's console is this terminal (Ctrl-] leaves); with --exec it logs in
 * on the console as a person would, runs the commands, prints their output and exits with their status.
 *
 * What it starts: QEMU (KVM where it can boot a stock kernel, else TCG); virtio-blk serving a fresh sparse copy of
 * the cached Debian image (so the cache stays pristine; the copy is deleted at the end); virtio-net on the built-in
 * switch with a host tap as its uplink, 10.0.77.1 on the host and 10.0.77.2 in the guest; virtio-console port 0
 * (the guest's getty on hvc0). On every way out (detach, the guest powering off, SIGINT, SIGTERM, SIGHUP) the guest is
 * shut down and every process, socket, tap and file it made is gone; only the cache stays.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chooseAccel, type AccelChoice } from '../harness/accel.js';
import { ensureHostTools, MissingPackagesError } from '../harness/host-packages.js';
import { run } from '../harness/host-tools.js';
import { machineArgs, type VhostUserDevice as QemuDevice } from '../harness/qemu-args.js';
import { qemuCommand } from '../harness/qemu-install.js';
import { qmp } from '../harness/qmp.js';
import { ensureSetup } from '../harness/setup.js';
import { blkDevice } from '../src/devices/blk/index.js';
import { consoleDevice, type ConsoleDevice } from '../src/devices/console/index.js';
import { netDevice } from '../src/devices/net/index.js';
import { parseMac } from '../src/devices/net/spec.js';
import { joinSwitch } from '../src/devices/net/switch.js';
import { VhostUserServer, type Logger } from '../src/vhost/index.js';
import { UsageError, wholeNumberOr } from './backend-options.js';
import { ConsoleShell } from './demo-shell.js';

export const demoUsage = `usage: vhost-ts demo [--exec 'COMMANDS'] [--net switch|none|tap:NAME] [--accel kvm|tcg] [--memory MiB] [--cpus N]

Boots a full Debian (provisioned on first use: QEMU 11 and a Debian 12 image, cached in ~/.cache/vhost-ts) with
its disk, network and console all served by vhost-ts in this process.
  --exec 'COMMANDS'  log in as root on the virtio console, run COMMANDS, print their output, power off, exit
                     with their status (no terminal needed)
  --net switch       (default) the built-in switch with a host tap uplink: host 10.0.77.1, guest 10.0.77.2
  --net tap:NAME     the guest's NIC straight on host tap NAME (you configure the host side)
  --net none         no network
  --accel kvm|tcg    force the accelerator (default: KVM where it can boot a stock kernel, else TCG)
  --memory MiB       guest memory (default 1024)
  --cpus N           guest CPUs (default 2)
Interactive, the guest's console (hvc0) is this terminal: log in as root (no password); Ctrl-] leaves and shuts
the guest down.`;

const HOST_IP = '10.0.77.1';
const GUEST_IP = '10.0.77.2';
const PREFIX = 24;
const GUEST_MAC = '52:54:00:76:74:02';
/** From QEMU's start to the login prompt, and then to the commands' end: TCG reaches the hvc0 login in about 16 s here. */
const BOOT_TIMEOUT_MS = 10 * 60_000;
const EXEC_TIMEOUT_MS = 10 * 60_000;
const SHUTDOWN_MS = 60_000;

type NetChoice = { kind: 'none' } | { kind: 'switch' } | { kind: 'tap'; name: string };

export async function demoMain(argv: string[]): Promise<number> {
  // A terminal that hung up (SIGHUP) fails every later write with EIO; the clean-up still has to run to its end.
  for (const out of [process.stdout, process.stderr]) out.on('error', () => {});
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      exec: { type: 'string' },
      net: { type: 'string' },
      accel: { type: 'string' },
      memory: { type: 'string' },
      cpus: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(demoUsage);
    return 0;
  }
  const net = parseNet(values.net ?? 'switch');
  if (values.accel !== undefined && values.accel !== 'kvm' && values.accel !== 'tcg') throw new UsageError('--accel takes kvm or tcg');
  const memoryMiB = wholeNumberOr(values.memory, 1024, '--memory');
  const cpus = wholeNumberOr(values.cpus, 2, '--cpus');
  const exec = values.exec;
  const say = (m: string) => process.stderr.write(`vhost-ts demo: ${m}\n`);

  try {
    await ensureHostTools(['debootstrap', 'mke2fs', 'chroot', 'ip', 'apt-get', 'dpkg-deb'], 'to provision QEMU 11 and the Debian image, and for the host side of the network', say);
  } catch (e) {
    if (!(e instanceof MissingPackagesError)) throw e;
    say(`some host packages are missing and this is not root. Run as root:\n  ${e.command}\nthen npm start again.`);
    return 1;
  }
  const setup = await ensureSetup({ full: true });
  const rootfs = setup.rootfs!;
  const accel = chooseAccel(values.accel ? { force: values.accel as 'kvm' | 'tcg' } : {});

  const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-demo-'));
  const servers: VhostUserServer[] = [];
  let consoleDev: ConsoleDevice | null = null;
  let uplink: { close(): void } | null = null;
  let qemu: ChildProcess | null = null;
  const logs: string[] = [];
  // The backends' own messages go to a list while the console owns the terminal; shown if something fails.
  const log: Logger = { info: (m) => logs.push(m), warn: (m) => logs.push(m), error: (m) => logs.push(m) };
  try {
    const disk = join(dir, 'root.ext4');
    say(`copying the Debian image (${(rootfs.sizeBytes / 2 ** 20).toFixed(0)} MiB used, sparse) so the cached one stays pristine ...`);
    await run('cp', ['--sparse=always', '--reflink=auto', rootfs.image, disk], { timeoutMs: 10 * 60_000 });

    const devices: QemuDevice[] = [];
    const blkSock = join(dir, 'blk.sock');
    servers.push(await VhostUserServer.start(blkDevice({ path: disk, numQueues: 2 }), { socketPath: blkSock, log }));
    devices.push({ kind: 'blk', socket: blkSock, numQueues: 2 });

    let netLine = 'no network (--net none)';
    if (net.kind !== 'none') {
      const netSock = join(dir, 'net.sock');
      if (net.kind === 'switch') {
        const tap = freeTapName();
        const sw = joinSwitch(`demo-${process.pid}`);
        sw.attachUplink(tap);
        uplink = sw;
        await run('ip', ['addr', 'add', `${HOST_IP}/${PREFIX}`, 'dev', tap], { timeoutMs: 10_000 });
        await run('ip', ['link', 'set', tap, 'up'], { timeoutMs: 10_000 });
        servers.push(await VhostUserServer.start(netDevice({ backend: { kind: 'switch', name: `demo-${process.pid}` }, mac: parseMac(GUEST_MAC) }), { socketPath: netSock, log }));
        netLine = `built-in switch, uplink tap ${tap} = ${HOST_IP}/${PREFIX} on this host; the guest is ${GUEST_IP} (ping ${GUEST_IP})`;
      } else {
        servers.push(await VhostUserServer.start(netDevice({ backend: { kind: 'tap', name: net.name }, mac: parseMac(GUEST_MAC) }), { socketPath: netSock, log }));
        netLine = `host tap ${net.name} (configure its host side); the guest is ${GUEST_IP}/${PREFIX}`;
      }
      devices.push({ kind: 'net', socket: netSock, mac: GUEST_MAC });
    }

    let detach: () => void = () => {};
    const detached = new Promise<void>((resolve) => (detach = resolve));
    const hvcSock = join(dir, 'hvc0.sock');
    consoleDev = consoleDevice({
      console: exec !== undefined ? { kind: 'socket', path: hvcSock } : { kind: 'stdio' },
      onDetach: () => detach(),
      log: (m) => logs.push(m),
    });
    const conSock = join(dir, 'console.sock');
    servers.push(await VhostUserServer.start(consoleDev, { socketPath: conSock, log }));
    devices.push({ kind: 'console', socket: conSock, numQueues: consoleDev.numQueues });

    const qmpSock = join(dir, 'qmp.sock');
    const serialLog = join(dir, 'serial.log');
    const cmd = qemuCommand(
      setup.qemu,
      'qemu-system-x86_64',
      machineArgs({
        kernel: setup.guest.kernel,
        initrd: setup.guest.initrd,
        // The last console= is /dev/console: systemd's messages and the getty go to hvc0, the kernel's also to ttyS0.
        append: [`harness.root=/dev/vda`, 'console=hvc0', ...(net.kind !== 'none' ? [`vhost_ts.ip=${GUEST_IP}/${PREFIX}`, 'net.ifnames=0'] : [])],
        memoryMiB,
        cpus,
        accelArgs: accel.args,
        serial: { to: 'file', path: serialLog },
        devices,
        extra: ['-qmp', `unix:${qmpSock},server=on,wait=off`],
      }),
    );
    banner(say, accel, { blkSock, conSock, net: netLine, exec: exec !== undefined, dir });
    const started = Date.now();
    qemu = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...cmd.env } });
    let qemuStderr = '';
    qemu.stderr!.on('data', (d) => (qemuStderr = (qemuStderr + d).slice(-8192)));
    const qemuExit = new Promise<number | null>((resolve) => qemu!.once('exit', (code) => resolve(code)));

    const stopSignal = new Promise<string>((resolve) => {
      // SIGHUP: the terminal went away (its window closed, the ssh session dropped); clean up as for the others.
      // on, not once: a hang-up comes twice (the shell passes it on, the kernel sends its own), and a signal with
      // no listener left kills the process in the middle of its clean-up.
      for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => resolve(sig));
    });

    if (exec !== undefined) {
      const shell = await ConsoleShell.connect(hvcSock);
      try {
        const work = (async () => {
          await shell.login('root', BOOT_TIMEOUT_MS);
          say(`logged in on hvc0 after ${((Date.now() - started) / 1000).toFixed(1)} s; running the commands`);
          const r = await shell.run(exec, EXEC_TIMEOUT_MS);
          process.stdout.write(r.output);
          if (r.output.length > 0 && !r.output.endsWith('\n')) process.stdout.write('\n');
          shell.type('poweroff\r');
          return r.status;
        })();
        const outcome = await Promise.race([
          work.then((status) => ({ status })),
          qemuExit.then((code) => ({ error: `QEMU exited (${code}) before the commands finished:\n${qemuStderr}` })),
          stopSignal.then((sig) => ({ error: `stopped by ${sig}` })),
        ]);
        if ('error' in outcome) throw new Error(outcome.error);
        await shutdown(qemu, qmpSock, say, false);
        say(`guest powered off; ${((Date.now() - started) / 1000).toFixed(1)} s in all`);
        return outcome.status;
      } finally {
        shell.close();
      }
    }

    const why = await Promise.race([qemuExit.then(() => 'the guest powered off'), detached.then(() => 'detached (Ctrl-])'), stopSignal]);
    consoleDev.close(); // the terminal back to normal before we print
    say(`${why}; shutting down`);
    await shutdown(qemu, qmpSock, say, why !== 'the guest powered off');
    return 0;
  } catch (e) {
    if (logs.length > 0) say(`backend log:\n  ${logs.slice(-20).join('\n  ')}`);
    throw e;
  } finally {
    // Every step, whatever the one before it threw: a failed step must not leave a process, tap or file behind.
    const steps: [string, () => unknown][] = [
      ['stop QEMU', () => qemu && shutdown(qemu, join(dir, 'qmp.sock'), () => {}, true)],
      ['close the console', () => consoleDev?.close()],
      ...servers.map((s): [string, () => unknown] => [`close ${s.endpoint}`, () => s.close()]),
      ['remove the uplink tap', () => uplink?.close()], // the tap goes with its fd
      [`remove ${dir}`, () => rmSync(dir, { recursive: true, force: true })],
    ];
    for (const [what, step] of steps) {
      try {
        await step();
      } catch (e) {
        say(`could not ${what}: ${(e as Error).message}`);
      }
    }
  }
}

function banner(say: (m: string) => void, accel: AccelChoice, d: { blkSock: string; conSock: string; net: string; exec: boolean; dir: string }): void {
  say(`starting a Debian guest under ${accel.accel.toUpperCase()} (${accel.reason})`);
  say(`  disk     vhost-ts blk on ${d.blkSock}: a fresh copy of the cached image, deleted at exit`);
  say(`  network  ${d.net}`);
  say(`  console  vhost-ts console on ${d.conSock}: ${d.exec ? 'logging in as root through its socket backend' : "this terminal (log in as root, no password; Ctrl-] leaves)"}`);
  say(`  files    ${d.dir} (sockets, the disk copy, the serial log), removed at exit`);
}

/** Ask the guest to power off (ACPI), then QEMU to quit, then kill it: every step bounded. */
async function shutdown(qemu: ChildProcess, qmpSock: string, say: (m: string) => void, askGuest: boolean): Promise<void> {
  const gone = () => qemu.exitCode !== null || qemu.signalCode !== null;
  const wait = (ms: number) =>
    gone()
      ? Promise.resolve(true)
      : new Promise<boolean>((resolve) => {
          const t = setTimeout(() => resolve(false), ms);
          qemu.once('exit', () => {
            clearTimeout(t);
            resolve(true);
          });
        });
  if (gone()) return;
  if (askGuest && existsSync(qmpSock)) {
    try {
      await qmp(qmpSock, [{ execute: 'system_powerdown' }]);
      say('asked the guest to power off (ACPI) ...');
    } catch {
      // QMP gone: fall through to quitting QEMU
    }
  }
  if (await wait(SHUTDOWN_MS)) return;
  say('the guest did not power off in time: stopping QEMU');
  try {
    process.kill(qemu.pid!, 'SIGTERM');
  } catch {
    return;
  }
  if (await wait(5000)) return;
  try {
    process.kill(qemu.pid!, 'SIGKILL');
  } catch {
    return;
  }
  await wait(5000);
}

/** The first vtsdemoN not in use on this host. */
function freeTapName(): string {
  for (let i = 0; i < 100; i++) if (!existsSync(`/sys/class/net/vtsdemo${i}`)) return `vtsdemo${i}`;
  throw new Error('vtsdemo0 to vtsdemo99 are all in use');
}

function parseNet(text: string): NetChoice {
  if (text === 'none' || text === 'switch') return { kind: text };
  const m = /^tap:([\w.-]{1,15})$/.exec(text);
  if (m) return { kind: 'tap', name: m[1] };
  throw new UsageError(`--net takes switch, none or tap:NAME, not "${text}"`);
}
