// The full Debian guest (--full): a bookworm root filesystem with systemd, for tests that need a real init, udev
// and services. It is packed with mke2fs -d, which copies a directory into a new ext4 image without a loop mount,
// and boots from our initramfs with harness.root=DEV once a block device (our vhost-user-blk) serves the image.
import fs from 'node:fs';
import path from 'node:path';
import { buildAtomically, readMarker, removeTree, type Marker } from './cache.js';
import { ROOTFS_RUNNER } from './guest-init.js';
import { requireTools, run } from './host-tools.js';
import type { KernelInfo } from './kernel.js';
import { chrootApt, debootstrap } from './qemu-install.js';
import { diskUsage, formatBytes, type Progress } from './progress.js';

const ROOTFS_FORMAT = 4;
const SUITE = 'bookworm';
// dbus: systemd-logind needs it, and logind is what powers the guest off on an ACPI power button (vhost-ts demo's exit).
const PACKAGES = ['systemd', 'systemd-sysv', 'dbus', 'udev', 'kmod', 'iproute2', 'iputils-ping', 'ethtool', 'fio', 'iperf3', 'e2fsprogs', 'procps'];
export const ROOTFS_LABEL = 'vhost-ts-root';

export interface RootfsImage {
  image: string;
  suite: string;
  kernelRelease: string;
  sizeBytes: number;
}

interface RootfsMarker extends Marker {
  kind: 'rootfs';
  suite: string;
  packages: string[];
  kernelRelease: string;
}

const HARNESS_UNIT = `[Unit]
Description=vhost-ts harness script from fw_cfg
After=systemd-modules-load.service network.target
ConditionPathExists=/sys/firmware/qemu_fw_cfg/by_name/opt/harness/script/raw

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vhost-ts-harness

[Install]
WantedBy=multi-user.target
`;

// The guest's address from the kernel command line (vhost_ts.ip=ADDR/PREFIX, set by vhost-ts demo with
// net.ifnames=0) on eth0; nothing on the command line, nothing done.
const NET_UNIT = `[Unit]
Description=vhost-ts guest address from the kernel command line
After=systemd-udevd.service
Before=network.target
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/vhost-ts-net

[Install]
WantedBy=multi-user.target
`;

const NET_SCRIPT = `#!/bin/sh
addr=
for arg in $(cat /proc/cmdline); do
  case "$arg" in vhost_ts.ip=*) addr="\${arg#vhost_ts.ip=}" ;; esac
done
[ -n "$addr" ] || exit 0
# net.ifnames=0 beside vhost_ts.ip keeps the kernel's name, so no rename races us; udev may still be probing.
udevadm settle --timeout=30
i=0
while [ ! -e /sys/class/net/eth0 ]; do
  i=$((i + 1)); [ $i -gt 100 ] && { echo "vhost-ts-net: no eth0"; exit 1; }
  sleep 0.1
done
ip link set eth0 up
ip addr add "$addr" dev eth0
`;

// Autologin makes the serial console usable for manual debugging without a password prompt.
const GETTY_AUTOLOGIN = `[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
`;

function write(root: string, rel: string, text: string, mode = 0o644): void {
  const p = path.join(root, rel);
  fs.mkdirSync(path.dirname(p), { recursive: true });
  fs.writeFileSync(p, text, { mode });
}

async function configure(root: string, kernel: KernelInfo): Promise<void> {
  write(root, 'etc/hostname', 'vhost-ts-guest\n');
  write(root, 'etc/hosts', '127.0.0.1 localhost vhost-ts-guest\n');
  write(root, 'etc/fstab', `LABEL=${ROOTFS_LABEL} / ext4 rw,errors=remount-ro 0 1\n`);
  write(root, 'etc/modules-load.d/vhost-ts.conf', 'qemu_fw_cfg\nvirtio_net\nvirtio_blk\nvirtio_console\nvirtio_rng\n');
  write(root, 'etc/systemd/system/vhost-ts-harness.service', HARNESS_UNIT);
  write(root, 'usr/local/sbin/vhost-ts-harness', ROOTFS_RUNNER, 0o755);
  write(root, 'etc/systemd/system/vhost-ts-net.service', NET_UNIT);
  write(root, 'usr/local/sbin/vhost-ts-net', NET_SCRIPT, 0o755);
  write(root, 'etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf', GETTY_AUTOLOGIN);
  const wants = path.join(root, 'etc/systemd/system/multi-user.target.wants');
  fs.mkdirSync(wants, { recursive: true });
  fs.symlinkSync('/etc/systemd/system/vhost-ts-harness.service', path.join(wants, 'vhost-ts-harness.service'));
  fs.symlinkSync('/etc/systemd/system/vhost-ts-net.service', path.join(wants, 'vhost-ts-net.service'));
  const gettyWants = path.join(root, 'etc/systemd/system/getty.target.wants');
  fs.mkdirSync(gettyWants, { recursive: true });
  fs.symlinkSync('/lib/systemd/system/serial-getty@.service', path.join(gettyWants, 'serial-getty@ttyS0.service'));
  await run('chroot', [root, 'passwd', '-d', 'root'], { timeoutMs: 60_000 });
  // udev and modprobe inside the guest need the modules of the kernel it runs, with a modules.dep.
  const modules = path.join(root, 'lib/modules', kernel.release);
  fs.mkdirSync(path.dirname(modules), { recursive: true });
  fs.cpSync(kernel.modulesDir, modules, { recursive: true });
  await run('chroot', [root, 'depmod', kernel.release], { timeoutMs: 5 * 60_000 });
  await chrootApt(root, ['clean']);
  // Only for installing into the chroot; inside the booted guest apt should start services normally.
  fs.rmSync(path.join(root, 'usr/sbin/policy-rc.d'), { force: true });
  fs.rmSync(path.join(root, 'var/lib/apt/lists'), { recursive: true, force: true });
  fs.mkdirSync(path.join(root, 'var/lib/apt/lists/partial'), { recursive: true });
}

export async function ensureRootfs(
  progress: Progress,
  cacheDir: string,
  kernel: KernelInfo,
  rebuild: boolean,
): Promise<{ rootfs: RootfsImage; reused: boolean }> {
  const dir = path.join(cacheDir, 'rootfs', `${SUITE}_${kernel.release}`);
  const image = path.join(dir, 'rootfs.ext4');
  const existing = rebuild ? undefined : readMarker<RootfsMarker>(dir, 'rootfs', ROOTFS_FORMAT);
  if (existing && fs.existsSync(image)) {
    progress.note(`reusing Debian ${SUITE} rootfs ${image} (${formatBytes(existing.sizeBytes)})`);
    return { rootfs: { image, suite: SUITE, kernelRelease: existing.kernelRelease, sizeBytes: existing.sizeBytes }, reused: true };
  }
  requireTools(['mke2fs', 'chroot']);
  const marker = await buildAtomically<RootfsMarker>(dir, async (tmp) => {
    const tree = path.join(tmp, 'tree');
    await debootstrap(progress, SUITE, tree, PACKAGES);
    await progress.task('configure rootfs (systemd units, getty on ttyS0, kernel modules)', () => configure(tree, kernel), () => diskUsage(tree));
    const used = diskUsage(tree);
    // Room for test files and journal; mke2fs -d needs the size up front.
    const size = Math.max(2 ** 30, Math.ceil((used * 1.5) / 2 ** 20) * 2 ** 20);
    const img = path.join(tmp, 'rootfs.ext4');
    fs.closeSync(fs.openSync(img, 'w'));
    fs.truncateSync(img, size);
    await progress.task(
      `mke2fs -d (ext4, ${formatBytes(size)})`,
      () => run('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', ROOTFS_LABEL, '-d', tree, img], { timeoutMs: 10 * 60_000 }),
      () => diskUsage(img),
    );
    await removeTree(tree);
    return { kind: 'rootfs', format: ROOTFS_FORMAT, suite: SUITE, packages: PACKAGES, kernelRelease: kernel.release, sizeBytes: diskUsage(img) };
  });
  return { rootfs: { image, suite: SUITE, kernelRelease: marker.kernelRelease, sizeBytes: marker.sizeBytes }, reused: false };
}
