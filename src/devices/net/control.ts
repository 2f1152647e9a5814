/**
 * The control virtqueue (virtio 1.2 §5.1.6.5): receive modes, the MAC address, the number of active queue pairs.
 * State lives in a SharedArrayBuffer so every pair's worker sees it. (QEMU's virtio-net keeps the control queue to
 * itself; frontends that pass it through, such as our test frontend, get it answered here.)
 */
import type { DescriptorChain } from '../../virtqueue/index.js';
import {
  VIRTIO_NET_CTRL_MAC,
  VIRTIO_NET_CTRL_MAC_ADDR_SET,
  VIRTIO_NET_CTRL_MAC_TABLE_SET,
  VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
  VIRTIO_NET_CTRL_RX,
  VIRTIO_NET_CTRL_RX_ALLMULTI,
  VIRTIO_NET_CTRL_RX_PROMISC,
  VIRTIO_NET_ERR,
  VIRTIO_NET_OK,
} from './spec.js';

/** Serve one control command; returns the bytes written (the ack byte), 0 when there is nowhere to answer. */
export function handleControl(chain: DescriptorChain, rxMode: SharedArrayBuffer, maxPairs: number): number {
  if (chain.writableBytes < 1) return 0;
  const r = chain.reader();
  let ack = VIRTIO_NET_ERR;
  if (chain.readableBytes >= 2) {
    const cls = r.readUint(1);
    const cmd = r.readUint(1);
    const left = chain.readableBytes - 2;
    const mode = new Int32Array(rxMode, 0, 3);
    if (cls === VIRTIO_NET_CTRL_RX && (cmd === VIRTIO_NET_CTRL_RX_PROMISC || cmd === VIRTIO_NET_CTRL_RX_ALLMULTI) && left >= 1) {
      Atomics.store(mode, cmd === VIRTIO_NET_CTRL_RX_PROMISC ? 0 : 1, r.readUint(1) ? 1 : 0);
      ack = VIRTIO_NET_OK;
    } else if (cls === VIRTIO_NET_CTRL_MAC && cmd === VIRTIO_NET_CTRL_MAC_ADDR_SET && left >= 6) {
      const mac = new Uint8Array(6);
      r.read(mac);
      if ((mac[0] & 1) === 0) {
        new Uint8Array(rxMode, 12, 6).set(mac);
        ack = VIRTIO_NET_OK;
      }
    } else if (cls === VIRTIO_NET_CTRL_MAC && cmd === VIRTIO_NET_CTRL_MAC_TABLE_SET) {
      // Unicast and multicast filter tables: we accept every multicast and our own unicast address.
      ack = VIRTIO_NET_OK;
    } else if (cls === VIRTIO_NET_CTRL_MQ && cmd === VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET && left >= 2) {
      const n = r.readUint(2);
      if (n >= 1 && n <= maxPairs) {
        Atomics.store(mode, 2, n);
        ack = VIRTIO_NET_OK;
      }
    }
  }
  // The ack is the last writable byte.
  const w = chain.writer();
  w.fill(0, chain.writableBytes - 1);
  w.writeUint(ack, 1);
  return chain.writableBytes;
}
