#!/usr/bin/env node
// In a git checkout (tsconfig.json beside bin/), runs the TypeScript source through tsx, so a stale dist/ from an
// earlier `npm pack` is never what runs; in the npm package (no tsconfig.json), the built CLI in dist/.
import { existsSync } from 'node:fs';

if (existsSync(new URL('../tsconfig.json', import.meta.url))) {
  const { register } = await import('tsx/esm/api');
  register();
  await import(new URL('../cli/main.ts', import.meta.url).href);
} else {
  await import(new URL('../dist/cli/main.js', import.meta.url).href);
}
