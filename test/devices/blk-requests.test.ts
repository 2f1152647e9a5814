// virtio-blk request handling against our own frontend: every status a guest can provoke, and the queue keeps
// serving after each. (qemu-io cannot send malformed requests; a hostile guest can.)
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { blkDevice, type BlkDevice, type BlkOptions } from '../../src/devices/blk/index.js';
import {
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../src/devices/blk/spec.js';
import { VhostUserFrontend, type TestQueue } from '../../src/frontend/index.js';
import { VhostUserServer, type Logger } from '../../src/vhost/index.js';

const DISK = 1 << 20; // 2048 sectors
const quiet: Logger = { info() {}, warn() {}, error() {} };

function header(type: number, sector: number): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setUint32(0, type, true);
  v.setUint32(8, sector >>> 0, true);
  v.setUint32(12, Math.floor(sector / 2 ** 32), true);
  return b;
}

function rangeSeg(sector: number, sectors: number, flags: number): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setUint32(0, sector, true);
  v.setUint32(8, sectors, true);
  v.setUint32(12, flags, true);
  return b;
}

for (const engine of ['sync', 'uring'] as const)
describe(`blk requests (${engine} engine)`, () => {
  let dir: string;
  let image: string;
  let server: VhostUserServer;
  let fe: VhostUserFrontend;
  let q: TestQueue;
  let dev: BlkDevice;

  async function start(opts: Partial<BlkOptions> = {}) {
    dev = blkDevice({ path: image, serial: 'vhost-ts-disk-01', engine, ...opts });
    server = await VhostUserServer.start(dev, { socketPath: join(dir, 'blk.sock'), log: quiet });
    fe = await VhostUserFrontend.connect(join(dir, 'blk.sock'));
    [q] = await fe.start({ queues: [{ index: 0, size: 256 }] });
  }

  /** Post one request; returns [status, used length, bytes written before the status]. */
  async function request(readable: Uint8Array[], dataLen: number, opts: { statusLen?: number; extraWritable?: number } = {}) {
    const writable = [...(dataLen > 0 ? [dataLen] : []), ...(opts.extraWritable ? [opts.extraWritable] : []), opts.statusLen ?? 1].filter((n) => n > 0);
    const chain = q.add({ readable, writable });
    q.kick();
    const [used] = await q.waitForUsed(1);
    const all = q.written(chain, writable.reduce((a, b) => a + b, 0));
    return { status: all[all.length - 1], len: used.len, data: all.subarray(0, dataLen) };
  }

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-blkreq-'));
    image = join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, DISK);
  });
  afterEach(async () => {
    fe?.close();
    await server?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('reads, writes and flushes with OK; reports the config the spec asks for', async () => {
    await start();
    const payload = new Uint8Array(4096).map((_, i) => i & 0xff);
    expect((await request([header(VIRTIO_BLK_T_OUT, 8), payload], 0)).status).toBe(VIRTIO_BLK_S_OK);
    const r = await request([header(VIRTIO_BLK_T_IN, 8)], 4096);
    expect(r.status).toBe(VIRTIO_BLK_S_OK);
    expect(r.len).toBe(4097);
    expect(Buffer.compare(r.data, payload)).toBe(0);
    expect((await request([header(VIRTIO_BLK_T_FLUSH, 0)], 0)).status).toBe(VIRTIO_BLK_S_OK);
    expect(readFileSync(image).subarray(4096, 8192)).toEqual(Buffer.from(payload));
    const cfg = await fe.getConfig(0, 60);
    const v = new DataView(cfg.buffer, cfg.byteOffset);
    expect(v.getUint32(0, true)).toBe(DISK / 512); // capacity
    expect(v.getUint32(20, true)).toBe(512); // blk_size
    expect(v.getUint16(34, true)).toBe(1); // num_queues
    expect(v.getUint8(32)).toBe(1); // writeback
  });

  it('answers GET_ID with the serial, zero-padded to 20 bytes', async () => {
    await start();
    const r = await request([header(VIRTIO_BLK_T_GET_ID, 0)], 20);
    expect(r.status).toBe(VIRTIO_BLK_S_OK);
    expect(new TextDecoder().decode(r.data).replace(/\0+$/, '')).toBe('vhost-ts-disk-01');
  });

  it('refuses bad requests with IOERR or UNSUPP and keeps serving', async () => {
    await start();
    const cases: [string, () => ReturnType<typeof request>, number][] = [
      ['read past capacity', () => request([header(VIRTIO_BLK_T_IN, DISK / 512 - 1)], 1024), VIRTIO_BLK_S_IOERR],
      ['read at a sector beyond 2^53', () => request([header(VIRTIO_BLK_T_IN, 2 ** 60)], 512), VIRTIO_BLK_S_IOERR],
      ['data not a multiple of 512', () => request([header(VIRTIO_BLK_T_IN, 0)], 1000), VIRTIO_BLK_S_IOERR],
      ['write with data not a multiple of 512', () => request([header(VIRTIO_BLK_T_OUT, 0), new Uint8Array(100)], 0), VIRTIO_BLK_S_IOERR],
      ['write with writable bytes before the status', () => request([header(VIRTIO_BLK_T_OUT, 0), new Uint8Array(512)], 0, { extraWritable: 8 }), VIRTIO_BLK_S_IOERR],
      ['short header', () => request([new Uint8Array(8)], 512), VIRTIO_BLK_S_IOERR],
      ['unknown request type', () => request([header(99, 0)], 0), VIRTIO_BLK_S_UNSUPP],
      ['discard with the unmap flag', () => request([header(VIRTIO_BLK_T_DISCARD, 0), rangeSeg(0, 8, 1)], 0), VIRTIO_BLK_S_UNSUPP],
      ['write-zeroes with an unknown flag', () => request([header(VIRTIO_BLK_T_WRITE_ZEROES, 0), rangeSeg(0, 8, 2)], 0), VIRTIO_BLK_S_UNSUPP],
      ['discard past capacity', () => request([header(VIRTIO_BLK_T_DISCARD, 0), rangeSeg(DISK / 512, 8, 0)], 0), VIRTIO_BLK_S_IOERR],
      ['discard with a partial range segment', () => request([header(VIRTIO_BLK_T_DISCARD, 0), new Uint8Array(10)], 0), VIRTIO_BLK_S_IOERR],
    ];
    for (const [what, run, status] of cases) {
      const r = await run();
      expect(r.status, what).toBe(status);
    }
    // More data segments than seg_max.
    const many = q.add({ readable: [header(VIRTIO_BLK_T_IN, 0)], writable: [...Array.from({ length: 300 }, () => 512), 1] as number[], indirect: true });
    q.kick();
    const [used] = await q.waitForUsed(1);
    expect(q.written(many, 300 * 512 + 1)[300 * 512]).toBe(VIRTIO_BLK_S_IOERR);
    expect(used.len).toBe(1);
    // A chain with no writable byte has nowhere for a status: returned with length 0.
    q.add({ readable: [header(VIRTIO_BLK_T_FLUSH, 0)] });
    q.kick();
    expect((await q.waitForUsed(1))[0].len).toBe(0);
    // Still serving.
    expect((await request([header(VIRTIO_BLK_T_IN, 0)], 512)).status).toBe(VIRTIO_BLK_S_OK);
    expect(dev.stats().refused).toBe(cases.length + 2);
  });

  it('a read-only disk offers RO, refuses writes, discards and write-zeroes, and serves reads', async () => {
    writeFileSync(image, Buffer.alloc(DISK, 0x77));
    await start({ readonly: true });
    expect(fe.offeredFeatures! & (1n << BigInt(VIRTIO_BLK_F_RO))).not.toBe(0n);
    expect(fe.offeredFeatures! & (1n << BigInt(VIRTIO_BLK_F_DISCARD))).toBe(0n);
    expect((await request([header(VIRTIO_BLK_T_OUT, 0), new Uint8Array(512)], 0)).status).toBe(VIRTIO_BLK_S_IOERR);
    expect((await request([header(VIRTIO_BLK_T_WRITE_ZEROES, 0), rangeSeg(0, 8, 0)], 0)).status).not.toBe(VIRTIO_BLK_S_OK);
    const r = await request([header(VIRTIO_BLK_T_IN, 0)], 512);
    expect(r.status).toBe(VIRTIO_BLK_S_OK);
    expect(r.data.every((b) => b === 0x77)).toBe(true);
    expect(readFileSync(image).every((b) => b === 0x77)).toBe(true);
  });

  it('handles header, data and status sharing descriptors (ANY_LAYOUT)', async () => {
    await start();
    const payload = new Uint8Array(512).fill(0x3c);
    // header and data in one readable descriptor
    const joined = new Uint8Array(16 + 512);
    joined.set(header(VIRTIO_BLK_T_OUT, 4));
    joined.set(payload, 16);
    expect((await request([joined], 0)).status).toBe(VIRTIO_BLK_S_OK);
    // data and status in one writable descriptor
    const chain = q.add({ readable: [header(VIRTIO_BLK_T_IN, 4)], writable: [513] });
    q.kick();
    const [used] = await q.waitForUsed(1);
    const out = q.written(chain, 513);
    expect(used.len).toBe(513);
    expect(out[512]).toBe(VIRTIO_BLK_S_OK);
    expect(out.subarray(0, 512).every((b) => b === 0x3c)).toBe(true);
  });
});

describe('blk null disk', () => {
  it('completes reads and writes at once, refuses what is out of range, and reports the size', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-blknull-'));
    const dev = blkDevice({ path: '', nullSize: 1 << 20 });
    const server = await VhostUserServer.start(dev, { socketPath: join(dir, 'n.sock'), log: quiet });
    const fe = await VhostUserFrontend.connect(join(dir, 'n.sock'));
    try {
      const [q] = await fe.start({ queues: [{ index: 0, size: 64 }] });
      const ok = q.add({ readable: [header(VIRTIO_BLK_T_OUT, 0), new Uint8Array(4096)], writable: [1] });
      const past = q.add({ readable: [header(VIRTIO_BLK_T_IN, 2048)], writable: [512, 1] });
      q.kick();
      await q.waitForUsed(2);
      expect(q.written(ok, 1)[0]).toBe(VIRTIO_BLK_S_OK);
      expect(q.written(past, 513)[512]).toBe(VIRTIO_BLK_S_IOERR);
      const cfg = await fe.getConfig(0, 8);
      expect(new DataView(cfg.buffer, cfg.byteOffset).getUint32(0, true)).toBe(2048);
    } finally {
      fe.close();
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
