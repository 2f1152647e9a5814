// QEMU's machine protocol, just enough to ask a guest to shut down: connect, leave capabilities negotiation, run
// commands one at a time. Every step is bounded.
import { connect } from 'node:net';

/** Runs `commands` in order on the QMP socket at `path`; resolves with their `return` values. */
export function qmp(path: string, commands: { execute: string; arguments?: object }[], timeoutMs = 5000): Promise<unknown[]> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    const results: unknown[] = [];
    const queue = [{ execute: 'qmp_capabilities' }, ...commands];
    let buffered = '';
    let greeted = false;
    const timer = setTimeout(() => finish(new Error(`QMP ${path}: no answer within ${timeoutMs} ms`)), timeoutMs);
    const finish = (error: Error | null) => {
      clearTimeout(timer);
      socket.destroy();
      if (error) reject(error);
      else resolve(results.slice(1));
    };
    const next = () => {
      const cmd = queue.shift();
      if (!cmd) return finish(null);
      socket.write(`${JSON.stringify(cmd)}\n`);
    };
    socket.on('data', (d) => {
      buffered += d.toString('utf8');
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as { QMP?: unknown; return?: unknown; error?: { desc: string }; event?: string };
        if (msg.QMP !== undefined && !greeted) {
          greeted = true;
          next();
        } else if (msg.error) {
          finish(new Error(`QMP: ${msg.error.desc}`));
        } else if ('return' in msg) {
          results.push(msg.return);
          next();
        }
      }
    });
    socket.on('error', (e) => finish(e));
  });
}
