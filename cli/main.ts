/**
 * vhost-ts command line: one subcommand per device, each a vhost-user backend program, plus tools.
 */
import { parseArgs } from 'node:util';
import { blkDevice } from '../src/devices/blk/index.js';
import { consoleCommand } from './console.js';
import { netCommand } from './net.js';
import { rngDevice } from '../src/devices/rng/index.js';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { loadStateFile, saveStateFile } from '../src/vhost/device-state.js';
import { VhostUserServer, type DeviceStateHooks, type VhostUserDevice } from '../src/vhost/index.js';
import { setupMain } from '../harness/setup.js';
import { backendOptions, backendUsage, pollSetting, serveOptionsOf, UsageError, wholeNumber, type DeviceCommand, type Values } from './backend-options.js';
import { ControlServer } from '../src/control/index.js';
import { ctlMain } from './ctl.js';
import { demoMain } from './demo.js';
import { vmMain } from './vm.js';

const usage = `usage: vhost-ts <command> [options]

devices (vhost-user backends):
  rng        virtio-rng: random numbers for the guest (QEMU: -device vhost-user-rng-pci)
  blk        virtio-blk: a raw image or block device (QEMU: -device vhost-user-blk-pci; libblkio)
  net        virtio-net: tap, built-in switch, or sink/source for benchmarks (QEMU: -netdev vhost-user)
  console    virtio-console: hvc0 and named ports on sockets, ptys, this terminal or files (QEMU 10.2+:
             -device vhost-user-test-device-pci,virtio-id=3)

the main job:
  demo       boot a full Debian whose disk, network and console are all served by vhost-ts (npm start);
             --exec 'COMMANDS' runs commands in it through the console and exits with their status

tools:
  setup      provision QEMU and build the test guest (cached; --full adds a Debian rootfs image)
  vm         boot the test guest with vhost-ts devices attached (--rng, --blk IMAGE, --script FILE, --shell)
  ctl        talk to a running backend's control API: vhost-ts ctl PATH CALL [--json] (list, stats, blk-resize, net-link,
             mac-table, console-resize, console-add-port, console-remove-port; vhost-ts ctl --help)

common device options:
${backendUsage}

Run 'vhost-ts <command> --help' for a command's own options.`;

const devices: Record<string, DeviceCommand> = {
  rng: {
    summary: 'vhost-ts rng (--socket-path PATH | --fd N | --connect PATH)',
    capabilities: { type: 'rng' },
    create: () => rngDevice(),
  },
  blk: {
    summary: 'vhost-ts blk (--socket-path PATH | --fd N | --connect PATH) (--image FILE | --null SIZE) [options]',
    options: {
      image: { type: 'string' },
      null: { type: 'string' },
      readonly: { type: 'boolean' },
      direct: { type: 'boolean' },
      'num-queues': { type: 'string' },
      serial: { type: 'string' },
      engine: { type: 'string' },
      'poll-us': { type: 'string' },
      'no-inflight': { type: 'boolean' },
      'completion-order': { type: 'string' },
    },
    optionsUsage: `  --image FILE            raw image file or block device
  --null SIZE             no image: a null disk of SIZE bytes (suffix K, M, G), like QEMU's null-co
  --readonly              refuse writes (the guest sees a read-only disk)
  --direct                O_DIRECT: bypass the host page cache
  --num-queues N          request queues, one worker thread each (default 1)
  --serial ID             the disk's serial number (GET_ID), at most 20 bytes
  --engine uring|sync     io_uring or preadv/pwritev (default: io_uring where the kernel allows, preadv/pwritev
                          for an image on tmpfs, where io_uring hands every request to a kernel thread)
  --poll-us N|adaptive    after requests, busy-poll each queue before sleeping: adaptive (default) up to 32 us
                          while requests keep coming back within it, as QEMU's IOThreads; N: always N us; 0: never
  --no-inflight           do not offer inflight tracking (INFLIGHT_SHMFD, on by default: a restarted backend
                          runs again the requests its predecessor left unfinished)
  --completion-order reverse
                          testing aid: complete each batch of requests in reverse order (out of ring order)`,
    capabilities: { type: 'blk', features: ['read-only', 'blk-file', 'num-queues'] },
    create: (v) => {
      if ((typeof v.image === 'string') === (typeof v.null === 'string')) throw new UsageError('blk needs --image FILE or --null SIZE');
      const engine = v.engine ?? 'auto';
      if (engine !== 'auto' && engine !== 'uring' && engine !== 'sync') throw new UsageError('--engine takes uring or sync');
      const order = v['completion-order'] ?? 'ready';
      if (order !== 'ready' && order !== 'reverse') throw new UsageError('--completion-order takes ready or reverse');
      return blkDevice({
        path: typeof v.image === 'string' ? v.image : '',
        ...(typeof v.null === 'string' ? { nullSize: byteSize(v.null, '--null') } : {}),
        readonly: v.readonly === true,
        direct: v.direct === true,
        numQueues: v['num-queues'] === undefined ? 1 : wholeNumber(String(v['num-queues']), '--num-queues'),
        ...(typeof v.serial === 'string' ? { serial: v.serial } : {}),
        engine,
        inflightTracking: v['no-inflight'] !== true,
        completionOrder: order,
        ...(v['poll-us'] !== undefined ? { pollUs: pollSetting(String(v['poll-us']), '--poll-us') } : {}),
      });
    },
  },
};

devices.net = netCommand;
devices.console = consoleCommand;

function byteSize(text: string, flag: string): number {
  const m = /^(\d+)([KMG]?)$/i.exec(text);
  if (!m) throw new UsageError(`${flag} takes a size such as 512, 64M or 1G, not "${text}"`);
  return Number(m[1]) * { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G'];
}


async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    console.log(usage);
    return command === undefined ? 2 : 0;
  }
  if (command === 'setup') return setupMain(rest);
  if (command === 'vm') return vmMain(rest);
  if (command === 'demo') return demoMain(rest);
  if (command === 'ctl') return ctlMain(rest, byteSize);
  const dev = devices[command];
  if (!dev) throw new UsageError(`unknown command "${command}"`);
  const { values } = parseArgs({ args: rest, options: { ...backendOptions, ...dev.options }, strict: true });
  if (values.help) {
    console.log(`usage: ${dev.summary}\n\n${backendUsage}${dev.optionsUsage ? `\n${dev.optionsUsage}` : ''}`);
    return 0;
  }
  if (values['print-capabilities']) {
    console.log(JSON.stringify(dev.capabilities));
    return 0;
  }
  const created = dev.create(values as Values);
  const list = Array.isArray(created) ? created : [created];
  const stateFile = typeof values['state-file'] === 'string' ? values['state-file'] : null;
  const stateful = list.filter((d): d is VhostUserDevice & { state: DeviceStateHooks } => d.state !== undefined);
  if (stateFile !== null) {
    if (stateful.length !== list.length) throw new UsageError(`--state-file: ${command} keeps no device state`);
    if (existsSync(stateFile)) {
      loadStateFile(stateful, readFileSync(stateFile));
      console.error(`vhost-ts: device state loaded from ${stateFile}`);
    }
  }
  const saveState = (): void => {
    if (stateFile === null) return;
    writeFileSync(`${stateFile}.tmp`, saveStateFile(stateful));
    renameSync(`${stateFile}.tmp`, stateFile); // whole or not at all
    console.error(`vhost-ts: device state saved to ${stateFile}`);
  };
  const where = serveOptionsOf(values, list.length);
  const servers: VhostUserServer[] = [];
  try {
    for (let i = 0; i < list.length; i++) servers.push(await VhostUserServer.start(list[i], where[i]));
  } catch (e) {
    for (const s of servers) await s.close();
    throw e;
  }
  const control = typeof values.control === 'string' ? await ControlServer.start(values.control, servers) : null;
  await new Promise<void>((resolve) => {
    const stop = () => {
      saveState();
      void Promise.all([...servers.map((s) => s.close()), control?.close()]).then(() => resolve());
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    // An inherited connected fd serves one frontend: when every server is done, so is the program.
    let open = servers.length;
    for (const s of servers) s.once('closed', () => --open === 0 && resolve());
  });
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    if (e instanceof UsageError || (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`vhost-ts: ${e.message}\n\n${usage}`);
      process.exit(2);
    }
    console.error(`vhost-ts: ${e.message}`);
    process.exit(1);
  },
);
