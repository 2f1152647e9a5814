/**
 * Entry of a queue worker thread. It blocks in epoll_wait on its queues' kick eventfds, the device's own fds and
 * a control eventfd; a thread blocked in a native call cannot get postMessage events, so the session writes the
 * control eventfd and the worker pulls requests with receiveMessageOnPort.
 */
import { receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { Epoll, eventfdRead } from '../sys/index.js';
import type { QueueHandlerFactory } from './device.js';
import { QueueRunner, type RunnerRequest } from './queue-runner.js';

interface WorkerInit {
  module: string;
  options: unknown;
  controlFd: number;
  port: MessagePort;
  name: string;
  pollUs: number;
}

const CONTROL = 0xffffffff;
const WATCH_BASE = 0x10000; // tokens below are queue indexes (kick fds)

const init = workerData as WorkerInit;
const port = init.port;
const epoll = new Epoll(64);
const kickFds = new Map<number, number>();
const watches = new Map<number, { fd: number; onReadable: () => void }>();
let nextWatch = WATCH_BASE;

let factory: QueueHandlerFactory;
try {
  const mod = (await import(init.module)) as { createQueueHandler?: QueueHandlerFactory };
  if (typeof mod.createQueueHandler !== 'function') {
    throw new Error(`${init.module} does not export createQueueHandler(ctx)`);
  }
  factory = mod.createQueueHandler;
} catch (e) {
  port.postMessage({ ready: false, error: (e as Error).message });
  process.exit(1);
}

const runner = new QueueRunner(factory, init.options, {
  watch(fd, onReadable) {
    const token = nextWatch++;
    epoll.add(fd, token);
    watches.set(token, { fd, onReadable });
    return {
      close() {
        if (watches.delete(token)) epoll.remove(fd);
      },
    };
  },
  watchKick(index, fd) {
    epoll.add(fd, index);
    kickFds.set(index, fd);
  },
  unwatchKick(index) {
    const fd = kickFds.get(index);
    if (fd === undefined) return;
    kickFds.delete(index);
    epoll.remove(fd);
  },
  log(message) {
    port.postMessage({ log: `${init.name}: ${message}` });
  },
}, init.pollUs);

epoll.add(init.controlFd, CONTROL);
port.postMessage({ ready: true });

let running = true;
while (running) {
  const n = epoll.wait(-1);
  for (let i = 0; i < n; i++) {
    const token = epoll.token(i);
    if (token === CONTROL) {
      eventfdRead(init.controlFd);
      running = serveControl();
      if (!running) break;
    } else if (token < WATCH_BASE) {
      const fd = kickFds.get(token);
      // A kick fd replaced in this same batch: its stale event is dropped.
      if (fd === undefined) continue;
      eventfdRead(fd);
      runner.kicked(token);
    } else {
      watches.get(token)?.onReadable();
    }
  }
}
epoll.close();
port.close();

function serveControl(): boolean {
  for (;;) {
    const m = receiveMessageOnPort(port);
    if (!m) return true;
    const msg = m.message as { id: number; request: RunnerRequest | { op: 'exit' } };
    if (msg.request.op === 'exit') {
      port.postMessage({ id: msg.id, reply: { ok: true, value: 0 } });
      return false;
    }
    port.postMessage({ id: msg.id, reply: runner.handle(msg.request) });
  }
}
