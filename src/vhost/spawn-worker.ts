/**
 * Start a worker_thread from a module URL, whether the module is built JavaScript or TypeScript source run
 * through tsx (tests, benchmarks and devices written in TypeScript).
 */
import { Worker, type WorkerOptions } from 'node:worker_threads';

export function spawnWorker(entry: URL, workerData: Record<string, unknown>, options: WorkerOptions = {}): Worker {
  if (entry.pathname.endsWith('.ts')) {
    return new Worker(new URL('./ts-worker-bootstrap.mjs', import.meta.url), {
      ...options,
      workerData: { ...workerData, __entry: entry.href },
    });
  }
  return new Worker(entry, { ...options, workerData });
}
