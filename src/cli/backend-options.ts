/**
 * The options every vhost-user backend program takes (vhost-user.rst, "Backend program conventions"):
 * --socket-path, --fd, --print-capabilities; plus --connect for client mode.
 */
import type { ParseArgsConfig } from 'node:util';
import type { ServeOptions } from '../vhost/index.js';

export const backendOptions = {
  'socket-path': { type: 'string' },
  fd: { type: 'string' },
  connect: { type: 'string' },
  'print-capabilities': { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies NonNullable<ParseArgsConfig['options']>;

export const backendUsage = `  --socket-path PATH      listen for the frontend on this Unix socket
  --fd N                  serve on an inherited socket fd (listening or connected)
  --connect PATH          connect to a frontend listening on PATH (retried until it answers)
  --print-capabilities    print the backend's capabilities as JSON and exit`;

export class UsageError extends Error {
  override readonly name = 'UsageError';
}

/** Where to serve, from the parsed options; exactly one of the three. */
export function serveOptionsOf(values: { 'socket-path'?: string; fd?: string; connect?: string }): ServeOptions {
  const given = [values['socket-path'], values.fd, values.connect].filter((v) => v !== undefined);
  if (given.length !== 1) throw new UsageError('give exactly one of --socket-path, --fd or --connect');
  if (values.fd !== undefined) {
    const fd = Number(values.fd);
    if (!Number.isInteger(fd) || fd < 0) throw new UsageError(`--fd takes a file descriptor number, not "${values.fd}"`);
    return { fd };
  }
  if (values.connect !== undefined) return { connectPath: values.connect };
  return { socketPath: values['socket-path'] };
}
