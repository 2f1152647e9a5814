// The fast test guest: one initramfs with busybox, the virtio modules, and the host's own fio, iperf3, ip, ethtool
// and e2fsprogs copied with the shared libraries ldd names. Boots to a shell script in seconds under TCG, needs no
// root filesystem and no root privileges to build.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { download, extract, noListsHint, type PackageInfo } from './apt.js';
import { buildAtomically, readMarker, type Marker } from './cache.js';
import { CpioWriter } from './cpio.js';
import { INIT_SCRIPT, MODULE_LIST } from './guest-init.js';
import { requireTools, run } from './host-tools.js';
import type { KernelInfo } from './kernel.js';
import { loadOrder } from './kmod.js';
import type { Progress } from './progress.js';

const BUSYBOX_FORMAT = 1;
const GUEST_FORMAT = 1;

/** Loaded in this order after their dependencies; the device drivers a vhost-user test can meet. */
export const GUEST_MODULES = ['virtio_pci', 'virtio_net', 'virtio_blk', 'virtio_console', 'qemu_fw_cfg', 'virtio_rng'];
/** Wanted when this kernel builds them as modules; some kernels have them built in. */
const OPTIONAL_MODULES = ['virtio_scsi', 'virtio_balloon', 'vmw_vsock_virtio_transport', 'tun', 'loop'];

interface GuestTool {
  name: string;
  /** Other names the guest should know the tool by (mkfs.ext4 is mke2fs). */
  aliases?: string[];
}

export const GUEST_TOOLS: GuestTool[] = [
  { name: 'fio' },
  { name: 'iperf3' },
  { name: 'ip' },
  { name: 'ethtool' },
  { name: 'mke2fs', aliases: ['mkfs.ext4', 'mkfs.ext2'] },
  { name: 'e2fsck', aliases: ['fsck.ext4', 'fsck.ext2'] },
];

export interface GuestImage {
  dir: string;
  kernel: string;
  initrd: string;
  kernelRelease: string;
  kernelPackage: string;
  kernelPackageVersion: string;
  busyboxVersion: string;
  modules: string[];
  tools: string[];
}

interface BusyboxMarker extends Marker {
  kind: 'busybox';
  version: string;
}

interface GuestMarker extends Marker, Omit<GuestImage, 'dir' | 'kernel' | 'initrd'> {
  kind: 'guest';
  inputsHash: string;
}

export const BUSYBOX_PACKAGE = 'busybox-static';

async function ensureBusybox(
  progress: Progress,
  cacheDir: string,
  pkg: PackageInfo | undefined,
): Promise<{ binary: string; version: string }> {
  const root = path.join(cacheDir, 'busybox');
  const reuse = (dir: string, m: BusyboxMarker) => ({ binary: path.join(dir, 'busybox'), version: m.version });
  if (!pkg) {
    for (const e of fs.existsSync(root) ? fs.readdirSync(root) : []) {
      const m = readMarker<BusyboxMarker>(path.join(root, e), 'busybox', BUSYBOX_FORMAT);
      if (m) {
        progress.note(`apt cannot resolve ${BUSYBOX_PACKAGE}; reusing cached busybox ${m.version}`);
        return reuse(path.join(root, e), m);
      }
    }
    throw new Error(noListsHint(BUSYBOX_PACKAGE));
  }
  const dir = path.join(root, pkg.version.replace(/:/g, '_'));
  const existing = readMarker<BusyboxMarker>(dir, 'busybox', BUSYBOX_FORMAT);
  if (existing) {
    progress.note(`reusing busybox-static ${existing.version}`);
    return reuse(dir, existing);
  }
  const marker = await buildAtomically<BusyboxMarker>(dir, async (tmp) => {
    const deb = await progress.task(
      `download busybox-static ${pkg.version}`,
      () => download(BUSYBOX_PACKAGE, pkg.version, path.join(cacheDir, 'debs')),
      (f) => fs.statSync(f).size,
    );
    const x = path.join(tmp, 'x');
    await extract(deb, x);
    fs.copyFileSync(path.join(x, 'bin', 'busybox'), path.join(tmp, 'busybox'));
    fs.chmodSync(path.join(tmp, 'busybox'), 0o755);
    fs.rmSync(x, { recursive: true });
    fs.rmSync(deb);
    return { kind: 'busybox', format: BUSYBOX_FORMAT, version: pkg.version, sizeBytes: fs.statSync(path.join(tmp, 'busybox')).size };
  });
  return reuse(dir, marker);
}

/** Shared libraries a dynamically linked program needs, as ldd resolves them on this host. */
export async function sharedLibraries(binary: string): Promise<string[]> {
  const out = (await run('ldd', [binary], { timeoutMs: 30_000 }).catch((e: Error) => {
    if (/not a dynamic executable/.test(e.message)) return { stdout: '' };
    throw e;
  })).stdout;
  const libs: string[] = [];
  for (const line of out.split('\n')) {
    if (/=> not found/.test(line)) throw new Error(`${binary}: ldd cannot find ${line.trim()}`);
    const m = line.match(/=>\s*(\/\S+)/) ?? line.match(/^\s*(\/\S+)\s+\(/);
    if (m) libs.push(m[1]!);
  }
  return libs;
}

/** Where a host path lives in the guest's merged-/usr layout, where /lib, /lib64, /bin, /sbin are symlinks. */
function guestPath(hostPath: string): string {
  const p = path.resolve(hostPath).replace(/^\/(lib64|lib|bin|sbin)\//, '/usr/$1/');
  return p.slice(1);
}

function addParents(cpio: CpioWriter, p: string): void {
  const parts = p.split('/').slice(0, -1);
  for (let i = 1; i <= parts.length; i++) cpio.add({ type: 'dir', path: parts.slice(0, i).join('/') });
}

function addHostFile(cpio: CpioWriter, hostPath: string, at: string): void {
  if (cpio.has(at)) return;
  addParents(cpio, at);
  const st = fs.statSync(hostPath);
  cpio.add({ type: 'file', path: at, data: fs.readFileSync(hostPath), mode: st.mode & 0o7777 });
}

interface ToolSet {
  tools: { tool: GuestTool; path: string }[];
  /** Stat of every tool binary: a host upgrade changes the guest's inputs and triggers a rebuild. */
  fingerprint: string[];
}

function hostTools(): ToolSet {
  const found = requireTools(['ldd', ...GUEST_TOOLS.map((t) => t.name)]);
  const tools = GUEST_TOOLS.map((tool) => ({ tool, path: found[tool.name]! }));
  const fingerprint = tools.map(({ path: p }) => {
    const real = fs.realpathSync(p);
    const st = fs.statSync(real);
    return `${real}:${st.size}:${st.mtimeMs}`;
  });
  return { tools, fingerprint };
}

async function buildInitramfs(
  out: string,
  kernel: KernelInfo,
  busybox: string,
  modules: { name: string; file: string }[],
  tools: ToolSet['tools'],
): Promise<void> {
  const cpio = new CpioWriter();
  for (const d of ['usr', 'usr/bin', 'usr/sbin', 'usr/lib', 'usr/lib64', 'etc', 'etc/harness', 'proc', 'sys', 'dev', 'run', 'tmp', 'root', 'mnt', 'newroot', 'var']) {
    cpio.add({ type: 'dir', path: d, mode: d === 'tmp' ? 0o1777 : d === 'root' ? 0o700 : 0o755 });
  }
  for (const l of ['bin', 'sbin', 'lib', 'lib64']) cpio.add({ type: 'symlink', path: l, target: `usr/${l}` });
  // PID 1 starts before devtmpfs is mounted and inherits /dev/console as its stdio: the node must be in the archive.
  cpio.add({ type: 'chardev', path: 'dev/console', major: 5, minor: 1 });
  cpio.add({ type: 'chardev', path: 'dev/null', major: 1, minor: 3, mode: 0o666 });
  cpio.add({ type: 'file', path: 'init', data: Buffer.from(INIT_SCRIPT), mode: 0o755 });
  cpio.add({ type: 'file', path: 'usr/bin/busybox', data: fs.readFileSync(busybox), mode: 0o755 });
  cpio.add({ type: 'symlink', path: 'usr/bin/sh', target: 'busybox' });
  cpio.add({ type: 'file', path: 'etc/passwd', data: Buffer.from('root:x:0:0:root:/root:/bin/sh\n') });
  cpio.add({ type: 'file', path: 'etc/group', data: Buffer.from('root:x:0:\n') });
  cpio.add({ type: 'file', path: 'etc/hosts', data: Buffer.from('127.0.0.1 localhost\n') });
  if (fs.existsSync('/etc/mke2fs.conf')) addHostFile(cpio, '/etc/mke2fs.conf', 'etc/mke2fs.conf');

  const moduleDir = `usr/lib/modules/${kernel.release}/harness`;
  addParents(cpio, `${moduleDir}/x`);
  const list: string[] = [];
  for (const m of modules) {
    const at = `${moduleDir}/${m.name}.ko`;
    cpio.add({ type: 'file', path: at, data: fs.readFileSync(m.file) });
    list.push(`/${at}`);
  }
  cpio.add({ type: 'file', path: MODULE_LIST, data: Buffer.from(list.join('\n') + '\n') });

  for (const { tool, path: hostPath } of tools) {
    const at = guestPath(hostPath);
    addHostFile(cpio, fs.realpathSync(hostPath), at);
    for (const alias of tool.aliases ?? []) {
      cpio.add({ type: 'symlink', path: path.posix.join(path.posix.dirname(at), alias), target: path.posix.basename(at) });
    }
    for (const lib of await sharedLibraries(hostPath)) addHostFile(cpio, fs.realpathSync(lib), guestPath(lib));
  }
  // Uncompressed: TCG decompresses gzip slowly enough to cost more boot time than the larger load costs.
  fs.writeFileSync(out, cpio.finish());
}

export async function ensureGuestImage(
  progress: Progress,
  cacheDir: string,
  kernel: KernelInfo,
  rebuild: boolean,
  /** busybox-static's candidate, resolved by the caller together with other packages. */
  busyboxPackage: PackageInfo | undefined,
): Promise<{ guest: GuestImage; reused: boolean }> {
  const toolSet = hostTools();
  const busybox = await ensureBusybox(progress, cacheDir, busyboxPackage);
  const modules = loadOrder(kernel.modulesDir, GUEST_MODULES, OPTIONAL_MODULES);
  const inputsHash = createHash('sha256')
    .update(JSON.stringify([GUEST_FORMAT, INIT_SCRIPT, kernel.package, kernel.packageVersion, busybox.version, modules.map((m) => m.name), toolSet.fingerprint]))
    .digest('hex')
    .slice(0, 16);
  const guestsDir = path.join(cacheDir, 'guest');
  const dir = path.join(guestsDir, inputsHash);
  const image = (m: GuestMarker): GuestImage => ({
    dir,
    kernel: path.join(dir, 'vmlinuz'),
    initrd: path.join(dir, 'initrd.img'),
    kernelRelease: m.kernelRelease,
    kernelPackage: m.kernelPackage,
    kernelPackageVersion: m.kernelPackageVersion,
    busyboxVersion: m.busyboxVersion,
    modules: m.modules,
    tools: m.tools,
  });
  const existing = rebuild ? undefined : readMarker<GuestMarker>(dir, 'guest', GUEST_FORMAT);
  if (existing) {
    progress.note(`reusing initramfs ${dir} (kernel ${existing.kernelRelease}; initrd + vmlinuz ${(existing.sizeBytes / 2 ** 20).toFixed(0)} MiB)`);
    return { guest: image(existing), reused: true };
  }
  const marker = await buildAtomically<GuestMarker>(dir, async (tmp) => {
    const initrd = path.join(tmp, 'initrd.img');
    await progress.task(
      `build initramfs (busybox ${busybox.version}, ${modules.length} modules, ${toolSet.tools.map((t) => t.tool.name).join(' ')})`,
      () => buildInitramfs(initrd, kernel, busybox.binary, modules, toolSet.tools),
      () => fs.statSync(initrd).size,
    );
    fs.copyFileSync(kernel.vmlinuz, path.join(tmp, 'vmlinuz'));
    return {
      kind: 'guest',
      format: GUEST_FORMAT,
      inputsHash,
      kernelRelease: kernel.release,
      kernelPackage: kernel.package,
      kernelPackageVersion: kernel.packageVersion,
      busyboxVersion: busybox.version,
      modules: modules.map((m) => m.name),
      tools: toolSet.tools.map((t) => t.tool.name),
      sizeBytes: fs.statSync(initrd).size + fs.statSync(path.join(tmp, 'vmlinuz')).size,
    };
  });
  // Older guests are superseded; a VM already running from one keeps its open files.
  for (const e of fs.readdirSync(guestsDir)) {
    if (e !== inputsHash && /^[0-9a-f]{16}$/.test(e)) fs.rmSync(path.join(guestsDir, e), { recursive: true, force: true });
  }
  return { guest: image(marker), reused: false };
}
