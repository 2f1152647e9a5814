// `npm test`'s pretest step: the Debian packages the tests need (harness/test-packages.txt). As root, missing ones
// are installed with apt-get, saying which; otherwise the one command to run is printed and the tests do not start.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';

const list = fs
  .readFileSync(new URL('./test-packages.txt', import.meta.url), 'utf8')
  .split('\n')
  .map((l) => l.trim())
  .filter((l) => l && !l.startsWith('#'));

const installed = (pkg: string) => spawnSync('dpkg-query', ['-W', '-f=${Status}', pkg], { encoding: 'utf8' }).stdout.includes('install ok installed');
const missing = list.filter((p) => !installed(p));
if (missing.length > 0) {
  const command = `apt-get install -y --no-install-recommends ${missing.join(' ')}`;
  if (process.getuid?.() !== 0) {
    console.error(`npm test needs these Debian packages: ${missing.join(' ')}\nas root, run: ${command}`);
    process.exit(1);
  }
  console.error(`npm test: installing ${missing.join(', ')} with apt-get (the tests' QEMU provisioning, guest tools and reference frontends) ...`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  let r = spawnSync('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...missing], { stdio: 'inherit', env });
  if (r.status !== 0) {
    spawnSync('apt-get', ['update', '-q'], { stdio: 'inherit', env });
    r = spawnSync('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...missing], { stdio: 'inherit', env });
  }
  if (r.status !== 0) process.exit(r.status ?? 1);
}
