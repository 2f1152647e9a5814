/**
 * virtio-net as the virtio 1.2 spec (§5.1) defines it: feature bits, the per-packet header, control commands and
 * the config space layout. Pure data; no I/O.
 */

export const VIRTIO_ID_NET = 1;

export const VIRTIO_NET_F_CSUM = 0;
export const VIRTIO_NET_F_GUEST_CSUM = 1;
export const VIRTIO_NET_F_MTU = 3;
export const VIRTIO_NET_F_MAC = 5;
export const VIRTIO_NET_F_GUEST_TSO4 = 7;
export const VIRTIO_NET_F_GUEST_TSO6 = 8;
export const VIRTIO_NET_F_GUEST_ECN = 9;
export const VIRTIO_NET_F_HOST_TSO4 = 11;
export const VIRTIO_NET_F_HOST_TSO6 = 12;
export const VIRTIO_NET_F_HOST_ECN = 13;
export const VIRTIO_NET_F_MRG_RXBUF = 15;
export const VIRTIO_NET_F_STATUS = 16;
export const VIRTIO_NET_F_CTRL_VQ = 17;
export const VIRTIO_NET_F_CTRL_RX = 18;
export const VIRTIO_NET_F_MQ = 22;
export const VIRTIO_NET_F_CTRL_MAC_ADDR = 23;

/** struct virtio_net_hdr_v1 (VERSION_1): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers. */
export const NET_HDR_SIZE = 12;
export const NET_HDR_NUM_BUFFERS = 10;
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_GSO_NONE = 0;

export const VIRTIO_NET_S_LINK_UP = 1;

/** Largest frame accepted from a guest: a 64 KiB GSO super-frame plus its Ethernet/VLAN header. */
export const MAX_FRAME = 65536 + 14 + 4;
export const ETH_HEADER = 14;

export const CONFIG = { mac: 0, status: 6, maxVirtqueuePairs: 8, mtu: 10 } as const;
export const CONFIG_SIZE = 12;

// Control virtqueue (§5.1.6.5): class, command, then data; the device writes one ack byte.
export const VIRTIO_NET_CTRL_RX = 0;
export const VIRTIO_NET_CTRL_RX_PROMISC = 0;
export const VIRTIO_NET_CTRL_RX_ALLMULTI = 1;
export const VIRTIO_NET_CTRL_MAC = 1;
export const VIRTIO_NET_CTRL_MAC_TABLE_SET = 0;
export const VIRTIO_NET_CTRL_MAC_ADDR_SET = 1;
export const VIRTIO_NET_CTRL_MQ = 4;
export const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0;
export const VIRTIO_NET_OK = 0;
export const VIRTIO_NET_ERR = 1;

export interface NetConfig {
  mac: Uint8Array;
  linkUp: boolean;
  queuePairs: number;
  mtu: number;
}

export function encodeConfig(c: NetConfig): Uint8Array {
  const b = new Uint8Array(CONFIG_SIZE);
  const v = new DataView(b.buffer);
  b.set(c.mac, CONFIG.mac);
  v.setUint16(CONFIG.status, c.linkUp ? VIRTIO_NET_S_LINK_UP : 0, true);
  v.setUint16(CONFIG.maxVirtqueuePairs, c.queuePairs, true);
  v.setUint16(CONFIG.mtu, c.mtu, true);
  return b;
}

/** "52:54:00:12:34:56" -> bytes; throws on anything else. */
export function parseMac(text: string): Uint8Array {
  const parts = text.split(':');
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{2}$/.test(p))) throw new RangeError(`"${text}" is not a MAC address (aa:bb:cc:dd:ee:ff)`);
  const mac = new Uint8Array(parts.map((p) => parseInt(p, 16)));
  if (mac[0] & 1) throw new RangeError(`${text} is a multicast address; a NIC needs a unicast one`);
  return mac;
}

export function formatMac(mac: Uint8Array): string {
  return [...mac].map((b) => b.toString(16).padStart(2, '0')).join(':');
}

/** A locally administered MAC from 3 random bytes. */
export function randomMac(): Uint8Array {
  const m = new Uint8Array(6);
  crypto.getRandomValues(m.subarray(3));
  m[0] = 0x52;
  m[1] = 0x54;
  m[2] = 0x00;
  return m;
}
