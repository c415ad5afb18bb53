//! Command-line options of the benchmark.

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::{Config, Kind};
use crate::workload::Setup;

pub const USAGE: &str = "\
usage: vubd-bench [OPTIONS]

Runs the same libblkio workloads against qemu-storage-daemon (qsd) and vubd,
alternating the backends, and reports medians and vubd/qsd ratios.

  --quick               smoke test: 1 repetition of 0.5 s (+0.2 s warm-up),
                        256 MiB image, 1024 MiB single-pass image
  --duration SECS       measured time per run (default 5)
  --warmup SECS         warm-up before each run (default 1)
  --reps N              runs per workload and backend (default 3)
  --configs LIST        null, null-throttle (null-co under a throttle filter
                        whose group allows 10^9 IOPS: the throttle's cost
                        when it holds nothing), raw, qcow2 (the raw image converted: every
                        cluster allocated and filled), qcow2-meta (qemu-img
                        create -o preallocation=metadata: clusters mapped,
                        file sparse, reads return zeroes), qcow2-fresh
                        (qemu-img create: writes allocate clusters; no read
                        workloads); 'default' = null,raw,qcow2, 'qcow2-all'
                        = the three qcow2 ones, 'all' = all six
                        (default: default; qcow2-meta and qcow2-fresh are
                        opt-in, as each write workload on them gets a
                        session and an image of its own, made anew).
                        Every qcow2 configuration adds seqwrite 64k QD1 and
                        QD8 (one cluster per write) in the setups without
                        a poll queue. Sequential writes to qcow2-meta and
                        qcow2-fresh go through the image once (see
                        --pass-size) and end when it is full.
  --setups LIST         1q,2q,poll (the benchmark's iothreads with polling),
                        1q-def,2q-def,poll-def (the same with both daemons
                        on their defaults: no iothread objects, no polling
                        options); 'tuned' and 'defaults' name the groups
                        (default: all)
  --backends LIST       qsd,vubd (default: both)
  --only TEXT           only workloads whose name contains TEXT, e.g. randread,
                        'QD1', '128k'
  --image-size MIB      size of the images and of the null device (default 1024)
  --pass-size MIB       size of the qcow2-meta and qcow2-fresh images that
                        sequential writes go through once (default 2048:
                        a window of about a second at 2 GB/s into the page
                        cache, and below the dirty data at which the kernel
                        starts throttling writers with 16 GiB of memory)
  --dir DIR             images, sockets and daemon logs (default /var/tmp/vubd-bench)
  --qsd PATH            qemu-storage-daemon binary (default: from PATH)
  --vubd PATH           vubd binary (default target/release/vubd)
  --qemu-img PATH       qemu-img, to make the qcow2 image (default: from PATH)
  --no-drop-caches      do not drop the page cache before each session
  --small-pages         read the images back with readahead off, so that the
                        page cache holds 4 KiB pages instead of large folios
                        (on ext4 with Linux 6.16+ a 4k buffered write into a
                        large folio costs several times the CPU)
  --seed N              seed of the offset generator (default 1)

In the tuned setups both daemons' iothreads poll for up to 32768 ns
(QEMU's default for iothreads); set VUBD_BENCH_POLL_MAX_NS=0 in the
environment to turn polling off for both. The -def setups pass neither.
  --json PATH           write all runs, medians and ratios as JSON
  --markdown PATH       write the results as a markdown table
  -h, --help            this text
";

#[derive(Clone, Debug)]
pub struct Opts {
    pub duration: Duration,
    pub warmup: Duration,
    pub reps: usize,
    pub configs: Vec<Config>,
    pub setups: Vec<Setup>,
    pub backends: Vec<Kind>,
    pub only: Option<String>,
    pub image_mib: u64,
    /// Size of the images sequential writes go through once.
    pub pass_mib: u64,
    pub dir: PathBuf,
    pub qsd: PathBuf,
    pub vubd: PathBuf,
    pub qemu_img: PathBuf,
    pub drop_caches: bool,
    pub small_pages: bool,
    pub seed: u64,
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            reps: 3,
            configs: Config::DEFAULT.to_vec(),
            setups: Setup::ALL.to_vec(),
            backends: vec![Kind::Qsd, Kind::Vubd],
            only: None,
            image_mib: 1024,
            pass_mib: 2048,
            dir: PathBuf::from("/var/tmp/vubd-bench"),
            qsd: PathBuf::from("qemu-storage-daemon"),
            vubd: PathBuf::from("target/release/vubd"),
            qemu_img: PathBuf::from("qemu-img"),
            drop_caches: true,
            small_pages: false,
            seed: 1,
            json: None,
            markdown: None,
        }
    }
}

/// `None` means: print the usage and exit successfully.
pub fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts::default();
    // --quick sets defaults that explicit options given anywhere override.
    if args.iter().any(|a| a == "--quick") {
        o.duration = Duration::from_millis(500);
        o.warmup = Duration::from_millis(200);
        o.reps = 1;
        o.image_mib = 256;
        o.pass_mib = 1024;
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().cloned().ok_or(format!("{name} needs a value")),
            }
        };
        match name {
            "-h" | "--help" => return Ok(None),
            "--quick" => {}
            "--duration" => o.duration = secs(name, &value()?)?,
            "--warmup" => o.warmup = secs(name, &value()?)?,
            "--reps" => {
                o.reps = num(name, &value()?)? as usize;
                if o.reps == 0 {
                    return Err("--reps must be at least 1".into());
                }
            }
            "--configs" => {
                o.configs = grouped(name, &value()?, Config::parse_group, Config::parse)?
            }
            "--setups" => o.setups = grouped(name, &value()?, Setup::parse_group, Setup::parse)?,
            "--backends" => o.backends = list(name, &value()?, Kind::parse)?,
            "--only" => o.only = Some(value()?),
            "--image-size" => {
                o.image_mib = num(name, &value()?)?;
                if o.image_mib < 16 {
                    return Err("--image-size must be at least 16 (MiB)".into());
                }
            }
            "--pass-size" => {
                o.pass_mib = num(name, &value()?)?;
                if o.pass_mib < 16 {
                    return Err("--pass-size must be at least 16 (MiB)".into());
                }
            }
            "--dir" => o.dir = PathBuf::from(value()?),
            "--qsd" => o.qsd = PathBuf::from(value()?),
            "--vubd" => o.vubd = PathBuf::from(value()?),
            "--qemu-img" => o.qemu_img = PathBuf::from(value()?),
            "--no-drop-caches" => o.drop_caches = false,
            "--small-pages" => o.small_pages = true,
            "--seed" => o.seed = num(name, &value()?)?,
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--markdown" => o.markdown = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(Some(o))
}

fn secs(name: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = v
        .parse()
        .map_err(|_| format!("{name}: not a number of seconds: {v}"))?;
    if !(0.0..=3600.0).contains(&s) {
        return Err(format!("{name}: out of range: {v}"));
    }
    Ok(Duration::from_secs_f64(s))
}

fn num(name: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("{name}: not a whole number: {v}"))
}

fn list<T: PartialEq>(name: &str, v: &str, f: fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let x = f(item).ok_or_else(|| format!("{name}: unknown item {item}"))?;
        if !out.contains(&x) {
            out.push(x);
        }
    }
    if out.is_empty() {
        return Err(format!("{name}: empty list"));
    }
    Ok(out)
}

/// A list where a group name stands for its members (setups, configs).
fn grouped<T: PartialEq + Copy + 'static>(
    name: &str,
    v: &str,
    group: fn(&str) -> Option<&'static [T]>,
    one: fn(&str) -> Option<T>,
) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let members = match group(item) {
            Some(g) => g.to_vec(),
            None => vec![one(item).ok_or_else(|| format!("{name}: unknown item {item}"))?],
        };
        for x in members {
            if !out.contains(&x) {
                out.push(x);
            }
        }
    }
    if out.is_empty() {
        return Err(format!("{name}: empty list"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Option<Opts>, String> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_quick_and_overrides() {
        let o = p(&[]).unwrap().unwrap();
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.reps, 3);
        assert_eq!(o.backends, vec![Kind::Qsd, Kind::Vubd]);
        let o = p(&["--duration", "2", "--quick"]).unwrap().unwrap();
        assert_eq!(o.duration, Duration::from_secs(2));
        assert_eq!(o.reps, 1);
        let o = p(&[
            "--configs=raw,null",
            "--backends",
            "qsd",
            "--setups",
            "poll",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.configs, vec![Config::Raw, Config::Null]);
        assert_eq!(o.backends, vec![Kind::Qsd]);
        assert_eq!(o.setups, vec![Setup::Poll]);
        let o = p(&["--setups", "poll,defaults,1q-def"]).unwrap().unwrap();
        assert_eq!(
            o.setups,
            vec![
                Setup::Poll,
                Setup::OneQueueDefaults,
                Setup::TwoQueuesDefaults,
                Setup::PollDefaults
            ]
        );
        let o = p(&["--setups=tuned"]).unwrap().unwrap();
        assert_eq!(o.setups, Setup::TUNED.to_vec());
        assert!(p(&["--setups", "bogus"]).is_err());
        assert!(p(&["--help"]).unwrap().is_none());
        assert!(p(&["--bogus"]).is_err());
        assert!(p(&["--configs", "nope"]).is_err());
        assert!(p(&["--reps", "0"]).is_err());
        assert!(p(&["--duration"]).is_err());
    }

    #[test]
    fn qcow2_configs() {
        let o = p(&[]).unwrap().unwrap();
        assert_eq!(o.configs, vec![Config::Null, Config::Raw, Config::Qcow2]);
        let o = p(&["--quick", "--configs", "qcow2-meta,qcow2-fresh"])
            .unwrap()
            .unwrap();
        assert_eq!(o.configs, vec![Config::Qcow2Meta, Config::Qcow2Fresh]);
        let o = p(&["--configs=qcow2-fresh,qcow2-all"]).unwrap().unwrap();
        assert_eq!(
            o.configs,
            vec![Config::Qcow2Fresh, Config::Qcow2, Config::Qcow2Meta]
        );
        let o = p(&["--configs", "all"]).unwrap().unwrap();
        assert_eq!(o.configs, Config::ALL.to_vec());
        let o = p(&["--configs", "default,qcow2-meta"]).unwrap().unwrap();
        assert_eq!(
            o.configs,
            vec![Config::Null, Config::Raw, Config::Qcow2, Config::Qcow2Meta]
        );
        let o = p(&["--configs", "qcow2-fresh", "--small-pages"])
            .unwrap()
            .unwrap();
        assert!(o.small_pages);
        assert_eq!(o.pass_mib, 2048);
        let o = p(&["--quick"]).unwrap().unwrap();
        assert_eq!((o.image_mib, o.pass_mib), (256, 1024));
        let o = p(&["--pass-size=4096", "--quick"]).unwrap().unwrap();
        assert_eq!(o.pass_mib, 4096);
        assert!(p(&["--pass-size", "8"]).is_err());
        assert!(p(&["--configs", "qcow2-prealloc"]).is_err());
        assert!(p(&["--configs", ","]).is_err());
        assert!(USAGE.contains("qcow2-meta") && USAGE.contains("qcow2-fresh"));
    }
}
