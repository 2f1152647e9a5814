// Two guests pinging each other through one `vhost-ts net --switch` process, which is SIGKILLed and restarted
// twice on the same sockets; QEMU reconnects (reconnect-ms) and the pings resume within 2 s each time. Frames in
// flight when the switch died may be lost (that is Ethernet); the guests need nothing done to them.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { startBackend as start, vhostTsBin, type BackendProcess } from '../helpers/backend-process.js';

const RESTARTS = 2;
const RESUME_MS = 2000;

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('net switch killed under guest traffic', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-net-restart-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(`two guests ping through the switch; it is SIGKILLed ${RESTARTS} times and pings resume within ${RESUME_MS} ms`, async () => {
    const macs = ['52:54:00:00:cc:01', '52:54:00:00:cc:02'];
    const ips = ['10.216.0.1', '10.216.0.2'];
    const sockets = macs.map((_, i) => join(dir, `port${i}.sock`));
    const args = [vhostTsBin, 'net', '--switch', 'restart-sw', ...sockets.flatMap((s) => ['--socket-path', s])];
    const switches: BackendProcess[] = [];
    const startSwitch = async (): Promise<void> => {
      switches.push(await start(args, (log) => sockets.every((s) => log.includes(`listening on ${s}`))));
    };
    const kill = (): Promise<void> => switches[switches.length - 1].kill();

    // Guest A's ping replies, timestamped as they reach the host.
    const replies: number[] = [];
    const gaps: number[] = [];
    const abort = new AbortController();
    let killer: Promise<void> | null = null;
    const killLoop = async (): Promise<void> => {
      for (let r = 0; r < RESTARTS; r++) {
        const seen = replies.length;
        // Pings flow (a few replies since the last restart), then the switch dies.
        const flowing = Date.now() + 60_000;
        while (replies.length < seen + 5 && Date.now() < flowing) await new Promise((res) => setTimeout(res, 50));
        if (replies.length < seen + 5) throw new Error(`pings did not flow before restart ${r}`);
        await kill();
        await startSwitch();
        const restarted = Date.now();
        const before = replies.length;
        const deadline = restarted + 30_000;
        while (replies.length === before && Date.now() < deadline) await new Promise((res) => setTimeout(res, 20));
        gaps.push(replies.length > before ? replies[before] - restarted : Infinity);
      }
    };
    await startSwitch();
    try {
      const guest = (i: number, script: string, onLine?: (line: string) => void) =>
        runGuest({
          setup,
          timeoutMs: 300_000,
          memoryMiB: 384,
          cpus: 1,
          signal: abort.signal,
          devices: [{ kind: 'net', socket: sockets[i], mac: macs[i], reconnectMs: 100 }],
          ...(onLine ? { onConsoleLine: onLine } : {}),
          script,
        });
      const up = (i: number) => `
ip link set eth0 up
ip addr add ${ips[i]}/24 dev eth0
n=0; until ping -c 1 -W 1 ${ips[1 - i]} > /dev/null 2>&1; do n=$((n+1)); [ $n -gt 120 ] && break; done
`;
      const [a] = await Promise.all([
        guest(
          0,
          `${up(0)}
echo PINGING
# The host kills and restarts the switch meanwhile (60 s: two restarts of a tsx-started switch under load fit).
ping -i 0.2 -W 1 -w 60 ${ips[1]} | while read -r line; do echo "PING $line"; done
echo "RESULT ping done"
`,
          (line) => {
            if (line.startsWith('PING ') && line.includes('bytes from')) replies.push(Date.now());
            if (line.includes('PINGING') && !killer) {
              killer = killLoop().catch((e) => abort.abort(e));
            }
          },
        ),
        guest(1, `${up(1)}
# Answer pings while A pings.
sleep 70
`),
      ]);
      await killer;
      expect(a.exitCode).toBe(0);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- switch logs ---\n${switches.map((b) => b.log()).join('\n---\n')}`);
    } finally {
      for (const b of switches) await b.kill();
    }
    console.log(`net switch restarts: pings resumed ${gaps.map((g) => `${g} ms`).join(', ')} after the switch listened again`);
    expect(gaps).toHaveLength(RESTARTS);
    for (const g of gaps) expect(g).toBeLessThan(RESUME_MS);
    expect(liveQemuPids()).toEqual([]);
  }, 360_000);
});
