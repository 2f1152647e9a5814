// Host packages a command needs, installed with apt-get when missing: as root it says which and why and installs
// them; otherwise it prints the one apt-get command to run and stops.
import { aptPackageFor, isRoot, run, which } from './host-tools.js';

export class MissingPackagesError extends Error {
  constructor(readonly command: string) {
    super(`missing host packages; as root, run: ${command}`);
    this.name = 'MissingPackagesError';
  }
}

/**
 * Make sure every tool in `tools` is on the host. `why` says what they are for, for the line printed before an
 * install. Throws MissingPackagesError (with the command) when not root.
 */
export async function ensureHostTools(tools: string[], why: string, log: (line: string) => void): Promise<void> {
  const missing = tools.filter((t) => which(t) === undefined);
  if (missing.length === 0) return;
  const pkgs = [...new Set(missing.map(aptPackageFor))].sort();
  const command = `apt-get install -y --no-install-recommends ${pkgs.join(' ')}`;
  if (!isRoot()) throw new MissingPackagesError(command);
  log(`installing ${pkgs.join(', ')} with apt-get (${why}) ...`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  try {
    await run('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...pkgs], { timeoutMs: 15 * 60_000, env });
  } catch {
    // Stale or missing package lists are the usual cause on a fresh machine.
    await run('apt-get', ['update', '-q'], { timeoutMs: 10 * 60_000, env });
    await run('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...pkgs], { timeoutMs: 15 * 60_000, env });
  }
  const still = tools.filter((t) => which(t) === undefined);
  if (still.length > 0) throw new Error(`apt-get installed ${pkgs.join(' ')}, but ${still.join(', ')} is still missing`);
}
