/**
 * Waiting for a bench/blk.ts backend to listen. The process handling itself is shared with bench/net.ts
 * (bench/procs.ts).
 */
import fs from 'node:fs';
import net from 'node:net';
import { sleep, type Proc } from './procs.js';

export { pinned, Processes, sleep, type Proc as Backend, type RunResult } from './procs.js';

function tryConnect(socketPath: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    const done = (ok: boolean) => {
      clearTimeout(timer);
      s.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

/**
 * Waits until the backend accepts connections on socketPath: the socket file exists and a connection succeeds
 * (bind creates the file before listen). The probe connection is closed at once and the backend given a moment to
 * notice, since a vhost-user backend serves one frontend at a time. Fails early if the backend exits.
 */
export async function waitForSocket(backend: Proc, socketPath: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!backend.running) throw new Error(`${backend.name} exited before listening on ${socketPath}\n${backend.describe()}`);
    const st = fs.statSync(socketPath, { throwIfNoEntry: false });
    if (st?.isSocket() && (await tryConnect(socketPath, 1000))) {
      await sleep(300);
      if (!backend.running) throw new Error(`${backend.name} exited after the probe connection\n${backend.describe()}`);
      return;
    }
    await sleep(50);
  }
  throw new Error(`${backend.name} did not listen on ${socketPath} within ${timeoutMs / 1000} s\n${backend.describe()}`);
}
