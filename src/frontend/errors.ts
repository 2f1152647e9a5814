import type { UsedElement } from './guest.js';

export type FrontendErrorCode =
  | 'TIMEOUT' // no reply (or used element, or signal) within the time allowed
  | 'EOF' // the back-end closed the socket while we awaited a reply
  | 'NACK' // a REPLY_ACK status or request reply reported failure
  | 'CLOSED' // the front-end (or the queue, or the memory) was closed
  | 'BROKEN' // an earlier timeout or protocol error desynchronised the socket: replies can no longer be matched
  | 'UNSUPPORTED'; // the back-end did not offer what the call needs

/** What the test front-end throws for everything that is the back-end's doing or a lost connection. */
export class FrontendError extends Error {
  override readonly name = 'FrontendError';
  /** For waitForUsed timeouts: the elements collected before giving up. */
  used?: UsedElement[];
  /** For NACK: the back-end's status. */
  status?: number;

  constructor(
    readonly code: FrontendErrorCode,
    message: string,
  ) {
    super(message);
  }
}
