// The QEMU command line without QEMU: each vhost-user device kind maps to the options QEMU 11 expects.
import { describe, expect, it } from 'vitest';
import { deviceArgs, machineArgs } from '../../harness/qemu-args.js';

describe('QEMU command line', () => {
  it('builds a q35 machine with shared memfd RAM, direct kernel boot and the fw_cfg script', () => {
    const args = machineArgs({
      kernel: '/k/vmlinuz',
      initrd: '/k/initrd.img',
      append: ['harness.root=/dev/vda'],
      memoryMiB: 768,
      cpus: 2,
      accelArgs: ['-accel', 'tcg', '-cpu', 'max'],
      serial: { to: 'file', path: '/tmp/serial.log' },
      scriptFile: '/tmp/a,b/script.sh',
      extra: ['-s'],
    });
    const joined = args.join(' ');
    expect(joined).toContain('-machine q35 -accel tcg -cpu max -smp 2 -m 768M');
    expect(joined).toContain('-object memory-backend-memfd,id=mem,size=768M,share=on -numa node,memdev=mem');
    expect(args[args.indexOf('-append') + 1]).toBe('console=ttyS0 panic=-1 quiet harness.root=/dev/vda');
    expect(joined).toContain('-serial file:/tmp/serial.log');
    expect(joined).toContain('-fw_cfg name=opt/harness/script,file=/tmp/a,,b/script.sh');
    expect(args).toContain('-no-reboot');
    expect(args.at(-1)).toBe('-s');
  });

  it('maps each vhost-user device kind to its chardev and device options', () => {
    const args = deviceArgs([
      { kind: 'rng', socket: '/s/rng.sock' },
      { kind: 'blk', socket: '/s/blk.sock', numQueues: 4, reconnectMs: 1000 },
      { kind: 'net', socket: '/s/net.sock', queues: 2 },
      { kind: 'net', socket: '/s/net2.sock', mac: '52:54:00:aa:bb:cc' },
      { kind: 'console', socket: '/s/con.sock' },
      { kind: 'net', socket: '/s/net3.sock' },
    ]);
    expect(args).toEqual([
      '-chardev', 'socket,id=vhu0,path=/s/rng.sock',
      '-device', 'vhost-user-rng-pci,chardev=vhu0',
      '-chardev', 'socket,id=vhu1,path=/s/blk.sock,reconnect-ms=1000',
      '-device', 'vhost-user-blk-pci,chardev=vhu1,num-queues=4',
      '-chardev', 'socket,id=vhu2,path=/s/net.sock',
      '-netdev', 'vhost-user,id=net0,chardev=vhu2,queues=2',
      '-device', 'virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile=,mq=on,vectors=6',
      '-chardev', 'socket,id=vhu3,path=/s/net2.sock',
      '-netdev', 'vhost-user,id=net1,chardev=vhu3',
      '-device', 'virtio-net-pci,netdev=net1,mac=52:54:00:aa:bb:cc,romfile=',
      '-chardev', 'socket,id=vhu4,path=/s/con.sock',
      '-device', 'vhost-user-test-device-pci,chardev=vhu4,virtio-id=3,num_vqs=2,config_size=12',
      '-chardev', 'socket,id=vhu5,path=/s/net3.sock',
      '-netdev', 'vhost-user,id=net2,chardev=vhu5',
      '-device', 'virtio-net-pci,netdev=net2,mac=52:54:00:12:34:58,romfile=',
    ]);
  });
});
