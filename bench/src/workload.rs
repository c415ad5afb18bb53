//! The workloads and the libblkio client that drives them.
//!
//! A run connects to the daemon's socket, starts one queue per client
//! thread, lets every thread keep its queue depth of requests in flight for
//! warm-up + duration, and counts only the requests that complete inside the
//! measurement window. Latency is taken per request, from just before it is
//! queued to the `do_io` return that reports it.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::backend::Config;
use crate::stats::{percentile, RunStats, XorShift64};

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "seqread",
            Pattern::SeqWrite => "seqwrite",
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }

    pub fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

/// How many queues the export has and the client uses, and of which kind,
/// and whether the daemons get the benchmark's tuning or none at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Setup {
    /// One interrupt-driven queue, one client thread.
    OneQueue,
    /// Two interrupt-driven queues, two client threads (one per queue).
    TwoQueues,
    /// One poll queue (the client busy-polls for completions).
    Poll,
    /// As `OneQueue`, both daemons on their defaults: no iothread objects,
    /// no polling options (what a user who only changes the program name
    /// gets).
    OneQueueDefaults,
    /// As `TwoQueues`, both daemons on their defaults.
    TwoQueuesDefaults,
    /// As `Poll`, both daemons on their defaults.
    PollDefaults,
}

impl Setup {
    pub const ALL: [Setup; 6] = [
        Setup::OneQueue,
        Setup::TwoQueues,
        Setup::Poll,
        Setup::OneQueueDefaults,
        Setup::TwoQueuesDefaults,
        Setup::PollDefaults,
    ];
    /// The setups with the benchmark's iothreads and polling.
    pub const TUNED: [Setup; 3] = [Setup::OneQueue, Setup::TwoQueues, Setup::Poll];
    /// The setups with both daemons on their defaults.
    pub const DEFAULTS: [Setup; 3] = [
        Setup::OneQueueDefaults,
        Setup::TwoQueuesDefaults,
        Setup::PollDefaults,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::OneQueue => "1q",
            Setup::TwoQueues => "2q",
            Setup::Poll => "poll",
            Setup::OneQueueDefaults => "1q-def",
            Setup::TwoQueuesDefaults => "2q-def",
            Setup::PollDefaults => "poll-def",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Setup::OneQueue => "1 queue",
            Setup::TwoQueues => "2 queues",
            Setup::Poll => "1 poll queue",
            Setup::OneQueueDefaults => "1 queue, defaults",
            Setup::TwoQueuesDefaults => "2 queues, defaults",
            Setup::PollDefaults => "1 poll queue, defaults",
        }
    }

    pub fn parse(s: &str) -> Option<Setup> {
        match s {
            "1" | "1q" => Some(Setup::OneQueue),
            "2" | "2q" => Some(Setup::TwoQueues),
            "poll" | "p" => Some(Setup::Poll),
            "1q-def" => Some(Setup::OneQueueDefaults),
            "2q-def" => Some(Setup::TwoQueuesDefaults),
            "poll-def" => Some(Setup::PollDefaults),
            _ => None,
        }
    }

    /// A name that stands for several setups (`tuned`, `defaults`).
    pub fn parse_group(s: &str) -> Option<&'static [Setup]> {
        match s {
            "tuned" => Some(&Setup::TUNED),
            "defaults" | "def" => Some(&Setup::DEFAULTS),
            _ => None,
        }
    }

    /// The same queue shape with the benchmark's tuning.
    fn shape(self) -> Setup {
        match self {
            Setup::OneQueue | Setup::OneQueueDefaults => Setup::OneQueue,
            Setup::TwoQueues | Setup::TwoQueuesDefaults => Setup::TwoQueues,
            Setup::Poll | Setup::PollDefaults => Setup::Poll,
        }
    }

    /// Whether both daemons run on their defaults (no iothread objects, no
    /// polling options).
    pub fn defaults(self) -> bool {
        self.shape() != self
    }

    /// Queues of the export, and client threads (one queue each).
    pub fn queues(self) -> u32 {
        match self.shape() {
            Setup::TwoQueues => 2,
            _ => 1,
        }
    }

    pub fn polled(self) -> bool {
        self.shape() == Setup::Poll
    }

    /// The workloads run in this setup, reads before writes so that reads
    /// never meet pages dirtied earlier in the same session.
    pub fn workloads(self) -> Vec<Workload> {
        let w = |pattern, bs, qd| Workload { pattern, bs, qd };
        if self.polled() {
            vec![
                w(Pattern::RandRead, 4096, 1),
                w(Pattern::RandWrite, 4096, 1),
            ]
        } else {
            vec![
                w(Pattern::RandRead, 4096, 1),
                w(Pattern::RandRead, 4096, 32),
                w(Pattern::SeqRead, 128 * 1024, 8),
                w(Pattern::RandWrite, 4096, 1),
                w(Pattern::RandWrite, 4096, 32),
                w(Pattern::SeqWrite, 128 * 1024, 8),
            ]
        }
    }
}

/// The workloads of a configuration in a setup: the setup's, plus on
/// every qcow2 image, in the setups without a poll queue, 64k sequential
/// writes at QD1 and QD8 — one cluster per write, so that on a new image
/// each allocates one, and on the converted image the same writes only
/// overwrite (the difference is the cost of allocating). A new qcow2 image
/// (`qcow2-fresh`) gets no reads: they would only measure how fast a
/// daemon returns zeroes for clusters that are not there.
pub fn plan(config: Config, setup: Setup) -> Vec<Workload> {
    let mut ws = setup.workloads();
    if Config::QCOW2.contains(&config) && !setup.polled() {
        for qd in [1, 8] {
            ws.push(Workload {
                pattern: Pattern::SeqWrite,
                bs: CLUSTER,
                qd,
            });
        }
    }
    if config == Config::Qcow2Fresh {
        ws.retain(|w| w.pattern.is_write());
    }
    ws
}

/// The cluster size of the qcow2 images (qemu-img's default).
const CLUSTER: usize = 64 * 1024;

/// One workload: pattern, block size and queue depth (per queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub pattern: Pattern,
    pub bs: usize,
    pub qd: usize,
}

impl Workload {
    /// e.g. `randread 4k QD32`.
    pub fn name(&self) -> String {
        let bs = if self.bs % 1024 == 0 {
            format!("{}k", self.bs / 1024)
        } else {
            format!("{}", self.bs)
        };
        format!("{} {bs} QD{}", self.pattern.name(), self.qd)
    }
}

/// Timing of one run.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// Samples the backend around the measurement window.
pub trait Probe {
    /// Backend CPU seconds so far.
    fn cpu_seconds(&mut self) -> std::io::Result<f64>;
    /// Backend peak RSS in KiB.
    fn peak_rss_kib(&mut self) -> std::io::Result<u64>;
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long a `do_io` may wait before the backend is declared stuck.
const STALL: Duration = Duration::from_secs(10);

/// A client connection with its queues and buffers, ready to run.
struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    /// Per queue: address of a buffer region of `qd * bs` bytes.
    bufs: Vec<usize>,
    capacity: u64,
}

fn round_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

/// Connects to the daemon and prepares queues and buffers.
fn connect(socket: &Path, setup: Setup, w: &Workload) -> Result<Client, Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", &socket.to_string_lossy())?;
    b.connect()?;
    let capacity = b.get_u64("capacity")?;
    let max_queues = b.get_i32("max-queues")?;
    let n = setup.queues() as i32;
    if n > max_queues {
        return Err(format!("the export offers {max_queues} queue(s), {n} needed").into());
    }
    let max_transfer = b.get_i32("max-transfer")?;
    if max_transfer > 0 && w.bs > max_transfer as usize {
        return Err(format!("block size {} exceeds max-transfer {max_transfer}", w.bs).into());
    }
    if capacity < (w.bs * 2) as u64 * n as u64 {
        return Err(format!("the export is too small ({capacity} bytes)").into());
    }
    let (nq, npq) = if setup.polled() { (0, n) } else { (n, 0) };
    b.set_i32("num-queues", nq)?;
    b.set_i32("num-poll-queues", npq)?;
    let started = b.start()?;
    let queues = if setup.polled() {
        started.poll_queues
    } else {
        started.queues
    };
    if queues.len() != n as usize {
        return Err(format!("got {} queues, wanted {n}", queues.len()).into());
    }
    let align = (b.get_u64("mem-region-alignment")? as usize).max(4096);
    let len = round_up(w.qd * w.bs, align);
    let mut bufs = Vec::new();
    for (i, _) in queues.iter().enumerate() {
        let region = b.alloc_mem_region(len)?;
        b.map_mem_region(&region)?;
        // Non-zero data for writes (and so that reads visibly overwrite it).
        // SAFETY: the region is `len` bytes of fresh, writable, mapped memory
        // owned by `b`, and nothing else uses it yet.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a + i as u8, len) };
        bufs.push(region.addr);
    }
    Ok(Client {
        blkio: b,
        queues,
        bufs,
        capacity,
    })
}

/// What one client thread measured.
struct ThreadResult {
    requests: u64,
    latencies_ns: Vec<u32>,
}

/// Where one client thread's requests go: random blocks of its range, or
/// its range in order.
#[derive(Clone, Debug)]
struct Offsets {
    random: bool,
    bs: u64,
    rng: XorShift64,
    /// Byte offset of the range.
    start: u64,
    /// Blocks in the range.
    blocks: u64,
    /// Next block for sequential patterns.
    next_block: u64,
    /// Sequential only: go through the range once instead of starting over
    /// at its end.
    once: bool,
}

impl Offsets {
    /// The next request's offset; `None` once a single pass is over.
    fn next(&mut self) -> Option<u64> {
        let block = if self.random {
            self.rng.below(self.blocks)
        } else {
            if self.next_block >= self.blocks {
                if self.once {
                    return None;
                }
                self.next_block = 0;
            }
            self.next_block += 1;
            self.next_block - 1
        };
        Some(self.start + block * self.bs)
    }
}

/// When the first client thread of a single-pass run had nothing left to
/// submit: the measurement window of every thread ends there.
type Stop = Arc<OnceLock<Instant>>;

/// One client thread's share of the device and its request loop.
struct Worker {
    queue: Blkioq,
    buf: usize,
    w: Workload,
    offsets: Offsets,
    stop: Stop,
}

impl Worker {
    /// Queues a request in `slot`; false when the thread's range is done.
    fn submit(&mut self, slot: usize) -> bool {
        let Some(off) = self.offsets.next() else {
            return false;
        };
        let ptr = (self.buf + slot * self.w.bs) as *mut u8;
        if self.w.pattern.is_write() {
            self.queue
                .write(off, ptr, self.w.bs, slot, ReqFlags::empty());
        } else {
            self.queue
                .read(off, ptr, self.w.bs, slot, ReqFlags::empty());
        }
        true
    }

    fn run(mut self, go: Instant, warm_end: Instant, end: Instant) -> Result<ThreadResult, String> {
        let qd = self.w.qd;
        let expected = (end - warm_end).as_secs_f64();
        let mut latencies: Vec<u32> =
            Vec::with_capacity(((expected * 200_000.0) as usize).clamp(1024, 1 << 24));
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..qd).map(|_| MaybeUninit::uninit()).collect();
        let mut submitted_at = vec![go; qd];
        let now = Instant::now();
        if go > now {
            thread::sleep(go - now);
        }
        let mut in_flight = 0;
        for (slot, t) in submitted_at.iter_mut().enumerate() {
            *t = Instant::now();
            if !self.submit(slot) {
                let _ = self.stop.set(*t);
                break;
            }
            in_flight += 1;
        }
        let mut requests = 0u64;
        let mut failed: Option<String> = None;
        while in_flight > 0 {
            let mut timeout = STALL;
            let n = self
                .queue
                .do_io(&mut comps, 1, Some(&mut timeout), None)
                .map_err(|e| format!("do_io: {e} ({in_flight} requests in flight)"))?;
            let now = Instant::now();
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                let slot = c.user_data;
                if slot >= qd {
                    return Err(format!("completion with unknown user_data {slot}"));
                }
                if c.ret != 0 && failed.is_none() {
                    failed = Some(format!(
                        "{} request failed: {}",
                        self.w.pattern.name(),
                        std::io::Error::from_raw_os_error(-c.ret)
                    ));
                }
                let stopped = self.stop.get().is_some();
                if now >= warm_end && now < end && !stopped {
                    let ns = (now - submitted_at[slot]).as_nanos();
                    latencies.push(u32::try_from(ns).unwrap_or(u32::MAX));
                    requests += 1;
                }
                if now < end && failed.is_none() && !stopped {
                    submitted_at[slot] = Instant::now();
                    if self.submit(slot) {
                        continue;
                    }
                    // This thread cannot keep its queue depth any more.
                    let _ = self.stop.set(now);
                }
                in_flight -= 1;
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(ThreadResult {
                requests,
                latencies_ns: latencies,
            }),
        }
    }
}

/// What an export's blocks hold before the benchmark writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    /// Nothing is stored (`null-co`): reads return whatever they return.
    Discarded,
    /// The benchmark's non-zero data.
    Filled,
    /// Zeroes: a new image.
    Zeroes,
}

impl Contents {
    pub fn of(config: Config) -> Contents {
        if !config.uses_image() {
            Contents::Discarded
        } else if config.holds_data() {
            Contents::Filled
        } else {
            Contents::Zeroes
        }
    }
}

/// Checks, on a connection of its own, that the export really moves data:
/// a block written with a fresh pattern reads back identical (unless the
/// node discards data, as `null-co` does), and the first block holds what
/// the image holds: the non-zero data it was filled with, or zeroes in a
/// new image (read into a buffer that is not zero before). A daemon that
/// answers without doing the I/O would otherwise produce flattering
/// figures. The write goes to the last block, which the workloads reach
/// last (a new image gets that one cluster allocated early).
pub fn verify(socket: &Path, contents: Contents, seed: u64) -> Result<(), String> {
    const BS: usize = 4096;
    let stores_data = contents != Contents::Discarded;
    let w = Workload {
        pattern: Pattern::RandWrite,
        bs: BS,
        qd: 2,
    };
    let client = connect(socket, Setup::OneQueue, &w).map_err(|e| e.to_string())?;
    let Client {
        blkio,
        mut queues,
        bufs,
        capacity,
    } = client;
    let q = queues.first_mut().ok_or_else(|| "no queue".to_string())?;
    let (wbuf, rbuf) = (bufs[0] as *mut u8, (bufs[0] + BS) as *mut u8);
    let mut rng = XorShift64::new(seed ^ 0x7665_7269_6679);
    let pattern: Vec<u8> = (0..BS / 8)
        .flat_map(|_| (rng.next_u64() | 1).to_le_bytes())
        .collect();
    // The buffers are only touched while no request is in flight: both lie
    // inside the 2 * BS bytes mapped for queue 0 (qd 2), and every request
    // below is waited for before the next access.
    // SAFETY: see above; `pattern` is BS bytes long.
    unsafe {
        std::ptr::copy_nonoverlapping(pattern.as_ptr(), wbuf, BS);
        std::ptr::write_bytes(rbuf, 0, BS);
    }
    let read_back = || -> Vec<u8> {
        // SAFETY: see above.
        unsafe { std::slice::from_raw_parts(rbuf, BS).to_vec() }
    };
    let one = |q: &mut Blkioq, write: bool, off: u64, what: &str| -> Result<(), String> {
        if write {
            q.write(off, wbuf, BS, 0, ReqFlags::empty());
        } else {
            q.read(off, rbuf, BS, 0, ReqFlags::empty());
        }
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = STALL;
        let n = q
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .map_err(|e| format!("{what}: {e}"))?;
        if n != 1 {
            return Err(format!("{what}: no completion"));
        }
        // SAFETY: do_io initialised the one completion it reported.
        let c = unsafe { c[0].assume_init_read() };
        if c.ret != 0 {
            return Err(format!(
                "{what} failed: {}",
                std::io::Error::from_raw_os_error(-c.ret)
            ));
        }
        Ok(())
    };
    let last = (capacity / BS as u64 - 1) * BS as u64;
    one(q, true, last, "write of the last block")?;
    one(q, false, last, "read of the last block")?;
    if stores_data && read_back() != pattern {
        return Err("the last block does not read back as written".into());
    }
    match contents {
        Contents::Discarded => {}
        Contents::Filled => {
            // SAFETY: see above.
            unsafe { std::ptr::write_bytes(rbuf, 0, BS) };
            one(q, false, 0, "read of the first block")?;
            if read_back().iter().all(|&b| b == 0) {
                return Err("the first block reads as zeroes, not the image's data".into());
            }
        }
        Contents::Zeroes => {
            // SAFETY: see above.
            unsafe { std::ptr::write_bytes(rbuf, 0xa5, BS) };
            one(q, false, 0, "read of the first block")?;
            if read_back().iter().any(|&b| b != 0) {
                return Err("the first block of the new image does not read as zeroes".into());
            }
        }
    }
    drop(queues);
    drop(blkio);
    Ok(())
}

/// Why a run failed: before any I/O (the export could not be used at all)
/// or during it.
#[derive(Debug)]
pub enum RunError {
    Connect(String),
    Io(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Connect(e) => write!(f, "cannot use the export: {e}"),
            RunError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Runs one workload against the daemon listening on `socket`.
///
/// With `once`, a sequential pattern goes through each thread's range a
/// single time instead of starting over, so that every write lands where
/// nothing was written in the run before (on a new image: every write
/// allocates). The run then ends early when the first thread has nothing
/// left to submit; the window, and so IOPS, covers only the time up to
/// that point (`RunStats::seconds`).
pub fn run(
    socket: &Path,
    setup: Setup,
    w: Workload,
    timing: Timing,
    once: bool,
    seed: u64,
    probe: &mut dyn Probe,
) -> Result<RunStats, RunError> {
    let client = connect(socket, setup, &w).map_err(|e| RunError::Connect(e.to_string()))?;
    let Client {
        blkio,
        queues,
        bufs,
        capacity,
    } = client;
    let n = queues.len() as u64;
    let bs = w.bs as u64;
    let total_blocks = capacity / bs;
    let go = Instant::now() + Duration::from_millis(20);
    let warm_end = go + timing.warmup;
    let end = warm_end + timing.duration;
    let stop: Stop = Arc::default();

    let mut handles = Vec::new();
    for (i, (queue, buf)) in queues.into_iter().zip(bufs).enumerate() {
        let i = i as u64;
        // Random: every thread covers the whole device with its own
        // sequence. Sequential: each streams through its own slice.
        let (start, blocks) = if w.pattern.is_random() {
            (0, total_blocks)
        } else {
            let per = total_blocks / n;
            (i * per * bs, per)
        };
        let worker = Worker {
            queue,
            buf,
            w,
            offsets: Offsets {
                random: w.pattern.is_random(),
                bs,
                rng: XorShift64::new(seed ^ (i + 1).wrapping_mul(0x9e37_79b9)),
                start,
                blocks,
                next_block: 0,
                once,
            },
            stop: Arc::clone(&stop),
        };
        handles.push(thread::spawn(move || worker.run(go, warm_end, end)));
    }

    let sleep_until = |t: Instant| {
        let now = Instant::now();
        if t > now {
            thread::sleep(t - now);
        }
    };
    sleep_until(warm_end);
    let cpu0 = probe.cpu_seconds();
    let t0 = Instant::now();
    // Until the end, or until a single-pass run has run out.
    loop {
        let now = Instant::now();
        if now >= end || stop.get().is_some() {
            break;
        }
        thread::sleep((end - now).min(Duration::from_millis(1)));
    }
    let cpu1 = probe.cpu_seconds();
    let window = t0.elapsed().as_secs_f64();

    let mut requests = 0u64;
    let mut latencies: Vec<u32> = Vec::new();
    let mut err: Option<String> = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => {
                requests += r.requests;
                if latencies.is_empty() {
                    latencies = r.latencies_ns;
                } else {
                    latencies.extend_from_slice(&r.latencies_ns);
                }
            }
            Ok(Err(e)) => {
                err.get_or_insert(e);
            }
            Err(_) => {
                err.get_or_insert_with(|| "client thread panicked".to_string());
            }
        }
    }
    let rss = probe.peak_rss_kib();
    drop(blkio);
    if let Some(e) = err {
        return Err(RunError::Io(e));
    }
    let cpu = match (cpu0, cpu1) {
        (Ok(a), Ok(b)) => b - a,
        (Err(e), _) | (_, Err(e)) => return Err(RunError::Io(format!("backend CPU time: {e}"))),
    };
    let rss_kib = rss.map_err(|e| RunError::Io(format!("backend RSS: {e}")))?;
    let window_end = stop.get().map_or(end, |&t| t.min(end));
    if window_end <= warm_end {
        return Err(RunError::Io(
            "the single pass reached the end of the device during the warm-up \
             (a larger --pass-size helps)"
                .into(),
        ));
    }
    if requests == 0 {
        return Err(RunError::Io("no request completed in the window".into()));
    }
    latencies.sort_unstable();
    let us = |p| percentile(&latencies, p).map_or(f64::NAN, |ns| ns as f64 / 1000.0);
    let seconds = (window_end - warm_end).as_secs_f64();
    let iops = requests as f64 / seconds;
    Ok(RunStats {
        requests,
        seconds,
        iops,
        mib_s: iops * w.bs as f64 / (1024.0 * 1024.0),
        p50_us: us(50.0),
        p99_us: us(99.0),
        cpu_s: cpu,
        // CPU was sampled over `window`, requests counted over `seconds`;
        // scale so that both refer to the same span.
        cpu_us_per_req: cpu * 1e6 / (iops * window),
        rss_mib: rss_kib as f64 / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_and_setups() {
        let w = Workload {
            pattern: Pattern::SeqWrite,
            bs: 128 * 1024,
            qd: 8,
        };
        assert_eq!(w.name(), "seqwrite 128k QD8");
        assert_eq!(Setup::TwoQueues.queues(), 2);
        assert_eq!(Setup::OneQueue.workloads().len(), 6);
        assert!(Setup::Poll.workloads().iter().all(|w| w.qd == 1));
        // reads come before writes in every session
        for s in Setup::ALL {
            let ws = s.workloads();
            let first_write = ws.iter().position(|w| w.pattern.is_write());
            let last_read = ws.iter().rposition(|w| !w.pattern.is_write());
            assert!(first_write > last_read);
        }
        assert_eq!(Setup::parse("poll"), Some(Setup::Poll));
        assert_eq!(Setup::parse("poll-def"), Some(Setup::PollDefaults));
        assert!(Setup::PollDefaults.polled() && Setup::PollDefaults.defaults());
        assert!(!Setup::Poll.defaults());
        assert_eq!(Setup::TwoQueuesDefaults.queues(), 2);
        assert_eq!(
            Setup::OneQueueDefaults.workloads(),
            Setup::OneQueue.workloads()
        );
        assert_eq!(Setup::parse_group("defaults"), Some(&Setup::DEFAULTS[..]));
        // every setup has a name that parses back to it
        for s in Setup::ALL {
            assert_eq!(Setup::parse(s.name()), Some(s));
        }
        assert_eq!(round_up(4097, 4096), 8192);
    }

    #[test]
    fn plans_per_configuration() {
        let alloc: Vec<String> = plan(Config::Qcow2Fresh, Setup::OneQueue)
            .iter()
            .map(Workload::name)
            .filter(|n| n.contains(" 64k "))
            .collect();
        assert_eq!(alloc, ["seqwrite 64k QD1", "seqwrite 64k QD8"]);
        for s in Setup::ALL {
            assert_eq!(plan(Config::Null, s), s.workloads());
            assert_eq!(plan(Config::Raw, s), s.workloads());
            let extra = if s.polled() { 0 } else { 2 };
            for c in [Config::Qcow2, Config::Qcow2Meta] {
                let p = plan(c, s);
                assert_eq!(p[..p.len() - extra], s.workloads()[..], "{c:?} {s:?}");
                assert!(p[p.len() - extra..]
                    .iter()
                    .all(|w| w.pattern == Pattern::SeqWrite && w.bs == CLUSTER));
                // reads still come before writes
                let first_write = p.iter().position(|w| w.pattern.is_write());
                let last_read = p.iter().rposition(|w| !w.pattern.is_write());
                assert!(first_write > last_read);
            }
            let fresh = plan(Config::Qcow2Fresh, s);
            assert!(!fresh.is_empty());
            assert!(fresh.iter().all(|w| w.pattern.is_write()), "{s:?}");
            let writes = plan(Config::Qcow2, s)
                .into_iter()
                .filter(|w| w.pattern.is_write());
            assert!(fresh.into_iter().eq(writes), "{s:?}");
        }
        assert_eq!(Contents::of(Config::Null), Contents::Discarded);
        assert_eq!(Contents::of(Config::Qcow2), Contents::Filled);
        assert_eq!(Contents::of(Config::Qcow2Meta), Contents::Zeroes);
        assert_eq!(Contents::of(Config::Qcow2Fresh), Contents::Zeroes);
    }

    fn offsets(random: bool, once: bool) -> Offsets {
        Offsets {
            random,
            bs: 4096,
            rng: XorShift64::new(3),
            start: 8192,
            blocks: 3,
            next_block: 0,
            once,
        }
    }

    #[test]
    fn sequential_ranges_wrap_or_end() {
        let mut o = offsets(false, false);
        let v: Vec<_> = (0..5).map(|_| o.next()).collect();
        assert_eq!(
            v,
            [
                Some(8192),
                Some(12288),
                Some(16384),
                Some(8192),
                Some(12288)
            ]
        );
        let mut o = offsets(false, true);
        let v: Vec<_> = (0..5).map(|_| o.next()).collect();
        assert_eq!(v, [Some(8192), Some(12288), Some(16384), None, None]);
        // a single pass means nothing to random offsets
        let mut o = offsets(true, true);
        for _ in 0..100 {
            let off = o.next().unwrap();
            assert!((8192..8192 + 3 * 4096).contains(&off) && off % 4096 == 0);
        }
    }
}
