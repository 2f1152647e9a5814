import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: 'forks',
    projects: [
      // Everything, with the test frontend on split rings (QEMU's default); guest tests choose their rings.
      { extends: true, test: { name: 'split', include: ['test/**/*.test.ts'] } },
      // The devices and the framework again through the test frontend on packed rings. Tests that pin their
      // rings (the guests, DPDK, the stress test, the ring units) or whose frontend is libblkio are not repeated.
      {
        extends: true,
        test: {
          name: 'packed',
          include: ['test/frontend/**/*.test.ts', 'test/vhost/**/*.test.ts', 'test/devices/**/*.test.ts', 'test/net/net-device.test.ts', 'test/net/switch-uplink.test.ts', 'test/net/tap-multiqueue.test.ts'],
          exclude: ['test/vhost/notify-stress.test.ts', 'test/vhost/reconnect-growth.test.ts', 'test/vhost/restart.test.ts', 'test/devices/blk-libblkio.test.ts', 'test/devices/blk-durability.test.ts', 'test/devices/console-restart.test.ts'],
          env: { VHOST_TS_TEST_RING: 'packed' },
        },
      },
    ],
  },
});
