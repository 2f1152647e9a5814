/**
 * One virtio-blk request, parsed from a descriptor chain into a reusable slot: type, sector, the data as an iovec
 * table pointing straight into guest memory, and where the status byte goes. Every length and bound the guest
 * controls is checked here; a request that fails a check is answered with a status, never executed.
 */
import { IovecArray } from '../../sys/index.js';
import type { DescriptorChain } from '../../virtqueue/index.js';
import {
  DISCARD_SEGMENT_SIZE,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from './spec.js';

export interface DiskLimits {
  capacitySectors: number;
  readonly: boolean;
  /** Most data segments in one request (the seg_max we advertise). */
  segMax: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  /** Whether the driver accepted DISCARD / WRITE_ZEROES. */
  discard: boolean;
  writeZeroes: boolean;
}

/** Why a request is answered without I/O; counted per queue. */
export type Refusal = 'malformed' | 'range' | 'readonly' | 'unsupported' | null;

export class BlkRequest {
  chain: DescriptorChain | null = null;
  type = 0;
  sector = 0;
  /** Data bytes (IN/OUT), excluding header and status. */
  dataBytes = 0;
  readonly iov: IovecArray;
  iovCount = 0;
  /** Every data buffer sector-aligned in address and length (O_DIRECT can take it as is). */
  aligned = true;
  /** Where the status byte goes: buffer index and offset in chain.memory. */
  statusBuffer = 0;
  statusOffset = 0;
  /** Bytes to report as written in the used ring. */
  written = 0;
  /** Discard/write-zeroes ranges: sector, sectors, flags per entry. */
  readonly ranges: Float64Array;
  rangeCount = 0;
  /** For the engines: I/O operations still outstanding, and the status so far. */
  pending = 0;
  status = VIRTIO_BLK_S_OK;

  constructor(maxSegments: number, maxRanges: number) {
    this.iov = new IovecArray(maxSegments);
    this.ranges = new Float64Array(3 * maxRanges);
  }
}

/**
 * Fill `req` from `chain`. Returns null when the request is valid and needs I/O; otherwise the refusal, with
 * req.status set (and req.written) so the caller can answer at once. A chain without a writable status byte
 * returns 'malformed' with statusBuffer = -1: there is nowhere to answer, the chain is returned with length 0.
 */
export function parseRequest(chain: DescriptorChain, req: BlkRequest, disk: DiskLimits): Refusal {
  req.chain = chain;
  req.iovCount = 0;
  req.aligned = true;
  req.dataBytes = 0;
  req.rangeCount = 0;
  req.pending = 0;
  req.written = 0;
  req.status = VIRTIO_BLK_S_OK;
  const last = chain.count - 1;
  if (chain.writableCount === 0 || chain.readableBytes < REQUEST_HEADER_SIZE) {
    req.statusBuffer = -1;
    if (chain.writableCount > 0) setStatusLocation(chain, req, last);
    return refuse(req, 'malformed', VIRTIO_BLK_S_IOERR);
  }
  setStatusLocation(chain, req, last);
  req.written = 1;

  const r = chain.reader();
  if (chain.segLength[0] >= REQUEST_HEADER_SIZE) {
    // The usual layout: the whole header in the first buffer. Read it in place (little-endian).
    const b = chain.memory.buffers[chain.segBuffer[0]];
    const o = chain.segOffset[0];
    req.type = (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0;
    const lo = (b[o + 8] | (b[o + 9] << 8) | (b[o + 10] << 16) | (b[o + 11] << 24)) >>> 0;
    const hi = (b[o + 12] | (b[o + 13] << 8) | (b[o + 14] << 16) | (b[o + 15] << 24)) >>> 0;
    req.sector = hi * 4294967296 + lo;
    r.skip(REQUEST_HEADER_SIZE);
  } else {
    req.type = r.readUint(4);
    r.skip(4);
    req.sector = r.readUint64();
  }

  switch (req.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
      const isWrite = req.type === VIRTIO_BLK_T_OUT;
      if (isWrite && disk.readonly) return refuse(req, 'readonly', VIRTIO_BLK_S_IOERR);
      if (isWrite ? !addReadableData(chain, req) : !addWritableData(chain, req)) return refuse(req, 'malformed', VIRTIO_BLK_S_IOERR);
      if (req.iovCount > disk.segMax) return refuse(req, 'malformed', VIRTIO_BLK_S_IOERR);
      if (req.dataBytes % SECTOR_SIZE !== 0) return refuse(req, 'malformed', VIRTIO_BLK_S_IOERR);
      if (!inRange(req.sector, req.dataBytes / SECTOR_SIZE, disk)) return refuse(req, 'range', VIRTIO_BLK_S_IOERR);
      if (!isWrite) req.written = req.dataBytes + 1;
      return null;
    }
    case VIRTIO_BLK_T_FLUSH:
      return null;
    case VIRTIO_BLK_T_GET_ID:
      if (!addWritableData(chain, req)) return refuse(req, 'malformed', VIRTIO_BLK_S_IOERR);
      return null;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
      const allowed = req.type === VIRTIO_BLK_T_DISCARD ? disk.discard : disk.writeZeroes;
      if (!allowed) return refuse(req, 'unsupported', VIRTIO_BLK_S_UNSUPP);
      if (disk.readonly) return refuse(req, 'readonly', VIRTIO_BLK_S_IOERR);
      const bytes = chain.readableBytes - REQUEST_HEADER_SIZE;
      const n = bytes / DISCARD_SEGMENT_SIZE;
      if (n === 0 || !Number.isInteger(n) || n > disk.maxDiscardSeg || 3 * n > req.ranges.length) {
        return refuse(req, 'malformed', VIRTIO_BLK_S_IOERR);
      }
      for (let i = 0; i < n; i++) {
        const sector = r.readUint64();
        const sectors = r.readUint(4);
        const flags = r.readUint(4);
        if (sectors > disk.maxDiscardSectors || !inRange(sector, sectors, disk)) return refuse(req, 'range', VIRTIO_BLK_S_IOERR);
        // virtio 1.2 §5.2.6.2: UNSUPP for an unknown flag, and for the unmap flag on a discard.
        if (flags & ~(req.type === VIRTIO_BLK_T_WRITE_ZEROES ? 1 : 0)) return refuse(req, 'unsupported', VIRTIO_BLK_S_UNSUPP);
        req.ranges[3 * i] = sector;
        req.ranges[3 * i + 1] = sectors;
        req.ranges[3 * i + 2] = flags;
      }
      req.rangeCount = n;
      return null;
    }
    default:
      return refuse(req, 'unsupported', VIRTIO_BLK_S_UNSUPP);
  }
}

/** Write the status byte and return the chain's length; the caller pushes the chain. */
export function writeStatus(req: BlkRequest): void {
  const chain = req.chain!;
  if (req.statusBuffer >= 0) chain.memory.buffers[req.statusBuffer][req.statusOffset] = req.status;
}

function refuse(req: BlkRequest, why: Exclude<Refusal, null>, status: number): Refusal {
  req.status = status;
  req.written = req.statusBuffer >= 0 ? 1 : 0;
  return why;
}

function inRange(sector: number, sectors: number, disk: DiskLimits): boolean {
  return Number.isSafeInteger(sector) && sector + sectors <= disk.capacitySectors;
}

function setStatusLocation(chain: DescriptorChain, req: BlkRequest, seg: number): void {
  req.statusBuffer = chain.segBuffer[seg];
  req.statusOffset = chain.segOffset[seg] + chain.segLength[seg] - 1;
}

/** Data of a read-type request: every writable byte but the last (the status). */
function addWritableData(chain: DescriptorChain, req: BlkRequest): boolean {
  for (let i = chain.readableCount; i < chain.count; i++) {
    const len = i === chain.count - 1 ? chain.segLength[i] - 1 : chain.segLength[i];
    if (len > 0 && !pushIov(chain, req, i, 0, len)) return false;
  }
  return true;
}

/** Data of a write-type request: every readable byte after the 16-byte header. */
function addReadableData(chain: DescriptorChain, req: BlkRequest): boolean {
  let skip = REQUEST_HEADER_SIZE;
  for (let i = 0; i < chain.readableCount; i++) {
    const len = chain.segLength[i];
    if (skip >= len) {
      skip -= len;
      continue;
    }
    if (!pushIov(chain, req, i, skip, len - skip)) return false;
    skip = 0;
  }
  // Bytes written after the data (before the status) are not allowed: the status must be the only writable byte.
  return chain.writableBytes === 1;
}

function pushIov(chain: DescriptorChain, req: BlkRequest, seg: number, skip: number, len: number): boolean {
  if (req.iovCount >= req.iov.capacity) return false;
  const address = chain.hostAddress(seg);
  if (address === 0) return false;
  req.iov.set(req.iovCount++, address + skip, len);
  if ((address + skip) % SECTOR_SIZE !== 0 || len % SECTOR_SIZE !== 0) req.aligned = false;
  req.dataBytes += len;
  return true;
}
