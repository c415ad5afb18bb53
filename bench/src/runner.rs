//! The plan: for every repetition, configuration and queue setup, each
//! backend in turn (the order flips every repetition so that drift hits both
//! alike) gets a freshly started daemon, a freshly settled image and the
//! setup's workloads.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{daemon_args, version_of, Config, Daemon, Kind, StartError, Threads};
use crate::image;
use crate::opts::Opts;
use crate::report;
use crate::results::{Case, Meta, Results};
use crate::workload::{self, Probe, RunError, Setup, Timing};

const START_TIMEOUT: Duration = Duration::from_secs(15);

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
    raw_image: PathBuf,
    qcow2_image: PathBuf,
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

impl Runner<'_> {
    fn image_for(&self, config: Config) -> Option<&Path> {
        match config {
            Config::Null => None,
            Config::Raw => Some(&self.raw_image),
            Config::Qcow2 => Some(&self.qcow2_image),
        }
    }

    fn skip(&mut self, kind: Kind, config: Config, why: String) {
        eprintln!(
            "bench: {} skipped for the {} configuration: {why}",
            kind.name(),
            config.name()
        );
        self.results.skipped.push((kind, config, why));
    }

    /// Creates the images the selected configurations need.
    fn prepare_images(&mut self) -> Result<(), String> {
        let o = self.opts;
        let needs_raw = o.configs.iter().any(|c| c.uses_image());
        if !needs_raw {
            return Ok(());
        }
        let size = o.image_mib << 20;
        let t = Instant::now();
        image::create_filled(&self.raw_image, size, o.seed)
            .map_err(|e| format!("cannot create {}: {e}", self.raw_image.display()))?;
        eprintln!(
            "bench: wrote {} MiB of non-zero data to {} in {:.1} s",
            o.image_mib,
            self.raw_image.display(),
            t.elapsed().as_secs_f64()
        );
        if o.configs.contains(&Config::Qcow2) {
            match image::convert_to_qcow2(&o.qemu_img, &self.raw_image, &self.qcow2_image) {
                Ok(()) => eprintln!(
                    "bench: converted it to a fully allocated qcow2 image {}",
                    self.qcow2_image.display()
                ),
                Err(e) => {
                    for kind in o.backends.clone() {
                        self.skip(kind, Config::Qcow2, format!("no qcow2 image: {e}"));
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
                self.image_for(config),
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

    /// One daemon session: settle the image, start the daemon, run the
    /// setup's workloads, stop it.
    fn session(&mut self, rep: usize, config: Config, setup: Setup, kind: Kind) {
        let o = self.opts;
        if self.results.skip_reason(kind, config).is_some() {
            return;
        }
        let workloads: Vec<_> = setup
            .workloads()
            .into_iter()
            .filter(|w| {
                o.only
                    .as_ref()
                    .is_none_or(|f| w.name().contains(f.as_str()))
            })
            .collect();
        if workloads.is_empty() {
            return;
        }
        if let Some(img) = self.image_for(config) {
            match image::settle(img, o.drop_caches, o.small_pages) {
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
        if let Err(e) = workload::verify(&socket, config.uses_image(), o.seed) {
            let msg = format!("data check failed: {e}");
            eprintln!(
                "bench: {} {} {}: {msg}",
                kind.name(),
                config.name(),
                setup.name()
            );
            for w in &workloads {
                let case = Case {
                    config,
                    setup,
                    workload: *w,
                };
                self.results.cell_mut(case, kind).errors.push(msg.clone());
            }
            if rep == 0 {
                self.skip(kind, config, msg);
            }
            daemon.stop();
            return;
        }
        let timing = Timing {
            warmup: o.warmup,
            duration: o.duration,
        };
        for (i, w) in workloads.into_iter().enumerate() {
            let case = Case {
                config,
                setup,
                workload: w,
            };
            // Same offsets for both backends and every repetition.
            let seed = o.seed.wrapping_mul(1000).wrapping_add(i as u64);
            let r = workload::run(
                &socket,
                setup,
                w,
                timing,
                false,
                seed,
                &mut DaemonProbe(&daemon),
            );
            let cell = self.results.cell_mut(case, kind);
            cell.threads = threads.describe(kind, setup.queues());
            match r {
                Ok(stats) => {
                    println!(
                        "{}",
                        report::progress_line(rep, o.reps, &case, kind, &stats)
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
                    if matches!(e, RunError::Connect(_)) && i == 0 && rep == 0 {
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
        raw_image: opts.dir.join("bench.img"),
        qcow2_image: opts.dir.join("bench.qcow2"),
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
                let mut order = opts.backends.clone();
                if rep % 2 == 1 {
                    order.reverse();
                }
                for kind in order {
                    r.session(rep, config, setup, kind);
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
