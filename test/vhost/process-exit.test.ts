// A backend process that dies of an uncaught exception (or calls process.exit) must end, not hang: Node stops its
// worker threads only when they run JavaScript, and queue threads sleep in epoll_wait. They wake at least twice a
// second, so the exit completes; a thread that waited without a bound kept the dead process alive for good
// (seen with the demo after its terminal hung up: its QEMU and tap stayed).
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { startBackend, type BackendProcess } from '../helpers/backend-process.js';

const fixture = new URL('./fixtures/crash-after-start.ts', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'vhost-ts-exit-'));
let backend: BackendProcess | undefined;
afterAll(async () => {
  await backend?.kill();
  rmSync(dir, { recursive: true, force: true });
});

it('a process whose main thread throws while its queue threads sleep exits within 5 s', async () => {
  backend = await startBackend(['--import', 'tsx', fixture, join(dir, 'rng.sock')], (log) => log.includes('throwing'));
  const child = backend.child;
  const exited = child.exitCode !== null ? Promise.resolve() : once(child, 'exit');
  const timeout = new Promise<'hung'>((r) => setTimeout(() => r('hung'), 5000).unref());
  expect(await Promise.race([exited.then(() => 'exited'), timeout]), backend.log()).toBe('exited');
  expect(child.exitCode).not.toBe(0);
  expect(backend.log()).toContain('an uncaught exception on the main thread');
});
