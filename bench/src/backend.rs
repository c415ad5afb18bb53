//! The daemons under test: their command lines, starting and stopping them,
//! and reading their CPU time and peak RSS from /proc.
//!
//! vubd takes qemu-storage-daemon's command line, so both are started from
//! the same argument list; only the program differs (and, for several
//! queues, vubd may get one iothread per queue). The defaults setups give
//! both no iothread object and no polling option at all.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Which daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Qsd,
    Vubd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Qsd => "qsd",
            Kind::Vubd => "vubd",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "qsd" => Some(Kind::Qsd),
            "vubd" => Some(Kind::Vubd),
            _ => None,
        }
    }
}

/// The iothreads' polling time, QEMU's default.
const POLL_MAX_NS: u64 = 32768;
/// The `null-throttle` group's operations per second: far above what any
/// workload reaches, so that requests are counted but never held.
const THROTTLE_UNREACHED: u64 = 1_000_000_000;

/// What the exported node sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Config {
    /// `null-co`, no data, no zeroing: the cost of the daemon alone.
    Null,
    /// The same `null-co` node under a `throttle` filter whose group's
    /// limit (10^9 operations per second) is never reached: what the
    /// throttle's bookkeeping costs a request that is never held.
    NullThrottle,
    /// A raw image on a `file` node with `aio=io_uring`, page cache on.
    Raw,
    /// A fully allocated qcow2 image (the raw image converted) on the same
    /// kind of `file` node.
    Qcow2,
    /// A qcow2 image made with `preallocation=metadata`: every cluster is
    /// mapped, but the file under it is a hole, so reads return zeroes and
    /// writes fill the file without allocating clusters.
    Qcow2Meta,
    /// A new, empty qcow2 image: every write to a cluster not written
    /// before allocates it.
    Qcow2Fresh,
}

impl Config {
    pub const ALL: [Config; 6] = [
        Config::Null,
        Config::NullThrottle,
        Config::Raw,
        Config::Qcow2,
        Config::Qcow2Meta,
        Config::Qcow2Fresh,
    ];
    /// What runs when `--configs` is not given.
    pub const DEFAULT: [Config; 3] = [Config::Null, Config::Raw, Config::Qcow2];
    /// The qcow2 images.
    pub const QCOW2: [Config; 3] = [Config::Qcow2, Config::Qcow2Meta, Config::Qcow2Fresh];

    pub fn name(self) -> &'static str {
        match self {
            Config::Null => "null",
            Config::NullThrottle => "null-throttle",
            Config::Raw => "raw",
            Config::Qcow2 => "qcow2",
            Config::Qcow2Meta => "qcow2-meta",
            Config::Qcow2Fresh => "qcow2-fresh",
        }
    }

    pub fn parse(s: &str) -> Option<Config> {
        match s {
            "null" | "null-co" => Some(Config::Null),
            "null-throttle" => Some(Config::NullThrottle),
            "raw" | "file" => Some(Config::Raw),
            "qcow2" => Some(Config::Qcow2),
            "qcow2-meta" => Some(Config::Qcow2Meta),
            "qcow2-fresh" => Some(Config::Qcow2Fresh),
            _ => None,
        }
    }

    /// A name that stands for several configurations.
    pub fn parse_group(s: &str) -> Option<&'static [Config]> {
        match s {
            "all" => Some(&Config::ALL),
            "default" => Some(&Config::DEFAULT),
            "qcow2-all" => Some(&Config::QCOW2),
            _ => None,
        }
    }

    /// Whether the configuration reads and writes an image file.
    pub fn uses_image(self) -> bool {
        !matches!(self, Config::Null | Config::NullThrottle)
    }

    /// The image's file name in the benchmark's directory.
    pub fn image_file(self) -> Option<&'static str> {
        match self {
            Config::Null | Config::NullThrottle => None,
            Config::Raw => Some("bench.img"),
            Config::Qcow2 => Some("bench.qcow2"),
            Config::Qcow2Meta => Some("bench-meta.qcow2"),
            Config::Qcow2Fresh => Some("bench-fresh.qcow2"),
        }
    }

    /// Whether the image holds the benchmark's non-zero data (the others
    /// read as zeroes where nothing was written).
    pub fn holds_data(self) -> bool {
        matches!(self, Config::Raw | Config::Qcow2)
    }

    /// Whether writes change how later writes to the image are served
    /// (clusters or file blocks get allocated), so that the image is made
    /// anew with `qemu-img create` before every session that writes, and
    /// the two daemons find it in the same state.
    pub fn renews_image(self) -> bool {
        matches!(self, Config::Qcow2Meta | Config::Qcow2Fresh)
    }

    /// The format driver of the exported node, for image configurations.
    fn format(self) -> Option<&'static str> {
        match self {
            Config::Null | Config::NullThrottle => None,
            Config::Raw => Some("raw"),
            Config::Qcow2 | Config::Qcow2Meta | Config::Qcow2Fresh => Some("qcow2"),
        }
    }
}

/// How the export's queues map onto iothreads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// One iothread `io0` for the whole export (what qsd 10 can do).
    Single,
    /// One iothread per queue, `iothread.0=io0,iothread.1=io1,...`
    /// (the list form of `iothread`, QEMU 11 syntax, which vubd accepts).
    PerQueue,
    /// No iothread object and no `iothread` option: each daemon's default
    /// (qsd serves the export from its main loop, vubd gives every queue a
    /// private thread).
    Defaults,
}

impl Threads {
    pub fn describe(self, kind: Kind, queues: u32) -> String {
        match (self, kind) {
            (Threads::Single, _) => "1 iothread".to_string(),
            (Threads::PerQueue, _) => format!("{queues} iothreads"),
            (Threads::Defaults, Kind::Qsd) => "the main loop".to_string(),
            (Threads::Defaults, Kind::Vubd) if queues == 1 => "1 private thread".to_string(),
            (Threads::Defaults, Kind::Vubd) => format!("{queues} private threads"),
        }
    }
}

/// Escapes a value for QEMU's keyval syntax (a comma is doubled).
fn keyval_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// The daemon command line for a configuration.
pub fn daemon_args(
    config: Config,
    image: Option<&Path>,
    null_size: u64,
    socket: &Path,
    num_queues: u32,
    threads: Threads,
) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    let file_node = |image: Option<&Path>| -> Result<String, String> {
        let image = image.ok_or_else(|| format!("{} needs an image", config.name()))?;
        Ok(format!(
            "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off",
            keyval_escape(&image.to_string_lossy())
        ))
    };
    match config {
        Config::Null => {
            args.push("--blockdev".to_string());
            args.push(format!(
                "driver=null-co,node-name=n0,size={null_size},read-zeroes=off"
            ));
        }
        Config::NullThrottle => {
            args.push("--object".to_string());
            args.push(format!(
                "throttle-group,id=tg0,limits.iops-total={THROTTLE_UNREACHED}"
            ));
            args.push("--blockdev".to_string());
            args.push(format!(
                "driver=null-co,node-name=nul0,size={null_size},read-zeroes=off"
            ));
            args.push("--blockdev".to_string());
            args.push("driver=throttle,node-name=n0,throttle-group=tg0,file=nul0".to_string());
        }
        Config::Raw | Config::Qcow2 | Config::Qcow2Meta | Config::Qcow2Fresh => {
            let format = config.format().unwrap_or("raw");
            args.push("--blockdev".to_string());
            args.push(file_node(image)?);
            args.push("--blockdev".to_string());
            args.push(format!("driver={format},node-name=n0,file=f0"));
        }
    }
    let n_threads = match threads {
        Threads::Defaults => 0,
        Threads::Single => 1,
        Threads::PerQueue => num_queues.max(1),
    };
    // QEMU's iothreads busy-poll for up to 32 µs by default, vubd's only
    // when asked: both are given the same polling explicitly
    // (VUBD_BENCH_POLL_MAX_NS changes it; 0 turns polling off for both).
    let poll_max_ns = std::env::var("VUBD_BENCH_POLL_MAX_NS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(POLL_MAX_NS);
    for i in 0..n_threads {
        args.push("--object".to_string());
        args.push(format!("iothread,id=io{i},poll-max-ns={poll_max_ns}"));
    }
    let iothread = match threads {
        Threads::Defaults => String::new(),
        Threads::Single => ",iothread=io0".to_string(),
        Threads::PerQueue => (0..n_threads)
            .map(|i| format!(",iothread.{i}=io{i}"))
            .collect(),
    };
    args.push("--export".to_string());
    args.push(format!(
        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}{iothread}",
        keyval_escape(&socket.to_string_lossy())
    ));
    Ok(args)
}

/// Why a daemon did not come up.
#[derive(Debug)]
pub enum StartError {
    Spawn(PathBuf, io::Error),
    Exited { status: ExitStatus, log: String },
    Timeout { log: String },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Spawn(p, e) => write!(f, "cannot run {}: {e}", p.display()),
            StartError::Exited { status, log } => {
                write!(f, "exited during startup ({status})")?;
                if !log.is_empty() {
                    write!(f, ": {log}")?;
                }
                Ok(())
            }
            StartError::Timeout { log } => {
                write!(f, "its socket did not appear in time")?;
                if !log.is_empty() {
                    write!(f, ": {log}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for StartError {}

/// The last lines of a log file, joined with " | ", for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// A running daemon; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program args`, with output going to `log`, and waits for
    /// `socket` to appear. A process that exits first failed to start.
    pub fn start(
        program: &Path,
        args: &[String],
        socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<Daemon, StartError> {
        let _ = fs::remove_file(socket);
        let out = File::create(log).map_err(|e| StartError::Spawn(log.to_path_buf(), e))?;
        let err = out
            .try_clone()
            .map_err(|e| StartError::Spawn(log.to_path_buf(), e))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| StartError::Spawn(program.to_path_buf(), e))?;
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(StartError::Exited {
                    status,
                    log: log_tail(log, 4),
                });
            }
            if socket.exists() {
                break;
            }
            if Instant::now() > deadline {
                return Err(StartError::Timeout {
                    log: log_tail(log, 4),
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
        // A daemon that creates its socket and then gives up on the export
        // (or crashes right away) still counts as failing to start.
        thread::sleep(Duration::from_millis(50));
        if let Ok(Some(status)) = d.child.try_wait() {
            return Err(StartError::Exited {
                status,
                log: log_tail(log, 4),
            });
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `None` while running, else how it ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 4)
    }

    /// CPU seconds (user + system, every thread) used so far.
    pub fn cpu_seconds(&self) -> io::Result<f64> {
        cpu_seconds(self.pid())
    }

    /// Peak RSS (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> io::Result<u64> {
        status_kib(self.pid(), "VmHWM:")
    }

    /// Asks the daemon to quit and waits; kills it if it does not.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if self.exited().is_some() {
            let _ = fs::remove_file(&self.socket);
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: plain kill(2) on our own child's pid, which has not been
            // reaped yet (try_wait above returned None), so it cannot have
            // been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                let _ = fs::remove_file(&self.socket);
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads) from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_ticks(&stat)
        .map(|t| t as f64 / clock_ticks_per_second())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/PID/stat"))
}

/// utime + stime, in clock ticks, from the text of /proc/PID/stat. The
/// command name may contain spaces and parentheses, so fields are counted
/// from the last ')': state is field 3, utime 14 and stime 15.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of /proc/PID/status, e.g. `VmHWM:`.
pub fn status_kib(pid: u32, key: &str) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kib(&status, key)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no {key} in status")))
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The first line of `program --version`, for the report.
pub fn version_of(program: &Path) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_skips_odd_command_names() {
        let s = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_ticks(s), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn status_parsing() {
        let s = "Name:\tqsd\nVmPeak:\t  9000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_status_kib(s, "VmHWM:"), Some(12345));
        assert_eq!(parse_status_kib(s, "VmSwap:"), None);
    }

    #[test]
    fn null_throttle_exports_a_throttle_node_over_null() {
        let sock = Path::new("/tmp/t.sock");
        let a = daemon_args(
            Config::NullThrottle,
            None,
            1 << 30,
            sock,
            1,
            Threads::Defaults,
        )
        .unwrap();
        let line = a.join(" ");
        assert!(line.contains("--object throttle-group,id=tg0,limits.iops-total=1000000000"));
        assert!(line.contains("driver=throttle,node-name=n0,throttle-group=tg0,file=nul0"));
        assert!(line.contains("node-name=n0,addr.type=unix"));
        assert_eq!(Config::parse("null-throttle"), Some(Config::NullThrottle));
    }

    #[test]
    fn command_lines() {
        let sock = Path::new("/tmp/x,y.sock");
        let a = daemon_args(Config::Null, None, 1 << 30, sock, 1, Threads::Single).unwrap();
        assert_eq!(
            a,
            [
                "--blockdev",
                "driver=null-co,node-name=n0,size=1073741824,read-zeroes=off",
                "--object",
                "iothread,id=io0,poll-max-ns=32768",
                "--export",
                "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/x,,y.sock,writable=on,num-queues=1,iothread=io0",
            ]
        );
        let img = Path::new("/var/tmp/a.img");
        let a = daemon_args(Config::Raw, Some(img), 0, sock, 2, Threads::PerQueue).unwrap();
        assert_eq!(
            a[1],
            "driver=file,node-name=f0,filename=/var/tmp/a.img,aio=io_uring,cache.direct=off"
        );
        assert_eq!(a[3], "driver=raw,node-name=n0,file=f0");
        assert_eq!(a[5], "iothread,id=io0,poll-max-ns=32768");
        assert_eq!(a[7], "iothread,id=io1,poll-max-ns=32768");
        assert!(a[9].ends_with("num-queues=2,iothread.0=io0,iothread.1=io1"));
        let a = daemon_args(Config::Qcow2, Some(img), 0, sock, 1, Threads::Single).unwrap();
        assert_eq!(a[3], "driver=qcow2,node-name=n0,file=f0");
        assert!(daemon_args(Config::Raw, None, 0, sock, 1, Threads::Single).is_err());
    }

    #[test]
    fn qcow2_images_share_the_command_line() {
        let sock = Path::new("/tmp/q.sock");
        let img = Path::new("/var/tmp/b,c.qcow2");
        for config in [Config::Qcow2Meta, Config::Qcow2Fresh] {
            let a = daemon_args(config, Some(img), 0, sock, 2, Threads::Single).unwrap();
            assert_eq!(
                a,
                [
                    "--blockdev",
                    "driver=file,node-name=f0,filename=/var/tmp/b,,c.qcow2,aio=io_uring,cache.direct=off",
                    "--blockdev",
                    "driver=qcow2,node-name=n0,file=f0",
                    "--object",
                    "iothread,id=io0,poll-max-ns=32768",
                    "--export",
                    "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/q.sock,writable=on,num-queues=2,iothread=io0",
                ]
            );
            let d = daemon_args(config, Some(img), 0, sock, 1, Threads::Defaults).unwrap();
            assert_eq!(d[3], "driver=qcow2,node-name=n0,file=f0");
            assert!(d.iter().all(|x| !x.contains("iothread")));
            assert!(daemon_args(config, None, 0, sock, 1, Threads::Single).is_err());
        }
    }

    #[test]
    fn config_names_and_properties() {
        for c in Config::ALL {
            assert_eq!(Config::parse(c.name()), Some(c));
            assert_eq!(c.image_file().is_some(), c.uses_image());
        }
        assert_eq!(Config::parse("qcow2-meta"), Some(Config::Qcow2Meta));
        assert_eq!(Config::parse("qcow2-fresh"), Some(Config::Qcow2Fresh));
        assert_eq!(Config::parse("qcow2-new"), None);
        assert_eq!(Config::parse_group("all"), Some(&Config::ALL[..]));
        assert_eq!(
            Config::parse_group("qcow2-all"),
            Some(&[Config::Qcow2, Config::Qcow2Meta, Config::Qcow2Fresh][..])
        );
        assert_eq!(Config::DEFAULT, [Config::Null, Config::Raw, Config::Qcow2]);
        // only the images filled with data are read back as data, and
        // only the new ones are made again
        let data: Vec<_> = Config::ALL.into_iter().filter(|c| c.holds_data()).collect();
        assert_eq!(data, [Config::Raw, Config::Qcow2]);
        let renewed: Vec<_> = Config::ALL
            .into_iter()
            .filter(|c| c.renews_image())
            .collect();
        assert_eq!(renewed, [Config::Qcow2Meta, Config::Qcow2Fresh]);
        // distinct files, so that one configuration never reuses another's
        let mut files: Vec<_> = Config::ALL.iter().filter_map(|c| c.image_file()).collect();
        files.sort_unstable();
        files.dedup();
        assert_eq!(files.len(), 4);
    }

    #[test]
    fn defaults_command_lines_have_no_tuning() {
        let sock = Path::new("/tmp/d.sock");
        let a = daemon_args(Config::Null, None, 1 << 30, sock, 1, Threads::Defaults).unwrap();
        assert_eq!(
            a,
            [
                "--blockdev",
                "driver=null-co,node-name=n0,size=1073741824,read-zeroes=off",
                "--export",
                "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/d.sock,writable=on,num-queues=1",
            ]
        );
        let img = Path::new("/var/tmp/a.img");
        let a = daemon_args(Config::Raw, Some(img), 0, sock, 2, Threads::Defaults).unwrap();
        assert_eq!(
            a,
            [
                "--blockdev",
                "driver=file,node-name=f0,filename=/var/tmp/a.img,aio=io_uring,cache.direct=off",
                "--blockdev",
                "driver=raw,node-name=n0,file=f0",
                "--export",
                "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/d.sock,writable=on,num-queues=2",
            ]
        );
        assert!(a
            .iter()
            .all(|x| !x.contains("poll") && !x.contains("iothread")));
        assert_eq!(Threads::Defaults.describe(Kind::Qsd, 2), "the main loop");
        assert_eq!(
            Threads::Defaults.describe(Kind::Vubd, 2),
            "2 private threads"
        );
    }
}
