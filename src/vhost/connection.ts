/**
 * One vhost-user socket: framed messages with the fds that came with them, read one at a time. Reading stops
 * while a message is being handled, so a peer cannot queue unbounded work, and replies go out in order.
 *
 * The header is read with recvmsg (the frontend sends each message, fds attached, in one sendmsg); the payload
 * follows. fds that arrive with the payload are kept with the message too, so the codec can reject them.
 */
import { close, receiveMessage, sendMessage, watchReadable, type FdWatch } from '../sys/index.js';
import { VhostProtocolError } from './errors.js';
import { HEADER_SIZE, MAX_PAYLOAD, frontendRequestName } from './protocol.js';

export interface RawMessage {
  header: Uint8Array;
  payload: Uint8Array;
  /** Received with the message; the receiver owns them (close what is not kept). */
  fds: number[];
}

export interface ConnectionHandlers {
  /** One message; the next is read once the returned promise settles. */
  onMessage(msg: RawMessage): Promise<void> | void;
  /** The peer hung up (error null) or broke framing; fds of a partial message are already closed. */
  onClose(error: Error | null): void;
}

export class Connection {
  private watch: FdWatch | null = null;
  private readonly header = new Uint8Array(HEADER_SIZE);
  private payload: Uint8Array | null = null;
  private got = 0;
  private fds: number[] = [];
  private closed = false;

  constructor(
    readonly fd: number,
    private readonly handlers: ConnectionHandlers,
  ) {}

  start(): void {
    if (!this.closed && !this.watch) this.watch = watchReadable(this.fd, () => this.onReadable());
  }

  /** Send one message (a reply, or a backend request). Throws when the socket cannot take it. */
  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (this.closed) throw new Error('connection closed');
    const n = sendMessage(this.fd, bytes, bytes.length, fds);
    // Replies are a few hundred bytes: a socket that cannot take one at once belongs to a peer that stopped reading.
    if (n !== bytes.length) throw new Error(`short write on vhost-user socket (${n} of ${bytes.length} bytes)`);
  }

  /** Stop reading, close the socket and any fds of a half-read message. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watch?.close();
    this.watch = null;
    for (const fd of this.fds) close(fd);
    this.fds = [];
    close(this.fd);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private onReadable(): void {
    let msg: RawMessage | null;
    try {
      msg = this.readMessage();
    } catch (e) {
      this.fail(e as Error);
      return;
    }
    if (msg === null) return;
    // Pause while the message is handled; a level-triggered watch would otherwise fire on every loop turn.
    this.watch?.close();
    this.watch = null;
    void Promise.resolve()
      .then(() => this.handlers.onMessage(msg!))
      .then(
        () => this.start(),
        (e: Error) => this.fail(e),
      );
  }

  /** A whole message, or null when more bytes are needed (or the peer hung up). */
  private readMessage(): RawMessage | null {
    if (this.payload === null) {
      const n = receiveMessage(this.fd, this.header, this.got, HEADER_SIZE - this.got, this.fds);
      if (n < 0) return null;
      if (n === 0) return this.eof();
      this.got += n;
      if (this.got < HEADER_SIZE) return null;
      const dv = new DataView(this.header.buffer);
      const size = dv.getUint32(8, true);
      if (size > MAX_PAYLOAD) {
        const name = frontendRequestName(dv.getUint32(0, true));
        throw new VhostProtocolError('BAD_SIZE', name, `${name} announces a ${size}-byte payload; at most ${MAX_PAYLOAD} is allowed`);
      }
      this.payload = new Uint8Array(size);
      this.got = 0;
    }
    const payload = this.payload;
    if (this.got < payload.length) {
      const n = receiveMessage(this.fd, payload, this.got, payload.length - this.got, this.fds);
      if (n < 0) return null;
      if (n === 0) return this.eof();
      this.got += n;
      if (this.got < payload.length) return null;
    }
    const msg: RawMessage = { header: this.header.slice(), payload, fds: this.fds };
    this.payload = null;
    this.got = 0;
    this.fds = [];
    return msg;
  }

  private eof(): null {
    const partial = this.got > 0 || this.payload !== null;
    this.fail(partial ? new Error('frontend hung up in the middle of a message') : null);
    return null;
  }

  private fail(error: Error | null): void {
    if (this.closed) return;
    this.close();
    this.handlers.onClose(error);
  }
}
