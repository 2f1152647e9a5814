import { execFile } from 'node:child_process';
import { closeSync, constants, openSync } from 'node:fs';

// Test utility: throwaway network namespaces managed with iproute2. Every name starts with `vts` so that
// nothing here can address the host's own namespaces or interfaces by accident.

export interface ExecResult {
  /** Exit status; -1 when the command could not be started or was killed (timeout). */
  code: number;
  stdout: string;
  stderr: string;
}

export interface Netns {
  readonly name: string;
  /** Runs argv inside the namespace (`ip netns exec`). Never rejects: check code. */
  exec(cmd: string[], timeoutMs?: number): Promise<ExecResult>;
  /** Moves an interface of ours from the caller's namespace into this one (`ip link set dev X netns N`). */
  moveLink(ifname: string): Promise<void>;
  /** `ip -n N addr add CIDR dev X` */
  addAddress(ifname: string, cidr: string): Promise<void>;
  /** `ip -n N link set dev X up|down` */
  setLinkUp(ifname: string, up: boolean): Promise<void>;
  /** Whether the interface exists inside the namespace. */
  hasLink(ifname: string): Promise<boolean>;
  /** Deletes the namespace and every interface inside it. Idempotent. */
  close(): Promise<void>;
}

const DEFAULT_TIMEOUT_MS = 10_000;
let counter = 0;

/** Runs a command with a hard timeout (SIGKILL); resolves with its status and output, never rejects. */
export function run(cmd: string[], timeoutMs = DEFAULT_TIMEOUT_MS): Promise<ExecResult> {
  return new Promise((resolve) => {
    execFile(cmd[0], cmd.slice(1), { timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' }, (error, stdout, stderr) => {
      let code = 0;
      if (error) code = typeof error.code === 'number' ? error.code : -1;
      if (error && code === 0) code = -1;
      resolve({ code, stdout, stderr: stderr || (error && code === -1 ? error.message : '') });
    });
  });
}

async function ip(args: string[], what: string): Promise<ExecResult> {
  const result = await run(['ip', ...args]);
  if (result.code !== 0) throw new Error(`${what}: ip ${args.join(' ')} exited ${result.code}: ${result.stderr.trim()}`);
  return result;
}

function checkName(kind: string, name: string): void {
  if (!name.startsWith('vts')) throw new Error(`${kind} ${JSON.stringify(name)} must start with "vts"`);
}

/** A fresh namespace named `${prefix}${pid}-${n}`; prefix must start with "vts". */
export async function createNetns(prefix: string): Promise<Netns> {
  checkName('netns prefix', prefix);
  const name = `${prefix}${process.pid}-${counter++}`;
  await ip(['netns', 'add', name], 'create netns');
  let closed = false;

  const netns: Netns = {
    name,
    exec(cmd, timeoutMs = DEFAULT_TIMEOUT_MS) {
      return run(['ip', 'netns', 'exec', name, ...cmd], timeoutMs);
    },
    async moveLink(ifname) {
      checkName('interface', ifname);
      await ip(['link', 'set', 'dev', ifname, 'netns', name], 'move link');
    },
    async addAddress(ifname, cidr) {
      checkName('interface', ifname);
      await ip(['-n', name, 'addr', 'add', cidr, 'dev', ifname], 'add address');
    },
    async setLinkUp(ifname, up) {
      checkName('interface', ifname);
      await ip(['-n', name, 'link', 'set', 'dev', ifname, up ? 'up' : 'down'], 'set link');
    },
    async hasLink(ifname) {
      const result = await run(['ip', '-n', name, '-o', 'link', 'show', 'dev', ifname]);
      return result.code === 0;
    },
    async close() {
      if (closed) return;
      closed = true;
      await ip(['netns', 'del', name], 'delete netns');
    },
  };
  return netns;
}

/** Why namespaces cannot be used here, or null when a probe namespace could be added and deleted. */
export async function netnsUnavailable(): Promise<string | null> {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'needs root for ip netns';
  const probe = await run(['ip', 'netns', 'list'], 5_000);
  if (probe.code !== 0) return `ip netns unavailable: ${probe.stderr.trim() || `exit ${probe.code}`}`;
  try {
    const netns = await createNetns('vtsprobe');
    await netns.close();
  } catch (error) {
    return `ip netns add failed: ${(error as Error).message}`;
  }
  return null;
}

/** Why taps cannot be made here (null when they can): /dev/net/tun must open. */
export function tunUnavailable(): string | null {
  try {
    closeSync(openSync('/dev/net/tun', constants.O_RDWR));
    return null;
  } catch (error) {
    return `/dev/net/tun cannot be opened: ${(error as Error).message}`;
  }
}
