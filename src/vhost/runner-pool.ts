/**
 * The queue threads of one device, kept for the server's lifetime and lent to each session in turn. A worker
 * thread costs a few MiB that Node and koffi never give back when it exits (about 3 mappings and 3 MiB per
 * worker, DESIGN §11), so a backend that made new ones per connection grew without bound under a frontend that
 * reconnects; reusing them keeps it flat, and saves the thread start on every reconnect.
 */
import type { QueueHandlerFactory, ThreadHandlerFactory, VhostUserDevice } from './device.js';
import { InlineHost, startSharedHost, startWorkerHost, type RunnerHost } from './runner-host.js';

export class RunnerPool {
  private readonly hosts = new Map<number, Promise<RunnerHost>>();
  private closed = false;

  constructor(
    private readonly device: VhostUserDevice,
    private readonly log: (message: string) => void,
  ) {}

  /** The host of a queue group, started on first use (or again, when the last one died). */
  host(group: number): Promise<RunnerHost> {
    if (this.closed) return Promise.reject(new Error(`${this.device.name}: the server is closed`));
    const known = this.hosts.get(group);
    if (known) return known.then((h) => (h.alive ? h : this.replace(group, h)));
    return this.start(group);
  }

  /**
   * The session is over (its queues are stopped): every host drops its views of that session's memory and
   * forgets its queues, and waits for the next session. A host that cannot is closed, and made anew when needed.
   */
  async release(): Promise<void> {
    for (const [group, pending] of [...this.hosts]) {
      let host: RunnerHost;
      try {
        host = await pending;
      } catch {
        continue; // failed to start: already forgotten
      }
      try {
        await host.request({ op: 'reset' });
      } catch (e) {
        this.log(`queue group ${group}: ${(e as Error).message}; its thread is replaced`);
        this.hosts.delete(group);
        await host.close().catch(() => {});
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    const hosts = [...this.hosts.values()];
    this.hosts.clear();
    for (const pending of hosts) {
      try {
        await (await pending).close();
      } catch {
        // A host that failed to start has nothing to close.
      }
    }
  }

  private async replace(group: number, dead: RunnerHost): Promise<RunnerHost> {
    this.hosts.delete(group);
    await dead.close().catch(() => {});
    return this.start(group);
  }

  private start(group: number): Promise<RunnerHost> {
    const plane = this.device.dataPlane;
    const opts = {
      module: plane.module,
      factory: plane.createQueueHandler?.bind(plane) as QueueHandlerFactory | undefined,
      threadFactory: plane.createThreadHandler?.bind(plane) as ThreadHandlerFactory | undefined,
      options: plane.options,
      name: `${this.device.name} queue group ${group}`,
      log: this.log,
      pollUs: plane.pollUs ?? 0,
    };
    const host =
      plane.thread === 'main' ? InlineHost.start(opts) : plane.shareThread !== undefined ? startSharedHost(plane.shareThread, opts) : startWorkerHost(opts);
    this.hosts.set(group, host);
    // A host that failed to start is forgotten, so the next request retries and reports the same error.
    host.catch(() => {
      if (this.hosts.get(group) === host) this.hosts.delete(group);
    });
    return host;
  }
}
