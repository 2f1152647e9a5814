/**
 * Guest-memory steps that both ring layouts take the same way: laying typed arrays over a ring, turning a
 * descriptor's buffer into chain segments, and finding an indirect table's words. Each returns a status rather
 * than throwing, so the queue that calls it words the error for its own layout.
 */
import type { DescriptorChain } from './chain.js';
import { VirtqueueError } from './errors.js';
import type { GuestMemory, Location } from './guest-memory.js';

/** A typed array over `bytes` of guest memory at `gpa` for ring structure `what`; throws BAD_RING if unusable. */
export function ringView<T extends Uint16Array | Uint32Array>(
  memory: GuestMemory,
  queue: number,
  gpa: number,
  bytes: number,
  align: number,
  what: string,
  Ctor: { new (buffer: ArrayBufferLike, byteOffset: number, length: number): T; BYTES_PER_ELEMENT: number },
): T {
  if (gpa % align !== 0) {
    throw new VirtqueueError('BAD_RING', queue, `${what} at 0x${gpa.toString(16)} is not ${align}-byte aligned`);
  }
  let view: Uint8Array;
  try {
    view = memory.slice(gpa, bytes);
  } catch (e) {
    throw new VirtqueueError('BAD_RING', queue, `${what} at 0x${gpa.toString(16)}+${bytes}: ${(e as Error).message}`);
  }
  if ((view.byteOffset & (Ctor.BYTES_PER_ELEMENT - 1)) !== 0) {
    throw new VirtqueueError('BAD_RING', queue, `${what} at 0x${gpa.toString(16)} is misaligned in our mapping`);
  }
  return new Ctor(view.buffer, view.byteOffset, Math.floor(bytes / Ctor.BYTES_PER_ELEMENT));
}

export const APPENDED = 0;
/** The buffer is not wholly inside one region of guest memory. */
export const OUTSIDE_MEMORY = 1;
/** The chain would have more than maxSegments segments. */
export const TOO_MANY_SEGMENTS = 2;

/**
 * Append `len` bytes at `gpa` to `chain`, one segment per mapping window the buffer touches. `loc` is scratch.
 * Returns APPENDED, OUTSIDE_MEMORY or TOO_MANY_SEGMENTS.
 */
export function appendBuffer(
  chain: DescriptorChain,
  memory: GuestMemory,
  loc: Location,
  gpa: number,
  len: number,
  writable: boolean,
  maxSegments: number,
): number {
  if (!memory.locate(gpa, len, loc)) return OUTSIDE_MEMORY;
  let left = len;
  for (;;) {
    const n = left < loc.span ? left : loc.span;
    if (chain.count >= maxSegments) return TOO_MANY_SEGMENTS;
    chain.addSegment(gpa + (len - left), loc.buffer, loc.offset, n, writable);
    left -= n;
    if (left === 0) return APPENDED;
    loc.buffer++;
    loc.offset = 0;
    loc.span = memory.buffers[loc.buffer].length;
  }
}

/** Table not wholly inside one mapping window. */
export const TABLE_NOT_MAPPED = -1;
/** Table not 4-byte aligned. */
export const TABLE_MISALIGNED = -2;
/** Table beyond the word view of its mapping. */
export const TABLE_BEYOND_VIEW = -3;

/**
 * Where the `len`-byte descriptor table at `gpa` starts in `memory.words32(loc.buffer)` (also the 16-bit view's
 * index / 2), or a negative TABLE_* code. On success `loc` names the window.
 */
export function tableWord(memory: GuestMemory, loc: Location, gpa: number, len: number): number {
  if (!memory.locate(gpa, len, loc) || len > loc.span) return TABLE_NOT_MAPPED;
  // Floor rather than % 4: the offset is a double (it may pass 2^32 in a large ArrayBuffer) and % on doubles is
  // a call to fmod.
  const word = (memory.byteOffsetOf(loc.buffer) + loc.offset) / 4;
  if (word !== Math.floor(word)) return TABLE_MISALIGNED;
  if (word + len / 4 > memory.words32(loc.buffer).length || word > 0x7fffffff) return TABLE_BEYOND_VIEW;
  // | 0: int32, like a ring table's base 0, so the walk indexes with int32 arithmetic either way.
  return word | 0;
}

/** What a TABLE_* code means, for an error message. */
export function tableProblem(code: number): string {
  if (code === TABLE_NOT_MAPPED) return 'is not in one mapped range';
  if (code === TABLE_MISALIGNED) return 'is not 4-byte aligned';
  return 'is beyond our word view of its mapping';
}

/**
 * For claimWrites: store a zero into each cache line of the first `bytes` bytes of a descriptor's buffer (address
 * words lo and hi, `len` bytes) when the whole buffer lies in one window of guest memory; otherwise nothing, and
 * pop() judges the descriptor.
 */
export function claimLines(memory: GuestMemory, lo: number, hi: number, len: number, bytes: number): void {
  const n = len < bytes ? len : bytes;
  if (n <= 0) return;
  // The whole buffer must be guest memory, not just the part claimed: nothing is written for a bad descriptor.
  const o = memory.windowOffset(lo, hi, len);
  if (o < 0) return;
  const b = memory.buffers[memory.lastBuffer];
  // A store every 64 bytes and one at the end hits every line the range touches.
  for (let i = 0; i < n; i += 64) b[o + i] = 0;
  b[o + n - 1] = 0;
}

/**
 * The most segments a chain may have in a ring of `size` descriptors: `configured`, or by default the whole ring
 * plus a full indirect table of `indirectMax` entries. At least 1, or the ring is refused: pop()'s path for a lone
 * descriptor does not look at the limit.
 */
export function segmentLimit(configured: number | undefined, size: number, indirectMax: number, index: number): number {
  const limit = configured ?? size + indirectMax;
  if (!(limit >= 1)) throw new VirtqueueError('BAD_RING', index, `maxSegments ${configured}: at least 1`);
  return limit;
}
