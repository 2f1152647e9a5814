// Two guests on one vhost-ts switch; guest A migrates to a new QEMU on another port of the same switch while
// guest B pings it. After the switch-over the destination's QEMU sends SEND_RARP, its port announces A's MAC, the
// switch learns A's new port, and B's pings resume within 2 s.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qmp } from '../../harness/qmp.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { netDevice } from '../../src/devices/net/index.js';
import { parseMac } from '../../src/devices/net/spec.js';
import { VhostUserServer } from '../../src/vhost/index.js';

const RESUME_MS = 2000;

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('net migration on one switch', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-net-migrate-'));
  }, 15 * 60_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(`guest A moves to another switch port; B's pings resume within ${RESUME_MS} ms`, async () => {
    const macA = '52:54:00:00:dd:01';
    const macB = '52:54:00:00:dd:02';
    const ipA = '10.217.0.1';
    const ipB = '10.217.0.2';
    const logs: string[] = [];
    const infos: string[] = [];
    const log = { info: (m: string) => infos.push(m), warn: (m: string) => logs.push(m), error: (m: string) => logs.push(m) };
    const ports = { b: join(dir, 'b.sock'), aSrc: join(dir, 'a-src.sock'), aDst: join(dir, 'a-dst.sock') };
    const servers = await Promise.all(
      Object.values(ports).map((socketPath, i) =>
        VhostUserServer.start(netDevice({ backend: { kind: 'switch', name: 'migrate-sw' }, mac: parseMac(i === 0 ? macB : macA) }), { socketPath, log }),
      ),
    );
    const [srcQmp, incoming] = ['a-src.qmp', 'migrate.sock'].map((n) => join(dir, n));
    const replies: number[] = [];
    let switchedAt = 0;
    let migration: Promise<void> | null = null;
    const abort = new AbortController();
    const up = (me: string, peer: string) => `
ip link set eth0 up
ip addr add ${me}/24 dev eth0
n=0; until ping -c 1 -W 1 ${peer} > /dev/null 2>&1; do n=$((n+1)); [ $n -gt 120 ] && break; done
`;
    const scriptA = `${up(ipA, ipB)}
echo A-UP
sleep 55
`;
    const migrate = async (): Promise<void> => {
      await qmp(srcQmp, [{ execute: 'migrate', arguments: { uri: `unix:${incoming}` } }]);
      for (const deadline = Date.now() + 120_000; Date.now() < deadline; ) {
        const [info] = (await qmp(srcQmp, [{ execute: 'query-migrate' }])) as { status?: string; 'error-desc'?: string }[];
        if (info.status === 'completed') {
          switchedAt = Date.now();
          await qmp(srcQmp, [{ execute: 'quit' }]).catch(() => {});
          return;
        }
        if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      throw new Error('migration did not complete within 120 s');
    };
    const guestA = { setup, timeoutMs: 300_000, memoryMiB: 384, cpus: 1, signal: abort.signal, script: scriptA };
    try {
      const dst = runGuest({
        ...guestA,
        devices: [{ kind: 'net', socket: ports.aDst, mac: macA }],
        extra: ['-incoming', `unix:${incoming}`],
      });
      const src = runGuest({
        ...guestA,
        devices: [{ kind: 'net', socket: ports.aSrc, mac: macA }],
        extra: ['-qmp', `unix:${srcQmp},server=on,wait=off`],
      }).catch((e: Error) => e); // it ends by quitting after the migration
      const b = runGuest({
        setup,
        timeoutMs: 300_000,
        memoryMiB: 384,
        cpus: 1,
        signal: abort.signal,
        devices: [{ kind: 'net', socket: ports.b, mac: macB }],
        script: `${up(ipB, ipA)}
ping -i 0.2 -W 1 -w 50 ${ipA} | while read -r line; do echo "PING $line"; done
echo "RESULT b done"
`,
        onConsoleLine: (line) => {
          if (!line.startsWith('PING ') || !line.includes('bytes from')) return;
          replies.push(Date.now());
          // Pings flow: move A.
          if (replies.length === 10 && !migration) {
            migration = migrate();
            migration.catch((e) => abort.abort(e));
          }
        },
      });
      const [runB, runDst] = await Promise.all([b, dst, src]);
      await migration;
      expect(runB.exitCode).toBe(0);
      expect(runDst.exitCode).toBe(0);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- backends ---\n${logs.join('\n')}`);
    } finally {
      abort.abort();
      for (const s of servers) await s.close();
    }
    const after = replies.find((t) => t > switchedAt);
    expect(switchedAt).toBeGreaterThan(0);
    expect(after, 'no ping reply after the switch-over').toBeDefined();
    // QEMU moved the net device's own state too (DEVICE_STATE): saved on the source's port, loaded on the other.
    console.log(`net migration: device state ${infos.filter((m) => /device state (saved|loaded)/.test(m)).join('; ') || 'not transferred'}`);
    expect(infos.some((m) => /device state saved/.test(m)) && infos.some((m) => /device state loaded/.test(m))).toBe(true);
    // The destination's QEMU asked its port to announce the guest (the driver has no GUEST_ANNOUNCE to do it).
    const rarps = infos.filter((m) => m.startsWith('SEND_RARP'));
    expect(rarps.length, 'SEND_RARP on the destination').toBeGreaterThan(0);
    for (const m of rarps) expect(m).toBe(`SEND_RARP: the guest (${macA}) is announced on its next pass`);
    console.log(`net migration: pings resumed ${after! - switchedAt} ms after the switch-over (${replies.length} replies in all)`);
    expect(after! - switchedAt).toBeLessThan(RESUME_MS);
    expect(liveQemuPids()).toEqual([]);
  }, 360_000);
});
