//! The rust-vmm peer of `npm run bench:virtqueue`: the same-thread round trip of the 1-descriptor case
//! (bench/virtqueue-setup.ts, `oneDescriptorCase`) with rust-vmm's virtio-queue as the device.
//!
//! Per round, as in ours:
//! - the driver posts 256 one-descriptor chains (64 device-writable bytes each, at the same guest address) and
//!   publishes the avail idx once (a sequentially consistent store, as `Atomics.store` is), then reads the used
//!   ring's flags to decide whether to kick;
//! - the device pops every chain (`pop_descriptor_chain`), walks its descriptors (`DescriptorChain::next`, until
//!   it says the chain ended), translates each buffer to host memory (`GuestMemory::get_slice`: our `pop()` checks
//!   that the buffer lies in guest memory and locates it), and returns it with 0 bytes written (`add_used`);
//!   after the batch it asks `needs_notification`, as our `publish()` decides whether to notify;
//! - the driver reaps every used element and frees their descriptors.
//!
//! The driver is a port of src/virtqueue/driver.ts (`SplitQueueDriver.add1`, `publish`, `nextUsed`): plain stores
//! into the rings through the region's host mapping, as our driver writes typed arrays, and atomics where ours
//! uses `Atomics`. Ring layout as `splitRingLayout(256, 0x100000)` places it, in one 1 MiB region at 0x100000.
//!
//! Usage: vhost-ts-rust-vmm-peer [--warmup-ms N] [--ms N] [--buffer-check slice|none] [--serve]
//! Prints one JSON line: rounds, chains, seconds, cpuSeconds, chainsPerSecond and chainsPerCpuSecond over the
//! measured time (after the warm-up).
//! With --serve it keeps its queue and memory and measures once per line `WARMUP_MS MS` read from stdin, one JSON
//! line each, until EOF: the benchmark alternates short windows of it and of ours without restarting either.

use std::hint::black_box;
use std::io::Write;
use std::process::exit;
use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

const RING: u16 = 256;
const BASE: u64 = 0x10_0000;
const MEMORY: usize = 1 << 20;
const F_WRITE: u32 = 2;
const USED_F_NO_NOTIFY: u16 = 1;

const fn align_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

/// `splitRingLayout(RING, BASE)` of src/virtqueue/driver.ts.
const DESC: u64 = align_up(BASE, 16);
const AVAIL: u64 = DESC + 16 * RING as u64;
const USED: u64 = align_up(AVAIL + 6 + 2 * RING as u64, 4096);
const END: u64 = align_up(USED + 6 + 8 * RING as u64, 4096);
/// `alloc.alloc(64)`: the first 8-aligned address after the rings.
const BUF: u64 = END;
const BUF_LEN: u32 = 64;

/// The driver side, as `SplitQueueDriver` does it for one-descriptor chains.
struct Driver {
    desc: *mut u32,
    avail: *mut u16,
    used: *mut u32,
    free: [u16; RING as usize],
    free_top: usize,
    chain_length: [u16; RING as usize],
    avail_idx: u16,
    used_ahead: u16,
    last_used_idx: u16,
    last_used_len: u32,
}

impl Driver {
    /// `host` is the host address of guest address BASE, mapped for MEMORY bytes.
    fn new(host: *mut u8) -> Self {
        let at = |gpa: u64| unsafe { host.add((gpa - BASE) as usize) };
        unsafe {
            ptr::write_bytes(at(DESC), 0, 16 * RING as usize);
            ptr::write_bytes(at(AVAIL), 0, 6 + 2 * RING as usize);
            ptr::write_bytes(at(USED), 0, 6 + 8 * RING as usize);
        }
        let mut free = [0u16; RING as usize];
        for (k, slot) in free.iter_mut().enumerate() {
            *slot = RING - 1 - k as u16;
        }
        Driver {
            desc: at(DESC).cast(),
            avail: at(AVAIL).cast(),
            used: at(USED).cast(),
            free,
            free_top: RING as usize,
            chain_length: [0; RING as usize],
            avail_idx: 0,
            used_ahead: 0,
            last_used_idx: 0,
            last_used_len: 0,
        }
    }

    /// `add1(gpa, length, writable)`: a one-descriptor chain; its head, or -1 when the table is full.
    #[inline]
    fn add1(&mut self, gpa: u64, length: u32, writable: bool) -> i32 {
        if self.free_top == 0 {
            return -1;
        }
        self.free_top -= 1;
        let head = self.free[self.free_top];
        let w = 4 * head as usize;
        // Stores the device sees through vm-memory, not through a Rust reference: volatile, like typed-array stores.
        unsafe {
            ptr::write_volatile(self.desc.add(w), gpa as u32);
            ptr::write_volatile(self.desc.add(w + 1), (gpa >> 32) as u32);
            ptr::write_volatile(self.desc.add(w + 2), length);
            ptr::write_volatile(self.desc.add(w + 3), if writable { F_WRITE } else { 0 }); // flags, next = 0
        }
        self.chain_length[head as usize] = 1;
        let avail = self.avail_idx;
        unsafe { ptr::write_volatile(self.avail.add(2 + (avail & (RING - 1)) as usize), head) };
        self.avail_idx = avail.wrapping_add(1);
        head as i32
    }

    /// `publish()` (no EVENT_IDX): store avail idx, then whether the device wants a kick.
    #[inline]
    fn publish(&mut self) -> bool {
        unsafe {
            AtomicU16::from_ptr(self.avail.add(1)).store(self.avail_idx, Ordering::SeqCst);
            AtomicU16::from_ptr(self.used.cast::<u16>()).load(Ordering::SeqCst) & USED_F_NO_NOTIFY == 0
        }
    }

    /// `nextUsed()`: the next used id (its length in last_used_len), or -1.
    #[inline]
    fn next_used(&mut self) -> i32 {
        if self.used_ahead == 0 {
            let idx = unsafe { AtomicU16::from_ptr(self.used.cast::<u16>().add(1)).load(Ordering::SeqCst) };
            self.used_ahead = idx.wrapping_sub(self.last_used_idx);
            if self.used_ahead == 0 {
                return -1;
            }
        }
        self.used_ahead -= 1;
        let last = self.last_used_idx;
        let at = 1 + 2 * (last & (RING - 1)) as usize;
        let id = unsafe { ptr::read_volatile(self.used.add(at)) };
        self.last_used_len = unsafe { ptr::read_volatile(self.used.add(at + 1)) };
        self.last_used_idx = last.wrapping_add(1);
        if id < RING as u32 {
            self.release(id as u16);
        }
        id as i32
    }

    fn release(&mut self, head: u16) {
        let mut i = head;
        let mut k = self.chain_length[head as usize];
        while k > 0 && self.free_top < self.free.len() {
            self.free[self.free_top] = i;
            self.free_top += 1;
            // The next field: the high half of the descriptor's last word.
            i = unsafe { (ptr::read_volatile(self.desc.add(4 * i as usize + 3)) >> 16) as u16 };
            k -= 1;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum BufferCheck {
    /// Translate each buffer to a host slice, as our pop() locates it.
    Slice,
    /// Only read the descriptor (what virtio-queue itself does; a device would still translate before use).
    None,
}

struct Bench {
    mem: GuestMemoryMmap,
    queue: Queue,
    driver: Driver,
    check: BufferCheck,
    sum: u64,
}

impl Bench {
    fn new(check: BufferCheck) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), MEMORY)])
            .unwrap_or_else(|e| fail(&format!("cannot map guest memory: {e}")));
        let host = mem
            .get_host_address(GuestAddress(BASE))
            .unwrap_or_else(|e| fail(&format!("no host address for guest memory: {e}")));
        let driver = Driver::new(host);
        let mut queue = Queue::new(RING).unwrap_or_else(|e| fail(&format!("Queue::new({RING}): {e}")));
        queue.set_size(RING);
        queue.set_desc_table_address(Some(DESC as u32), Some((DESC >> 32) as u32));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some((AVAIL >> 32) as u32));
        queue.set_used_ring_address(Some(USED as u32), Some((USED >> 32) as u32));
        queue.set_event_idx(false);
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            fail("virtio-queue says the queue is not valid");
        }
        Bench { mem, queue, driver, check, sum: 0 }
    }

    #[inline(never)]
    fn fill(&mut self) {
        for _ in 0..RING {
            self.driver.add1(BUF, BUF_LEN, true);
        }
        black_box(self.driver.publish());
    }

    #[inline(never)]
    fn serve(&mut self) -> u32 {
        let mem = &self.mem;
        let queue = &mut self.queue;
        let mut n = 0;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            for desc in &mut chain {
                // Read the descriptor as a device would: its length, and its buffer in host memory.
                self.sum += u64::from(desc.len());
                if self.check == BufferCheck::Slice {
                    match mem.get_slice(desc.addr(), desc.len() as usize) {
                        Ok(slice) => {
                            black_box(slice.len());
                        }
                        Err(e) => fail(&format!("chain {head}: buffer not in guest memory: {e}")),
                    }
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                fail(&format!("add_used({head}): {e}"));
            }
            n += 1;
        }
        match queue.needs_notification(mem) {
            Ok(notify) => {
                black_box(notify);
            }
            Err(e) => fail(&format!("needs_notification: {e}")),
        }
        n
    }

    #[inline(never)]
    fn reap(&mut self) {
        while self.driver.next_used() >= 0 {}
        black_box(self.driver.last_used_len);
    }

    /// One round: the chains the device served.
    #[inline(never)]
    fn round(&mut self) -> u32 {
        self.fill();
        let n = self.serve();
        self.reap();
        n
    }
}

fn fail(message: &str) -> ! {
    eprintln!("vhost-ts-rust-vmm-peer: {message}");
    exit(1);
}

fn main() {
    let mut warmup_ms = 200u64;
    let mut ms = 1000u64;
    let mut check = BufferCheck::Slice;
    let mut serve = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| fail(&format!("{a} needs a value")));
        match a.as_str() {
            "--warmup-ms" => warmup_ms = value().parse().unwrap_or_else(|_| fail("--warmup-ms: not a number")),
            "--ms" => ms = value().parse().unwrap_or_else(|_| fail("--ms: not a number")),
            "--buffer-check" => {
                check = match value().as_str() {
                    "slice" => BufferCheck::Slice,
                    "none" => BufferCheck::None,
                    other => fail(&format!("--buffer-check {other}: want slice or none")),
                }
            }
            "--serve" => serve = true,
            _ => fail(&format!(
                "unknown argument {a}; usage: [--warmup-ms N] [--ms N] [--buffer-check slice|none] [--serve]"
            )),
        }
    }
    let mut bench = Bench::new(check);
    if !serve {
        println!("{}", measure(&mut bench, warmup_ms, ms));
        return;
    }
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lines() {
        let line = line.unwrap_or_else(|e| fail(&format!("stdin: {e}")));
        let mut words = line.split_whitespace().map(|w| w.parse::<u64>());
        match (words.next(), words.next(), words.next()) {
            (Some(Ok(w)), Some(Ok(m)), None) => {
                let result = measure(&mut bench, w, m);
                writeln!(out, "{result}").and_then(|_| out.flush()).unwrap_or_else(|e| fail(&format!("stdout: {e}")));
            }
            _ => fail(&format!("--serve: want lines `WARMUP_MS MS`, got {line:?}")),
        }
    }
}

/// CPU time this process has used (CLOCK_PROCESS_CPUTIME_ID): what a window costs, without the time other
/// programs on the same CPU took from it.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        fail("clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Rounds for warmup_ms, then rounds for ms (wall clock, read once per round): the JSON line of the measured part,
/// with its rate over wall time and over this process's CPU time.
fn measure(bench: &mut Bench, warmup_ms: u64, ms: u64) -> String {
    let expected = u32::from(RING);
    let mut run = |duration: Duration| -> (u64, u64, Duration, Duration) {
        let start = Instant::now();
        let cpu_start = cpu_time();
        let (mut rounds, mut chains) = (0u64, 0u64);
        loop {
            let n = bench.round();
            if n != expected {
                fail(&format!("served {n} chains in a round, expected {expected}"));
            }
            rounds += 1;
            chains += u64::from(n);
            let elapsed = start.elapsed();
            if elapsed >= duration {
                return (rounds, chains, elapsed, cpu_time() - cpu_start);
            }
        }
    };
    run(Duration::from_millis(warmup_ms));
    let (rounds, chains, elapsed, cpu) = run(Duration::from_millis(ms));
    black_box(bench.sum);
    let seconds = elapsed.as_secs_f64();
    let cpu_seconds = cpu.as_secs_f64();
    format!(
        "{{\"peer\":\"rust-vmm virtio-queue\",\"layout\":\"split\",\"bufferCheck\":\"{}\",\"rounds\":{rounds},\"chains\":{chains},\"seconds\":{seconds},\"cpuSeconds\":{cpu_seconds},\"chainsPerSecond\":{},\"chainsPerCpuSecond\":{}}}",
        if bench.check == BufferCheck::Slice { "slice" } else { "none" },
        chains as f64 / seconds,
        chains as f64 / cpu_seconds
    )
}
