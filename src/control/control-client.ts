/**
 * A client of the control API: one request at a time, each answered in order (bounded by a timeout).
 *
 * @example
 * ```ts
 * const ctl = await ControlClient.connect('/tmp/blk.ctl');
 * const stats = await ctl.call({ stats: {} }); // { id, stats: { frontends: [...] } }
 * ctl.close();
 * ```
 */
import { connect, type Socket } from 'node:net';
import { encodeFrame, Request, Response, splitFrames } from './proto.js';

export class ControlClient {
  private nextId = 1;
  private pending: Buffer = Buffer.alloc(0);
  private readonly waiting = new Map<number, (r: Record<string, unknown>) => void>();
  private failure: Error | null = null;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      const { frames, rest } = splitFrames(Buffer.concat([this.pending, d]));
      this.pending = rest;
      for (const f of frames) {
        const r = Response.toObject(Response.decode(f), { longs: Number, oneofs: true, defaults: true }) as Record<string, unknown>;
        const w = this.waiting.get(r.id as number);
        this.waiting.delete(r.id as number);
        w?.(r);
      }
    });
    socket.on('close', () => {
      this.failure ??= new Error('the control socket closed');
      for (const w of this.waiting.values()) w({ error: this.failure.message });
      this.waiting.clear();
    });
    socket.on('error', (e) => (this.failure = e));
  }

  static async connect(path: string): Promise<ControlClient> {
    const socket = connect(path);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (e) => reject(new Error(`cannot reach the control API at ${path}: ${e.message} (is the backend running with --control ${path}?)`)));
    });
    return new ControlClient(socket);
  }

  /** Send one call (`{ stats: {} }`, `{ blkResize: { sizeBytes } }`, ...); resolves with the Response as an object. */
  call(call: Record<string, unknown>, timeoutMs = 5000): Promise<Record<string, unknown>> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error(`no answer from the control API within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
      this.socket.write(encodeFrame(Request, { id, ...call }));
    });
  }

  /**
   * console: add a named port on `backend` (`socket:PATH`, `pty`, `file:PATH`); resolves with its number and the
   * backend as it serves (a pty's path), rejects with the backend's answer when it cannot.
   */
  async consoleAddPort(name: string, backend: string): Promise<{ id: number; name: string; backend: string }> {
    const r = await this.call({ consoleAddPort: { name, backend } });
    if (r.error) throw new Error(String(r.error));
    return r.consolePort as { id: number; name: string; backend: string };
  }

  /** console: remove the named port; rejects with the backend's answer (no such port, the console port). */
  async consoleRemovePort(name: string): Promise<void> {
    const r = await this.call({ consoleRemovePort: { name } });
    if (r.error) throw new Error(String(r.error));
  }

  close(): void {
    this.socket.destroy();
  }
}
