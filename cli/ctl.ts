/**
 * vhost-ts ctl PATH CALL: a client of a backend's control API (`--control PATH`), for people and scripts.
 */
import { parseArgs } from 'node:util';
import { ControlClient } from '../src/control/index.js';
import { UsageError } from './backend-options.js';

export const ctlUsage = `usage: vhost-ts ctl PATH CALL [--json]

calls:
  list                 the frontends this backend serves and their queues
  stats                per queue: chains completed, bytes written, kicks, interrupts sent and suppressed, broken
  blk-resize SIZE      grow the disk to SIZE bytes (suffix K, M, G); the guest sees it without a reboot
  net-link up|down [SOCKET]
                       the link state the guest sees, of every net device or the one on SOCKET
  mac-table            the addresses a net switch learned, and their ports
  console-resize COLSxROWS
                       the console port's size
  console-add-port NAME BACKEND
                       a named port at run time (BACKEND: socket:PATH, pty or file:PATH), in a free port
                       number (max_nr_ports is fixed at start: --max-ports); prints its number and backend
  console-remove-port NAME
                       take a named port away from the guest and close its backend
  --json           print the answer as JSON (the messages of proto/vhost_ts/control.proto)`;

export async function ctlMain(argv: string[], byteSize: (text: string, flag: string) => number): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, options: { json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } }, allowPositionals: true });
  if (values.help) {
    console.log(ctlUsage);
    return 0;
  }
  const [path, call, arg, arg2] = positionals;
  if (!path || !call) throw new UsageError(`ctl needs a control socket and a call\n\n${ctlUsage}`);
  const size = /^(\d+)x(\d+)$/.exec(arg ?? '');
  const request =
    call === 'list'
      ? { list: {} }
      : call === 'stats'
        ? { stats: {} }
        : call === 'blk-resize'
          ? { blkResize: { sizeBytes: byteSize(arg ?? '', 'blk-resize') } }
          : call === 'net-link' && (arg === 'up' || arg === 'down')
            ? { netLink: { up: arg === 'up', endpoint: arg2 ?? '' } }
            : call === 'mac-table'
              ? { macTable: {} }
              : call === 'console-resize' && size
                ? { consoleResize: { cols: Number(size[1]), rows: Number(size[2]) } }
                : call === 'console-add-port' && arg && arg2
                  ? { consoleAddPort: { name: arg, backend: arg2 } }
                  : call === 'console-remove-port' && arg
                    ? { consoleRemovePort: { name: arg } }
                    : null;
  if (!request) {
    const known = ['list', 'stats', 'blk-resize', 'net-link', 'mac-table', 'console-resize', 'console-add-port', 'console-remove-port'];
    throw new UsageError(`${known.includes(call) ? `ctl ${call}: missing or bad arguments` : `unknown ctl call "${call}"`}\n\n${ctlUsage}`);
  }
  const client = await ControlClient.connect(path);
  try {
    const answer = await client.call(request);
    if (answer.error) {
      console.error(`vhost-ts ctl: ${String(answer.error)}`);
      return 1;
    }
    if (values.json) {
      const { id: _id, error: _error, ...rest } = answer;
      console.log(JSON.stringify(rest, null, 2));
    } else console.log(human(answer));
    return 0;
  } finally {
    client.close();
  }
}

interface Queue {
  index: number;
  started?: boolean;
  size?: number;
  packed?: boolean;
  chains?: number;
  bytes?: number;
  kicks?: number;
  notifications?: number;
  suppressed?: number;
  broken?: boolean;
}
interface Frontend {
  device: string;
  endpoint: string;
  connected?: boolean;
  queues: Queue[];
}

function human(answer: Record<string, unknown>): string {
  if (answer.list) {
    return (answer.list as { frontends: Frontend[] }).frontends
      .map((f) => `${f.device} on ${f.endpoint}: ${f.connected ? 'connected' : 'no frontend'}${f.queues.filter((q) => q.started).map((q) => `\n  queue ${q.index}: ${q.packed ? 'packed' : 'split'} ring of ${q.size}`).join('')}`)
      .join('\n');
  }
  if (answer.macTable) {
    const entries = (answer.macTable as { entries: { mac: string; port: string; ageMs: number }[] }).entries;
    return entries.length === 0 ? 'no addresses learned' : entries.map((e) => `${e.mac}  ${e.port}  ${Math.round(e.ageMs / 1000)} s ago`).join('\n');
  }
  if (answer.consolePort) {
    const p = answer.consolePort as { id: number; name: string; backend: string };
    return `port ${p.id} (${p.name}): ${p.backend}; in the guest /dev/vport*p${p.id}, /sys/class/virtio-ports/vport*p${p.id}/name`;
  }
  if (answer.stats) {
    return (answer.stats as { frontends: Frontend[] }).frontends
      .map((f) => `${f.device} on ${f.endpoint}${f.queues.map((q) => `\n  queue ${q.index}: ${q.chains} chains, ${q.bytes} bytes written, ${q.kicks} kicks, ${q.notifications} interrupts, ${q.suppressed} suppressed${q.broken ? ', BROKEN' : ''}`).join('')}`)
      .join('\n');
  }
  return 'done';
}
