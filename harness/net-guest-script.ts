// The guest side of network tests and benchmarks: address the first NIC, wait for the peer, ping it, then run
// iperf3 as server (two one-off runs) or client (10 s each way, retried until the server is up).
import { featureBitScript, RING_PACKED_BIT } from './guest-features.js';

export function netGuestScript(me: string, peer: string, role: 'server' | 'client', seconds = 10): string {
  const iperf =
    role === 'server'
      ? 'iperf3 -s -1 > /dev/null 2>&1; iperf3 -s -1 > /dev/null 2>&1'
      : `for dir in up down; do
  flag=""; [ $dir = down ] && flag=-R
  n=0; until iperf3 -c ${peer} -t ${seconds} $flag > /tmp/iperf.$dir 2>&1; do n=$((n+1)); [ $n -gt 30 ] && break; sleep 1; done
  echo "RESULT iperf $dir $(grep receiver /tmp/iperf.$dir | tail -1)"
done`;
  return `
ip link set eth0 up
ip addr add ${me}/24 dev eth0
# Bounded waits, not fixed delays: under load the link and the peer take their time.
n=0; until [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = 1 ]; do n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.1; done
${featureBitScript(1, RING_PACKED_BIT, 'packed')}
echo "RESULT offload $(ethtool -k eth0 | grep -E '^(tcp-segmentation-offload|tx-checksumming|rx-checksumming):' | tr '\\n' ' ')"
n=0; until ping -c 1 -W 1 ${peer} > /dev/null 2>&1; do n=$((n+1)); [ $n -gt 90 ] && break; sleep 0.2; done
# Three pings one at a time, each with its own 5 s deadline: busybox's ping -c 3 waits only about two round trips
# for the last reply, which a guest stalled for a second under TCG misses.
got=0; for i in 1 2 3; do ping -c 1 -W 5 ${peer} > /dev/null 2>&1 && got=$((got+1)); done
echo "RESULT ping 3 packets transmitted, $got received"
echo "RESULT arp $(ip neigh show ${peer} | grep -c lladdr)"
${iperf}
`;
}

/** Mbit/s of the client's `RESULT iperf up|down ...` line, 0 when missing. */
export function iperfMbits(results: string[], dir: 'up' | 'down'): number {
  const line = results.find((r) => r.startsWith(`iperf ${dir} `)) ?? '';
  const m = line.match(/([\d.]+) ([KMG])bits\/sec/);
  if (!m) return 0;
  return Number(m[1]) * { K: 1e-3, M: 1, G: 1e3 }[m[2] as 'K' | 'M' | 'G'];
}
