/**
 * bench:net drives testpmd interactively in turns: `show port stats all` and `stop` are sent on its stdin, and
 * TestpmdStats must see each answer as it arrives. `cat` stands in for testpmd here: it echoes what the test sends,
 * which is testpmd's output as recorded from DPDK 22.11's testpmd (prompt and all).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { Processes, TestpmdStats, windowBetween } from '../../bench/net-procs.js';

const procs = new Processes();
afterEach(() => procs.stopAll());

const statsBlock = (port: number, rx: number, rxBytes: number, rxPps: number) => [
  `testpmd> `,
  `  ######################## NIC statistics for port ${port}  ########################`,
  `  RX-packets: ${rx}    RX-missed: 0          RX-bytes:  ${rxBytes}`,
  '  RX-errors: 0',
  '  RX-nombuf:  0         ',
  '  TX-packets: 0          TX-errors: 0          TX-bytes:  0',
  '',
  '  Throughput (since last show)',
  `  Rx-pps:     ${rxPps}          Rx-bps:   ${rxPps * 512}`,
  '  Tx-pps:            0          Tx-bps:            0',
  '  ############################################################################',
];

const stopOutput = [
  'testpmd> stop',
  'Telling cores to stop...',
  'Waiting for lcores to finish...',
  '',
  '  ---------------------- Forward statistics for port 0  ----------------------',
  '  RX-packets: 10405248       RX-dropped: 0             RX-total: 10405248',
  '  TX-packets: 0              TX-dropped: 0             TX-total: 0',
  '  ----------------------------------------------------------------------------',
  '',
  '  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++',
  '  RX-packets: 10405248       RX-dropped: 0             RX-total: 10405248',
  '  TX-packets: 0              TX-dropped: 0             TX-total: 0',
  '  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++',
  '',
  'Done.',
];

describe('TestpmdStats over an interactive session', () => {
  it('sees each answer to show port stats and each finished stop as it arrives', async () => {
    const cat = procs.start('cat (testpmd stand-in)', { file: 'cat', args: [] }, { input: true });
    const stats = new TestpmdStats(cat);

    for (const line of statsBlock(0, 1869056, 119619584, 0)) cat.send(line);
    expect(await stats.waitForBlocks(1, 5000, cat)).toBe(true);
    // "Done" without the period ends other messages (port set-up): only a finished stop counts.
    cat.send('Done');
    for (const line of statsBlock(0, 4271104, 273350656, 4383235)) cat.send(line);
    expect(await stats.waitForBlocks(2, 5000, cat)).toBe(true);
    expect(stats.stopped).toBe(0);

    for (const line of stopOutput) cat.send(line);
    expect(await stats.waitUntil(() => stats.stopped === 1, 5000, cat)).toBe(true);
    expect(stats.forward).toEqual([{ port: 0, rxPackets: 10405248, txPackets: 0, txDropped: 0 }]);
    // The stop's forward statistics are not port statistics.
    expect(stats.blocks).toHaveLength(2);

    // A turn's window: the packets between the two answers, over testpmd's own interval (packets / its rate).
    const w = windowBetween(stats.blocks, 0, 1, 'rx');
    expect(w.packets).toBe(4271104 - 1869056);
    expect(w.bytes).toBe(273350656 - 119619584);
    expect(w.seconds).toBeCloseTo((4271104 - 1869056) / 4383235, 9);
  });

  it('gives up when the program exits before answering', async () => {
    const cat = procs.start('cat (testpmd stand-in)', { file: 'cat', args: [] }, { input: true });
    const stats = new TestpmdStats(cat);
    cat.child.stdin!.end();
    await cat.exited;
    const t0 = performance.now();
    expect(await stats.waitUntil(() => stats.stopped > 0, 5000, cat)).toBe(false);
    expect(performance.now() - t0).toBeLessThan(1000);
  });
});
