// `npm run setup`: everything a VM test needs, provisioned once into a cache outside the source tree and reused.
// Tests call ensureSetup() themselves, so a fresh checkout needs no manual step; the CLI exists to do the slow
// part up front and to build the optional full Debian guest.
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { chooseAccel } from './accel.js';
import { candidates } from './apt.js';
import { resolveCacheDir, withCacheLock } from './cache.js';
import { BUSYBOX_PACKAGE, ensureGuestImage, type GuestImage } from './initramfs.js';
import { ensureKernel, KERNEL_METAPACKAGE } from './kernel.js';
import { ensureQemu, type QemuInstall } from './qemu-install.js';
import { Progress, formatBytes, formatMs, stderrLog, type LogFn } from './progress.js';
import { ensureRootfs, type RootfsImage } from './rootfs.js';

export interface SetupOptions {
  /** Defaults to $VHOST_TS_CACHE, else ~/.cache/vhost-ts. */
  cacheDir?: string;
  /** Also build the full Debian rootfs image (slow; needs root). */
  full?: boolean;
  /** Rebuild every artefact even when a valid one is cached. */
  rebuild?: boolean;
  log?: LogFn;
  /** How long to wait for another process's set-up to finish. */
  lockWaitMs?: number;
}

export interface HarnessSetup {
  cacheDir: string;
  qemu: QemuInstall;
  guest: GuestImage;
  rootfs?: RootfsImage;
}

const SETUP_RECORD = 'setup.json';

export async function ensureSetup(opts: SetupOptions = {}): Promise<HarnessSetup> {
  const log = opts.log ?? stderrLog;
  const cacheDir = resolveCacheDir(opts.cacheDir);
  return withCacheLock(
    cacheDir,
    opts.lockWaitMs ?? 30 * 60_000,
    (pid) => log(`vhost-ts setup: waiting for the set-up already running in process ${pid}`),
    () => provision(cacheDir, opts, log),
  );
}

async function provision(cacheDir: string, opts: SetupOptions, log: LogFn): Promise<HarnessSetup> {
  const rebuild = opts.rebuild ?? false;
  const progress = new Progress(opts.full ? 4 : 3, log);
  log(`vhost-ts setup: cache ${cacheDir}`);
  const status: [string, string, boolean][] = [];

  progress.step('QEMU with vhost-user-test-device-pci');
  const qemu = await ensureQemu(progress, cacheDir, rebuild);
  status.push(['QEMU', `${qemu.install.version}, ${qemu.detail}`, qemu.reused]);

  progress.step('guest kernel (Debian cloud)');
  const packages = await candidates([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE]);
  const kernel = await ensureKernel(progress, cacheDir, rebuild, packages.get(KERNEL_METAPACKAGE));
  status.push(['kernel', `${kernel.kernel.package} ${kernel.kernel.packageVersion}, ${kernel.kernel.vmlinuz}`, kernel.reused]);

  progress.step('test guest initramfs');
  const guest = await ensureGuestImage(progress, cacheDir, kernel.kernel, rebuild, packages.get(BUSYBOX_PACKAGE));
  const initrdSize = fs.statSync(guest.guest.initrd).size;
  status.push(['initrd', `${formatBytes(initrdSize)}, ${guest.guest.initrd}`, guest.reused]);

  let rootfs: RootfsImage | undefined;
  if (opts.full) {
    progress.step('full Debian guest rootfs');
    const r = await ensureRootfs(progress, cacheDir, kernel.kernel, rebuild);
    rootfs = r.rootfs;
    status.push(['rootfs', `Debian ${r.rootfs.suite}, ${formatBytes(r.rootfs.sizeBytes)}, ${r.rootfs.image}`, r.reused]);
  } else {
    const previous = loadSetup(cacheDir)?.rootfs;
    if (previous && previous.kernelRelease === kernel.kernel.release && fs.existsSync(previous.image)) rootfs = previous;
  }

  const setup: HarnessSetup = { cacheDir, qemu: qemu.install, guest: guest.guest, ...(rootfs ? { rootfs } : {}) };
  const record = path.join(cacheDir, SETUP_RECORD);
  fs.writeFileSync(`${record}.tmp`, JSON.stringify(setup, null, 2) + '\n');
  fs.renameSync(`${record}.tmp`, record);

  const accel = chooseAccel({ log: () => undefined });
  log(`vhost-ts setup done in ${formatMs(Date.now() - progress.started)}:`);
  for (const [what, where, reused] of status) log(`  ${what.padEnd(7)} ${reused ? 'reused' : 'built '}  ${where}`);
  if (!opts.full && !rootfs) log(`  rootfs  -       not built (npm run setup -- --full)`);
  log(`  accel   ${accel.accel}: ${accel.reason}`);
  return setup;
}

/** The last completed set-up, without provisioning anything; undefined when there is none or it is gone. */
export function loadSetup(cacheDir?: string): HarnessSetup | undefined {
  let setup: HarnessSetup;
  try {
    setup = JSON.parse(fs.readFileSync(path.join(resolveCacheDir(cacheDir), SETUP_RECORD), 'utf8')) as HarnessSetup;
  } catch {
    return undefined;
  }
  const present = [setup.guest.kernel, setup.guest.initrd, path.join(setup.qemu.binDir, 'qemu-system-x86_64')];
  return present.every((p) => fs.existsSync(p)) ? setup : undefined;
}

function usage(): string {
  return `usage: vhost-ts setup [--full] [--rebuild] [--cache DIR]   (or: npm run setup -- ...)
  --full     also build the Debian bookworm rootfs image (systemd, gettys on hvc0 and ttyS0, fio, iperf3, iproute2)
  --rebuild  rebuild every artefact even when cached
  --cache    cache directory (default $VHOST_TS_CACHE or ~/.cache/vhost-ts)`;
}

/** `vhost-ts setup` and `npm run setup`: returns the exit code. */
export async function setupMain(argv: string[]): Promise<number> {
  const opts: SetupOptions = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--full') opts.full = true;
    else if (a === '--rebuild') opts.rebuild = true;
    else if (a === '--cache' && argv[i + 1]) opts.cacheDir = argv[++i];
    else if (a === '--help' || a === '-h') {
      console.log(usage());
      return 0;
    } else {
      console.error(`unknown argument ${a}\n${usage()}`);
      return 2;
    }
  }
  try {
    await ensureSetup(opts);
    return 0;
  } catch (err) {
    console.error(`vhost-ts setup failed: ${(err as Error).message}`);
    return 1;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  process.exitCode = await setupMain(process.argv.slice(2));
}
