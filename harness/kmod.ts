// Kernel module dependencies straight from the .ko files: Debian's kernel package ships no modules.dep (depmod
// runs at install time), and the guest's busybox insmod loads exactly what it is told, so the harness computes the
// load order itself from each module's .modinfo section.
import fs from 'node:fs';
import path from 'node:path';

/** The key=value strings of an ELF64 little-endian object's .modinfo section. */
export function readModinfo(ko: Buffer): Map<string, string[]> {
  if (ko.readUInt32BE(0) !== 0x7f454c46 || ko[4] !== 2 || ko[5] !== 1) {
    throw new Error('not an ELF64 little-endian object');
  }
  const shoff = Number(ko.readBigUInt64LE(0x28));
  const shentsize = ko.readUInt16LE(0x3a);
  const shnum = ko.readUInt16LE(0x3c);
  const shstrndx = ko.readUInt16LE(0x3e);
  const section = (i: number) => {
    const h = shoff + i * shentsize;
    return { name: ko.readUInt32LE(h), offset: Number(ko.readBigUInt64LE(h + 0x18)), size: Number(ko.readBigUInt64LE(h + 0x20)) };
  };
  const names = section(shstrndx);
  const info = new Map<string, string[]>();
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    const nameStart = names.offset + s.name;
    const name = ko.toString('latin1', nameStart, ko.indexOf(0, nameStart));
    if (name !== '.modinfo') continue;
    for (const entry of ko.toString('latin1', s.offset, s.offset + s.size).split('\0')) {
      const eq = entry.indexOf('=');
      if (eq <= 0) continue;
      const key = entry.slice(0, eq);
      info.set(key, [...(info.get(key) ?? []), entry.slice(eq + 1)]);
    }
  }
  return info;
}

/** Module names use underscores; file names may use dashes (virtio-rng.ko is module virtio_rng). */
export function moduleName(fileOrName: string): string {
  return path.basename(fileOrName).replace(/\.ko$/, '').replace(/-/g, '_');
}

/** Every .ko below a kernel's module directory, by module name. */
export function indexModules(modulesDir: string): Map<string, string> {
  const index = new Map<string, string>();
  const walk = (dir: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ko')) index.set(moduleName(e.name), p);
    }
  };
  walk(modulesDir);
  return index;
}

export interface ModuleFile {
  name: string;
  file: string;
  depends: string[];
}

/**
 * The wanted modules and everything they depend on, each after its dependencies, wanted ones in the order given.
 * Names the kernel has built in (no .ko) are skipped when optional, an error otherwise.
 */
export function loadOrder(modulesDir: string, wanted: string[], optional: string[] = []): ModuleFile[] {
  const index = indexModules(modulesDir);
  const order: ModuleFile[] = [];
  const done = new Set<string>();
  const visiting = new Set<string>();
  const visit = (name: string, chain: string[]) => {
    if (done.has(name)) return;
    if (visiting.has(name)) throw new Error(`module dependency cycle: ${[...chain, name].join(' -> ')}`);
    const file = index.get(name);
    if (!file) throw new Error(`module ${name} (needed by ${chain.join(' -> ') || 'the guest'}) is not in ${modulesDir}`);
    visiting.add(name);
    const depends = (readModinfo(fs.readFileSync(file)).get('depends')?.[0] ?? '')
      .split(',')
      .map((d) => d.trim())
      .filter(Boolean)
      .map(moduleName);
    for (const d of depends) visit(d, [...chain, name]);
    visiting.delete(name);
    done.add(name);
    order.push({ name, file, depends });
  };
  for (const w of wanted) visit(moduleName(w), []);
  for (const o of optional) if (index.has(moduleName(o))) visit(moduleName(o), []);
  return order;
}
