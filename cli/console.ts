/** `vhost-ts console`: virtio-console with the console port and named ports on sockets, ptys, this terminal or files. */
import { consoleDevice, consoleQemuArgs, parseHostEnd, type ConsoleDevice, type ConsolePortOptions, type HostEndSpec } from '../src/devices/console/index.js';
import { UsageError, wholeNumber, type DeviceCommand, type Values } from './backend-options.js';

export const consoleCommand: DeviceCommand = {
  summary: 'vhost-ts console --socket-path SOCK [--console BACKEND] [--port NAME=BACKEND]... [--cols N --rows N] [--max-ports N]',
  options: {
    console: { type: 'string' },
    port: { type: 'string', multiple: true },
    cols: { type: 'string' },
    rows: { type: 'string' },
    'max-ports': { type: 'string' },
    'print-qemu-args': { type: 'boolean' },
  },
  optionsUsage: `  --console BACKEND       port 0, the guest's /dev/hvc0 (default stdio)
  --port NAME=BACKEND     a named port (/sys/class/virtio-ports/*/name; /dev/virtio-ports/NAME with udev); repeat
  --cols N --rows N       the console's size (default: the terminal's for stdio, else 80x24)
  --max-ports N           max_nr_ports (default 1 + the number of --port); more leaves room for ports added at run
                          time (--control PATH; vhost-ts ctl PATH console-add-port NAME BACKEND)
  --print-qemu-args       print the QEMU options for this device and exit
BACKEND is one of:
  socket:PATH             a Unix socket server, one client at a time (socat - UNIX-CONNECT:PATH); output while no
                          client is attached waits in a 64 KiB backlog (the console drops its oldest, counted)
  pty                     a pseudo-terminal; its path is printed (screen /dev/pts/N); its size follows the terminal
  stdio                   this terminal, raw; Ctrl-] detaches and ends the program
  file:PATH               append what the guest writes to PATH`,
  capabilities: { type: 'console' },
  create(v: Values) {
    const backend = (text: string, what: string): HostEndSpec => {
      try {
        return parseHostEnd(text);
      } catch (e) {
        throw new UsageError(`${what}: ${(e as Error).message}`);
      }
    };
    const ports: ConsolePortOptions[] = ((v.port as string[] | undefined) ?? []).map((p) => {
      const eq = p.indexOf('=');
      if (eq <= 0) throw new UsageError(`--port takes NAME=BACKEND, not "${p}"`);
      return { name: p.slice(0, eq), backend: backend(p.slice(eq + 1), `--port ${p.slice(0, eq)}`) };
    });
    const spec = backend(typeof v.console === 'string' ? v.console : 'stdio', '--console');
    const stdioUsers = [spec, ...ports.map((p) => p.backend)].filter((b) => b.kind === 'stdio').length;
    if (stdioUsers > 1) throw new UsageError('only one port can use stdio');
    if ((v.cols === undefined) !== (v.rows === undefined)) throw new UsageError('give --cols and --rows together');
    const socketPath = ((v['socket-path'] as string[] | undefined) ?? [])[0] ?? 'SOCK';
    const maxPorts = v['max-ports'] !== undefined ? wholeNumber(String(v['max-ports']), '--max-ports') : 1 + ports.length;
    if (v['print-qemu-args']) {
      console.log(consoleQemuArgs(socketPath, maxPorts).join(' '));
      process.exit(0);
    }
    let dev: ConsoleDevice;
    try {
      dev = consoleDevice({
        console: spec,
        ports,
        ...(v.cols !== undefined ? { cols: wholeNumber(String(v.cols), '--cols'), rows: wholeNumber(String(v.rows), '--rows') } : {}),
        maxPorts,
        // Detaching ends the program as Ctrl-C does: the server closes and the terminal is restored.
        onDetach: () => process.kill(process.pid, 'SIGTERM'),
        log: (m) => process.stderr.write(`${spec.kind === 'stdio' ? '\r' : ''}vhost-ts console: ${m}${spec.kind === 'stdio' ? '\r' : ''}\n`),
      });
    } catch (e) {
      if (e instanceof RangeError) throw new UsageError(e.message);
      throw e;
    }
    const qemu = `${dev.qemuArgs(socketPath).join(' ')}  (QEMU 10.2 or newer; guest RAM shared: memory-backend-memfd,share=on)`;
    const out = (m: string) => process.stderr.write(`vhost-ts console: ${m}${spec.kind === 'stdio' ? '\r' : ''}\n`);
    for (let i = 0; i <= ports.length; i++) out(`port ${i}${i === 0 ? ' (console, /dev/hvc0)' : ` (${ports[i - 1].name})`}: ${dev.describe(i)}`);
    if (maxPorts > 1 + ports.length) out(`${maxPorts - 1 - ports.length} more port numbers free for ports added at run time (console-add-port)`);
    out(`QEMU: ${qemu}`);
    if (spec.kind === 'stdio') out('Ctrl-] detaches');
    process.once('exit', () => dev.close());
    return dev;
  },
};
