/**
 * The control API's messages, from proto/vhost_ts/control.proto (shipped in the package, for clients in other
 * languages too), loaded with protobufjs.
 */
import type protobuf from 'protobufjs';
import { loadProto } from '../vhost/proto-files.js';

const root = loadProto('control.proto');
export const Request = root.lookupType('vhost_ts.control.Request');
export const Response = root.lookupType('vhost_ts.control.Response');

/** Largest message either side accepts: far above any real one, and a bound on what a client can make us buffer. */
export const MAX_MESSAGE_BYTES = 1 << 20;

/**
 * Split a byte stream into length-delimited messages (varint length, then the message). Returns the messages
 * complete in `buf` and the bytes left over; throws on a length above MAX_MESSAGE_BYTES or a varint over 5 bytes.
 */
export function splitFrames(buf: Buffer): { frames: Buffer[]; rest: Buffer } {
  const frames: Buffer[] = [];
  let at = 0;
  for (;;) {
    let len = 0;
    let shift = 0;
    let p = at;
    for (;;) {
      if (p >= buf.length) return { frames, rest: buf.subarray(at) };
      const b = buf[p++];
      len += (b & 0x7f) * 2 ** shift;
      if ((b & 0x80) === 0) break;
      shift += 7;
      if (shift > 28) throw new RangeError('a frame length of more than 5 varint bytes');
    }
    if (len > MAX_MESSAGE_BYTES) throw new RangeError(`a frame of ${len} bytes (at most ${MAX_MESSAGE_BYTES})`);
    if (p + len > buf.length) return { frames, rest: buf.subarray(at) };
    frames.push(buf.subarray(p, p + len));
    at = p + len;
  }
}

export function encodeFrame(type: protobuf.Type, message: object): Uint8Array {
  return type.encodeDelimited(type.fromObject(message)).finish();
}
