//! Starting and stopping storage daemons (vubd or the reference
//! qemu-storage-daemon) for the integration tests.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::qmp::{Incoming, Qmp};
use super::{poll_until, TempDir};
use serde_json::json;

/// How long a daemon may take to come up before the test fails.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Name of the reference daemon on PATH.
pub const QSD: &str = "qemu-storage-daemon";

/// Which program a [`Daemon`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Vubd,
    Qsd,
}

impl Flavor {
    pub fn program(self) -> PathBuf {
        match self {
            Flavor::Vubd => PathBuf::from(env!("CARGO_BIN_EXE_vubd")),
            Flavor::Qsd => PathBuf::from(QSD),
        }
    }

    /// The daemon under test: vubd, unless `VUBD_TEST_BINARY=qsd` asks for
    /// the reference daemon (to check the tests themselves).
    pub fn under_test() -> Flavor {
        match std::env::var("VUBD_TEST_BINARY").as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => Flavor::Qsd,
            Ok("") | Ok("vubd") | Err(_) => Flavor::Vubd,
            Ok(other) => panic!("VUBD_TEST_BINARY={other}: expected `vubd` or `qsd`"),
        }
    }
}

/// True when qemu-storage-daemon can be run.
pub fn qsd_available() -> bool {
    Command::new(QSD)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Monitor sockets of running qsd instances (see [`Qmp::connect`]).
static QSD_SOCKETS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// True if `path` is a monitor socket of a qsd started by the harness.
pub fn is_qsd_socket(path: &Path) -> bool {
    let list = QSD_SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    list.iter().any(|p| p == path)
}

/// Reads a pidfile; `Some(pid)` only once it holds a complete "<pid>\n".
pub fn read_pidfile(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.strip_suffix('\n')?.trim().parse().ok()
}

/// Collects everything a child writes to one of its pipes.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// Configures a daemon before it starts.  Arguments may contain `{dir}`,
/// replaced by the daemon's temporary directory.
pub struct DaemonBuilder {
    flavor: Flavor,
    dir: TempDir,
    args: Vec<String>,
    monitors: Vec<String>,
    pidfile: bool,
    daemonize: bool,
    wait: bool,
}

impl DaemonBuilder {
    fn new(flavor: Flavor, args: &[&str]) -> DaemonBuilder {
        DaemonBuilder {
            flavor,
            dir: TempDir::new("vubd-test"),
            args: args.iter().map(|s| s.to_string()).collect(),
            monitors: Vec::new(),
            pidfile: false,
            daemonize: false,
            wait: true,
        }
    }

    /// The directory the daemon will run in; create images here first.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Adds the QMP monitor `mon0` on `<dir>/qmp.sock`.
    pub fn monitor(self) -> Self {
        self.named_monitor("mon0")
    }

    /// Adds a QMP monitor on chardev `id` listening on `<dir>/<id>.sock`
    /// (`mon0` uses `<dir>/qmp.sock`).
    pub fn named_monitor(mut self, id: &str) -> Self {
        self.monitors.push(id.to_string());
        self
    }

    /// Adds `--pidfile <dir>/pid`; start waits until it holds the pid.
    pub fn pidfile(mut self) -> Self {
        self.pidfile = true;
        self
    }

    /// Adds `--daemonize` (and `--pidfile`): start waits for the
    /// foreground process to exit and does no readiness polling.
    pub fn daemonize(mut self) -> Self {
        self.daemonize = true;
        self.pidfile = true;
        self
    }

    /// Start without waiting for the monitor socket or pidfile.
    pub fn no_wait(mut self) -> Self {
        self.wait = false;
        self
    }

    fn socket_path(dir: &Path, id: &str) -> PathBuf {
        if id == "mon0" {
            dir.join("qmp.sock")
        } else {
            dir.join(format!("{id}.sock"))
        }
    }

    /// The full argument list, with `{dir}` substituted.
    pub fn command_line(&self) -> Vec<String> {
        let dir = self.dir.path().to_str().expect("temp dir path is UTF-8");
        let mut args: Vec<String> = self.args.iter().map(|a| a.replace("{dir}", dir)).collect();
        for id in &self.monitors {
            let path = Self::socket_path(self.dir.path(), id);
            args.push("--chardev".into());
            args.push(format!(
                "socket,id={id},path={},server=on,wait=off",
                path.display()
            ));
            args.push("--monitor".into());
            args.push(format!("chardev={id}"));
        }
        if self.pidfile {
            args.push("--pidfile".into());
            args.push(format!("{dir}/pid"));
        }
        if self.daemonize {
            args.push("--daemonize".into());
        }
        args
    }

    /// Starts the daemon; panics (with its stderr) if it does not come up.
    pub fn start(self) -> Daemon {
        let mut args = self.command_line();
        // qsd's readiness signal is its pidfile (see wait_ready); give it
        // one when the test did not ask for it.
        let ready_pidfile = (self.flavor == Flavor::Qsd
            && self.wait
            && !self.pidfile
            && !self.daemonize
            && !self.monitors.is_empty())
        .then(|| self.dir.path().join("qsd-ready.pid"));
        if let Some(path) = &ready_pidfile {
            args.push("--pidfile".into());
            args.push(path.to_str().unwrap().to_string());
        }
        let program = self.flavor.program();
        let mut child = Command::new(&program)
            .args(&args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let sockets: Vec<PathBuf> = self
            .monitors
            .iter()
            .map(|id| Self::socket_path(self.dir.path(), id))
            .collect();
        let pidfile = self.pidfile.then(|| self.dir.path().join("pid"));
        if self.flavor == Flavor::Qsd {
            let mut list = QSD_SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
            list.extend(sockets.iter().cloned());
        }
        let mut d = Daemon {
            flavor: self.flavor,
            child: Some(child),
            exit: None,
            daemon_pid: None,
            dir: self.dir,
            args,
            sockets,
            pidfile,
            ready_pidfile,
            stdout,
            stderr,
        };
        if self.daemonize {
            let status = d.wait_exit(STARTUP_TIMEOUT);
            match status {
                Some(s) if s.success() => {}
                other => panic!(
                    "--daemonize foreground process: {other:?}\n{}",
                    d.describe()
                ),
            }
            // Readiness is promised by the exit itself: no polling here.
            d.daemon_pid = d.pidfile.as_deref().and_then(read_pidfile);
            d.child = None;
            return d;
        }
        if self.wait {
            d.wait_ready();
        }
        d
    }
}

/// A running daemon, SIGKILLed on drop, with its own temporary directory.
pub struct Daemon {
    flavor: Flavor,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    /// Pid read from the pidfile after `--daemonize`.
    daemon_pid: Option<u32>,
    args: Vec<String>,
    sockets: Vec<PathBuf>,
    pidfile: Option<PathBuf>,
    /// Pidfile added by the harness to see when qsd is ready.
    ready_pidfile: Option<PathBuf>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    // Declared last so that it is removed after the process is gone.
    dir: TempDir,
}

impl Daemon {
    /// The daemon under test (vubd, or qsd with `VUBD_TEST_BINARY=qsd`).
    pub fn vubd(args: &[&str]) -> DaemonBuilder {
        DaemonBuilder::new(Flavor::under_test(), args)
    }

    /// The reference qemu-storage-daemon.
    pub fn qsd(args: &[&str]) -> DaemonBuilder {
        DaemonBuilder::new(Flavor::Qsd, args)
    }

    pub fn with_flavor(flavor: Flavor, args: &[&str]) -> DaemonBuilder {
        DaemonBuilder::new(flavor, args)
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid of the daemon (after `--daemonize`: the one in the pidfile).
    pub fn pid(&self) -> u32 {
        match (&self.child, self.daemon_pid) {
            (Some(c), _) => c.id(),
            (None, Some(pid)) => pid,
            (None, None) => panic!("daemon has no known pid\n{}", self.describe()),
        }
    }

    /// Path of the first monitor's socket (`<dir>/qmp.sock` for `mon0`).
    pub fn qmp_socket(&self) -> &Path {
        self.sockets
            .first()
            .expect("daemon was started without .monitor()")
    }

    /// All monitor socket paths, in the order they were added.
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    pub fn pidfile(&self) -> Option<&Path> {
        self.pidfile.as_deref()
    }

    /// Connects to the first monitor and negotiates capabilities.
    pub fn qmp(&self) -> Qmp {
        let (mut qmp, _greeting) = Qmp::connect(self.qmp_socket());
        qmp.negotiate();
        qmp
    }

    /// Waits for the pidfile, then for each monitor to complete a
    /// session (greeting and `qmp_capabilities`), failing fast if the
    /// daemon exits.
    ///
    /// qsd 10.0.2 copes badly with clients that connect while it starts:
    /// under load such a client sometimes gets the greeting twice, no
    /// answer, or EOF, and qsd itself has crashed with SIGSEGV.  So with
    /// qsd the harness waits for a pidfile (adding one if the test did
    /// not), lets it settle briefly, makes the first session itself and
    /// retries that session until it works.  With vubd there is no such
    /// allowance: any misbehaviour fails the test.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let strict = self.flavor != Flavor::Qsd;
        let mut pending: Vec<PathBuf> = self.sockets.clone();
        let pidfile = self.pidfile.clone().or(self.ready_pidfile.clone());
        let mut settled = strict;
        loop {
            let pid_ok = pidfile.as_deref().is_none_or(|p| read_pidfile(p).is_some());
            if pid_ok && !settled {
                thread::sleep(Duration::from_millis(20));
                settled = true;
            }
            // Clients may connect once the pidfile is written (documented
            // by qsd); connect no earlier than that.
            while pid_ok && !pending.is_empty() {
                let Ok(stream) = UnixStream::connect(&pending[0]) else {
                    break;
                };
                match probe_session(stream) {
                    Ok(()) => {
                        pending.remove(0);
                    }
                    Err(e) if strict || self.try_wait().is_some() => {
                        self.wait_exit(Duration::from_secs(1));
                        panic!(
                            "monitor {} misbehaved during startup: {e}\n{}",
                            pending[0].display(),
                            self.describe()
                        );
                    }
                    Err(e) => eprintln!(
                        "qsd startup hiccup on {}: {e}; retrying",
                        pending[0].display()
                    ),
                }
            }
            if pending.is_empty() && pid_ok {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "daemon exited during startup with {status}\n{}",
                    self.describe()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "daemon not ready after {STARTUP_TIMEOUT:?}\n{}",
                    self.describe()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exit = child.try_wait().expect("try_wait");
            }
        }
        self.exit
    }

    /// Waits for the (non-daemonized) process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_wait().is_some());
        self.exit
    }

    /// Waits until a process with this pid no longer exists (or is a
    /// zombie); for daemonized processes, which are not our children.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let pid = self.pid();
        poll_until(timeout, || !process_alive(pid))
    }

    /// Sends a signal by name ("TERM", "INT", "KILL", ...) with kill(1).
    pub fn send_signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -s {sig} {} failed", self.pid());
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// User plus system CPU time the daemon used so far (all threads),
    /// from /proc, at the clock-tick resolution.
    #[allow(dead_code)]
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("cannot read the daemon's /proc stat");
        // Fields after the command name, which is in parentheses.
        let rest = &stat[stat.rfind(')').expect("malformed stat") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5), here 11 and 12.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_nanos(ticks * 1_000_000_000 / hz)
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Command line, exit status and output, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {} {}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.flavor.program().display(),
            self.args.join(" "),
            self.exit,
            self.stdout(),
            self.stderr()
        )
    }
}

/// One complete QMP session: greeting, `qmp_capabilities`, success.
fn probe_session(stream: UnixStream) -> Result<(), String> {
    const T: Duration = Duration::from_secs(2);
    let mut qmp = Qmp::from_stream(stream);
    match qmp.read_incoming(T) {
        Incoming::Message(m) if m.get("QMP").is_some() => {}
        other => return Err(format!("expected the greeting, got {other:?}")),
    }
    qmp.try_send_raw("{\"execute\": \"qmp_capabilities\"}\n")
        .map_err(|e| format!("cannot send qmp_capabilities: {e}"))?;
    match qmp.read_incoming(T) {
        Incoming::Message(m) if m == json!({"return": {}}) => Ok(()),
        other => Err(format!("qmp_capabilities answered {other:?}")),
    }
}

/// True if `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        QSD_SOCKETS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| !self.sockets.contains(p));
        if let Some(child) = self.child.as_mut() {
            if self.exit.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        } else if let Some(pid) = self.daemon_pid {
            if process_alive(pid) {
                let _ = Command::new("kill")
                    .args(["-s", "KILL", &pid.to_string()])
                    .status();
                poll_until(Duration::from_secs(2), || !process_alive(pid));
            }
        }
    }
}
