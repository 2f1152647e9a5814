/** `vhost-ts net`: virtio-net ports on a tap, on a built-in switch (several ports per process), or sink/source. */
import { netDevice, type NetBackendSpec } from '../src/devices/net/index.js';
import { parseMac } from '../src/devices/net/spec.js';
import { joinSwitch } from '../src/devices/net/switch.js';
import { pollSetting, UsageError, wholeNumber, type DeviceCommand, type Values } from './backend-options.js';

export const netCommand: DeviceCommand = {
  summary: 'vhost-ts net --socket-path SOCK [--socket-path SOCK2 ...] (--tap NAME | --switch NAME | --backend sink|source) [options]',
  options: {
    tap: { type: 'string' },
    switch: { type: 'string' },
    uplink: { type: 'string' },
    backend: { type: 'string' },
    mac: { type: 'string', multiple: true },
    mtu: { type: 'string' },
    queues: { type: 'string' },
    'frame-size': { type: 'string' },
    verify: { type: 'boolean' },
    'poll-us': { type: 'string' },
  },
  optionsUsage: `  --tap NAME              connect to host tap NAME (created if missing) with offloads passed through
  --switch NAME           ports of a built-in learning switch; repeat --socket-path for more ports
  --uplink TAP            with --switch: also connect the switch to host tap TAP
  --backend sink|source   benchmarks: drop every transmitted frame / fill every receive buffer
  --mac MAC               the port's MAC (repeat per port; default random 52:54:00:xx:xx:xx)
  --mtu N                 MTU reported to the guest (default 1500)
  --queues N              queue pairs (tap, sink, source; default 1)
  --frame-size N          source: bytes per generated frame (default 64)
  --verify                sink: check every frame against the first, byte for byte
  --poll-us N|adaptive    busy-poll each queue N microseconds after traffic before sleeping (a dedicated core;
                          default 0: never); adaptive: up to 32 us while traffic keeps coming, as QEMU's IOThreads`,
  capabilities: { type: 'net' },
  create(v: Values) {
    const kinds = [v.tap, v.switch, v.backend].filter((x) => x !== undefined);
    if (kinds.length !== 1) throw new UsageError('give exactly one of --tap, --switch or --backend');
    let backend: NetBackendSpec;
    if (typeof v.tap === 'string') backend = { kind: 'tap', name: v.tap };
    else if (typeof v.switch === 'string') backend = { kind: 'switch', name: v.switch };
    else if (v.backend === 'sink') backend = { kind: 'sink', verify: v.verify === true };
    else if (v.backend === 'source') {
      backend = { kind: 'source', frameSize: v['frame-size'] === undefined ? 64 : wholeNumber(String(v['frame-size']), '--frame-size') };
    } else throw new UsageError('--backend takes sink or source');
    if (v.uplink !== undefined && backend.kind !== 'switch') throw new UsageError('--uplink goes with --switch');
    const paths = (v['socket-path'] as string[] | undefined) ?? [];
    const ports = backend.kind === 'switch' ? Math.max(1, paths.length) : 1;
    const macs = (v.mac as string[] | undefined) ?? [];
    if (macs.length > ports) throw new UsageError(`${macs.length} --mac for ${ports} port(s)`);
    const mtu = v.mtu === undefined ? undefined : wholeNumber(String(v.mtu), '--mtu');
    const queuePairs = v.queues === undefined ? 1 : wholeNumber(String(v.queues), '--queues');
    if (typeof v.uplink === 'string') joinSwitch(backend.kind === 'switch' ? backend.name : '').attachUplink(v.uplink);
    return Array.from({ length: ports }, (_, i) =>
      netDevice({
        backend,
        ...(macs[i] ? { mac: parseMac(macs[i]) } : {}),
        ...(mtu ? { mtu } : {}),
        queuePairs,
        ...(v['poll-us'] !== undefined ? { pollUs: pollSetting(String(v['poll-us']), '--poll-us') } : {}),
      }),
    );
  },
};
