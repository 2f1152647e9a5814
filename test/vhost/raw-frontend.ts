/**
 * A minimal frontend for protocol tests: raw messages over a socket, replies awaited on the event loop with a
 * bound. Unlike src/frontend it does no bookkeeping, so tests can send anything, including garbage.
 */
import * as sys from '../../src/sys/index.js';
import { decodeReply, encodeFrontendMessage, readHeader, type FrontendMessageInput, type Reply } from '../../src/vhost/codec.js';
import type { FrontendRequest } from '../../src/vhost/protocol.js';

export class RawFrontend {
  private constructor(readonly fd: number) {}

  static connect(path: string): RawFrontend {
    return new RawFrontend(sys.unixConnect(path));
  }

  send(msg: FrontendMessageInput): void {
    const { bytes, fds } = encodeFrontendMessage(msg);
    this.sendBytes(bytes, fds);
  }

  sendBytes(bytes: Uint8Array, fds: readonly number[] = []): void {
    const n = sys.sendMessage(this.fd, bytes, bytes.length, fds);
    if (n !== bytes.length) throw new Error(`short send: ${n} of ${bytes.length}`);
  }

  async request(msg: FrontendMessageInput, expect: FrontendRequest, timeoutMs = 5000): Promise<Reply> {
    this.send(msg);
    const header = await this.readExactly(12, timeoutMs);
    const payload = await this.readExactly(readHeader(header).size, timeoutMs);
    return decodeReply(header, payload, expect);
  }

  /** Resolves when the backend closes the connection (EOF), rejects after the timeout. */
  waitClosed(timeoutMs = 5000): Promise<void> {
    const sink = new Uint8Array(4096);
    return this.waitFor(timeoutMs, () => {
      for (;;) {
        const n = sys.receiveMessage(this.fd, sink, 0, sink.length, []);
        if (n === 0) return true;
        if (n < 0) return false;
      }
    }, 'the backend did not close the connection');
  }

  close(): void {
    sys.close(this.fd);
  }

  private async readExactly(length: number, timeoutMs: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    let got = 0;
    const fds: number[] = [];
    if (length > 0) {
      await this.waitFor(timeoutMs, () => {
        const n = sys.receiveMessage(this.fd, buf, got, length - got, fds);
        if (n === 0) throw new Error('backend closed the connection instead of replying');
        if (n > 0) got += n;
        return got === length;
      }, 'no reply from the backend');
    }
    for (const fd of fds) sys.close(fd);
    return buf;
  }

  private waitFor(timeoutMs: number, attempt: () => boolean, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      let watch: sys.FdWatch | null = null;
      const timer = setTimeout(() => {
        watch?.close();
        reject(new Error(`${what} within ${timeoutMs} ms`));
      }, timeoutMs);
      const tryNow = () => {
        try {
          if (!attempt()) return false;
        } catch (e) {
          clearTimeout(timer);
          watch?.close();
          reject(e);
          return true;
        }
        clearTimeout(timer);
        watch?.close();
        resolve();
        return true;
      };
      if (!tryNow()) watch = sys.watchReadable(this.fd, () => void tryNow());
    });
  }
}
