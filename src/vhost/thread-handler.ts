/** Finding a data plane's thread handler: its own createThreadHandler, or one made from createQueueHandler. */
import type { QueueHandlerFactory, ThreadContext, ThreadHandler, ThreadHandlerFactory } from './device.js';

/** Queue indexes a thread tells apart per device (kick tokens are lane * this + index). */
export const MAX_LANE_QUEUES = 4096;

interface DataPlaneModule {
  createThreadHandler?: ThreadHandlerFactory;
  createQueueHandler?: QueueHandlerFactory;
}

/** The thread handler of a module's exports, or of the factories a main-thread data plane gives directly. */
export function threadHandlerOf(exports: DataPlaneModule, ctx: ThreadContext, what: string): ThreadHandler {
  if (typeof exports.createThreadHandler === 'function') return exports.createThreadHandler(ctx);
  const perQueue = exports.createQueueHandler;
  if (typeof perQueue === 'function') return { createQueueHandler: (q) => perQueue(q) };
  throw new Error(`${what} exports neither createThreadHandler(thread) nor createQueueHandler(ctx)`);
}

export async function loadThreadHandler(module: URL, ctx: ThreadContext): Promise<ThreadHandler> {
  const exports = (await import(module.href)) as DataPlaneModule;
  return threadHandlerOf(exports, ctx, module.href);
}
