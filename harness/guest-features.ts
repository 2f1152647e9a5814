// What the guest's driver negotiated, read from sysfs inside the guest: /sys/bus/virtio/devices/*/features holds
// one character per feature bit, bit 0 first.

/** VIRTIO_F_RING_PACKED: the driver runs packed virtqueues. */
export const RING_PACKED_BIT = 34;

/**
 * Guest shell that prints `RESULT <label> <0|1>` for feature `bit` of the first virtio device with `deviceId`
 * (virtio 1.2 §5: 1 net, 2 blk, 3 console, 4 rng), or `RESULT <label> missing` when there is none.
 */
export function featureBitScript(deviceId: number, bit: number, label: string): string {
  const id = `0x${deviceId.toString(16).padStart(4, '0')}`;
  return `v=missing; for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = ${id} ] && { v=$(cut -c${bit + 1} $d/features); break; }; done; echo "RESULT ${label} $v"`;
}
