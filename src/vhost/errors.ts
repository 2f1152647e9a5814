/**
 * The error the vhost-user codec raises for a malformed message. The peer (front-end, or back-end for replies
 * and back-end channel messages) is always at fault: the message says what it sent and what was expected, so
 * a log line is enough. The codec never closes fds; whoever received them closes them when this is thrown.
 */

export type VhostProtocolErrorCode =
  | 'BAD_SIZE' // header size, payload length and the request's payload layout disagree, or size > MAX_PAYLOAD
  | 'BAD_FDS' // wrong number of fds for the request
  | 'BAD_FLAGS' // version is not 1, REPLY set on a request (or missing on a reply), reserved bits set
  | 'BAD_PAYLOAD' // payload contents impossible: region count, vring index, u64 beyond 2^53, config bounds
  | 'UNEXPECTED_REPLY'; // a reply for another request than the one awaited

export class VhostProtocolError extends Error {
  override readonly name = 'VhostProtocolError';
  constructor(
    readonly code: VhostProtocolErrorCode,
    /** Request name ('SET_MEM_TABLE'), or 'REQUEST_<n>' for a number we do not know. */
    readonly request: string,
    message: string,
  ) {
    super(message);
  }
}
