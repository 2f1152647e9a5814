// The rng device serving a real guest: QEMU's vhost-user-rng-pci, driven by the guest kernel's virtio_rng driver.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { featureBitScript, RING_PACKED_BIT } from '../../harness/guest-features.js';
import { ensureSetup, type HarnessSetup } from '../../harness/setup.js';
import { liveQemuPids, runGuest } from '../../harness/vm.js';
import { rngDevice } from '../../src/devices/rng/index.js';
import { VhostUserServer } from '../../src/vhost/index.js';

const MIB = 1 << 20;

describe.skipIf(process.env.VHOST_TS_SKIP_VM === '1')('rng device in a guest', () => {
  let setup: HarnessSetup;
  let dir: string;

  beforeAll(async () => {
    setup = await ensureSetup();
    dir = mkdtempSync(join(tmpdir(), 'vhost-ts-rng-guest-'));
  }, 15 * 60_000);

  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  // QEMU's vhost-user-rng passes our features through (packed= is not consulted): the guest runs packed rings
  // when we offer them (the default), split ones when the server offers split only.
  for (const packedRings of [true, false])
  it(`serves /dev/hwrng (${packedRings ? 'packed' : 'split'} ring): the guest reads 1 MiB of random bytes from vhost-user-rng-pci`, async () => {
    const rng = rngDevice();
    const errors: string[] = [];
    const socket = join(dir, `rng-${packedRings}.sock`);
    const server = await VhostUserServer.start(rng, {
      socketPath: socket,
      packedRings,
      log: { info() {}, warn: (m) => errors.push(m), error: (m) => errors.push(m) },
    });
    try {
      const run = await runGuest({
        setup,
        timeoutMs: 120_000,
        devices: [{ kind: 'rng', socket }],
        script: [
          featureBitScript(4, RING_PACKED_BIT, 'packed'),
          'echo "RESULT rng_current $(cat /sys/class/misc/hw_random/rng_current)"',
          `head -c ${MIB} /dev/hwrng > /tmp/random`,
          'echo "RESULT bytes $(wc -c < /tmp/random)"',
          // Random data does not compress; a stuck or zero-filling device would.
          'echo "RESULT distinct $(head -c 4096 /tmp/random | od -An -v -tx1 | tr -s " " "\\n" | sort -u | grep -c .)"',
        ].join('\n'),
      });
      expect(run.exitCode).toBe(0);
      expect(run.results).toContain(`packed ${packedRings ? 1 : 0}`);
      expect(run.results).toContain('rng_current virtio_rng.0');
      expect(run.results).toContain(`bytes ${MIB}`);
      const distinct = Number(run.results.find((r) => r.startsWith('distinct '))!.split(' ')[1]);
      expect(distinct).toBeGreaterThan(250); // 4 KiB of random bytes hits nearly all 256 values
      // The host served at least what the guest read (the kernel's hwrng thread reads some more on its own).
      expect(rng.bytesServed()).toBeGreaterThanOrEqual(MIB);
      console.log(`rng guest under ${run.accel}: booted in ${run.bootMs} ms, host served ${rng.bytesServed()} bytes`);
    } finally {
      await server.close();
    }
    expect(errors.filter((e) => !/frontend disconnected/.test(e))).toEqual([]);
    expect(liveQemuPids()).toEqual([]);
  }, 180_000);
});
