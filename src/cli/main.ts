/**
 * vhost-ts command line: one subcommand per device, each a vhost-user backend program, plus tools.
 */
import { parseArgs } from 'node:util';
import { rngDevice } from '../devices/rng/index.js';
import { VhostUserServer, type VhostUserDevice } from '../vhost/index.js';
import { setupMain } from '../../harness/setup.js';
import { backendOptions, backendUsage, serveOptionsOf, UsageError } from './backend-options.js';
import { vmMain } from './vm.js';

const usage = `usage: vhost-ts <command> [options]

devices (vhost-user backends):
  rng        virtio-rng: random numbers for the guest (QEMU: -device vhost-user-rng-pci)

tools:
  setup      provision QEMU and build the test guest (cached; --full adds a Debian rootfs image)
  vm         boot the test guest with vhost-ts devices attached (--rng, --script FILE, --shell)

common device options:
${backendUsage}

Run 'vhost-ts <command> --help' for a command's own options.`;

interface DeviceCommand {
  summary: string;
  capabilities: { type: string; features?: string[] };
  create(): VhostUserDevice;
}

const devices: Record<string, DeviceCommand> = {
  rng: {
    summary: 'vhost-ts rng (--socket-path PATH | --fd N | --connect PATH)',
    capabilities: { type: 'rng' },
    create: () => rngDevice(),
  },
};

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    console.log(usage);
    return command === undefined ? 2 : 0;
  }
  if (command === 'setup') return setupMain(rest);
  if (command === 'vm') return vmMain(rest);
  const dev = devices[command];
  if (!dev) throw new UsageError(`unknown command "${command}"`);
  const { values } = parseArgs({ args: rest, options: backendOptions, strict: true });
  if (values.help) {
    console.log(`usage: ${dev.summary}\n\n${backendUsage}`);
    return 0;
  }
  if (values['print-capabilities']) {
    console.log(JSON.stringify(dev.capabilities));
    return 0;
  }
  const server = await VhostUserServer.start(dev.create(), serveOptionsOf(values));
  await new Promise<void>((resolve) => {
    const stop = () => void server.close().then(resolve);
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    server.once('closed', resolve);
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
