// The switch's forwarding decisions within one batch, where it remembers the sender it learned and the destination
// it looked up last: an address that moves to another port mid-batch must be learned there, and frames to it follow.
import { describe, expect, it } from 'vitest';
import type { ThreadContext } from '../../src/vhost/device.js';
import { BytesFrame, type FrameSource } from '../../src/devices/net/datapath.js';
import { Forwarder, type SwitchMember } from '../../src/devices/net/forwarding.js';
import { Switch } from '../../src/devices/net/switch.js';

const thread = { watch: () => ({ close() {} }), log() {} } as unknown as ThreadContext;

class Member implements SwitchMember {
  readonly got: string[] = [];
  readonly claims: [number, number][] = [];
  published = 0;
  claimWrites(count: number, bytes: number): void {
    this.claims.push([count, bytes]);
  }
  receive(frame: FrameSource): boolean {
    this.got.push(Array.from({ length: 12 }, (_, i) => frame.byteAt(i).toString(16)).join(''));
    return true;
  }
  publish(): void {
    this.published++;
  }
}

const mac = (last: number) => [0x52, 0x54, 0, 0, 0, last];
const frame = (dst: number[], src: number[]) => new BytesFrame().set(Uint8Array.from([...dst, ...src, 0x08, 0, ...new Array(46).fill(0)]));
const id = (dst: number[], src: number[]) => [...dst, ...src].map((b) => b.toString(16)).join('');

/** A switch's forwarder with members on ports 1, 2 and 3. */
function threePorts(name: string): { f: Forwarder; p1: Member; p2: Member; p3: Member } {
  const sw = new Switch(name);
  const options = [1, 2, 3].map(() => sw.addPort(() => 'p'));
  const f = new Forwarder(name, options[0], thread);
  const [p1, p2, p3] = [new Member(), new Member(), new Member()];
  f.attach(1, p1);
  f.attach(2, p2);
  f.attach(3, p3);
  return { f, p1, p2, p3 };
}

describe('forwarder', () => {
  it('a sender that moves to another port within one batch is learned there, and frames to it follow it', () => {
    const { f, p1, p2, p3 } = threePorts('fwd-test');
    const A = mac(0xa);
    const B = mac(0xb);
    // One batch: A speaks on port 1, B answers on port 3, A to B twice (known: port 3 only), then A appears on
    // port 2 and B answers again: that answer must go to port 2, not to port 1 where A was first.
    f.forward(1, frame(B, A), null);
    f.forward(3, frame(A, B), null);
    f.forward(1, frame(B, A), null);
    f.forward(1, frame(B, A), null);
    f.forward(2, frame(B, A), null);
    f.forward(3, frame(A, B), null);
    f.endOfBatch();
    expect(p3.got).toEqual([id(B, A), id(B, A), id(B, A), id(B, A)]);
    expect(p1.got).toEqual([id(A, B)]); // B's first answer; the second follows A to port 2
    expect(p2.got).toEqual([id(B, A), id(A, B)]); // the flood of A's first frame (B unknown), then B's answer
    // And in the next batch, still port 2.
    f.forward(3, frame(A, B), null);
    expect(p2.got.at(-1)).toBe(id(A, B));
    expect(p1.got).toHaveLength(1);
    f.close();
  });

  it('a destination unknown at its first lookup is found once it has spoken, within the same batch', () => {
    const { f, p1, p2, p3 } = threePorts('fwd-test-2');
    const A = mac(0xa);
    const B = mac(0xb);
    const ALL = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    f.forward(1, frame(B, A), null); // B unknown: flooded
    f.forward(3, frame(ALL, B), null); // B speaks (a broadcast: no lookup in between)
    f.forward(1, frame(B, A), null); // now only to port 3
    f.endOfBatch();
    expect(p3.got).toEqual([id(B, A), id(B, A)]);
    expect(p2.got).toEqual([id(B, A), id(ALL, B)]);
    f.close();
  });

  it('before a burst, the ports its sender last sent to claim their receive buffers: the one it reached, or all it flooded', () => {
    const { f, p1, p2, p3 } = threePorts('fwd-test-3');
    const A = mac(0xa);
    const B = mac(0xb);
    const claimed = () => [p1, p2, p3].map((p) => p.claims.splice(0));
    f.prepare(1, 32, 76);
    expect(claimed()).toEqual([[], [], []]); // port 1 has sent nothing yet
    f.forward(1, frame(B, A), null); // B unknown: flooded
    f.prepare(1, 32, 76);
    expect(claimed()).toEqual([[], [[32, 76]], [[32, 76]]]);
    f.forward(3, frame(A, B), null); // B learned on port 3; A known on 1
    f.forward(1, frame(B, A), null);
    f.prepare(1, 8, 1530); // a long frame: only its first lines
    expect(claimed()).toEqual([[], [], [[8, 256]]]);
    f.prepare(3, 4, 76);
    expect(claimed()).toEqual([[[4, 76]], [], []]);
    f.close();
  });

  it('each receiver is published once per flush, again after the next burst, and never once it left the switch', () => {
    const { f, p1, p2, p3 } = threePorts('fwd-test-4');
    const published = () => [p1, p2, p3].map((p) => p.published);
    const A = mac(0xa);
    const B = mac(0xb);
    for (let i = 0; i < 3; i++) f.forward(1, frame(B, A), null); // flooded to 2 and 3
    f.flush();
    expect(published()).toEqual([0, 1, 1]);
    f.flush();
    expect(published()).toEqual([0, 1, 1]); // nothing new
    f.forward(1, frame(B, A), null);
    f.flush();
    expect(published()).toEqual([0, 2, 2]);
    f.forward(1, frame(B, A), null);
    f.detach(3);
    f.flush();
    expect(published()).toEqual([0, 3, 2]);
    f.attach(3, p3);
    f.forward(1, frame(B, A), null);
    f.flush();
    expect(published()).toEqual([0, 4, 3]);
    f.close();
  });
});
