/**
 * A backend in a process of its own, for tests that kill it: started from the CLI (or any script), ready once its
 * log says so (bounded), killed with SIGKILL and reaped.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';

export const vhostTsBin = new URL('../../bin/vhost-ts.mjs', import.meta.url).pathname;

export interface BackendProcess {
  child: ChildProcess;
  /** Its stderr so far. */
  log(): string;
  /** SIGKILL, and wait until it is gone (nothing to do when it already is). */
  kill(): Promise<void>;
}

/**
 * Run `node ARGS` and resolve once `ready(stderr)` holds; rejects with its log when it exits first or is not
 * ready within `timeoutMs`. `via` runs node through a command that execs it in place, so that the child is
 * still node and kill() reaches it: `['ip', 'netns', 'exec', NAME]` starts the backend inside a namespace.
 */
export async function startBackend(args: string[], ready: (log: string) => boolean, timeoutMs = 30_000, via: readonly string[] = []): Promise<BackendProcess> {
  const argv = [...via, process.execPath, ...args];
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  const backend: BackendProcess = {
    child,
    log: () => log,
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGKILL');
      await exited;
    },
  };
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${argv.join(' ')}: not ready within ${timeoutMs} ms:\n${log}`)), timeoutMs);
      child.stderr!.on('data', (d) => {
        log += d;
        if (ready(log)) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`${argv.join(' ')}: exited (${code ?? signal}) before it was ready:\n${log}`));
      });
    });
  } catch (e) {
    await backend.kill();
    throw e;
  }
  return backend;
}

/** Once listening on its socket (the server's "listening on PATH" line). */
export const listening = (log: string): boolean => log.includes('listening on');
