// Where QEMU comes from. The console device needs vhost-user-test-device-pci (QEMU >= 10.2); Debian 12 ships 7.2,
// so unless the host has a new enough QEMU we provision 11.x from trixie-backports into a private root and run it
// through that root's own dynamic loader (it needs glibc 2.38), no chroot.
import fs from 'node:fs';
import path from 'node:path';
import { buildAtomically, readMarker, type Marker } from './cache.js';
import { HostToolError, isRoot, missingToolMessage, run, which } from './host-tools.js';
import { diskUsage, type Progress } from './progress.js';

export type QemuTool = 'qemu-system-x86_64' | 'qemu-img' | 'qemu-io' | 'qemu-storage-daemon' | 'qemu-nbd';

export interface QemuInstall {
  source: 'system' | 'private-root';
  version: string;
  /** Directory holding qemu-system-x86_64, qemu-img, qemu-io, qemu-storage-daemon. */
  binDir: string;
  /** The private root, when source is 'private-root'. */
  root?: string;
}

/** A program invocation: file and args for spawn, plus the variables to add to the environment. */
export interface Command {
  file: string;
  args: string[];
  env: Record<string, string>;
}

export const MIN_VERSION: readonly [number, number] = [10, 2];
const REQUIRED_DEVICE = 'vhost-user-test-device-pci';
const ROOT_FORMAT = 1;
const ROOT_SUITE = 'trixie';
const ROOT_PACKAGES = ['qemu-system-x86', 'qemu-utils', 'qemu-block-extra'];
const LIB_DIRS = ['lib/x86_64-linux-gnu', 'usr/lib/x86_64-linux-gnu'];

export function debianMirror(): string {
  return process.env.VHOST_TS_DEBIAN_MIRROR ?? 'http://deb.debian.org/debian';
}

/** Resolves a path inside a root the way the root itself would see it (absolute symlinks point into the root). */
function resolveInRoot(root: string, rel: string): string | undefined {
  let current = root;
  const parts = rel.split('/').filter(Boolean);
  for (let hops = 0; parts.length > 0 && hops < 64; hops++) {
    const next = path.join(current, parts.shift()!);
    const st = fs.lstatSync(next, { throwIfNoEntry: false });
    if (!st) return undefined;
    if (st.isSymbolicLink()) {
      const target = fs.readlinkSync(next);
      parts.unshift(...target.split('/').filter(Boolean));
      if (target.startsWith('/')) current = root;
    } else {
      current = next;
    }
  }
  return parts.length === 0 ? current : undefined;
}

function loaderOf(root: string): string {
  const loader = resolveInRoot(root, 'lib64/ld-linux-x86-64.so.2');
  if (!loader) throw new Error(`${root} has no lib64/ld-linux-x86-64.so.2`);
  return loader;
}

export function qemuCommand(q: QemuInstall, tool: QemuTool, args: string[]): Command {
  const binary = path.join(q.binDir, tool);
  if (q.source === 'system' || !q.root) return { file: binary, args, env: {} };
  const root = q.root;
  const dataDirs =
    tool === 'qemu-system-x86_64'
      ? ['-L', path.join(root, 'usr/share/qemu'), '-L', path.join(root, 'usr/share/seabios')]
      : [];
  return {
    file: loaderOf(root),
    args: ['--library-path', LIB_DIRS.map((d) => path.join(root, d)).join(':'), binary, ...dataDirs, ...args],
    // Block drivers (blkio, curl, ...) are loadable modules found through this variable, not through -L.
    env: { QEMU_MODULE_DIR: path.join(root, 'usr/lib/x86_64-linux-gnu/qemu') },
  };
}

async function runQemu(q: QemuInstall, args: string[]): Promise<string> {
  const c = qemuCommand(q, 'qemu-system-x86_64', args);
  const r = await run(c.file, c.args, { timeoutMs: 30_000, env: { ...process.env, ...c.env } });
  return r.stdout;
}

export function parseQemuVersion(text: string): string | undefined {
  return text.match(/QEMU emulator version (\d+\.\d+(?:\.\d+)?)/)?.[1];
}

export function versionAtLeast(version: string, min: readonly number[]): boolean {
  const v = version.split('.').map(Number);
  for (let i = 0; i < min.length; i++) {
    const a = v[i] ?? 0;
    const b = min[i]!;
    if (a !== b) return a > b;
  }
  return true;
}

/** Probes a QEMU: its version, and whether it can create the generic vhost-user device. */
async function probe(q: Omit<QemuInstall, 'version'>): Promise<{ version?: string; hasDevice: boolean }> {
  const version = parseQemuVersion(await runQemu({ ...q, version: '' }, ['--version']));
  if (!version || !versionAtLeast(version, MIN_VERSION)) return { version, hasDevice: false };
  const devices = await runQemu({ ...q, version }, ['-machine', 'none', '-device', 'help']);
  return { version, hasDevice: devices.includes(`"${REQUIRED_DEVICE}"`) };
}

/** A host QEMU good enough to use as is, or the reason it is not. */
async function systemQemu(): Promise<{ install?: QemuInstall; why: string }> {
  const override = process.env.VHOST_TS_QEMU;
  const binary = override ?? which('qemu-system-x86_64');
  if (!binary) return { why: 'no qemu-system-x86_64 on this host' };
  const candidate = { source: 'system' as const, binDir: path.dirname(binary) };
  const { version, hasDevice } = await probe(candidate).catch(() => ({ version: undefined, hasDevice: false }));
  if (!version) return { why: `${binary} did not report a version` };
  if (!hasDevice) {
    return { why: `${binary} is QEMU ${version}; ${REQUIRED_DEVICE} needs >= ${MIN_VERSION.join('.')}` };
  }
  return { install: { ...candidate, version }, why: `${binary} is QEMU ${version}` };
}

interface RootMarker extends Marker {
  kind: 'qemu-root';
  version: string;
  suite: string;
  packages: string[];
}

async function ensureDebootstrap(progress: Progress): Promise<void> {
  if (which('debootstrap')) return;
  if (!isRoot()) throw new HostToolError(missingToolMessage(['debootstrap']), 'debootstrap');
  progress.note('debootstrap is missing: installing it with apt-get install -y debootstrap');
  await progress.task('apt-get install debootstrap', () =>
    run('apt-get', ['install', '-y', '--no-install-recommends', 'debootstrap'], {
      timeoutMs: 10 * 60_000,
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    }),
  );
}

/** debootstrap + apt inside the target: both need root, which is why this is the one step that asks for it. */
export async function debootstrap(
  progress: Progress,
  suite: string,
  target: string,
  include: string[],
): Promise<void> {
  if (!isRoot()) {
    throw new Error(`debootstrap of Debian ${suite} needs root (it creates device nodes and chroots); rerun as root`);
  }
  await ensureDebootstrap(progress);
  const args = ['--variant=minbase', ...(include.length ? [`--include=${include.join(',')}`] : []), suite, target];
  await progress.task(
    `debootstrap ${suite} (minbase${include.length ? ` + ${include.join(' ')}` : ''})`,
    () => run('debootstrap', [...args, debianMirror()], { timeoutMs: 20 * 60_000 }),
    () => diskUsage(target),
  );
  // Package scripts must not start daemons on the host while they are installed into the chroot.
  fs.writeFileSync(path.join(target, 'usr/sbin/policy-rc.d'), '#!/bin/sh\nexit 101\n', { mode: 0o755 });
}

export async function chrootApt(target: string, args: string[]): Promise<void> {
  await run('chroot', [target, 'apt-get', ...args], {
    timeoutMs: 20 * 60_000,
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive', LC_ALL: 'C.UTF-8', PATH: '/usr/sbin:/usr/bin:/sbin:/bin' },
  });
}

async function buildPrivateRoot(progress: Progress, rootDir: string): Promise<RootMarker> {
  return buildAtomically<RootMarker>(rootDir, async (tmp) => {
    await debootstrap(progress, ROOT_SUITE, tmp, []);
    fs.writeFileSync(
      path.join(tmp, 'etc/apt/sources.list.d/backports.list'),
      `deb ${debianMirror()} ${ROOT_SUITE}-backports main\n`,
    );
    await progress.task(`apt-get update (${ROOT_SUITE}, ${ROOT_SUITE}-backports)`, () => chrootApt(tmp, ['update']));
    // Recommends would add GUI, audio and spice modules a headless test VM never loads.
    await progress.task(
      `apt-get install -t ${ROOT_SUITE}-backports ${ROOT_PACKAGES.join(' ')}`,
      () => chrootApt(tmp, ['install', '-y', '--no-install-recommends', '-t', `${ROOT_SUITE}-backports`, ...ROOT_PACKAGES]),
      () => diskUsage(tmp),
    );
    await chrootApt(tmp, ['clean']);
    fs.rmSync(path.join(tmp, 'var/lib/apt/lists'), { recursive: true, force: true });
    fs.mkdirSync(path.join(tmp, 'var/lib/apt/lists/partial'), { recursive: true });
    const { version, hasDevice } = await probe({ source: 'private-root', binDir: path.join(tmp, 'usr/bin'), root: tmp });
    if (!version || !hasDevice) {
      throw new Error(`QEMU installed in ${tmp} is ${version ?? 'unrunnable'} and lacks ${REQUIRED_DEVICE}`);
    }
    return {
      kind: 'qemu-root',
      format: ROOT_FORMAT,
      version,
      suite: `${ROOT_SUITE}-backports`,
      packages: ROOT_PACKAGES,
      sizeBytes: diskUsage(tmp),
    };
  });
}

export interface QemuResult {
  install: QemuInstall;
  reused: boolean;
  detail: string;
}

export async function ensureQemu(progress: Progress, cacheDir: string, rebuild: boolean): Promise<QemuResult> {
  const sys = await systemQemu();
  if (sys.install) {
    progress.note(`using the system QEMU: ${sys.why}`);
    return { install: sys.install, reused: true, detail: `system, ${sys.install.binDir}` };
  }
  const rootDir = path.join(cacheDir, 'qemu-root');
  const existing = rebuild ? undefined : readMarker<RootMarker>(rootDir, 'qemu-root', ROOT_FORMAT);
  if (existing && fs.existsSync(path.join(rootDir, 'usr/bin/qemu-system-x86_64'))) {
    progress.note(`reusing private root ${rootDir}: QEMU ${existing.version} from ${existing.suite} (${sizeText(existing)})`);
    const install = privateInstall(rootDir, existing.version);
    return { install, reused: true, detail: `private root (${existing.suite}), ${rootDir}` };
  }
  progress.note(`${sys.why}: provisioning QEMU from ${ROOT_SUITE}-backports into ${rootDir}`);
  const marker = await buildPrivateRoot(progress, rootDir);
  progress.note(`QEMU ${marker.version} ready in ${rootDir} (${sizeText(marker)})`);
  return { install: privateInstall(rootDir, marker.version), reused: false, detail: `private root (${marker.suite}), ${rootDir}` };
}

function privateInstall(root: string, version: string): QemuInstall {
  return { source: 'private-root', version, binDir: path.join(root, 'usr/bin'), root };
}

function sizeText(m: Marker): string {
  return `${(m.sizeBytes / 2 ** 20).toFixed(0)} MiB`;
}
