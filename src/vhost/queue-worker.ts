/**
 * Entry of a queue worker thread. It blocks in epoll_wait on its queues' kick eventfds, the device's own fds and
 * a control eventfd; a thread blocked in a native call cannot get postMessage events, so the session writes the
 * control eventfd and the worker pulls requests with receiveMessageOnPort.
 *
 * One thread may serve the queues of several devices (DataPlane.shareThread): each is a lane with its own
 * QueueRunner (its own memory table and queues), all under the module's one thread handler.
 */
import { receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { Epoll, EPOLLET, EPOLLIN, eventfdRead } from '../sys/index.js';
import type { ThreadHandler } from './device.js';
import { QueueRunner, type RunnerRequest } from './queue-runner.js';
import { loadThreadHandler, MAX_LANE_QUEUES } from './thread-handler.js';
import type { PollSetting } from './poll-window.js';

interface WorkerInit {
  module: string;
  controlFd: number;
  port: MessagePort;
  name: string;
  pollUs: PollSetting;
}

/** What the host sends: a lane to create, a request for a lane, or the end. */
type WorkerMessage =
  | { id: number; lane: number; create: { options: unknown; name: string } }
  | { id: number; lane: number; request: RunnerRequest }
  | { id: number; lane: number; drop: true }
  | { id: number; exit: true };

const CONTROL = 0xffffffff;
// Tokens below are kick fds: lane * MAX_LANE_QUEUES + queue index. Tokens from here up are the handlers' own fds.
const WATCH_BASE = 0x80000000;
// While polling, how often the thread still looks at its fds (control requests, kicks of queues not polled).
const POLL_EPOLL_MS = 0.05;
/**
 * An idle thread still wakes this often. Node stops a worker (when the process exits without closing its servers:
 * an uncaught exception, process.exit) only once it runs JavaScript again; a wait without a bound kept a dead
 * process alive for good, its QEMU and tap with it.
 */
const IDLE_WAKE_MS = 500;

const init = workerData as WorkerInit;
const port = init.port;
const epoll = new Epoll(64);
const kickFds = new Map<number, number>();
const watches = new Map<number, { fd: number; onReadable: () => void }>();
const lanes = new Map<number, QueueRunner>();
/** The same runners, for the poll loop (iterating a Map allocates). */
let runners: QueueRunner[] = [];
let nextWatch = WATCH_BASE;

function watch(fd: number, onReadable: () => void): { close(): void } {
  const token = nextWatch++;
  epoll.add(fd, token);
  watches.set(token, { fd, onReadable });
  return {
    close() {
      if (watches.delete(token)) epoll.remove(fd);
    },
  };
}

const log = (message: string) => port.postMessage({ log: `${init.name}: ${message}` });

let thread: ThreadHandler;
try {
  thread = await loadThreadHandler(new URL(init.module), {
    watch: (fd, onReadable) =>
      watch(fd, () => {
        try {
          onReadable();
        } catch (e) {
          log(`${(e as Error).message}`);
        }
      }),
    log,
  });
} catch (e) {
  port.postMessage({ ready: false, error: (e as Error).message });
  process.exit(1);
}

function createLane(lane: number, options: unknown, name: string): QueueRunner {
  const base = lane * MAX_LANE_QUEUES;
  const key = (index: number) => {
    if (index >= MAX_LANE_QUEUES) throw new RangeError(`queue ${index}: a thread serves at most ${MAX_LANE_QUEUES} queues per device`);
    return base + index;
  };
  return new QueueRunner(
    thread,
    options,
    {
      watch,
      watchKick(index, fd) {
        // Edge-triggered: each kick is an event of its own, and its counter need not be read (a read() per kick
        // saved). The counter only grows, by one a kick: 2^64 kicks away from full.
        epoll.add(fd, key(index), EPOLLIN | EPOLLET);
        kickFds.set(key(index), fd);
      },
      unwatchKick(index) {
        const fd = kickFds.get(key(index));
        if (fd === undefined) return;
        kickFds.delete(key(index));
        epoll.remove(fd);
      },
      log: (message) => port.postMessage({ log: `${name}: ${message}` }),
    },
    init.pollUs,
    lane,
  );
}

epoll.add(init.controlFd, CONTROL);
port.postMessage({ ready: true });

let running = true;
let polling = false;
let lastEpoll = 0;
while (running) {
  let n = 0;
  if (!polling) n = epoll.wait(IDLE_WAKE_MS);
  else {
    const now = performance.now();
    if (now - lastEpoll >= POLL_EPOLL_MS) {
      n = epoll.wait(0);
      lastEpoll = now;
    }
  }
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
      lanes.get(Math.floor(token / MAX_LANE_QUEUES))?.kicked(token % MAX_LANE_QUEUES);
    } else {
      watches.get(token)?.onReadable();
    }
  }
  if (!running) break;
  polling = false;
  if (init.pollUs !== 0) {
    const now = performance.now();
    for (let i = 0; i < runners.length; i++) {
      const runner = runners[i];
      if (!runner.polling) continue;
      runner.poll(now);
      polling ||= runner.polling;
    }
  }
  thread.endOfBatch?.();
}
epoll.close();
port.close();

function serveControl(): boolean {
  for (;;) {
    const m = receiveMessageOnPort(port);
    if (!m) return true;
    const msg = m.message as WorkerMessage;
    if ('exit' in msg) {
      for (const runner of lanes.values()) runner.handle({ op: 'reset' });
      port.postMessage({ id: msg.id, reply: { ok: true, value: 0 } });
      return false;
    }
    if ('create' in msg) {
      lanes.set(msg.lane, createLane(msg.lane, msg.create.options, msg.create.name));
      runners = [...lanes.values()];
      port.postMessage({ id: msg.id, reply: { ok: true, value: 0 } });
    } else if ('drop' in msg) {
      lanes.get(msg.lane)?.handle({ op: 'reset' });
      lanes.delete(msg.lane);
      runners = [...lanes.values()];
      port.postMessage({ id: msg.id, reply: { ok: true, value: 0 } });
    } else {
      const runner = lanes.get(msg.lane);
      port.postMessage({ id: msg.id, reply: runner ? runner.handle(msg.request) : { ok: false, error: `no lane ${msg.lane} in this thread` } });
    }
  }
}
