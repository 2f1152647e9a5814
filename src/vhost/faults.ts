/**
 * Fault injection, for the tests that must show they can fail: a test sets `VHOST_TS_FAULTS` (a comma-separated
 * list) in the backend's environment and checks that its assertions catch the broken behaviour. Never set it
 * anywhere else: each fault breaks a guarantee on purpose.
 *
 * - `no-dirty-log`: SET_LOG_BASE is accepted, but nothing is marked in the log (live migration loses the pages the
 *   backend wrote during the first pass).
 * - `skip-flush`: blk completes FLUSH without syncing the image (acknowledged data is not durable).
 */
export type Fault = 'no-dirty-log' | 'skip-flush';

/** Whether the environment asks for this fault. Read where a session or queue starts, never per request. */
export function faultInjected(fault: Fault): boolean {
  return (process.env.VHOST_TS_FAULTS ?? '').split(',').includes(fault);
}
