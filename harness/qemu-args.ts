// The one place a QEMU command line is assembled, so every test VM has the same machine: shared memfd guest RAM
// (vhost-user backends map it), a direct kernel boot, the serial console as its only output channel, and no
// default devices that would need firmware ROMs or slow the boot.
import { FW_CFG_SCRIPT } from './guest-init.js';

/**
 * `packed`: let the driver use packed virtqueues (`packed=on`; QEMU's default is split). QEMU's generic
 * vhost-user devices (rng, the test device the console uses) pass the backend's offer through whatever it says.
 * `server`: QEMU listens on the socket (`server=on,wait=on`: it waits for the backend to connect, with `--connect`), instead of
 * QEMU connecting (with `reconnectMs`, again after the backend restarts).
 */
interface Chardev {
  socket: string;
  reconnectMs?: number;
  server?: boolean;
  packed?: boolean;
}
export type VhostUserDevice =
  | ({ kind: 'rng' } & Chardev)
  | ({ kind: 'blk'; numQueues?: number } & Chardev)
  | ({ kind: 'net'; mac?: string; queues?: number } & Chardev)
  /** virtio-console through the generic vhost-user device: 2 queues for one port, more with multiport. */
  | ({ kind: 'console'; numQueues?: number } & Chardev);

export interface MachineSpec {
  kernel: string;
  initrd: string;
  /** Kernel command line words after the harness's own (console=ttyS0 ...). */
  append?: string[];
  memoryMiB: number;
  /** DIMM slots for memory hot-plug (QMP device_add pc-dimm), each up to 256 MiB beyond memoryMiB. */
  hotplugSlots?: number;
  cpus: number;
  /** From chooseAccel(). */
  accelArgs: string[];
  serial: { to: 'stdio' } | { to: 'file'; path: string };
  /** A file whose contents the guest's /init runs as a shell script. */
  scriptFile?: string;
  devices?: VhostUserDevice[];
  extra?: string[];
}

/** A QEMU option value must double commas that are meant literally (paths may contain them). */
function escape(value: string): string {
  return value.replace(/,/g, ',,');
}

function chardev(id: string, d: Chardev): string[] {
  const mode = d.server ? ',server=on,wait=on' : d.reconnectMs !== undefined ? `,reconnect-ms=${d.reconnectMs}` : '';
  return ['-chardev', `socket,id=${id},path=${escape(d.socket)}${mode}`];
}

export function defaultMac(index: number): string {
  return `52:54:00:12:34:${(0x56 + index).toString(16).padStart(2, '0')}`;
}

export function deviceArgs(devices: VhostUserDevice[]): string[] {
  const args: string[] = [];
  let netIndex = 0;
  devices.forEach((d, i) => {
    const id = `vhu${i}`;
    args.push(...chardev(id, d));
    const packed = d.packed ? ',packed=on' : '';
    switch (d.kind) {
      case 'rng':
        args.push('-device', `vhost-user-rng-pci,chardev=${id}${packed}`);
        break;
      case 'blk':
        args.push('-device', `vhost-user-blk-pci,chardev=${id}${d.numQueues ? `,num-queues=${d.numQueues}` : ''}${packed}`);
        break;
      case 'net': {
        const netdev = `net${netIndex}`;
        const mac = d.mac ?? defaultMac(netIndex);
        netIndex++;
        const queues = d.queues && d.queues > 1 ? d.queues : undefined;
        args.push('-netdev', `vhost-user,id=${netdev},chardev=${id}${queues ? `,queues=${queues}` : ''}`);
        // romfile= : the iPXE option ROM is only for network boot, and skipping it saves BIOS time under TCG.
        // A multiqueue virtio-net needs an MSI-X vector per queue, plus config and control.
        args.push(
          '-device',
          `virtio-net-pci,netdev=${netdev},mac=${mac},romfile=${queues ? `,mq=on,vectors=${2 * queues + 2}` : ''}${packed}`,
        );
        break;
      }
      case 'console':
        // virtio-id 3 is the console; its config space (cols, rows, max_nr_ports, emerg_wr) is 12 bytes.
        args.push('-device', `vhost-user-test-device-pci,chardev=${id},virtio-id=3,num_vqs=${d.numQueues ?? 2},config_size=12${packed}`);
        break;
    }
  });
  return args;
}

export function machineArgs(m: MachineSpec): string[] {
  const append = ['console=ttyS0', 'panic=-1', 'quiet', ...(m.append ?? [])].join(' ');
  return [
    '-nodefaults',
    '-no-user-config',
    '-machine', 'q35',
    ...m.accelArgs,
    '-smp', String(m.cpus),
    '-m', m.hotplugSlots ? `${m.memoryMiB}M,slots=${m.hotplugSlots},maxmem=${m.memoryMiB + 256 * m.hotplugSlots}M` : `${m.memoryMiB}M`,
    '-object', `memory-backend-memfd,id=mem,size=${m.memoryMiB}M,share=on`,
    '-numa', 'node,memdev=mem',
    '-kernel', m.kernel,
    '-initrd', m.initrd,
    '-append', append,
    '-display', 'none',
    '-vga', 'none',
    '-monitor', 'none',
    '-serial', m.serial.to === 'stdio' ? 'stdio' : `file:${m.serial.path}`,
    // panic=-1 makes a panicking guest reboot at once; -no-reboot turns that, and poweroff, into QEMU exiting.
    '-no-reboot',
    ...(m.scriptFile ? ['-fw_cfg', `name=${FW_CFG_SCRIPT},file=${escape(m.scriptFile)}`] : []),
    ...deviceArgs(m.devices ?? []),
    ...(m.extra ?? []),
  ];
}
