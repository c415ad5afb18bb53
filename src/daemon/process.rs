//! Process-level chores: going to the background, the pid file, and
//! turning signals into control messages.

use super::ControlMsg;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

/// The background child's promise to tell its parent when it is ready.
pub struct ReadyPipe {
    write: File,
}

impl ReadyPipe {
    /// Tells the waiting parent to exit successfully, then detaches the
    /// standard streams (the parent's terminal may go away).
    pub fn ready(mut self) -> std::io::Result<()> {
        self.write.write_all(b"1")?;
        detach_stdio()
    }
}

fn detach_stdio() -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors with a valid open fd;
        // nothing in vubd keeps a borrowed view of fds 0-2.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Forks into the background, as qemu-storage-daemon does: the parent
/// waits until the child reports ready (then exits 0) or fails (then exits
/// 1; the child has printed why). Must run before any thread is started.
pub fn daemonize() -> std::io::Result<ReadyPipe> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is still single-threaded (the caller's
    // contract), so the child may continue running Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        drop(write_end);
        let mut byte = [0u8; 1];
        let ok = matches!(File::from(read_end).read(&mut byte), Ok(1));
        std::process::exit(if ok { 0 } else { 1 });
    }
    drop(read_end);
    // SAFETY: setsid only changes the calling process's session.
    if unsafe { libc::setsid() } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ReadyPipe {
        write: File::from(write_end),
    })
}

/// A pid file, locked while vubd runs and removed at exit.
pub struct Pidfile {
    path: PathBuf,
    _file: File,
}

impl Pidfile {
    pub fn create(path: &Path) -> Result<Self, String> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("Cannot open pid file: {e}"))?;
        // SAFETY: lockf on a descriptor owned by `file`.
        if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("Cannot lock pid file: {e}"));
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| format!("Failed to write pid file: {e}"))?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("removing pid file {}: {e}", self.path.display());
        }
    }
}

/// Forwards SIGTERM, SIGINT and SIGHUP to the control plane.
pub fn forward_signals(tx: Sender<ControlMsg>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(ControlMsg::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .map(|_| ())
}
