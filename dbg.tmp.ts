import { mkdtempSync, writeFileSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureSetup } from './harness/setup.js';
import { runGuest } from './harness/vm.js';
import { blkDevice } from './src/devices/blk/index.js';
import { VhostUserServer } from './src/vhost/index.js';
const setup = await ensureSetup();
const dir = mkdtempSync(join(tmpdir(), 'dbg-'));
for (const packed of [false, true]) {
const image = join(dir, 'disk.img'); writeFileSync(image, ''); truncateSync(image, 256 << 20);
const socket = join(dir, 'blk.sock');
const blk = blkDevice({ path: image, numQueues: Number(process.env.NQ ?? 1) });
const server = await VhostUserServer.start(blk, { socketPath: socket, log: { info: (m) => console.log('I', m), warn: (m) => console.log('W', m), error: (m) => console.log('E', m) } });
try {
  const run = await runGuest({ setup, timeoutMs: 60_000, cpus: Number(process.env.CPUS ?? 1), devices: [{ kind: 'blk', socket, numQueues: Number(process.env.NQ ?? 1), packed }],
    script: process.env.SCRIPT ?? `echo "RESULT packed $(cut -c35 /sys/block/vda/device/features)"; dd if=/dev/vda of=/dev/null bs=4k count=100 && echo RESULT ok` });
  console.log(run.results, run.consoleText?.slice(-2000));
} catch (e) { console.log('ERR', (e as any).message, ((e as any).console ?? '').slice(-3000)); }
console.log(JSON.stringify(blk.queueStats()));
await server.close();
}
