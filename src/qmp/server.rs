//! Monitor sockets: listening on a UNIX socket that only its owner can
//! connect to, and a thread per connection.

use super::session::Session;
use super::writer::Writer;
use crate::daemon::ControlMsg;
use serde_json::Value;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Binds a listening socket at `path` with mode 0600. A stale socket file
/// left by an earlier run is replaced; any other file is an error.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    // The socket file takes its mode from the umask at bind time; there is
    // no way to set it on the descriptor first. Sockets are only created on
    // the control thread, and nothing else in vubd depends on the umask.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    result
}

/// Accepts connections on `listener`, each served by its own thread.
pub fn spawn_acceptor(
    listener: UnixListener,
    pretty: bool,
    greeting: Value,
    control: Sender<ControlMsg>,
    next_session: Arc<AtomicU64>,
    clients: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let id = next_session.fetch_add(1, Ordering::SeqCst);
                        if let Err(e) =
                            start_session(stream, id, pretty, &greeting, &control, &clients)
                        {
                            log::warn!("monitor session {id} not started: {e}");
                        }
                    }
                    Err(e) => log::warn!("accepting a monitor connection: {e}"),
                }
            }
        })
        .map(|_| ())
}

fn start_session(
    stream: UnixStream,
    id: u64,
    pretty: bool,
    greeting: &Value,
    control: &Sender<ControlMsg>,
    clients: &Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let writer = Writer::spawn(stream.try_clone()?, pretty, format!("qmp-{id}-out"))?;
    let session = Session {
        id,
        writer,
        negotiated: Arc::new(AtomicBool::new(false)),
        oob: Arc::new(AtomicBool::new(false)),
        control: control.clone(),
        clients: clients.clone(),
    };
    let greeting = greeting.clone();
    log::info!("monitor session {id} connected");
    std::thread::Builder::new()
        .name(format!("qmp-{id}"))
        .spawn(move || session.run(stream, &greeting))
        .map(|_| ())
}
