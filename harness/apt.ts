// Debian packages fetched without installing them on the host: apt resolves the candidate version from the host's
// package lists, apt-get download fetches it, dpkg-deb unpacks it. No root needed.
import fs from 'node:fs';
import path from 'node:path';
import { isRoot, run } from './host-tools.js';

export interface PackageInfo {
  name: string;
  version: string;
  depends: string[];
}

/** The candidate version apt would install, or undefined when the host's lists do not know the package. */
export async function candidate(pkg: string): Promise<PackageInfo | undefined> {
  let out: string;
  try {
    out = (await run('apt-cache', ['show', '--no-all-versions', pkg], { timeoutMs: 60_000 })).stdout;
  } catch {
    return undefined;
  }
  const field = (name: string) => out.match(new RegExp(`^${name}: (.*)$`, 'm'))?.[1]?.trim();
  const version = field('Version');
  if (!version) return undefined;
  const depends = (field('Depends') ?? '')
    .split(',')
    .map((d) => d.trim().split(/[\s|]/)[0]!)
    .filter(Boolean);
  return { name: pkg, version, depends };
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
