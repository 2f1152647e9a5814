/** virtio-console (virtio 1.2 §5.3): feature bits, config space, queue numbering and control messages. */

export const VIRTIO_ID_CONSOLE = 3;

export const VIRTIO_CONSOLE_F_SIZE = 0;
export const VIRTIO_CONSOLE_F_MULTIPORT = 1;
export const VIRTIO_CONSOLE_F_EMERG_WRITE = 2;

/** The transport's packed ring layout (virtio 1.2 §6), which decides whether a removed port's number can be reused. */
export const VIRTIO_F_RING_PACKED = 34;

/** struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; } */
export const CONFIG_SIZE = 12;
export const CONFIG_EMERG_WR = 8;

/** struct virtio_console_control { le32 id; le16 event; le16 value; } */
export const CONTROL_SIZE = 8;

export const VIRTIO_CONSOLE_DEVICE_READY = 0;
export const VIRTIO_CONSOLE_DEVICE_ADD = 1;
export const VIRTIO_CONSOLE_DEVICE_REMOVE = 2;
export const VIRTIO_CONSOLE_PORT_READY = 3;
export const VIRTIO_CONSOLE_CONSOLE_PORT = 4;
export const VIRTIO_CONSOLE_RESIZE = 5;
export const VIRTIO_CONSOLE_PORT_OPEN = 6;
export const VIRTIO_CONSOLE_PORT_NAME = 7;

export const CONTROL_EVENT_NAMES = ['DEVICE_READY', 'DEVICE_ADD', 'DEVICE_REMOVE', 'PORT_READY', 'CONSOLE_PORT', 'RESIZE', 'PORT_OPEN', 'PORT_NAME'];

/** The guest sends control messages with the id of no port for device-wide events (DEVICE_READY). */
export const NO_PORT = 0xffffffff;

/** Largest max_nr_ports Linux accepts (VIRTCONS_MAX_PORTS). */
export const MAX_PORTS = 0x8000;

/** Queue 0/1: port 0 rx/tx; 2/3: control rx/tx; port n ≥ 1: rx 2n+2, tx 2n+3. */
export function portOfQueue(queue: number): { port: number; dir: 'rx' | 'tx' } | 'control-rx' | 'control-tx' {
  if (queue === 2) return 'control-rx';
  if (queue === 3) return 'control-tx';
  const port = queue < 2 ? 0 : (queue >> 1) - 1;
  return { port, dir: (queue & 1) === 0 ? 'rx' : 'tx' };
}

export const queuesFor = (maxPorts: number): number => 2 * maxPorts + 2;

export function encodeConfig(cols: number, rows: number, maxPorts: number): Uint8Array {
  const b = new Uint8Array(CONFIG_SIZE);
  const v = new DataView(b.buffer);
  v.setUint16(0, cols, true);
  v.setUint16(2, rows, true);
  v.setUint32(4, maxPorts, true);
  return b;
}

/** A control message; RESIZE carries le16 cols, le16 rows and PORT_NAME the UTF-8 name after the header. */
export function encodeControl(id: number, event: number, value: number, extra?: Uint8Array): Uint8Array {
  const b = new Uint8Array(CONTROL_SIZE + (extra?.length ?? 0));
  const v = new DataView(b.buffer);
  v.setUint32(0, id, true);
  v.setUint16(4, event, true);
  v.setUint16(6, value, true);
  if (extra) b.set(extra, CONTROL_SIZE);
  return b;
}

/**
 * RESIZE payload in the spec's order (cols, rows). Linux reads it so since commit 5326ab737a47 (in the 6.1 series from
 * 6.1.160; Debian 12's kernel is newer); older kernels read rows first.
 */
export function resizePayload(cols: number, rows: number): Uint8Array {
  const b = new Uint8Array(4);
  const v = new DataView(b.buffer);
  v.setUint16(0, cols, true);
  v.setUint16(2, rows, true);
  return b;
}
