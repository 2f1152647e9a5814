/** A host-side client of a console's socket end: keeps everything it receives, notes when the end closes it. */
import { connect, type Socket } from 'node:net';

export interface SocketClient {
  socket: Socket;
  data(): Buffer;
  /** The first `n` bytes received, within 5 s. */
  until(n: number): Promise<Buffer>;
  /** Resolves when the other end closed the connection. */
  closed: Promise<void>;
  ended(): boolean;
}

export async function attach(path: string): Promise<SocketClient> {
  const socket = connect(path);
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  socket.on('error', () => {});
  const chunks: Buffer[] = [];
  let wake = () => {};
  socket.on('data', (d: Buffer) => {
    chunks.push(d);
    wake();
  });
  let ended = false;
  const closed = new Promise<void>((resolve) => socket.once('end', () => ((ended = true), resolve())));
  const data = () => Buffer.concat(chunks);
  const until = (n: number) =>
    new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`client got ${data().length} of ${n} bytes within 5 s`)), 5000);
      wake = () => {
        if (data().length < n) return;
        clearTimeout(timer);
        resolve(data());
      };
      wake();
    });
  return { socket, data, until, closed, ended: () => ended };
}
