// The guest kernel: Debian's cloud flavour (small, virtio drivers as modules). The archive keeps only the newest
// build of a kernel ABI, so a pinned version would vanish; the version is resolved through the metapackage each
// time and the unpacked kernel cached under its exact version.
import fs from 'node:fs';
import path from 'node:path';
import { candidates, download, extract, noListsHint, type PackageInfo } from './apt.js';
import { buildAtomically, readMarker, type Marker } from './cache.js';
import { diskUsage, type Progress } from './progress.js';

const KERNEL_FORMAT = 1;
export const KERNEL_METAPACKAGE = 'linux-image-cloud-amd64';
const METAPACKAGE = KERNEL_METAPACKAGE;

export interface KernelInfo {
  /** The Debian package, e.g. linux-image-6.1.0-56-cloud-amd64. */
  package: string;
  packageVersion: string;
  /** What uname -r prints in the guest. */
  release: string;
  dir: string;
  vmlinuz: string;
  modulesDir: string;
}

interface KernelMarker extends Marker {
  kind: 'kernel';
  package: string;
  packageVersion: string;
  release: string;
}

function info(dir: string, m: KernelMarker): KernelInfo {
  return {
    package: m.package,
    packageVersion: m.packageVersion,
    release: m.release,
    dir,
    vmlinuz: path.join(dir, 'boot', `vmlinuz-${m.release}`),
    modulesDir: path.join(dir, 'lib', 'modules', m.release),
  };
}

/** The newest kernel already in the cache, for when apt cannot resolve the metapackage (no lists, offline). */
function newestCached(kernelsDir: string): KernelInfo | undefined {
  let best: { at: string; k: KernelInfo } | undefined;
  for (const e of fs.existsSync(kernelsDir) ? fs.readdirSync(kernelsDir) : []) {
    const dir = path.join(kernelsDir, e);
    const m = readMarker<KernelMarker>(dir, 'kernel', KERNEL_FORMAT);
    if (m && (!best || m.builtAt > best.at)) best = { at: m.builtAt, k: info(dir, m) };
  }
  return best?.k;
}

export async function ensureKernel(
  progress: Progress,
  cacheDir: string,
  rebuild: boolean,
  /** The metapackage's candidate, resolved by the caller together with other packages. */
  meta: PackageInfo | undefined,
): Promise<{ kernel: KernelInfo; reused: boolean }> {
  const kernelsDir = path.join(cacheDir, 'kernel');
  const dep = meta?.depends.find((d) => /^linux-image-.*-cloud-amd64(-unsigned)?$/.test(d.name));
  const pkg = dep?.exactVersion
    ? { name: dep.name, version: dep.exactVersion }
    : dep
      ? (await candidates([dep.name])).get(dep.name)
      : undefined;
  if (!meta || !pkg) {
    const cached = newestCached(kernelsDir);
    if (!cached) throw new Error(noListsHint(METAPACKAGE));
    progress.note(`apt cannot resolve ${METAPACKAGE} (${noListsHint(METAPACKAGE)}); reusing cached ${cached.package} ${cached.packageVersion}`);
    return { kernel: cached, reused: true };
  }
  const release = pkg.name.replace(/^linux-image-/, '').replace(/-unsigned$/, '');
  const dir = path.join(kernelsDir, `${release}_${pkg.version}`);
  const existing = rebuild ? undefined : readMarker<KernelMarker>(dir, 'kernel', KERNEL_FORMAT);
  if (existing) {
    progress.note(`reusing ${pkg.name} ${pkg.version} (${METAPACKAGE} ${meta.version}) in ${dir}`);
    return { kernel: info(dir, existing), reused: true };
  }
  progress.note(`${METAPACKAGE} ${meta.version} resolves to ${pkg.name} ${pkg.version}`);
  const debs = path.join(cacheDir, 'debs');
  const marker = await buildAtomically<KernelMarker>(dir, async (tmp) => {
    const deb = await progress.task(`download ${pkg.name} ${pkg.version}`, () => download(pkg.name, pkg.version, debs), (f) => fs.statSync(f).size);
    await progress.task(`unpack ${path.basename(deb)}`, () => extract(deb, tmp), () => diskUsage(tmp));
    const m: Omit<KernelMarker, 'builtAt' | 'buildMs'> = {
      kind: 'kernel',
      format: KERNEL_FORMAT,
      package: pkg.name,
      packageVersion: pkg.version,
      release,
      sizeBytes: diskUsage(tmp),
    };
    const k = info(tmp, m as KernelMarker);
    if (!fs.existsSync(k.vmlinuz) || !fs.existsSync(k.modulesDir)) {
      throw new Error(`${path.basename(deb)} has no boot/vmlinuz-${release} or lib/modules/${release}`);
    }
    fs.rmSync(deb);
    return m;
  });
  // The guest image copies vmlinuz and the rootfs copies the modules, so superseded kernels are dead weight.
  for (const e of fs.readdirSync(kernelsDir)) {
    const other = path.join(kernelsDir, e);
    if (other !== dir && readMarker<KernelMarker>(other, 'kernel', KERNEL_FORMAT)) fs.rmSync(other, { recursive: true, force: true });
  }
  return { kernel: info(dir, marker), reused: false };
}
