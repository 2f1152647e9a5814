/**
 * Guest RAM and virtqueues as QEMU holds them, for tests and benchmarks that play the front-end.
 *
 * RAM is memfd-backed and mapped in this process, so the back-end (in this process or another) maps the very
 * same pages from the fds we send, and both sides see each other's writes. Frontend user addresses are our real
 * mapping addresses, as with QEMU: a back-end that confuses user and guest addresses fails here as it would there.
 */
import {
  close,
  eventfdCreate,
  eventfdRead,
  eventfdWrite,
  memfdCreate,
  mmapShared,
  munmap,
  pageSize,
  viewOf,
  watchReadable,
} from '../sys/index.js';
import type { MemoryRegion } from '../vhost/codec.js';
import {
  GuestAllocator,
  GuestMemory,
  PackedQueueDriver,
  SplitQueueDriver,
  WINDOW_SIZE,
  packedRingLayout,
  splitRingLayout,
  type GuestBuffer,
  type GuestRegion,
  type QueueDriver,
  type RingLayout,
} from '../virtqueue/index.js';
import { FrontendError } from './errors.js';

export interface TestRegionSpec {
  guestPhysAddr: number;
  /** Bytes; a multiple of the page size. */
  size: number;
}

export interface TestGuestMemoryOptions {
  /** Default: one 64 MiB region at guest address 0. */
  regions?: readonly TestRegionSpec[];
  /**
   * Back every region with one memfd at increasing offsets (as QEMU does for RAM split around the PCI hole), so
   * mmap offsets are non-zero and the same fd travels several times in SET_MEM_TABLE. Default: one memfd each.
   */
  singleFile?: boolean;
  /** memfd name, visible in /proc/<pid>/maps. */
  name?: string;
}

/** A region as SET_MEM_TABLE / ADD_MEM_REG describe it, plus where we mapped it. */
export interface TestMemoryRegion extends MemoryRegion {
  /** Our mapping of the region (also its userAddr). */
  readonly hostAddr: number;
}

export const DEFAULT_GUEST_MEMORY = 64 * 1024 * 1024;

export class TestGuestMemory {
  /** The translation the driver uses; the back-end builds its own from the regions. */
  readonly memory: GuestMemory;
  /** In guest address order; each carries its fd, ready for SET_MEM_TABLE. */
  readonly regions: readonly TestMemoryRegion[];
  /** Distinct fds behind the regions. */
  readonly fds: readonly number[];

  private readonly allocators: GuestAllocator[];
  private mappings: { address: number; length: number }[] = [];
  private isClosed = false;

  constructor(options: TestGuestMemoryOptions = {}) {
    const specs = [...(options.regions ?? [{ guestPhysAddr: 0, size: DEFAULT_GUEST_MEMORY }])].sort(
      (a, b) => a.guestPhysAddr - b.guestPhysAddr,
    );
    if (specs.length === 0) throw new RangeError('guest memory needs at least one region');
    for (const s of specs) {
      // mmap offsets must be page aligned, and a back-end maps each region whole.
      if (!(s.size > 0) || s.size % pageSize !== 0 || s.guestPhysAddr % pageSize !== 0) {
        throw new RangeError(`region 0x${s.guestPhysAddr.toString(16)}+${s.size}: address and size must be page multiples`);
      }
    }
    const name = options.name ?? 'vhost-ts-guest';
    const fds: number[] = [];
    const regions: TestMemoryRegion[] = [];
    const guestRegions: GuestRegion[] = [];
    try {
      let shared = -1;
      if (options.singleFile) {
        shared = memfdCreate(name, specs.reduce((sum, s) => sum + s.size, 0));
        fds.push(shared);
      }
      let offset = 0;
      for (const s of specs) {
        let fd = shared;
        if (fd < 0) {
          fd = memfdCreate(name, s.size);
          fds.push(fd);
        }
        const mmapOffset = shared < 0 ? 0 : offset;
        offset += s.size;
        const hostAddr = mmapShared(fd, s.size, mmapOffset);
        this.mappings.push({ address: hostAddr, length: s.size });
        regions.push({ guestPhysAddr: s.guestPhysAddr, size: s.size, userAddr: hostAddr, mmapOffset, fd, hostAddr });
        guestRegions.push({
          guestPhysAddr: s.guestPhysAddr,
          size: s.size,
          userAddr: hostAddr,
          mmapOffset,
          hostAddr,
          windows: windowsOf(hostAddr, s.size),
        });
      }
      this.memory = new GuestMemory(guestRegions);
    } catch (error) {
      this.release(fds);
      throw error;
    }
    this.regions = regions;
    this.fds = fds;
    // Nothing is handed out at guest address 0: a back-end that treats 0 as "unset" would pass by luck.
    this.allocators = regions.map(
      (r) => new GuestAllocator(r.guestPhysAddr === 0 ? pageSize : r.guestPhysAddr, r.guestPhysAddr + r.size),
    );
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** Guest address of `length` fresh bytes, from the first region with room. Never freed (a bump allocator). */
  alloc(length: number, align = 8): number {
    this.check();
    for (const a of this.allocators) {
      try {
        return a.alloc(length, align);
      } catch {
        // this region is full: try the next one
      }
    }
    throw new RangeError(`guest memory exhausted: ${length} bytes wanted`);
  }

  /** The front-end virtual address of a guest address (what SET_VRING_ADDR carries). */
  userAddr(gpa: number): number {
    for (const r of this.regions) {
      if (gpa >= r.guestPhysAddr && gpa - r.guestPhysAddr < r.size) return r.userAddr + (gpa - r.guestPhysAddr);
    }
    throw new RangeError(`guest address 0x${gpa.toString(16)} is not in guest memory`);
  }

  /** A copy of guest bytes. */
  read(gpa: number, length: number): Uint8Array {
    this.check();
    const out = new Uint8Array(length);
    this.memory.read(gpa, out);
    return out;
  }

  write(gpa: number, bytes: Uint8Array): void {
    this.check();
    this.memory.write(gpa, bytes);
  }

  fill(gpa: number, length: number, value: number): void {
    this.write(gpa, new Uint8Array(length).fill(value));
  }

  /** Unmap and close the fds. Every view handed out dies with it: touching one afterwards is SIGSEGV. */
  close(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.release(this.fds);
  }

  private release(fds: readonly number[]): void {
    for (const m of this.mappings) munmap(m.address, m.length);
    this.mappings = [];
    for (const fd of fds) close(fd);
  }

  private check(): void {
    if (this.isClosed) throw new FrontendError('CLOSED', 'guest memory is closed (unmapped)');
  }
}

function windowsOf(address: number, size: number): Uint8Array[] {
  const windows: Uint8Array[] = [];
  for (let off = 0; off < size; off += WINDOW_SIZE) {
    windows.push(new Uint8Array(viewOf(address + off, Math.min(WINDOW_SIZE, size - off))));
  }
  return windows;
}

// ---------------------------------------------------------------------------------------------------------

export interface TestQueueOptions {
  index: number;
  /** Power of 2 (split), or 1 to 32768 (packed). */
  size: number;
  /** Drive the ring with VIRTIO_RING_F_EVENT_IDX semantics (the feature must be negotiated). */
  eventIdx?: boolean;
  /** A packed ring (VIRTIO_F_RING_PACKED negotiated) instead of a split one. */
  packed?: boolean;
}

export interface ChainSpec {
  /** Device-readable buffers: bytes to copy into fresh guest memory, or existing [gpa, length] buffers. */
  readable?: readonly (Uint8Array | GuestBuffer)[];
  /** Device-writable buffers: a length to allocate (zeroed), or existing [gpa, length] buffers. */
  writable?: readonly (number | GuestBuffer)[];
  /** Put the chain in an indirect table (VIRTIO_RING_F_INDIRECT_DESC must be negotiated). */
  indirect?: boolean;
}

export interface PostedChain {
  head: number;
  readable: GuestBuffer[];
  writable: GuestBuffer[];
}

export interface UsedElement {
  id: number;
  len: number;
  /** The chain added under this head, when it was added through {@link TestQueue.add}. */
  chain: PostedChain | undefined;
}

/**
 * One virtqueue as the guest drives it: the rings in guest memory, a bump allocator for buffers, and the
 * kick, call and error eventfds that SET_VRING_KICK/CALL/ERR hand to the back-end.
 */
export class TestQueue {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly packed: boolean;
  readonly layout: RingLayout;
  readonly driver: QueueDriver;
  readonly kickFd: number;
  readonly callFd: number;
  readonly errFd: number;

  private readonly posted = new Map<number, PostedChain>();
  private waiting = false;
  private erring = false;
  private isClosed = false;
  /** Cancels the pending waits: close() rejects them rather than leave them hanging. */
  private readonly cancels = new Set<(error: Error) => void>();

  constructor(
    readonly memory: TestGuestMemory,
    options: TestQueueOptions,
  ) {
    const { index, size } = options;
    this.packed = options.packed ?? false;
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (!this.packed && (size & (size - 1)) !== 0)) {
      throw new RangeError(`queue size ${size} is not ${this.packed ? 'between 1 and' : 'a power of 2 up to'} 32768`);
    }
    this.index = index;
    this.size = size;
    this.eventIdx = options.eventIdx ?? false;
    const layoutOf = this.packed ? packedRingLayout : splitRingLayout;
    this.layout = layoutOf(size, memory.alloc(layoutOf(size, 0).end, 4096));
    this.driver = this.packed
      ? new PackedQueueDriver(memory.memory, this.layout, this.eventIdx)
      : new SplitQueueDriver(memory.memory, this.layout, this.eventIdx);
    const fds: number[] = [];
    try {
      // Non-blocking, as QEMU's event notifiers are: the flag lives on the shared file description, so the
      // back-end sees the same mode it gets from QEMU.
      for (let i = 0; i < 3; i++) fds.push(eventfdCreate(0, true));
    } catch (error) {
      for (const fd of fds) close(fd);
      throw error;
    }
    [this.kickFd, this.callFd, this.errFd] = fds;
  }

  /** The SET_VRING_ADDR payload for this ring (front-end user addresses). */
  vringAddr(): { index: number; ringFlags: number; descUserAddr: number; usedUserAddr: number; availUserAddr: number; logGuestAddr: number } {
    return {
      index: this.index,
      ringFlags: 0,
      descUserAddr: this.memory.userAddr(this.layout.descAddr),
      usedUserAddr: this.memory.userAddr(this.layout.usedAddr),
      availUserAddr: this.memory.userAddr(this.layout.availAddr),
      logGuestAddr: 0,
    };
  }

  /** Guest buffer of `length` zeroed bytes. */
  alloc(length: number, align = 8): GuestBuffer {
    const gpa = this.memory.alloc(length, align);
    this.memory.fill(gpa, length, 0);
    return [gpa, length];
  }

  /** Add one chain (not yet visible to the device: {@link kick} publishes). Throws when the ring is full. */
  add(spec: ChainSpec): PostedChain {
    this.check();
    const readable = (spec.readable ?? []).map((b): GuestBuffer => {
      if (!(b instanceof Uint8Array)) return b;
      const gpa = this.memory.alloc(b.length);
      this.memory.write(gpa, b);
      return [gpa, b.length];
    });
    const writable = (spec.writable ?? []).map((b) => (typeof b === 'number' ? this.alloc(b) : b));
    const indirectAt = spec.indirect ? this.memory.alloc(16 * (readable.length + writable.length), 16) : undefined;
    const head = this.driver.add(readable, writable, indirectAt);
    if (head < 0) throw new RangeError(`queue ${this.index} has no room for a chain of ${readable.length + writable.length}`);
    const chain = { head, readable, writable };
    this.posted.set(head, chain);
    return chain;
  }

  /** `count` chains of one writable buffer of `length` bytes each. */
  addWritable(count: number, length: number): PostedChain[] {
    const chains: PostedChain[] = [];
    for (let i = 0; i < count; i++) chains.push(this.add({ writable: [length] }));
    return chains;
  }

  /** Make added chains visible; true when the device asked to be kicked (no kick is sent). */
  publish(): boolean {
    this.check();
    return this.driver.publish();
  }

  /** Signal the kick eventfd without publishing. */
  notify(): void {
    this.check();
    eventfdWrite(this.kickFd, 1);
  }

  /** Publish and kick, whether or not the device asked: a spurious kick is always legal. */
  kick(): void {
    this.publish();
    this.notify();
  }

  /**
   * The next `count` used elements, in ring order. Already-returned ones are taken at once; after that it waits
   * on the call eventfd. Rejects with FrontendError TIMEOUT after `timeoutMs`, keeping what was collected on
   * the error's `used` so a test can say how far the device got.
   */
  waitForUsed(count: number, timeoutMs = 5000): Promise<UsedElement[]> {
    this.check();
    if (this.waiting) return Promise.reject(new Error(`queue ${this.index}: waitForUsed is already pending`));
    const used: UsedElement[] = [];
    const collect = (): boolean => {
      while (used.length < count) {
        const id = this.driver.nextUsed();
        if (id < 0) break;
        used.push({ id, len: this.driver.lastUsedLen, chain: this.takePosted(id) });
      }
      return used.length >= count;
    };
    if (collect()) return Promise.resolve(used);

    this.waiting = true;
    return this.waitOn<UsedElement[]>(this.callFd, timeoutMs, (done) => {
      eventfdRead(this.callFd);
      // The device fills the used ring before it signals, so a signal with nothing new is only an early one.
      if (collect()) done(null, used);
    }, () => {
      this.waiting = false;
      const error = new FrontendError(
        'TIMEOUT',
        `queue ${this.index}: ${used.length} of ${count} used elements after ${timeoutMs} ms ` +
          `(used idx ${this.driver.usedIdx()}, ${this.driver.pending} chains still with the device)`,
      );
      error.used = used;
      return error;
    }).finally(() => {
      this.waiting = false;
    });
  }

  /** Resolves with the error eventfd's counter once the back-end signals it. */
  waitForError(timeoutMs = 5000): Promise<number> {
    this.check();
    if (this.erring) return Promise.reject(new Error(`queue ${this.index}: waitForError is already pending`));
    const now = eventfdRead(this.errFd);
    if (now > 0) return Promise.resolve(now);
    this.erring = true;
    return this.waitOn<number>(this.errFd, timeoutMs, (done) => {
      const n = eventfdRead(this.errFd);
      if (n > 0) done(null, n);
    }, () => new FrontendError('TIMEOUT', `queue ${this.index}: error eventfd not signalled within ${timeoutMs} ms`)).finally(() => {
      this.erring = false;
    });
  }

  /** Bytes the device wrote into a chain's writable buffers: the first `len` of them (the used length). */
  written(chain: PostedChain, len: number): Uint8Array {
    const out = new Uint8Array(len);
    let at = 0;
    for (const [gpa, length] of chain.writable) {
      if (at >= len) break;
      const n = Math.min(length, len - at);
      out.set(this.memory.read(gpa, n), at);
      at += n;
    }
    if (at < len) throw new RangeError(`used length ${len} exceeds the chain's ${at} writable bytes`);
    return out;
  }

  /** Close the eventfds (guest memory belongs to whoever made it). */
  close(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const cancel of [...this.cancels]) cancel(new FrontendError('CLOSED', `queue ${this.index} closed while waiting`));
    close(this.kickFd);
    close(this.callFd);
    close(this.errFd);
  }

  get closed(): boolean {
    return this.isClosed;
  }

  private takePosted(id: number): PostedChain | undefined {
    const chain = this.posted.get(id);
    this.posted.delete(id);
    return chain;
  }

  /** Watch `fd` until onReadable calls done, or the timeout (which builds the rejection) fires. */
  private waitOn<T>(
    fd: number,
    timeoutMs: number,
    onReadable: (done: (error: Error | null, value?: T) => void) => void,
    onTimeout: () => Error,
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let settled = false;
      const finish = (error: Error | null, value?: T): void => {
        if (settled) return;
        settled = true;
        watch.close();
        clearTimeout(timer);
        this.cancels.delete(finish);
        if (error) reject(error);
        else resolve(value as T);
      };
      const watch = watchReadable(fd, () => {
        try {
          onReadable(finish);
        } catch (error) {
          finish(error as Error);
        }
      });
      const timer = setTimeout(() => finish(onTimeout()), timeoutMs);
      this.cancels.add(finish);
    });
  }

  private check(): void {
    if (this.isClosed) throw new FrontendError('CLOSED', `queue ${this.index} is closed`);
  }
}
