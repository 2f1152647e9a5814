import { close, receiveMessage } from '../sys/index.js';
import { readHeader } from '../vhost/codec.js';
import { VhostProtocolError } from '../vhost/errors.js';
import { HEADER_SIZE, MAX_PAYLOAD } from '../vhost/protocol.js';

export interface RawMessage {
  header: Uint8Array;
  payload: Uint8Array;
  /** Arrived with the message; the receiver owns them. */
  fds: number[];
}

/**
 * Frames vhost-user messages off a non-blocking stream socket. Header and payload are read with exact lengths,
 * never past the message, so the fds riding on a message's first byte are never mistaken for the next one's.
 */
export class MessageReader {
  private readonly header = new Uint8Array(HEADER_SIZE);
  private payload: Uint8Array | null = null;
  private got = 0;
  private fds: number[] = [];

  constructor(private readonly fd: number) {}

  /**
   * Complete messages pending on the socket; `eof` when the peer hung up; `error` on a framing violation (the
   * stream cannot be resynchronised, so the caller should give up on it).
   */
  drain(): { messages: RawMessage[]; eof: boolean; error?: Error } {
    const messages: RawMessage[] = [];
    for (;;) {
      if (this.payload === null) {
        const n = receiveMessage(this.fd, this.header, this.got, HEADER_SIZE - this.got, this.fds);
        if (n < 0) return { messages, eof: false };
        if (n === 0) return { messages, eof: true };
        this.got += n;
        if (this.got < HEADER_SIZE) continue;
        const { size } = readHeader(this.header);
        if (size > MAX_PAYLOAD) {
          this.discard();
          const error = new VhostProtocolError('BAD_SIZE', 'HEADER', `peer announced a ${size}-byte payload; the limit is ${MAX_PAYLOAD}`);
          return { messages, eof: false, error };
        }
        this.payload = new Uint8Array(size);
        this.got = 0;
      } else if (this.got < this.payload.length) {
        const n = receiveMessage(this.fd, this.payload, this.got, this.payload.length - this.got, this.fds);
        if (n < 0) return { messages, eof: false };
        if (n === 0) return { messages, eof: true };
        this.got += n;
      }
      // A zero-length payload completes with the header: reading 0 bytes would look like EOF.
      if (this.payload !== null && this.got === this.payload.length) {
        messages.push({ header: this.header.slice(), payload: this.payload, fds: this.fds });
        this.payload = null;
        this.got = 0;
        this.fds = [];
      }
    }
  }

  /** Close fds of a half-read message. */
  discard(): void {
    for (const fd of this.fds) close(fd);
    this.fds = [];
    this.payload = null;
    this.got = 0;
  }
}
