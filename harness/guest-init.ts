// The protocol between runGuest and the guest, and the guest's PID 1 that speaks it. The host knows a guest only
// through its serial console, so readiness, results and the script's exit status are all prefixed lines on ttyS0.

export const FW_CFG_SCRIPT = 'opt/harness/script';
export const READY_LINE = 'HARNESS-READY';
export const EXIT_PREFIX = 'HARNESS-EXIT ';
export const RESULT_PREFIX = 'RESULT ';
export const MODULE_LIST = 'etc/harness/modules';

/**
 * /init of the test initramfs. With harness.root=DEV on the kernel command line it only loads the virtio modules
 * and hands over to the root filesystem on DEV (whose own service then runs the script); otherwise it runs the
 * script itself. Every path ends in a power-off, because -no-reboot turns that into QEMU exiting, and a hung PID 1
 * would leave the host waiting for its timeout.
 */
export const INIT_SCRIPT = `#!/bin/sh
export PATH=/usr/sbin:/usr/bin HOME=/root TERM=dumb
/usr/bin/busybox --install -s /usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run

halt_guest() {
  sync
  poweroff -f
  sleep 5
  echo o > /proc/sysrq-trigger
  sleep 60
}

while read -r ko; do
  insmod "$ko" || echo "harness: insmod $ko failed"
done < /${MODULE_LIST}
hostname vhost-ts-guest
ip link set lo up

root=
hvcshell=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    harness.root=*) root="\${arg#harness.root=}" ;;
    harness.hvc-shell) hvcshell=1 ;;
  esac
done

# vhost-ts vm --console: a shell on the virtio console too, respawned when it exits.
if [ -n "$hvcshell" ]; then
  (i=0; while [ ! -e /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
   while [ -e /dev/hvc0 ]; do setsid getty -n -l /bin/sh 0 hvc0; sleep 1; done) &
fi

if [ -n "$root" ]; then
  i=0
  while [ ! -b "$root" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
  if mount -t ext4 -o rw "$root" /newroot; then
    for d in dev proc sys run; do mount -o move /$d /newroot/$d; done
    exec switch_root /newroot /sbin/init
  fi
  echo "harness: cannot mount root $root"
  echo "${EXIT_PREFIX}125"
  halt_guest
fi

script=/sys/firmware/qemu_fw_cfg/by_name/${FW_CFG_SCRIPT}/raw
echo ${READY_LINE}
cd /root
if [ -r "$script" ]; then
  cat "$script" > /run/harness-script
  sh /run/harness-script < /dev/null > /dev/ttyS0 2>&1
  rc=$?
else
  echo "harness: no script in fw_cfg ${FW_CFG_SCRIPT}; starting a shell"
  setsid cttyhack sh -l
  rc=$?
fi
echo "${EXIT_PREFIX}$rc"
halt_guest
`;

/** The same protocol for the full Debian guest, run by a systemd unit once the root filesystem is up. */
export const ROOTFS_RUNNER = `#!/bin/sh
script=/sys/firmware/qemu_fw_cfg/by_name/${FW_CFG_SCRIPT}/raw
echo ${READY_LINE} > /dev/ttyS0
cd /root
sh "$script" < /dev/null > /dev/ttyS0 2>&1
echo "${EXIT_PREFIX}$?" > /dev/ttyS0
sync
poweroff -f
`;
