/**
 * The options every vhost-user backend program takes (vhost-user.rst, "Backend program conventions"):
 * --socket-path, --fd, --print-capabilities; plus --connect for client mode.
 */
import type { ParseArgsConfig } from 'node:util';
import type { ServeOptions, VhostUserDevice } from '../src/vhost/index.js';

export const backendOptions = {
  'socket-path': { type: 'string', multiple: true },
  fd: { type: 'string' },
  connect: { type: 'string' },
  'print-capabilities': { type: 'boolean' },
  'no-packed': { type: 'boolean' },
  control: { type: 'string' },
  'state-file': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies NonNullable<ParseArgsConfig['options']>;

export const backendUsage = `  --socket-path PATH      listen for the frontend on this Unix socket
  --fd N                  serve on an inherited socket fd (listening or connected)
  --connect PATH          connect to a frontend listening on PATH (retried until it answers)
  --print-capabilities    print the backend's capabilities as JSON and exit
  --no-packed             offer split virtqueues only (packed rings are offered by default; the frontend decides:
                          QEMU's packed=on, which its generic vhost-user devices do not consult)
  --control PATH          serve the control API on this Unix socket (vhost-ts ctl PATH stats; messages in
                          proto/vhost_ts/control.proto)
  --state-file PATH       load the devices' state from PATH at start (when it exists) and save it there on
                          SIGINT/SIGTERM, for a planned restart (proto/vhost_ts/state.proto: StateFile)`;

export class UsageError extends Error {
  override readonly name = 'UsageError';
}

/**
 * Where to serve, from the parsed options: exactly one of the three, one endpoint per device. Only devices that
 * serve several ports from one process (net on a switch) take --socket-path more than once.
 */
export function serveOptionsOf(values: { 'socket-path'?: string[]; fd?: string; connect?: string; 'no-packed'?: boolean }, count = 1): ServeOptions[] {
  const packedRings = values['no-packed'] !== true;
  return endpointsOf(values, count).map((where) => ({ ...where, packedRings }));
}

function endpointsOf(values: { 'socket-path'?: string[]; fd?: string; connect?: string }, count: number): ServeOptions[] {
  const given = [values['socket-path'], values.fd, values.connect].filter((v) => v !== undefined);
  if (given.length !== 1) throw new UsageError('give exactly one of --socket-path, --fd or --connect');
  const paths = values['socket-path'];
  if (paths !== undefined) {
    if (paths.length !== count) {
      throw new UsageError(count === 1 ? 'give --socket-path once' : `give --socket-path once per port (${count})`);
    }
    return paths.map((socketPath) => ({ socketPath }));
  }
  if (count !== 1) throw new UsageError('several ports need one --socket-path each');
  if (values.fd !== undefined) {
    const fd = Number(values.fd);
    if (!Number.isInteger(fd) || fd < 0) throw new UsageError(`--fd takes a file descriptor number, not "${values.fd}"`);
    return [{ fd }];
  }
  return [{ connectPath: values.connect! }];
}

export type Values = Record<string, string | boolean | string[] | undefined>;

export interface DeviceCommand {
  summary: string;
  /** Device options beyond the common ones, for parseArgs. */
  options?: NonNullable<ParseArgsConfig['options']>;
  optionsUsage?: string;
  capabilities: { type: string; features?: string[] };
  /** One device, or several (ports of one switch), each served on its own --socket-path. */
  create(values: Values): VhostUserDevice | VhostUserDevice[];
}


export function wholeNumber(text: string, flag: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`${flag} takes a positive whole number, not "${text}"`);
  return n;
}

/** --poll-us: microseconds (0: never poll) or `adaptive`. */
export function pollSetting(text: string, flag: string): number | 'adaptive' {
  if (text === 'adaptive') return text;
  const n = Number(text);
  if (text.trim() === '' || !Number.isInteger(n) || n < 0) {
    throw new UsageError(`${flag} takes a whole number of microseconds (0: never poll) or "adaptive", not "${text}"`);
  }
  return n;
}

/** A flag's whole number, or `fallback` when the flag was not given. */
export function wholeNumberOr(text: string | undefined, fallback: number, flag: string): number {
  return text === undefined ? fallback : wholeNumber(text, flag);
}
