//! The plan: for every repetition, configuration and queue setup, each
//! backend in turn (the order flips every repetition so that drift hits both
//! alike) gets a freshly started daemon, a freshly settled image and the
//! setup's workloads. Images that writes change (`qcow2-meta`,
//! `qcow2-fresh`) are made anew for each session, and each of their write
//! workloads gets a session of its own, so that every write workload of
//! every backend starts on an image nothing was written to.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{daemon_args, version_of, Config, Daemon, Kind, StartError, Threads};
use crate::image;
use crate::opts::Opts;
use crate::report;
use crate::results::{Case, Meta, Results};
use crate::workload::{self, Contents, Pattern, Probe, RunError, Setup, Timing, Workload};

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest warm-up of a single-pass run: its warm-up writes use up the
/// image as well, and at several thousand allocations per second a long
/// one would leave little of it for the measurement.
const SINGLE_PASS_WARMUP: Duration = Duration::from_millis(100);

struct DaemonProbe<'a>(&'a Daemon);

impl Probe for DaemonProbe<'_> {
    fn cpu_seconds(&mut self) -> std::io::Result<f64> {
        self.0.cpu_seconds()
    }
    fn peak_rss_kib(&mut self) -> std::io::Result<u64> {
        self.0.peak_rss_kib()
    }
}

/// What is known about vubd's support for one iothread per queue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PerQueue {
    Untried,
    Works,
    Refused,
}

struct Runner<'a> {
    opts: &'a Opts,
    results: Results,
    vubd_per_queue: PerQueue,
    caches_dropped: bool,
}

fn program_of(opts: &Opts, kind: Kind) -> &Path {
    match kind {
        Kind::Qsd => &opts.qsd,
        Kind::Vubd => &opts.vubd,
    }
}

fn first_line_of(path: &str, prefix: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// A workload with its place in the setup's plan (which picks its seed).
type Planned = (usize, Workload);

/// How a setup's workloads are split into daemon sessions: all in one,
/// except on images that writes change, where the reads share a session
/// and every write workload gets its own (on an image made anew).
fn sessions(config: Config, workloads: &[Planned]) -> Vec<Vec<Planned>> {
    if !config.renews_image() {
        return vec![workloads.to_vec()];
    }
    let (writes, reads): (Vec<Planned>, Vec<Planned>) =
        workloads.iter().partition(|(_, w)| w.pattern.is_write());
    let mut out = Vec::new();
    if !reads.is_empty() {
        out.push(reads);
    }
    out.extend(writes.into_iter().map(|w| vec![w]));
    out
}

/// Whether a workload goes through the image a single time: sequential
/// writes to an image that writes change, so that each lands where nothing
/// was written before.
fn single_pass(config: Config, w: &Workload) -> bool {
    config.renews_image() && w.pattern == Pattern::SeqWrite
}

impl Runner<'_> {
    fn image_for(&self, config: Config) -> Option<PathBuf> {
        config.image_file().map(|f| self.opts.dir.join(f))
    }

    /// Makes the image of a configuration whose image is renewed, of
    /// `mib` MiB.
    fn make_new_image(&self, config: Config, mib: u64) -> std::io::Result<()> {
        let Some(path) = self.image_for(config) else {
            return Ok(());
        };
        let o = self.opts;
        image::create_qcow2(&o.qemu_img, &path, mib << 20, config == Config::Qcow2Meta)
    }

    fn skip(&mut self, kind: Kind, config: Config, why: String) {
        eprintln!(
            "bench: {} skipped for the {} configuration: {why}",
            kind.name(),
            config.name()
        );
        self.results.skipped.push((kind, config, why));
    }

    /// Creates the images the selected configurations need. Images that
    /// are made anew for every session are made once here already, so that
    /// a qemu-img that cannot make them is found out before any run.
    fn prepare_images(&mut self) -> Result<(), String> {
        let o = self.opts;
        if o.configs.iter().any(|c| c.holds_data()) {
            let raw = self.image_for(Config::Raw).unwrap_or_default();
            let size = o.image_mib << 20;
            let t = Instant::now();
            image::create_filled(&raw, size, o.seed)
                .map_err(|e| format!("cannot create {}: {e}", raw.display()))?;
            eprintln!(
                "bench: wrote {} MiB of non-zero data to {} in {:.1} s",
                o.image_mib,
                raw.display(),
                t.elapsed().as_secs_f64()
            );
            if o.configs.contains(&Config::Qcow2) {
                let qcow2 = self.image_for(Config::Qcow2).unwrap_or_default();
                match image::convert_to_qcow2(&o.qemu_img, &raw, &qcow2) {
                    Ok(()) => eprintln!(
                        "bench: converted it to a fully allocated qcow2 image {}",
                        qcow2.display()
                    ),
                    Err(e) => {
                        for kind in o.backends.clone() {
                            self.skip(kind, Config::Qcow2, format!("no qcow2 image: {e}"));
                        }
                    }
                }
            }
        }
        for config in o.configs.iter().copied().filter(|c| c.renews_image()) {
            match self.make_new_image(config, o.image_mib) {
                Ok(()) => eprintln!(
                    "bench: {} images are made with qemu-img create{} before each session",
                    config.name(),
                    if config == Config::Qcow2Meta {
                        " -o preallocation=metadata"
                    } else {
                        ""
                    }
                ),
                Err(e) => {
                    for kind in o.backends.clone() {
                        self.skip(kind, config, format!("no qcow2 image: {e}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts a backend for a configuration and setup. vubd gets one
    /// iothread per queue when it accepts that, else qsd's options; in the
    /// defaults setups both get no iothread at all.
    fn start(
        &mut self,
        kind: Kind,
        config: Config,
        setup: Setup,
    ) -> Result<(Daemon, Threads), StartError> {
        let o = self.opts;
        let queues = setup.queues();
        let socket = o.dir.join(format!("{}.sock", kind.name()));
        let log = o.dir.join(format!(
            "{}-{}-{}.log",
            kind.name(),
            config.name(),
            setup.name()
        ));
        let mut tries = Vec::new();
        if setup.defaults() {
            tries.push(Threads::Defaults);
        } else {
            if kind == Kind::Vubd && queues > 1 && self.vubd_per_queue != PerQueue::Refused {
                tries.push(Threads::PerQueue);
            }
            tries.push(Threads::Single);
        }
        let mut last_err = None;
        for threads in tries {
            let args = daemon_args(
                config,
                self.image_for(config).as_deref(),
                o.image_mib << 20,
                &socket,
                queues,
                threads,
            )
            .map_err(|e| StartError::Timeout { log: e })?;
            match Daemon::start(program_of(o, kind), &args, &socket, &log, START_TIMEOUT) {
                Ok(d) => {
                    if threads == Threads::PerQueue {
                        self.vubd_per_queue = PerQueue::Works;
                    } else if kind == Kind::Vubd
                        && queues > 1
                        && self.vubd_per_queue == PerQueue::Untried
                        && last_err.is_some()
                    {
                        eprintln!(
                            "bench: vubd refused one iothread per queue ({}); using qsd's options",
                            last_err
                                .as_ref()
                                .map(ToString::to_string)
                                .unwrap_or_default()
                        );
                        self.vubd_per_queue = PerQueue::Refused;
                    }
                    return Ok((d, threads));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(StartError::Timeout { log: String::new() }))
    }

    /// One daemon session: make the image anew if writes change it,
    /// settle it, start the daemon, run the workloads, stop it.
    fn session(
        &mut self,
        rep: usize,
        config: Config,
        setup: Setup,
        kind: Kind,
        workloads: &[Planned],
    ) {
        let o = self.opts;
        if self.results.skip_reason(kind, config).is_some() || workloads.is_empty() {
            return;
        }
        let fail_all = |r: &mut Self, msg: String| {
            eprintln!(
                "bench: {} {} {}: {msg}",
                kind.name(),
                config.name(),
                setup.name()
            );
            for &(_, w) in workloads {
                let case = Case {
                    config,
                    setup,
                    workload: w,
                };
                r.results.cell_mut(case, kind).errors.push(msg.clone());
            }
        };
        // A single pass gets an image of its own size, which the export's
        // capacity then reflects.
        let pass = workloads.iter().any(|(_, w)| single_pass(config, w));
        if config.renews_image() {
            let mib = if pass { o.pass_mib } else { o.image_mib };
            if let Err(e) = self.make_new_image(config, mib) {
                fail_all(self, format!("cannot make the image: {e}"));
                return;
            }
        }
        if let Some(img) = self.image_for(config) {
            match image::settle(&img, o.drop_caches, o.small_pages) {
                Ok(dropped) => self.caches_dropped &= dropped,
                Err(e) => {
                    eprintln!("bench: cannot settle {}: {e}", img.display());
                    self.caches_dropped = false;
                }
            }
        }
        let (mut daemon, threads) = match self.start(kind, config, setup) {
            Ok(x) => x,
            Err(e) => {
                let why = match kind {
                    Kind::Vubd => format!("startup failed, so vubd cannot serve this yet ({e})"),
                    Kind::Qsd => format!("startup failed ({e})"),
                };
                self.skip(kind, config, why);
                return;
            }
        };
        let socket = o.dir.join(format!("{}.sock", kind.name()));
        if let Err(e) = workload::verify(&socket, Contents::of(config), o.seed) {
            let msg = format!("data check failed: {e}");
            fail_all(self, msg.clone());
            if rep == 0 {
                self.skip(kind, config, msg);
            }
            daemon.stop();
            return;
        }
        for (n, &(i, w)) in workloads.iter().enumerate() {
            let case = Case {
                config,
                setup,
                workload: w,
            };
            let once = single_pass(config, &w);
            let timing = Timing {
                warmup: if once {
                    o.warmup.min(SINGLE_PASS_WARMUP)
                } else {
                    o.warmup
                },
                duration: o.duration,
            };
            // Same offsets for both backends and every repetition.
            let seed = o.seed.wrapping_mul(1000).wrapping_add(i as u64);
            let r = workload::run(
                &socket,
                setup,
                w,
                timing,
                once,
                seed,
                &mut DaemonProbe(&daemon),
            );
            let cell = self.results.cell_mut(case, kind);
            cell.threads = threads.describe(kind, setup.queues());
            match r {
                Ok(stats) => {
                    println!(
                        "{}",
                        report::progress_line(
                            rep,
                            o.reps,
                            &case,
                            kind,
                            &stats,
                            o.duration.as_secs_f64()
                        )
                    );
                    cell.runs.push(stats);
                }
                Err(e) => {
                    let exited = daemon.exited();
                    let mut msg = e.to_string();
                    if let Some(status) = exited {
                        msg = format!("{msg}; the daemon exited ({status}): {}", daemon.log_tail());
                    }
                    eprintln!(
                        "bench: {} {} {} {}: {msg}",
                        kind.name(),
                        config.name(),
                        setup.name(),
                        w.name()
                    );
                    cell.errors.push(msg.clone());
                    if matches!(e, RunError::Connect(_)) && n == 0 && rep == 0 {
                        // The daemon runs but its export is not usable at all.
                        self.skip(kind, config, msg);
                        break;
                    }
                    if exited.is_some() {
                        break;
                    }
                }
            }
        }
        daemon.stop();
    }
}

/// Runs everything the options select and returns the results.
pub fn run_all(opts: &Opts) -> Result<Results, String> {
    fs::create_dir_all(&opts.dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.dir.display()))?;
    let mut drop_caches = opts.drop_caches;
    if drop_caches && !image::can_drop_caches() {
        eprintln!(
            "bench: not allowed to drop the page cache (run as root); \
             continuing without, so raw/qcow2 figures depend on what is cached"
        );
        drop_caches = false;
    }
    let opts = &Opts {
        drop_caches,
        ..opts.clone()
    };
    let mut r = Runner {
        opts,
        results: Results {
            backends: opts.backends.clone(),
            ..Default::default()
        },
        vubd_per_queue: PerQueue::Untried,
        caches_dropped: drop_caches,
    };

    let mut versions = Vec::new();
    for &kind in &opts.backends {
        let prog = program_of(opts, kind);
        match version_of(prog) {
            Some(v) => versions.push((kind, v)),
            None => {
                let why = format!("cannot run {}", prog.display());
                for &c in &opts.configs {
                    r.skip(kind, c, why.clone());
                }
            }
        }
    }
    r.prepare_images()?;

    let start = Instant::now();
    for rep in 0..opts.reps {
        for &config in &opts.configs {
            for &setup in &opts.setups {
                let planned: Vec<Planned> = workload::plan(config, setup)
                    .into_iter()
                    .enumerate()
                    .filter(|(_, w)| {
                        opts.only
                            .as_ref()
                            .is_none_or(|f| w.name().contains(f.as_str()))
                    })
                    .collect();
                let mut order = opts.backends.clone();
                if rep % 2 == 1 {
                    order.reverse();
                }
                for group in sessions(config, &planned) {
                    for &kind in &order {
                        r.session(rep, config, setup, kind, &group);
                    }
                }
            }
        }
    }
    eprintln!(
        "bench: all runs done in {:.0} s",
        start.elapsed().as_secs_f64()
    );

    r.results.meta = Meta {
        duration_s: opts.duration.as_secs_f64(),
        warmup_s: opts.warmup.as_secs_f64(),
        reps: opts.reps,
        image_mib: opts.image_mib,
        pass_mib: opts.pass_mib,
        caches_dropped: r.caches_dropped,
        small_pages: opts.small_pages,
        seed: opts.seed,
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu: first_line_of("/proc/cpuinfo", "model name").unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        versions,
    };
    Ok(r.results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_images_get_a_session_per_write() {
        let planned: Vec<Planned> = Setup::OneQueue
            .workloads()
            .into_iter()
            .enumerate()
            .collect();
        assert_eq!(sessions(Config::Qcow2, &planned), vec![planned.clone()]);
        assert_eq!(sessions(Config::Raw, &planned), vec![planned.clone()]);
        let s = sessions(Config::Qcow2Meta, &planned);
        let reads = planned
            .iter()
            .filter(|(_, w)| !w.pattern.is_write())
            .count();
        let writes = planned.len() - reads;
        assert_eq!(s.len(), 1 + writes);
        assert_eq!(s[0].len(), reads);
        assert!(s[0].iter().all(|(_, w)| !w.pattern.is_write()));
        assert!(s[1..]
            .iter()
            .all(|g| g.len() == 1 && g[0].1.pattern.is_write()));
        // each workload keeps its place in the plan (its seed)
        let mut idx: Vec<usize> = s.iter().flatten().map(|(i, _)| *i).collect();
        idx.sort_unstable();
        assert_eq!(idx, (0..planned.len()).collect::<Vec<_>>());
        // no reads: writes only, one each
        let fresh: Vec<Planned> = workload::plan(Config::Qcow2Fresh, Setup::Poll)
            .into_iter()
            .enumerate()
            .collect();
        assert_eq!(sessions(Config::Qcow2Fresh, &fresh), vec![fresh.clone()]);
        assert!(sessions(Config::Qcow2Fresh, &[]).is_empty());
    }

    #[test]
    fn single_pass_only_for_sequential_writes_to_new_images() {
        let w = |pattern| Workload {
            pattern,
            bs: 65536,
            qd: 8,
        };
        assert!(single_pass(Config::Qcow2Fresh, &w(Pattern::SeqWrite)));
        assert!(single_pass(Config::Qcow2Meta, &w(Pattern::SeqWrite)));
        assert!(!single_pass(Config::Qcow2, &w(Pattern::SeqWrite)));
        assert!(!single_pass(Config::Raw, &w(Pattern::SeqWrite)));
        assert!(!single_pass(Config::Qcow2Fresh, &w(Pattern::RandWrite)));
        assert!(!single_pass(Config::Qcow2Meta, &w(Pattern::SeqRead)));
    }
}
