/**
 * Errors raised by guest-memory translation and virtqueue processing. Both are caused by the guest or the
 * frontend, never by us: their messages say what the peer did wrong so a log line is enough to find it.
 */

export type GuestMemoryErrorCode =
  | 'NOT_MAPPED' // address in no region
  | 'CROSSES_REGION' // range starts in a region and runs past its end
  | 'BAD_REGION' // a region description that cannot be right (size 0, overlap, beyond 2^53)
  | 'NO_SUCH_REGION'; // REM_MEM_REG of a region that was never added

export class GuestMemoryError extends Error {
  override readonly name = 'GuestMemoryError';
  constructor(
    readonly code: GuestMemoryErrorCode,
    message: string,
  ) {
    super(message);
  }
}

export type VirtqueueErrorCode =
  | 'BAD_RING' // ring addresses or size unusable (not mapped, misaligned, size not a power of 2)
  | 'AVAIL_IDX' // avail idx moved by more than the queue size
  | 'BAD_HEAD' // avail ring names a descriptor outside the table
  | 'BAD_NEXT' // a next index outside the table
  | 'CHAIN_LOOP' // more descriptors than the table holds: the chain loops
  | 'CHAIN_TOO_LONG' // more segments than the queue accepts
  | 'BAD_BUFFER' // descriptor buffer outside guest memory or across a region boundary
  | 'BAD_INDIRECT' // indirect table misplaced, nested, empty, oddly sized or not negotiated
  | 'ORDER' // a device-readable descriptor after a device-writable one
  | 'BAD_USED' // the device returned a chain twice or a head it never popped
  | 'BAD_ID' // packed ring: a buffer id outside the ring, or one that is still in flight
  | 'NOT_AVAILABLE' // packed ring: a chain runs into a descriptor the driver has not made available (wrap counter)
  | 'BAD_INFLIGHT' // the frontend's inflight region cannot be right (sizes, version, chains it records)
  | 'DEVICE_FAILED'; // the device's handler threw: a bug on our side, but the queue is stopped all the same

export class VirtqueueError extends Error {
  override readonly name = 'VirtqueueError';
  constructor(
    readonly code: VirtqueueErrorCode,
    readonly queue: number,
    message: string,
  ) {
    super(`queue ${queue}: ${message}`);
  }
}
