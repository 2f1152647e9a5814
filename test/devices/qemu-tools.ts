/** Run QEMU's block tools (qemu-io, qemu-img) from the harness's QEMU, bounded, for tests against real frontends. */
import { spawn } from 'node:child_process';
import { qemuCommand } from '../../harness/qemu-install.js';
import type { HarnessSetup } from '../../harness/setup.js';

export interface ToolRun {
  code: number;
  stdout: string;
  stderr: string;
}

export function runQemuTool(setup: HarnessSetup, tool: 'qemu-io' | 'qemu-img', args: string[], timeoutMs = 60_000): Promise<ToolRun> {
  const cmd = qemuCommand(setup.qemu, tool, args);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd.file, cmd.args, { env: { ...process.env, ...cmd.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${tool} did not finish within ${timeoutMs} ms\n${stdout}\n${stderr}`));
    }, timeoutMs);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** --image-opts for libblkio's vhost-user-blk driver. */
export function blkioImage(socket: string): string {
  return `driver=virtio-blk-vhost-user,path=${socket},cache.direct=on`;
}

/** qemu-io with one -c per command, against our backend through libblkio. */
export function qemuIo(setup: HarnessSetup, socket: string, commands: string[]): Promise<ToolRun> {
  return runQemuTool(setup, 'qemu-io', ['--image-opts', blkioImage(socket), ...commands.flatMap((c) => ['-c', c])]);
}
