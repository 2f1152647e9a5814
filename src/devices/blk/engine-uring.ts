/** io_uring engine: arrives with src/sys/io-uring.ts. Until then every queue uses the synchronous engine. */
import type { DiskFile } from './disk.js';
import type { BlockEngine, EngineHooks } from './engine.js';

export function createUringEngine(
  _disk: DiskFile,
  _hooks: EngineHooks,
  _depth: number,
  required: boolean,
  _onBatch: () => void,
  _watch: (fd: number, cb: () => void) => { close(): void },
): BlockEngine | null {
  if (required) throw new Error('the io_uring engine is not available in this build: use --engine sync');
  return null;
}
