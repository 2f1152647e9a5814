/**
 * `vhost-ts vm`: boot the test guest with vhost-ts devices served from this process, to try a device by hand.
 * Runs a script (its RESULT lines and exit code come back) or gives an interactive shell on the serial console.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chooseAccel } from '../harness/accel.js';
import type { VhostUserDevice as QemuDevice } from '../harness/qemu-args.js';
import { ensureSetup } from '../harness/setup.js';
import { guestCommand, runGuest } from '../harness/vm.js';
import { blkDevice } from '../src/devices/blk/index.js';
import { consoleDevice, parseHostEnd, type ConsoleDevice } from '../src/devices/console/index.js';
import { rngDevice } from '../src/devices/rng/index.js';
import { VhostUserServer } from '../src/vhost/index.js';
import { UsageError, wholeNumberOr } from './backend-options.js';

export const vmUsage = `usage: vhost-ts vm [--rng] [--blk IMAGE] [--console [BACKEND]] [--script FILE | --shell] [--accel kvm|tcg] [--memory MiB] [--timeout SECONDS]

Boots the test guest (built by 'vhost-ts setup') with the chosen vhost-ts devices served by this process.
  --rng              attach virtio-rng (vhost-user-rng-pci); the guest sees /dev/hwrng
  --blk IMAGE        attach IMAGE as virtio-blk (vhost-user-blk-pci, 2 queues); the guest sees /dev/vda
  --console [BACKEND] attach virtio-console with a shell on the guest's /dev/hvc0, served on BACKEND
                     (socket:PATH, pty, file:PATH; default pty, whose path is printed)
  --script FILE      run FILE (busybox sh) in the guest; its 'RESULT ...' lines and exit code come back
  --shell            an interactive shell on the serial console instead (leave with 'poweroff -f')
  --accel kvm|tcg    force the accelerator (default: KVM where it can boot a stock kernel, else TCG)
  --memory MiB       guest memory (default 512)
  --timeout SECONDS  bound on a script run (default 300)`;

const DEFAULT_SCRIPT = `echo "devices: $(ls /sys/bus/virtio/devices | tr '\\n' ' ')"
[ -e /dev/vda ] && echo "RESULT vda $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues"
[ "$(cat /sys/class/misc/hw_random/rng_current)" != none ] && echo "RESULT hwrng $(cat /sys/class/misc/hw_random/rng_current) $(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \\n')"
if [ -e /sys/class/virtio-ports/vport0p0 ]; then
  echo "RESULT hvc0 $(stty -F /dev/hvc0 size 2>&1) (rows cols)"
  echo "hello from the guest's /dev/hvc0" > /dev/hvc0
fi
true`;

const STOP_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

export async function vmMain(argv: string[]): Promise<number> {
  // --console takes an optional value, which parseArgs cannot express: supply the default.
  const args = argv.flatMap((a, i) => (a === '--console' && (i + 1 === argv.length || argv[i + 1].startsWith('--')) ? [a, 'pty'] : [a]));
  const { values } = parseArgs({
    args,
    strict: true,
    options: {
      rng: { type: 'boolean' },
      blk: { type: 'string' },
      console: { type: 'string' },
      script: { type: 'string' },
      shell: { type: 'boolean' },
      accel: { type: 'string' },
      memory: { type: 'string' },
      timeout: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(vmUsage);
    return 0;
  }
  if (values.script !== undefined && values.shell) throw new UsageError('--script and --shell exclude each other');
  if (values.accel !== undefined && values.accel !== 'kvm' && values.accel !== 'tcg') throw new UsageError('--accel takes kvm or tcg');
  const accel = values.accel as 'kvm' | 'tcg' | undefined;
  const memoryMiB = wholeNumberOr(values.memory, 512, '--memory');
  const timeoutMs = wholeNumberOr(values.timeout, 300, '--timeout') * 1000;
  const script = values.script !== undefined ? readFileSync(values.script, 'utf8') : DEFAULT_SCRIPT;

  const setup = await ensureSetup();
  const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-vm-'));
  const servers: VhostUserServer[] = [];
  const devices: QemuDevice[] = [];
  let console_: ConsoleDevice | null = null;
  try {
    if (values.console !== undefined) {
      let end;
      try {
        end = parseHostEnd(values.console);
      } catch (e) {
        throw new UsageError(`--console: ${(e as Error).message}`);
      }
      if (end.kind === 'stdio') throw new UsageError('--console stdio: the terminal already shows the serial console; use pty or socket:PATH');
      const socket = join(dir, 'console.sock');
      console_ = consoleDevice({ console: end });
      servers.push(await VhostUserServer.start(console_, { socketPath: socket }));
      devices.push({ kind: 'console', socket, numQueues: console_.numQueues });
      console.error(`vhost-ts vm: the guest's /dev/hvc0 (a shell) is on ${console_.describe(0)}`);
    }
    if (values.rng) {
      const socket = join(dir, 'rng.sock');
      servers.push(await VhostUserServer.start(rngDevice(), { socketPath: socket }));
      devices.push({ kind: 'rng', socket });
    }
    if (values.blk !== undefined) {
      const socket = join(dir, 'blk.sock');
      servers.push(await VhostUserServer.start(blkDevice({ path: values.blk, numQueues: 2 }), { socketPath: socket }));
      devices.push({ kind: 'blk', socket, numQueues: 2 });
    }
    const append = console_ ? ['harness.hvc-shell'] : [];
    if (values.shell) return await shell(setup, devices, memoryMiB, accel, append);
    // QEMU runs in a process group of its own, out of reach of signals to ours: a SIGINT, SIGTERM or SIGHUP (which
    // would end this process without its exit handlers) stops the guest, and then the servers, before we exit.
    const abort = new AbortController();
    const onSignal = (signal: NodeJS.Signals) => abort.abort(signal);
    for (const s of STOP_SIGNALS) process.on(s, onSignal);
    try {
      const run = await runGuest({
        setup,
        devices,
        append,
        script,
        timeoutMs,
        memoryMiB,
        signal: abort.signal,
        ...(accel ? { accel } : {}),
        onConsoleLine: (line) => process.stdout.write(`${line}\n`),
      });
      console.error(`vhost-ts vm: guest booted in ${run.bootMs} ms under ${run.accel}; script exited ${run.exitCode}`);
      return run.exitCode;
    } catch (e) {
      if (!abort.signal.aborted) throw e;
      const signal = abort.signal.reason as NodeJS.Signals;
      console.error(`vhost-ts vm: ${signal}: the guest was stopped`);
      return 128 + osConstants.signals[signal];
    } finally {
      for (const s of STOP_SIGNALS) process.off(s, onSignal);
    }
  } finally {
    for (const s of servers) await s.close();
    console_?.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** QEMU in the foreground with the serial console on this terminal; no script, so the guest's /init starts a shell. */
async function shell(setup: Awaited<ReturnType<typeof ensureSetup>>, devices: QemuDevice[], memoryMiB: number, accel: 'kvm' | 'tcg' | undefined, append: string[]): Promise<number> {
  const choice = chooseAccel(accel ? { force: accel } : {});
  const cmd = guestCommand(setup, { accelArgs: choice.args, memoryMiB, cpus: 2, devices, append });
  console.error(`vhost-ts vm: ${choice.accel}; a shell comes up on the console; 'poweroff -f' ends it`);
  const child = spawn(cmd.file, cmd.args, { stdio: 'inherit', env: { ...process.env, ...cmd.env } });
  // A SIGTERM or SIGHUP sent to this process alone (not the terminal's whole group) ends QEMU too.
  const forward = (signal: NodeJS.Signals) => child.kill(signal);
  for (const s of STOP_SIGNALS) process.on(s, forward);
  try {
    return await new Promise<number>((resolve) => child.once('exit', (c, signal) => resolve(c ?? 128 + (signal ? osConstants.signals[signal] : 0))));
  } finally {
    for (const s of STOP_SIGNALS) process.off(s, forward);
  }
}
