/**
 * The dirty log of live migration (vhost-user.rst, "Migration"): one bit per 4 KiB page of guest-physical memory,
 * in memory the frontend shares with us (SET_LOG_BASE), set atomically because the frontend and every queue thread
 * write it at once. Pages past the end of the log are not marked: the frontend sizes it for the highest guest
 * address, and a write beyond that is no write to guest memory.
 */
import type { DescriptorChain } from './chain.js';

const PAGE_SHIFT = 12;

export class DirtyLog {
  private readonly bits: Uint8Array;
  private readonly pages: number;

  constructor(log: Uint8Array) {
    this.bits = log;
    this.pages = log.length * 8;
  }

  /** Mark every page that [gpa, gpa + length) touches. */
  mark(gpa: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(gpa / 4096);
    const last = Math.min(Math.floor((gpa + length - 1) / 4096), this.pages - 1);
    const bits = this.bits;
    for (let page = first; page <= last; page++) Atomics.or(bits, page >>> 3, 1 << (page & 7));
  }

  /** The device wrote `written` bytes into the chain's writable part, from its start. */
  chainWrites(chain: DescriptorChain, written: number): void {
    let left = written;
    for (let i = chain.readableCount; i < chain.count && left > 0; i++) {
      const n = Math.min(chain.segLength[i], left);
      this.mark(chain.segAddr[i], n);
      left -= n;
    }
  }

  /** Whether the page holding `gpa` is marked (tests, diagnostics). */
  isDirty(gpa: number): boolean {
    const page = Math.floor(gpa / 4096);
    return page < this.pages && (this.bits[page >>> 3] & (1 << (page & 7))) !== 0;
  }
}

export const DIRTY_LOG_PAGE = 1 << PAGE_SHIFT;
