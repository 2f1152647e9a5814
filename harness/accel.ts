// KVM when it can run a stock kernel, TCG otherwise. Opening /dev/kvm is not proof: on these machines it is
// kvm_pvm, a software nested hypervisor on which a Debian kernel aborts with -cpu host and dies in emulation
// failures with other CPU models.
import fs from 'node:fs';
import { stderrLog, type LogFn } from './progress.js';

export type Accel = 'kvm' | 'tcg';

export interface AccelChoice {
  accel: Accel;
  args: string[];
  reason: string;
}

export interface AccelOptions {
  force?: Accel;
  /** Where the one-line notice about falling back to TCG goes (once per process). */
  log?: LogFn;
}

const KVM_ARGS = ['-accel', 'kvm', '-cpu', 'host'];
const TCG_ARGS = ['-accel', 'tcg', '-cpu', 'max'];

let noticeShown = false;

function kvmUnusableReason(): string | undefined {
  try {
    fs.closeSync(fs.openSync('/dev/kvm', fs.constants.O_RDWR));
  } catch (err) {
    return `/dev/kvm cannot be opened (${(err as NodeJS.ErrnoException).code ?? String(err)})`;
  }
  if (fs.existsSync('/sys/module/kvm_pvm')) {
    return '/dev/kvm is kvm_pvm (software nested virtualisation), which cannot boot a stock kernel';
  }
  return undefined;
}

export function chooseAccel(opts: AccelOptions = {}): AccelChoice {
  if (opts.force === 'kvm') return { accel: 'kvm', args: KVM_ARGS, reason: 'forced by the caller' };
  if (opts.force === 'tcg') return { accel: 'tcg', args: TCG_ARGS, reason: 'forced by the caller' };
  const why = kvmUnusableReason();
  if (!why) return { accel: 'kvm', args: KVM_ARGS, reason: '/dev/kvm is usable hardware virtualisation' };
  if (!noticeShown) {
    noticeShown = true;
    (opts.log ?? stderrLog)(`vhost-ts harness: using TCG, not KVM: ${why}`);
  }
  return { accel: 'tcg', args: TCG_ARGS, reason: why };
}
