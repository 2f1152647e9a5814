/**
 * The rust-vmm peer of bench:virtqueue: bench/rust-vmm (virtio-queue over vm-memory) built offline, against the
 * crate sources Debian trixie packages, into the artefact cache.
 *
 * Two cached artefacts, each built atomically (harness/cache.ts) under the cache's set-up lock:
 * - `rust-vmm-crates/`: a private root holding the unpacked librust-virtio-queue-dev, librust-vm-memory-dev and
 *   the closure of librust-*-dev packages they depend on (usr/share/cargo/registry/<crate>-<version>/). The host's
 *   apt resolves and downloads them from trixie through a private configuration (its own sources list, lists and
 *   an empty dpkg status, so nothing on the host counts as installed and nothing is installed on the host);
 *   harness/apt.ts downloads and unpacks each package into that root.
 * - `rust-vmm-peer/<key>/`: a binary per cargo profile (release, release-lto), built with `cargo build --offline
 *   --profile P` from a copy of bench/rust-vmm whose `.cargo/config.toml` replaces crates.io with that registry
 *   directory. The key hashes the sources, the toolchain and the crate versions, so a change to any of them
 *   rebuilds.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { download, extract } from '../harness/apt.js';
import { buildAtomically, readMarker, removeTree, resolveCacheDir, withCacheLock, type Marker } from '../harness/cache.js';
import { isRoot, run, which } from '../harness/host-tools.js';
import { diskUsage, formatBytes, formatMs, type LogFn } from '../harness/progress.js';
import { debianMirror } from '../harness/qemu-install.js';

/** Why the peer cannot be had on this host; the benchmark reports it and carries on without the comparison. */
export class RustPeerUnavailable extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RustPeerUnavailable';
  }
}

export interface Crate {
  name: string;
  version: string;
}

/** One build of the peer: a cargo profile of bench/rust-vmm/Cargo.toml. */
export interface PeerBuild {
  profile: string;
  description: string;
  binary: string;
  buildMs: number;
}

export interface RustVmmPeer {
  /** The default release build first, then the LTO one. */
  builds: PeerBuild[];
  virtioQueue: string;
  vmMemory: string;
  /** Every crate in the peer's Cargo.lock (its dependency graph as cargo resolved it from the Debian registry). */
  crates: Crate[];
  /** Whether this virtio-queue has a packed-ring queue, and how that was decided. */
  packed: { supported: boolean; why: string };
  /** `rustc -V` of the build. */
  rustc: string;
  /** False when an earlier build was reused. */
  built: boolean;
  /** The whole build, every profile (from the cache's marker when reused). */
  buildMs: number;
  /** Time spent provisioning the crates in this call (0 when reused). */
  provisionMs: number;
}

const SOURCE_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'rust-vmm');
const BINARY = 'vhost-ts-rust-vmm-peer';
const SUITE = 'trixie';
const ROOT_PACKAGES = ['librust-virtio-queue-dev', 'librust-vm-memory-dev'];
const CRATES_FORMAT = 1;
const PEER_FORMAT = 2;
/** Cargo profiles built, as bench/rust-vmm/Cargo.toml defines them; RUSTFLAGS is empty for all (no target-cpu). */
const PROFILES: readonly { profile: string; description: string }[] = [
  { profile: 'release', description: 'cargo release defaults: opt-level 3, no LTO, 16 codegen units' },
  { profile: 'release-lto', description: 'release + lto = true, codegen-units = 1' },
];
const NO_RUST = 'or run with --no-rust';

interface CratesMarker extends Marker {
  kind: 'rust-vmm-crates';
  suite: string;
  packages: Crate[];
  crates: Crate[];
}

interface PeerMarker extends Marker {
  kind: 'rust-vmm-peer';
  rustc: string;
  cargo: string;
  crates: Crate[];
  builds: { profile: string; description: string; buildMs: number }[];
}

function registryOf(cratesDir: string): string {
  return path.join(cratesDir, 'usr/share/cargo/registry');
}

/** `name-1.2.3` directory names of a cargo registry directory as crates. */
function registryCrates(registry: string): Crate[] {
  return fs
    .readdirSync(registry)
    .map((d) => d.match(/^(.+)-(\d+\.\d+\.\d+\S*)$/))
    .filter((m): m is RegExpMatchArray => m !== null)
    .map((m) => ({ name: m[1]!, version: m[2]! }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

/** The [[package]] entries of a Cargo.lock. */
function lockedCrates(lockText: string): Crate[] {
  const out: Crate[] = [];
  for (const block of lockText.split('[[package]]').slice(1)) {
    const name = block.match(/^name = "([^"]+)"/m)?.[1];
    const version = block.match(/^version = "([^"]+)"/m)?.[1];
    if (name && version) out.push({ name, version });
  }
  return out;
}

function versionOf(crates: Crate[], name: string): string {
  const c = crates.find((x) => x.name === name);
  if (!c) throw new RustPeerUnavailable(`the Debian registry has no ${name} crate (crates: ${crates.map((x) => x.name).join(', ')})`);
  return c.version;
}

/** A private apt configuration over Debian `suite` under dir: the host's apt, none of the host's package state. */
function writeAptConfig(dir: string, keyring: string): string {
  for (const d of ['lists/partial', 'cache/archives/partial', 'etc/sources.list.d', 'etc/preferences.d']) {
    fs.mkdirSync(path.join(dir, d), { recursive: true });
  }
  fs.writeFileSync(path.join(dir, 'status'), '');
  fs.writeFileSync(path.join(dir, 'etc/sources.list'), `deb [signed-by=${keyring}] ${debianMirror()} ${SUITE} main\n`);
  const conf = path.join(dir, 'apt.conf');
  const q = (p: string) => JSON.stringify(path.join(dir, p));
  fs.writeFileSync(
    conf,
    [
      `Dir::State ${q('')};`,
      `Dir::State::Lists ${q('lists')};`,
      `Dir::State::status ${q('status')};`,
      `Dir::Cache ${q('cache')};`,
      `Dir::Etc::SourceList ${q('etc/sources.list')};`,
      `Dir::Etc::SourceParts ${q('etc/sources.list.d')};`,
      `Dir::Etc::Preferences ${q('etc/preferences')};`,
      `Dir::Etc::PreferencesParts ${q('etc/preferences.d')};`,
      'APT::Architecture "amd64";',
      'APT::Architectures { "amd64"; };',
      'Acquire::Languages "none";',
      '',
    ].join('\n'),
  );
  return conf;
}

/**
 * harness/apt.ts runs the host's apt with this process's environment: point it at the private configuration for
 * the duration of fn. Nothing else in this process runs apt meanwhile (the benchmark is single-purpose).
 */
async function withAptConfig<T>(conf: string, fn: () => Promise<T>): Promise<T> {
  const before = process.env.APT_CONFIG;
  process.env.APT_CONFIG = conf;
  try {
    return await fn();
  } finally {
    if (before === undefined) delete process.env.APT_CONFIG;
    else process.env.APT_CONFIG = before;
  }
}

/** Runs fn over items, at most `limit` at a time. */
async function eachLimited<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) await fn(items[next++]!);
  });
  await Promise.all(workers);
}

/** The librust-*-dev packages apt would install for ROOT_PACKAGES on a system with nothing installed. */
async function resolveClosure(conf: string): Promise<Crate[]> {
  const env = { ...process.env, APT_CONFIG: conf };
  const { stdout } = await run('apt-get', ['-s', 'install', '--no-install-recommends', ...ROOT_PACKAGES], { timeoutMs: 5 * 60_000, env });
  const packages: Crate[] = [];
  for (const m of stdout.matchAll(/^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) /gm)) {
    // dpkg, perl and the like are what an empty root would need to install them; the crates are only these.
    if (/^librust-.*-dev$/.test(m[1]!)) packages.push({ name: m[1]!, version: m[2]! });
  }
  for (const p of ROOT_PACKAGES) {
    if (!packages.some((x) => x.name === p)) throw new RustPeerUnavailable(`Debian ${SUITE} has no ${p} (apt-get -s install did not list it)`);
  }
  return packages;
}

function keyringFor(cacheDir: string): string {
  // The trixie root the harness provisions for QEMU carries trixie's own keyring; the host's (Debian 12's
  // debian-archive-keyring) holds the trixie keys too.
  const candidates = [
    path.join(cacheDir, 'qemu-root/usr/share/keyrings/debian-archive-keyring.gpg'),
    '/usr/share/keyrings/debian-archive-keyring.gpg',
  ];
  const found = candidates.find((k) => fs.existsSync(k));
  if (!found) throw new RustPeerUnavailable(`no Debian archive keyring to verify ${SUITE} with (looked for ${candidates.join(', ')}); install debian-archive-keyring, ${NO_RUST}`);
  return found;
}

async function provisionCrates(cacheDir: string, dir: string, log: LogFn): Promise<CratesMarker> {
  for (const tool of ['apt-get', 'dpkg-deb']) {
    if (!which(tool)) {
      throw new RustPeerUnavailable(`${tool} not found: the rust-vmm crates come from Debian ${SUITE}'s packages (${ROOT_PACKAGES.join(', ')}); ${NO_RUST}`);
    }
  }
  const keyring = keyringFor(cacheDir);
  return buildAtomically<CratesMarker>(dir, async (tmp) => {
    const aptDir = path.join(tmp, 'apt');
    const conf = writeAptConfig(aptDir, keyring);
    const t0 = Date.now();
    await run('apt-get', [...(isRoot() ? ['-o', 'APT::Sandbox::User=root'] : []), 'update'], {
      timeoutMs: 10 * 60_000,
      env: { ...process.env, APT_CONFIG: conf },
    }).catch((err: Error) => {
      throw new RustPeerUnavailable(`apt-get update of Debian ${SUITE} (${debianMirror()}) failed: ${err.message.split('\n').slice(-3).join(' ')}`);
    });
    log(`rust-vmm peer: apt-get update (${SUITE}, private lists): ${formatMs(Date.now() - t0)}`);
    const packages = await resolveClosure(conf);
    log(`rust-vmm peer: ${packages.length} librust-*-dev packages for ${ROOT_PACKAGES.join(' ')}`);
    const debs = path.join(cacheDir, 'debs');
    const t1 = Date.now();
    const files: string[] = [];
    // One apt-get per package (download() takes one); each re-reads the lists, so several at a time.
    await withAptConfig(conf, () => eachLimited(packages, 6, async (p) => void files.push(await download(p.name, p.version, debs)))).catch(
      (err: Error) => {
        throw new RustPeerUnavailable(`downloading the librust-*-dev packages from Debian ${SUITE} failed: ${err.message.split('\n').slice(-3).join(' ')}`);
      },
    );
    log(`rust-vmm peer: downloaded ${files.length} .debs into ${debs}: ${formatMs(Date.now() - t1)}`);
    // The artefact is the private root: the packages' files land where Debian puts them.
    for (const f of files) await extract(f, tmp);
    await removeTree(aptDir);
    const registry = registryOf(tmp);
    if (!fs.existsSync(registry)) throw new Error(`the unpacked packages left no ${registry}`);
    const crates = registryCrates(registry);
    return {
      kind: 'rust-vmm-crates',
      format: CRATES_FORMAT,
      suite: SUITE,
      packages,
      crates,
      sizeBytes: diskUsage(tmp),
    };
  });
}

async function toolVersion(tool: string, args: string[]): Promise<string> {
  return (await run(tool, args, { timeoutMs: 60_000 })).stdout.trim();
}

/** The environment cargo builds in: the user's, minus anything that would change the profile or add codegen flags. */
function buildEnv(targetDir: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, CARGO_TARGET_DIR: targetDir, RUSTFLAGS: '' };
  for (const k of Object.keys(env)) {
    if (k === 'CARGO_ENCODED_RUSTFLAGS' || k.startsWith('CARGO_PROFILE_') || k.startsWith('CARGO_BUILD_')) delete env[k];
  }
  return env;
}

async function buildPeer(dir: string, registry: string, rustc: string, cargo: string, log: LogFn): Promise<PeerMarker> {
  return buildAtomically<PeerMarker>(dir, async (tmp) => {
    // Cargo writes Cargo.lock next to Cargo.toml: build a copy, never in the source tree.
    const work = path.join(tmp, 'build');
    fs.cpSync(SOURCE_DIR, work, { recursive: true, filter: (src) => !/[/\\](target|Cargo\.lock)$/.test(src) });
    fs.mkdirSync(path.join(work, '.cargo'), { recursive: true });
    fs.writeFileSync(
      path.join(work, '.cargo/config.toml'),
      `[source.crates-io]\nreplace-with = "debian"\n\n[source.debian]\ndirectory = ${JSON.stringify(registry)}\n`,
    );
    const targetDir = path.join(tmp, 'target');
    fs.mkdirSync(path.join(tmp, 'bin'));
    const builds: PeerMarker['builds'] = [];
    for (const { profile, description } of PROFILES) {
      const t0 = Date.now();
      await run('cargo', ['build', '--offline', '--profile', profile], { cwd: work, timeoutMs: 15 * 60_000, env: buildEnv(targetDir) }).catch(
        (err: Error) => {
          throw new RustPeerUnavailable(`cargo build --offline --profile ${profile} of ${SOURCE_DIR} against ${registry} failed:\n${err.message}`);
        },
      );
      const buildMs = Date.now() - t0;
      log(`rust-vmm peer: cargo build --offline --profile ${profile}: ${formatMs(buildMs)}`);
      const binary = path.join(tmp, 'bin', `${BINARY}-${profile}`);
      fs.copyFileSync(path.join(targetDir, profile, BINARY), binary);
      fs.chmodSync(binary, 0o755);
      builds.push({ profile, description, buildMs });
    }
    await removeTree(targetDir);
    return {
      kind: 'rust-vmm-peer',
      format: PEER_FORMAT,
      rustc,
      cargo,
      crates: lockedCrates(fs.readFileSync(path.join(work, 'Cargo.lock'), 'utf8')),
      builds,
      sizeBytes: diskUsage(tmp),
    };
  });
}

/** Whether virtio-queue's source has a packed-ring queue at all. */
function packedSupport(registry: string, version: string): { supported: boolean; why: string } {
  const src = path.join(registry, `virtio-queue-${version}`, 'src');
  const files = (fs.readdirSync(src, { recursive: true }) as string[]).filter((f) => f.endsWith('.rs'));
  const mentions = files.filter((f) => /packed/i.test(fs.readFileSync(path.join(src, f), 'utf8')));
  if (mentions.length === 0) {
    return { supported: false, why: `virtio-queue ${version} implements split rings only (no mention of packed rings in ${files.length} source files)` };
  }
  // Later versions define the packed descriptor layout (desc/packed.rs); that is still no packed queue to drive.
  const queue = files.some((f) => /packed/i.test(f) && /queue/i.test(f));
  return queue
    ? { supported: true, why: `virtio-queue ${version} has ${mentions.join(', ')}` }
    : { supported: false, why: `virtio-queue ${version} mentions packed rings only in ${mentions.join(', ')} (no packed queue)` };
}

function sourceKey(parts: string[]): string {
  const h = crypto.createHash('sha256');
  h.update(`format ${PEER_FORMAT}\n`);
  for (const f of ['Cargo.toml', 'src/main.rs']) h.update(`${f}\n`).update(fs.readFileSync(path.join(SOURCE_DIR, f)));
  for (const p of parts) h.update(`\n${p}`);
  return h.digest('hex').slice(0, 16);
}

/**
 * The peer binary, provisioning the crates and building it when the cache has no current build. Throws
 * RustPeerUnavailable, with what to do, when this host cannot have it (no cargo, no apt, no network).
 */
export async function ensureRustVmmPeer(opts: { cacheDir?: string; log: LogFn }): Promise<RustVmmPeer> {
  const { log } = opts;
  for (const tool of ['cargo', 'rustc']) {
    if (!which(tool)) throw new RustPeerUnavailable(`${tool} not found: install rustup/cargo, ${NO_RUST}`);
  }
  const cacheDir = resolveCacheDir(opts.cacheDir);
  const cratesDir = path.join(cacheDir, 'rust-vmm-crates');
  const peersDir = path.join(cacheDir, 'rust-vmm-peer');
  const rustc = await toolVersion('rustc', ['-V']);
  const cargo = await toolVersion('cargo', ['-V']);
  const rustcFull = await toolVersion('rustc', ['-vV']);

  const current = (): { crates: CratesMarker; dir: string; peer?: PeerMarker } | undefined => {
    const crates = readMarker<CratesMarker>(cratesDir, 'rust-vmm-crates', CRATES_FORMAT);
    if (!crates || !fs.existsSync(registryOf(cratesDir))) return undefined;
    const dir = path.join(peersDir, sourceKey([rustcFull, cargo, ...crates.crates.map((c) => `${c.name} ${c.version}`)]));
    const peer = readMarker<PeerMarker>(dir, 'rust-vmm-peer', PEER_FORMAT);
    const complete = peer && PROFILES.every((p) => fs.existsSync(path.join(dir, 'bin', `${BINARY}-${p.profile}`)));
    return { crates, dir, peer: complete ? peer : undefined };
  };

  let provisionMs = 0;
  let built = false;
  let state = current();
  if (!state?.peer) {
    state = await withCacheLock(
      cacheDir,
      30 * 60_000,
      (owner) => log(`rust-vmm peer: waiting for the set-up lock held by process ${owner}`),
      async () => {
        let s = current();
        if (!s) {
          log(`rust-vmm peer: provisioning ${ROOT_PACKAGES.join(', ')} and their librust-*-dev closure from Debian ${SUITE} into ${cratesDir}`);
          const t0 = Date.now();
          const m = await provisionCrates(cacheDir, cratesDir, log);
          provisionMs = Date.now() - t0;
          log(`rust-vmm peer: ${m.crates.length} crates in ${registryOf(cratesDir)} (${formatBytes(m.sizeBytes)})`);
          s = current();
          if (!s) throw new Error(`${cratesDir} has no marker after provisioning`);
        }
        if (!s.peer) {
          const registry = registryOf(cratesDir);
          log(`rust-vmm peer: building ${SOURCE_DIR} offline against ${registry} (${rustc}) into ${s.dir}`);
          await buildPeer(s.dir, registry, rustc, cargo, log);
          built = true;
          // Builds for older sources or toolchains are dead weight: keep only this one.
          for (const e of fs.readdirSync(peersDir)) {
            if (e !== path.basename(s.dir) && /^[0-9a-f]{16}$/.test(e)) await removeTree(path.join(peersDir, e));
          }
          s = current();
          if (!s?.peer) throw new Error(`${s?.dir ?? peersDir} has no marker after the build`);
        }
        return s;
      },
    );
  }
  const peer = state.peer!;
  const registry = registryOf(cratesDir);
  const virtioQueue = versionOf(peer.crates, 'virtio-queue');
  return {
    builds: peer.builds.map((b) => ({ ...b, binary: path.join(state.dir, 'bin', `${BINARY}-${b.profile}`) })),
    virtioQueue,
    vmMemory: versionOf(peer.crates, 'vm-memory'),
    crates: peer.crates,
    packed: packedSupport(registry, virtioQueue),
    rustc: peer.rustc,
    built,
    buildMs: peer.buildMs,
    provisionMs,
  };
}

/** Chains per second of a measured window: over wall-clock time, and over the CPU time the measuring process used. */
export interface Rate {
  wall: number;
  cpu: number;
}

/**
 * The peer running in --serve mode: one process, its queue and memory kept between measurements, so that the
 * benchmark can alternate short windows of it and of SplitQueue. Pinned to `cpu` when given (taskset).
 */
export class RustVmmPeerProcess {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly lines: AsyncIterator<string>;
  private stderr = '';

  constructor(
    private readonly binary: string,
    cpu: number | undefined,
  ) {
    const [file, args] = cpu === undefined ? [binary, ['--serve']] : ['taskset', ['-c', String(cpu), binary, '--serve']];
    this.child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stderr.on('data', (d: Buffer) => (this.stderr = (this.stderr + d.toString()).slice(-4000)));
    this.lines = readline.createInterface({ input: this.child.stdout })[Symbol.asyncIterator]();
  }

  /** Rounds for warmupMs, then chains per second over ms of rounds: over wall time, and over its CPU time. */
  async measure(warmupMs: number, ms: number): Promise<Rate> {
    this.child.stdin.write(`${warmupMs} ${ms}\n`);
    const next = await this.lines.next();
    if (next.done) throw new Error(`${this.binary} --serve ended without a result: ${this.stderr.trim() || 'no stderr'}`);
    const r = JSON.parse(next.value) as { chainsPerSecond?: number; chainsPerCpuSecond?: number };
    const ok = (x: unknown): x is number => typeof x === 'number' && x > 0 && Number.isFinite(x);
    if (!ok(r.chainsPerSecond) || !ok(r.chainsPerCpuSecond)) throw new Error(`${this.binary}: unexpected output ${next.value}`);
    return { wall: r.chainsPerSecond, cpu: r.chainsPerCpuSecond };
  }

  /** End its input and wait for it to exit. */
  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.stdin.end();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
}
