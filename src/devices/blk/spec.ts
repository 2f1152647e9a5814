/**
 * virtio-blk as the virtio 1.2 spec (§5.2) defines it: feature bits, request types, status codes and the config
 * space layout. Pure data; no I/O.
 */

export const VIRTIO_ID_BLOCK = 2;
export const SECTOR_SIZE = 512;

export const VIRTIO_BLK_F_SIZE_MAX = 1;
export const VIRTIO_BLK_F_SEG_MAX = 2;
export const VIRTIO_BLK_F_RO = 5;
export const VIRTIO_BLK_F_BLK_SIZE = 6;
export const VIRTIO_BLK_F_FLUSH = 9;
export const VIRTIO_BLK_F_TOPOLOGY = 10;
export const VIRTIO_BLK_F_CONFIG_WCE = 11;
export const VIRTIO_BLK_F_MQ = 12;
export const VIRTIO_BLK_F_DISCARD = 13;
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;

export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;

export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

export const VIRTIO_BLK_ID_BYTES = 20;
/** struct virtio_blk_req header: le32 type, le32 reserved, le64 sector. */
export const REQUEST_HEADER_SIZE = 16;
/** struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags. */
export const DISCARD_SEGMENT_SIZE = 16;
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

/** Config space fields we fill, by byte offset (struct virtio_blk_config). */
export const CONFIG = {
  capacity: 0, // le64, in 512-byte sectors
  sizeMax: 8, // le32
  segMax: 12, // le32
  blkSize: 20, // le32
  physicalBlockExp: 24, // u8
  alignmentOffset: 25, // u8
  minIoSize: 26, // le16, in blocks
  optIoSize: 28, // le32, in blocks
  writeback: 32, // u8
  numQueues: 34, // le16
  maxDiscardSectors: 36, // le32
  maxDiscardSeg: 40, // le32
  discardSectorAlignment: 44, // le32
  maxWriteZeroesSectors: 48, // le32
  maxWriteZeroesSeg: 52, // le32
  writeZeroesMayUnmap: 56, // u8
} as const;
/** Up to write_zeroes_may_unmap and its padding; the secure-erase and zoned fields are not offered. */
export const CONFIG_SIZE = 60;

export interface BlkGeometry {
  capacitySectors: number;
  blockSize: number;
  numQueues: number;
  segMax: number;
  sizeMax: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  writeback: boolean;
}

export function encodeConfig(g: BlkGeometry): Uint8Array {
  const bytes = new Uint8Array(CONFIG_SIZE);
  const v = new DataView(bytes.buffer);
  v.setUint32(CONFIG.capacity, g.capacitySectors >>> 0, true);
  v.setUint32(CONFIG.capacity + 4, Math.floor(g.capacitySectors / 2 ** 32), true);
  v.setUint32(CONFIG.sizeMax, g.sizeMax, true);
  v.setUint32(CONFIG.segMax, g.segMax, true);
  v.setUint32(CONFIG.blkSize, g.blockSize, true);
  v.setUint8(CONFIG.physicalBlockExp, Math.log2(g.blockSize / SECTOR_SIZE));
  v.setUint8(CONFIG.alignmentOffset, 0);
  v.setUint16(CONFIG.minIoSize, 1, true);
  v.setUint32(CONFIG.optIoSize, 0, true);
  v.setUint8(CONFIG.writeback, g.writeback ? 1 : 0);
  v.setUint16(CONFIG.numQueues, g.numQueues, true);
  v.setUint32(CONFIG.maxDiscardSectors, g.maxDiscardSectors, true);
  v.setUint32(CONFIG.maxDiscardSeg, g.maxDiscardSeg, true);
  v.setUint32(CONFIG.discardSectorAlignment, g.blockSize / SECTOR_SIZE, true);
  v.setUint32(CONFIG.maxWriteZeroesSectors, g.maxDiscardSectors, true);
  v.setUint32(CONFIG.maxWriteZeroesSeg, g.maxDiscardSeg, true);
  v.setUint8(CONFIG.writeZeroesMayUnmap, 1);
  return bytes;
}
