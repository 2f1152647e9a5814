import koffi from 'koffi';
import { EAGAIN, EINTR, SysError, lastError } from './errors.js';
import { eventfdCreate, eventfdRead } from './eventfd.js';
import { close } from './fd.js';
import { libc, setU64 } from './libc.js';
import { addressOf, mmapShared, munmap, viewOf } from './memory.js';

// io_uring has one syscall number on every architecture but alpha, and glibc has no wrappers for it.
const SYS_IO_URING_SETUP = 425;
const SYS_IO_URING_ENTER = 426;
const SYS_IO_URING_REGISTER = 427;

// syscall() is variadic; binding it with fixed integer parameters skips koffi's per-call variadic type parsing.
// Safe because glibc's syscall() is an assembly shim that only moves integer registers.
const sysSetup = libc.func('syscall', 'long', ['long', 'uint32_t', 'uintptr_t']) as (
  nr: number,
  entries: number,
  params: number,
) => number;
const sysEnter = libc.func('syscall', 'long', [
  'long',
  'int',
  'uint32_t',
  'uint32_t',
  'uint32_t',
  'uintptr_t',
  'size_t',
]) as (nr: number, fd: number, toSubmit: number, minComplete: number, flags: number, sig: number, sz: number) => number;
const sysRegister = libc.func('syscall', 'long', ['long', 'int', 'uint32_t', 'uintptr_t', 'uint32_t']) as (
  nr: number,
  fd: number,
  opcode: number,
  arg: number,
  count: number,
) => number;

const ENOSYS = koffi.os.errno.ENOSYS;
const EPERM = koffi.os.errno.EPERM;
const EACCES = koffi.os.errno.EACCES;
const EINVAL = koffi.os.errno.EINVAL;
const EBUSY = koffi.os.errno.EBUSY;

const IORING_OFF_SQ_RING = 0;
const IORING_OFF_CQ_RING = 0x8000000;
const IORING_OFF_SQES = 0x10000000;
const IORING_FEAT_SINGLE_MMAP = 1 << 0;
const IORING_ENTER_GETEVENTS = 1 << 0;
const IORING_REGISTER_EVENTFD = 4;
const IORING_REGISTER_PROBE = 8;
const IORING_FSYNC_DATASYNC = 1 << 0;
const IO_URING_OP_SUPPORTED = 1 << 0;

const IORING_OP_READV = 1;
const IORING_OP_WRITEV = 2;
const IORING_OP_FSYNC = 3;
const IORING_OP_FALLOCATE = 17;
const IORING_OP_READ = 22;
const IORING_OP_WRITE = 23;
const USED_OPS = [
  IORING_OP_READV,
  IORING_OP_WRITEV,
  IORING_OP_FSYNC,
  IORING_OP_FALLOCATE,
  IORING_OP_READ,
  IORING_OP_WRITE,
];

// struct io_uring_params as u32 words: 10 words of header, then io_sqring_offsets and io_cqring_offsets (10 each).
const PARAMS_WORDS = 30;
const P_SQ_ENTRIES = 0;
const P_CQ_ENTRIES = 1;
const P_FEATURES = 5;
const P_SQ_HEAD = 10;
const P_SQ_TAIL = 11;
const P_SQ_MASK = 12;
const P_SQ_ARRAY = 16;
const P_CQ_HEAD = 20;
const P_CQ_TAIL = 21;
const P_CQ_MASK = 22;
const P_CQ_CQES = 25;

// struct io_uring_sqe is 64 bytes = 16 words; struct io_uring_cqe is 16 bytes = 4 words.
const SQE_WORDS = 16;
const SQE_BYTES = 64;
const CQE_WORDS = 4;
const CQE_BYTES = 16;

// struct io_uring_probe: 16-byte header, then 8 bytes per opcode with the u16 flags at byte 2.
const PROBE_OPS = 256;
const PROBE_HEADER_BYTES = 16;
const PROBE_OP_BYTES = 8;

const TWO_32 = 0x1_0000_0000;

const EMPTY_U32 = new Uint32Array(0);
const EMPTY_I32 = new Int32Array(0);

let availability: boolean | undefined;

interface Mapping {
  address: number;
  length: number;
}

/**
 * An io_uring for block I/O between a file and memory given by address (guest memory, or a Buffer from addressOf).
 * Not thread-safe: one thread at a time prepares, submits and reaps, and that thread should be the one that
 * submits, because the kernel completes file I/O through task work on the submitting thread.
 */
export class IoUring {
  /** Registered with the ring: readable once completions are waiting. reap() drains it. */
  readonly eventFd: number;
  /** Submission queue size (the kernel rounds the requested size up to a power of two). */
  readonly entries: number;
  readonly cqEntries: number;

  private ringFd: number;
  private readonly mappings: Mapping[];
  private sq: Uint32Array;
  private sqes: Uint32Array;
  private cq: Uint32Array;
  private cqResults: Int32Array;
  // Zeroed by close(), so prep* fails fast instead of touching unmapped rings.
  private sqCapacity: number;
  private cqCapacity: number;
  private readonly sqMask: number;
  private readonly sqHeadIndex: number;
  private readonly sqTailIndex: number;
  private readonly cqMask: number;
  private readonly cqHeadIndex: number;
  private readonly cqTailIndex: number;
  private readonly cqesIndex: number;
  // Free-running u32 counters, as in the rings themselves; differences are taken modulo 2^32.
  private sqeTail = 0;
  private sqHead = 0;
  private cqHead = 0;
  private unreaped = 0;

  /** Whether io_uring works here with every opcode this class uses; probed once. Otherwise use preadv/pwritev. */
  static available(): boolean {
    if (availability !== undefined) return availability;
    let ring: IoUring;
    try {
      ring = IoUring.create(1);
    } catch (error) {
      // ENOSYS: kernel without io_uring, or seccomp. EPERM/EACCES: kernel.io_uring_disabled, seccomp, LSM.
      // Anything else (EMFILE, ENOMEM) says nothing about the machine, so it is thrown and not remembered.
      if (error instanceof SysError && [ENOSYS, EPERM, EACCES].includes(error.errno)) return (availability = false);
      throw error;
    }
    try {
      availability = ring.supportsOps(USED_OPS);
    } finally {
      ring.close();
    }
    return availability;
  }

  static create(entries: number): IoUring {
    const params = new Uint32Array(PARAMS_WORDS);
    const fd = sysSetup(SYS_IO_URING_SETUP, entries, addressOf(params));
    if (fd < 0) throw lastError('io_uring_setup');
    const mappings: Mapping[] = [];
    let eventFd = -1;
    try {
      const sqEntries = params[P_SQ_ENTRIES];
      const cqEntries = params[P_CQ_ENTRIES];
      let sqLength = params[P_SQ_ARRAY] + sqEntries * 4;
      let cqLength = params[P_CQ_CQES] + cqEntries * CQE_BYTES;
      const single = (params[P_FEATURES] & IORING_FEAT_SINGLE_MMAP) !== 0;
      if (single) sqLength = cqLength = Math.max(sqLength, cqLength);
      const map = (length: number, offset: number): number => {
        const address = mmapShared(fd, length, offset);
        mappings.push({ address, length });
        return address;
      };
      const sqAddress = map(sqLength, IORING_OFF_SQ_RING);
      const cqAddress = single ? sqAddress : map(cqLength, IORING_OFF_CQ_RING);
      const sqesAddress = map(sqEntries * SQE_BYTES, IORING_OFF_SQES);

      eventFd = eventfdCreate(0, true);
      const eventFdWord = new Int32Array([eventFd]);
      if (sysRegister(SYS_IO_URING_REGISTER, fd, IORING_REGISTER_EVENTFD, addressOf(eventFdWord), 1) < 0) {
        throw lastError('io_uring_register(EVENTFD)');
      }
      return new IoUring(fd, eventFd, params, mappings, {
        sq: new Uint32Array(viewOf(sqAddress, sqLength)),
        cq: cqAddress === sqAddress ? undefined : new Uint32Array(viewOf(cqAddress, cqLength)),
        sqes: new Uint32Array(viewOf(sqesAddress, sqEntries * SQE_BYTES)),
      });
    } catch (error) {
      for (const { address, length } of mappings) munmap(address, length);
      if (eventFd >= 0) close(eventFd);
      close(fd);
      throw error;
    }
  }

  private constructor(
    fd: number,
    eventFd: number,
    params: Uint32Array,
    mappings: Mapping[],
    views: { sq: Uint32Array; cq: Uint32Array | undefined; sqes: Uint32Array },
  ) {
    this.ringFd = fd;
    this.eventFd = eventFd;
    this.mappings = mappings;
    this.entries = params[P_SQ_ENTRIES];
    this.cqEntries = params[P_CQ_ENTRIES];
    this.sqCapacity = this.entries;
    this.cqCapacity = this.cqEntries;
    this.sq = views.sq;
    this.cq = views.cq ?? views.sq;
    this.cqResults = new Int32Array(this.cq.buffer);
    this.sqes = views.sqes;
    // Ring offsets are byte offsets of u32 fields, so /4 gives the word index.
    this.sqMask = this.sq[params[P_SQ_MASK] / 4];
    this.sqHeadIndex = params[P_SQ_HEAD] / 4;
    this.sqTailIndex = params[P_SQ_TAIL] / 4;
    this.cqMask = this.cq[params[P_CQ_MASK] / 4];
    this.cqHeadIndex = params[P_CQ_HEAD] / 4;
    this.cqTailIndex = params[P_CQ_TAIL] / 4;
    this.cqesIndex = params[P_CQ_CQES] / 4;
    // The SQ index array is an indirection we never need: pin slot i to SQE i once, then fill SQEs in ring order.
    const arrayIndex = params[P_SQ_ARRAY] / 4;
    for (let i = 0; i < this.entries; i++) this.sq[arrayIndex + i] = i;
    this.sqeTail = this.sqHead = Atomics.load(this.sq, this.sqTailIndex);
    this.cqHead = Atomics.load(this.cq, this.cqHeadIndex);
  }

  /**
   * How many more prep* calls succeed now. Bounded by free SQ slots and by CQ room: completions not yet reaped count
   * against the CQ, so the kernel never has to overflow it.
   */
  get sqSpace(): number {
    if (this.ringFd < 0) return 0;
    this.sqHead = Atomics.load(this.sq, this.sqHeadIndex);
    const sqFree = this.sqCapacity - ((this.sqeTail - this.sqHead) >>> 0);
    return Math.max(0, Math.min(sqFree, this.cqCapacity - this.unreaped));
  }

  /** Operations prepared and not yet reaped (submitted or not). */
  get pending(): number {
    return this.unreaped;
  }

  /** Prepared and not yet taken by the kernel. */
  get unsubmitted(): number {
    if (this.ringFd < 0) return 0;
    return (this.sqeTail - Atomics.load(this.sq, this.sqHeadIndex)) >>> 0;
  }

  /** iovAddress: a struct iovec table (IovecArray.address), which must stay put until the completion is reaped. */
  prepReadv(fd: number, iovAddress: number, iovCount: number, offset: number, userData: number): boolean {
    return this.prep(IORING_OP_READV, fd, iovAddress, iovCount, offset, 0, userData);
  }

  prepWritev(fd: number, iovAddress: number, iovCount: number, offset: number, userData: number): boolean {
    return this.prep(IORING_OP_WRITEV, fd, iovAddress, iovCount, offset, 0, userData);
  }

  prepRead(fd: number, address: number, length: number, offset: number, userData: number): boolean {
    return this.prep(IORING_OP_READ, fd, address, length, offset, 0, userData);
  }

  prepWrite(fd: number, address: number, length: number, offset: number, userData: number): boolean {
    return this.prep(IORING_OP_WRITE, fd, address, length, offset, 0, userData);
  }

  prepFsync(fd: number, datasync: boolean, userData: number): boolean {
    return this.prep(IORING_OP_FSYNC, fd, 0, 0, 0, datasync ? IORING_FSYNC_DATASYNC : 0, userData);
  }

  /** mode as for fallocate(2), e.g. FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, or FALLOC_FL_ZERO_RANGE. */
  prepFallocate(fd: number, mode: number, offset: number, length: number, userData: number): boolean {
    // The SQE carries the mode in len and the length in addr.
    return this.prep(IORING_OP_FALLOCATE, fd, length, mode, offset, 0, userData);
  }

  /** Hands prepared SQEs to the kernel without waiting. How many it took; 0 under EAGAIN/EBUSY (reap, retry). */
  submit(): number {
    return this.enter(0, 0);
  }

  /** Submits, then blocks this thread until at least `count` completions are waiting in the CQ. */
  submitAndWait(count: number): number {
    // Waiting for more than can ever complete would block the thread for good.
    if (count > this.unreaped) throw new RangeError(`waiting for ${count} completions, ${this.unreaped} pending`);
    return this.enter(count, IORING_ENTER_GETEVENTS);
  }

  /**
   * Calls onCompletion for every waiting completion, oldest first; result is the syscall's return value or -errno.
   * userData comes back exactly as given (a Number below 2^53). Drains the eventfd first, so a completion that
   * lands during the walk leaves the eventfd readable for the next turn.
   */
  reap(onCompletion: (userData: number, result: number) => void): number {
    if (this.ringFd < 0) return 0;
    eventfdRead(this.eventFd);
    const cq = this.cq;
    const results = this.cqResults;
    const tail = Atomics.load(cq, this.cqTailIndex);
    let count = 0;
    // The head is published before each callback, and re-read after it: a callback may prep, submit or even reap.
    while (((tail - this.cqHead) | 0) > 0) {
      const w = this.cqesIndex + (this.cqHead & this.cqMask) * CQE_WORDS;
      const userData = cq[w] + cq[w + 1] * TWO_32;
      const result = results[w + 2];
      this.cqHead = (this.cqHead + 1) >>> 0;
      Atomics.store(cq, this.cqHeadIndex, this.cqHead);
      this.unreaped--;
      count++;
      onCompletion(userData, result);
    }
    return count;
  }

  /**
   * Unmaps the rings and closes the ring and the eventfd. Idempotent. Operations still in flight are cancelled by
   * the kernel in the background and may still touch their buffers for a while: reap everything first when the
   * buffers are going to be reused or unmapped.
   */
  close(): void {
    if (this.ringFd < 0) return;
    const fd = this.ringFd;
    this.ringFd = -1;
    // Views over unmapped memory are SIGSEGV on touch: swap in empty arrays.
    this.sq = this.cq = this.sqes = EMPTY_U32;
    this.cqResults = EMPTY_I32;
    this.sqCapacity = this.cqCapacity = 0;
    try {
      for (const { address, length } of this.mappings) munmap(address, length);
    } finally {
      this.mappings.length = 0;
      close(fd);
      close(this.eventFd);
    }
  }

  private prep(
    opcode: number,
    fd: number,
    address: number,
    length: number,
    offset: number,
    opFlags: number,
    userData: number,
  ): boolean {
    if (this.unreaped >= this.cqCapacity) return false;
    if (((this.sqeTail - this.sqHead) >>> 0) >= this.sqCapacity) {
      // The cached head is stale only in our favour; reload it (one atomic) only when the ring looks full.
      this.sqHead = Atomics.load(this.sq, this.sqHeadIndex);
      if (((this.sqeTail - this.sqHead) >>> 0) >= this.sqCapacity) return false;
    }
    const s = this.sqes;
    const w = (this.sqeTail & this.sqMask) * SQE_WORDS;
    s[w] = opcode; // flags and ioprio zero
    s[w + 1] = fd;
    setU64(s, w + 2, offset);
    setU64(s, w + 4, address);
    s[w + 6] = length;
    s[w + 7] = opFlags;
    setU64(s, w + 8, userData);
    // buf_index, personality, splice_fd_in, addr3: an SQE slot is reused, so stale values must be cleared.
    s[w + 10] = 0;
    s[w + 11] = 0;
    s[w + 12] = 0;
    s[w + 13] = 0;
    s[w + 14] = 0;
    s[w + 15] = 0;
    this.sqeTail = (this.sqeTail + 1) >>> 0;
    this.unreaped++;
    return true;
  }

  private enter(minComplete: number, flags: number): number {
    if (this.ringFd < 0) throw new SysError('io_uring_enter', koffi.os.errno.EBADF, { subject: 'closed ring' });
    // Seq-cst store: the SQE writes above are visible to the kernel before it sees the new tail.
    Atomics.store(this.sq, this.sqTailIndex, this.sqeTail);
    for (;;) {
      const toSubmit = (this.sqeTail - Atomics.load(this.sq, this.sqHeadIndex)) >>> 0;
      if (toSubmit === 0 && minComplete === 0) return 0;
      const n = sysEnter(SYS_IO_URING_ENTER, this.ringFd, toSubmit, minComplete, flags, 0, 0);
      if (n >= 0) {
        this.sqHead = Atomics.load(this.sq, this.sqHeadIndex);
        return n;
      }
      const errno = koffi.errno();
      // The kernel reports EINTR only when it submitted nothing, so a retry cannot submit twice.
      if (errno === EINTR) continue;
      if (errno === EAGAIN || errno === EBUSY) return 0;
      throw new SysError('io_uring_enter', errno);
    }
  }

  private supportsOps(ops: readonly number[]): boolean {
    const probe = new Uint8Array(PROBE_HEADER_BYTES + PROBE_OPS * PROBE_OP_BYTES);
    if (sysRegister(SYS_IO_URING_REGISTER, this.ringFd, IORING_REGISTER_PROBE, addressOf(probe), PROBE_OPS) < 0) {
      // Kernels before 5.6 have no probe, and none of READ, WRITE, FALLOCATE either.
      if (koffi.errno() === EINVAL) return false;
      throw lastError('io_uring_register(PROBE)');
    }
    const opsLength = probe[1];
    return ops.every(
      (op) => op < opsLength && (probe[PROBE_HEADER_BYTES + op * PROBE_OP_BYTES + 2] & IO_URING_OP_SUPPORTED) !== 0,
    );
  }
}
