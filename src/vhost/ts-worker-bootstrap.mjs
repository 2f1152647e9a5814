// Starts a worker whose entry is TypeScript source (development and tests): Node 20 cannot load .ts itself,
// and `--import tsx` in a worker's execArgv comes too late for its first module. Built JavaScript never uses this.
import { workerData } from 'node:worker_threads';
import { register } from 'tsx/esm/api';

register();
await import(workerData.__entry);
