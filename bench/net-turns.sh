#!/usr/bin/env bash
# bench/net-turns.sh [--poll-us N] [--rounds R] [--slice S] [--mode switch|recvN|sendN] TREE_A TREE_B
#
# Compares two vhost-ts checkouts (each with node_modules) on the DPDK loops of bench:net, for a change whose
# effect is smaller than this host's noise between runs. Both pairs (vhost-ts on CPU 0, dpdk-testpmd on CPU 1)
# live at once and run in turns of S seconds, the other pair SIGSTOPped, so that the host's slow and fast
# phases (which last seconds and move a rate by 2x) fall on both. Prints per tree the mean, median and
# quartiles of testpmd's per-second rates, the first second after each resume left out.
#   switch:   two virtio-user ports, io forward with --tx-first, through `net --switch` (64-byte frames)
#   recvN:    `net --backend source --frame-size N` into testpmd rxonly (counted: testpmd's received frames)
#   sendN:    testpmd txonly of N-byte frames into `net --backend sink` (counted: testpmd's sent frames)
# Use it with the trees in both orders: the first may have an edge. Needs dpdk-testpmd (see bench/net.ts).
set -euo pipefail
POLL=200 ROUNDS=6 SLICE=6 MODE=switch
while [ $# -gt 2 ]; do
  case "$1" in
    --poll-us) POLL=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --slice) SLICE=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -eq 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2")
command -v dpdk-testpmd >/dev/null || { echo "dpdk-testpmd not found: apt-get install dpdk-dev librte-net-virtio23 librte-net-vhost23 librte-mempool-ring23" >&2; exit 1; }
D=$(mktemp -d /tmp/vhost-ts-turns.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D" "/var/run/dpdk/turns-a-$$" "/var/run/dpdk/turns-b-$$" "/run/user/$(id -u)/dpdk/turns-a-$$" "/run/user/$(id -u)/dpdk/turns-b-$$" 2>/dev/null || true
}
trap cleanup EXIT
POLL_ARGS=()
[ "$POLL" != 0 ] && POLL_ARGS=(--poll-us "$POLL")
PORTS=1 COUNTED=Rx-pps
[ "$MODE" = switch ] && PORTS=2
[ "${MODE#send}" != "$MODE" ] && COUNTED=Tx-pps

start() { # tag tree
  local t=$1 tree=$2 backend=() vdevs=() forward=()
  if [ "$MODE" = switch ]; then
    backend=(--socket-path "$D/$t.s0" --socket-path "$D/$t.s1" --switch "turns-$t")
    vdevs=(--vdev "net_virtio_user0,path=$D/$t.s0" --vdev "net_virtio_user1,path=$D/$t.s1")
    forward=(--forward-mode=io --tx-first --txpkts=64)
  elif [ "${MODE#recv}" != "$MODE" ]; then
    backend=(--socket-path "$D/$t.s0" --queues 1 --backend source --frame-size "${MODE#recv}")
    vdevs=(--vdev "net_virtio_user0,path=$D/$t.s0")
    forward=(--forward-mode=rxonly)
  else
    backend=(--socket-path "$D/$t.s0" --queues 1 --backend sink)
    vdevs=(--vdev "net_virtio_user0,path=$D/$t.s0")
    forward=(--forward-mode=txonly "--txpkts=${MODE#send}")
  fi
  taskset -c 0 node "$tree/bin/vhost-ts.mjs" net "${backend[@]}" "${POLL_ARGS[@]}" > "$D/$t.backend.log" 2>&1 &
  PIDS+=($!); echo $! > "$D/$t.pids"
  local last=$D/$t.s$((PORTS - 1))
  for _ in $(seq 300); do [ -S "$last" ] && break; sleep 0.1; done
  [ -S "$last" ] || { echo "tree $tree: no socket after 30 s" >&2; cat "$D/$t.backend.log" >&2; exit 1; }
  taskset -c 1 dpdk-testpmd --lcores=0@1,1@1 --no-pci --no-huge -m 512 "--file-prefix=turns-$t-$$" "${vdevs[@]}" -- \
    "${forward[@]}" --auto-start --nb-cores=1 --total-num-mbufs=32768 --no-mlockall --stats-period 1 < /dev/null > "$D/$t.front.log" 2>&1 &
  PIDS+=($!); echo $! >> "$D/$t.pids"
}
turn() { kill "-$1" $(cat "$D/$2.pids"); }
rates() { grep -c "$COUNTED" "$D/$1.front.log" || true; }

start a "$A"; sleep 3; turn STOP a
start b "$B"; sleep 3; turn STOP b
for _ in $(seq "$ROUNDS"); do
  for t in a b; do
    turn CONT $t; from=$(rates $t); sleep "$SLICE"; turn STOP $t; to=$(rates $t)
    echo "$from $to" >> "$D/$t.turns"
  done
done
for t in a b; do
  tree=$A; [ $t = b ] && tree=$B
  while read -r from to; do
    grep "$COUNTED" "$D/$t.front.log" | awk '{print $2}' | sed -n "$((from + 1)),${to}p" |
      awk -v p=$PORTS '{b = int((NR - 1) / p); v[b] += $1} END {for (k = 1; k <= b; k++) print v[k] / 1e6}'
  done < "$D/$t.turns" | sort -n |
    awk -v t="$tree" '{a[NR] = $1; s += $1} END {if (NR == 0) {print t ": no rates"; exit} q1 = int(NR * 0.25 + 0.5); if (q1 < 1) q1 = 1; printf "%s: %d s, mean %.2f, median %.2f, quartiles %.2f-%.2f Mpps\n", t, NR, s / NR, a[int((NR + 1) / 2)], a[q1], a[int(NR * 0.75 + 0.5)]}'
done
