import koffi from 'koffi';
import { libc } from './libc.js';

const strerror = libc.func('const char *strerror(int errnum)') as (errnum: number) => string;

// koffi.os.errno lists aliases (EWOULDBLOCK, EDEADLOCK, EOPNOTSUPP) after the canonical name; first one wins.
const names = new Map<number, string>();
for (const [name, value] of Object.entries(koffi.os.errno)) {
  if (!names.has(value)) names.set(value, name);
}

export const EAGAIN = koffi.os.errno.EAGAIN;
export const EINTR = koffi.os.errno.EINTR;

export function errnoName(n: number): string {
  return names.get(n) ?? `ERRNO_${n}`;
}

export interface SysErrorOptions {
  /** What the call was about (a path, usually); shown in parentheses after the syscall name. */
  subject?: string;
  /** For conditions that are not an errno, such as ECTRUNC. */
  code?: string;
  description?: string;
}

export class SysError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;

  constructor(syscall: string, errno: number, options: SysErrorOptions = {}) {
    const code = options.code ?? errnoName(errno);
    const description = options.description ?? strerror(errno);
    const where = options.subject === undefined ? syscall : `${syscall}(${options.subject})`;
    super(`${where}: ${code} (${description})`);
    this.name = 'SysError';
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
  }
}

/** Must run right after the failing call: any other koffi call may overwrite errno. */
export function lastError(syscall: string, subject?: string): SysError {
  return new SysError(syscall, koffi.errno(), { subject });
}
