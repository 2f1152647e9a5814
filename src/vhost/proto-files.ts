/**
 * The project's .proto files (proto/vhost_ts), loaded with protobufjs: beside src/ in a checkout, beside
 * dist/src/ in the package (the build copies them).
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';

export function loadProto(name: string): protobuf.Root {
  for (const rel of [`../../proto/vhost_ts/${name}`, `../../../proto/vhost_ts/${name}`]) {
    const path = fileURLToPath(new URL(rel, import.meta.url));
    if (existsSync(path)) return protobuf.loadSync(path);
  }
  throw new Error(`proto/vhost_ts/${name} is missing from the installation: reinstall vhost-ts`);
}
