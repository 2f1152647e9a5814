// Debian packages fetched without installing them on the host: apt resolves the candidate version from the host's
// package lists, apt-get download fetches it, dpkg-deb unpacks it. No root needed.
import fs from 'node:fs';
import path from 'node:path';
import { isRoot, run } from './host-tools.js';

export interface Dependency {
  name: string;
  /** The version when the dependency pins one with (= V). */
  exactVersion?: string;
}

export interface PackageInfo {
  name: string;
  version: string;
  depends: Dependency[];
}

function parseDepends(field: string): Dependency[] {
  return field
    .split(',')
    .map((alt) => alt.split('|')[0]!.trim())
    .filter(Boolean)
    .map((d) => {
      const m = d.match(/^(\S+)(?:\s*\(\s*=\s*([^)\s]+)\s*\))?/);
      return m?.[2] ? { name: m[1]!, exactVersion: m[2] } : { name: m?.[1] ?? d };
    });
}

/**
 * The candidate versions apt would install, for all names in one apt-cache run: on hosts whose apt keeps no
 * pkgcache.bin (container images often disable it) every run re-parses all package lists, about a second each.
 * Names the host's lists do not know are absent from the result.
 */
export async function candidates(pkgs: string[]): Promise<Map<string, PackageInfo>> {
  const found = new Map<string, PackageInfo>();
  let out: string;
  try {
    out = (await run('apt-cache', ['show', '--no-all-versions', ...pkgs], { timeoutMs: 60_000 })).stdout;
  } catch (err) {
    // apt-cache fails the whole call when one name is unknown: fall back to asking one by one.
    if (pkgs.length === 1) return found;
    for (const p of pkgs) for (const [k, v] of await candidates([p])) found.set(k, v);
    return found;
  }
  for (const stanza of out.split(/\n\s*\n/)) {
    const field = (name: string) => stanza.match(new RegExp(`^${name}: (.*)$`, 'm'))?.[1]?.trim();
    const name = field('Package');
    const version = field('Version');
    if (name && version && !found.has(name)) found.set(name, { name, version, depends: parseDepends(field('Depends') ?? '') });
  }
  return found;
}

export function noListsHint(pkg: string): string {
  return `apt does not know ${pkg}: the host's package lists are missing or stale; run: apt-get update`;
}

/** Downloads pkg=version into dir (reusing an earlier download) and returns the .deb path. */
export async function download(pkg: string, version: string, dir: string): Promise<string> {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${pkg}_${version.replace(/:/g, '%3a')}_amd64.deb`);
  const allFile = file.replace(/_amd64\.deb$/, '_all.deb');
  for (const f of [file, allFile]) if (fs.existsSync(f)) return f;
  // As root, apt hands the download to the _apt user, which cannot write an arbitrary cache dir.
  const sandbox = isRoot() ? ['-o', 'APT::Sandbox::User=root'] : [];
  await run('apt-get', [...sandbox, 'download', `${pkg}=${version}`], { cwd: dir, timeoutMs: 10 * 60_000 });
  for (const f of [file, allFile]) if (fs.existsSync(f)) return f;
  throw new Error(`apt-get download ${pkg}=${version} produced no ${path.basename(file)} in ${dir}`);
}

export async function extract(deb: string, dest: string): Promise<void> {
  await run('dpkg-deb', ['-x', deb, dest], { timeoutMs: 5 * 60_000 });
}
