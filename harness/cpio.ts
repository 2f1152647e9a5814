// A newc cpio writer, so the initramfs (device nodes included) is built without root and without a host cpio, and
// its bytes depend only on its inputs.

export type CpioEntry =
  | { type: 'dir'; path: string; mode?: number }
  | { type: 'file'; path: string; data: Buffer; mode?: number }
  | { type: 'symlink'; path: string; target: string }
  | { type: 'chardev'; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}

function pad4(n: number): Buffer {
  return Buffer.alloc((4 - (n % 4)) % 4);
}

export class CpioWriter {
  private readonly chunks: Buffer[] = [];
  private ino = 1;
  private readonly paths = new Set<string>();

  has(p: string): boolean {
    return this.paths.has(p.replace(/^\/+/, ''));
  }

  add(entry: CpioEntry): void {
    const name = entry.path.replace(/^\/+/, '');
    if (this.paths.has(name)) return;
    this.paths.add(name);
    let mode: number;
    let data: Buffer = Buffer.alloc(0);
    let rdevMajor = 0;
    let rdevMinor = 0;
    switch (entry.type) {
      case 'dir':
        mode = S_IFDIR | (entry.mode ?? 0o755);
        break;
      case 'file':
        mode = S_IFREG | (entry.mode ?? 0o644);
        data = entry.data;
        break;
      case 'symlink':
        mode = S_IFLNK | 0o777;
        data = Buffer.from(entry.target);
        break;
      case 'chardev':
        mode = S_IFCHR | (entry.mode ?? 0o600);
        rdevMajor = entry.major;
        rdevMinor = entry.minor;
        break;
    }
    this.record(name, mode, data, rdevMajor, rdevMinor);
  }

  private record(name: string, mode: number, data: Buffer, rdevMajor: number, rdevMinor: number): void {
    const nameBuf = Buffer.from(name + '\0');
    const fields = [
      this.ino++, mode, 0, 0, mode & S_IFDIR ? 2 : 1, 0, data.length, 0, 0, rdevMajor, rdevMinor, nameBuf.length, 0,
    ];
    const header = Buffer.from('070701' + fields.map(hex8).join(''), 'ascii');
    this.chunks.push(header, nameBuf, pad4(header.length + nameBuf.length), data, pad4(data.length));
  }

  finish(): Buffer {
    this.record('TRAILER!!!', 0, Buffer.alloc(0), 0, 0);
    return Buffer.concat(this.chunks);
  }
}
