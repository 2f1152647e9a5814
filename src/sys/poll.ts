import koffi from 'koffi';

export interface FdWatch {
  close(): void;
}

// index.d.ts declares the callback as (events) => void; koffi 3.3.4 actually passes (status, events).
type PollCallback = (status: number, events: { readable: boolean }) => void;

// An unreferenced poll handle is garbage-collected and silently stops firing.
const live = new Set<FdWatch>();

/**
 * Runs onReadable on the main event loop whenever fd is readable. Level-triggered: it fires again on every
 * loop turn while data remains, so the handler must drain the fd (read until EAGAIN).
 * A poll error (status < 0) also calls onReadable: the handler's own read then reports the real error or EOF.
 * Close the watch before closing the fd.
 */
export function watchReadable(fd: number, onReadable: () => void): FdWatch {
  const callback: PollCallback = () => onReadable();
  const handle = koffi.node.poll(fd, { readable: true }, callback as unknown as (events: unknown) => void);
  const watch: FdWatch = {
    close() {
      if (!live.delete(watch)) return;
      handle.close();
    },
  };
  live.add(watch);
  return watch;
}
