import koffi from 'koffi';

// One handle for every module in src/sys; each worker thread gets its own through its own module instance.
export const libc = koffi.load('libc.so.6');

const TWO_32 = 0x1_0000_0000;

// 64-bit fields are written as two u32 halves so callers can keep addresses as Numbers (exact below 2^53).
export function setU64(words: Uint32Array, index: number, value: number): void {
  words[index] = value >>> 0;
  words[index + 1] = Math.floor(value / TWO_32) >>> 0;
}

export function getU64(words: Uint32Array, index: number): number {
  return words[index] + words[index + 1] * TWO_32;
}
