//! Sending QMP messages. Replies and events for one session go through one
//! writer, so messages never interleave; the bytes are queued and written
//! by the session's own writer thread, so a client that reads slowly (or
//! not at all) never holds up the control thread, which serves every
//! other monitor and the block graph. A client that lets more than
//! `MAX_QUEUED` bytes pile up is disconnected.

use super::json;
use serde_json::Value;
use std::collections::VecDeque;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Bytes a session may have waiting to be written before it is dropped.
pub const MAX_QUEUED: usize = 256 << 20;

#[derive(Default)]
struct Outbox {
    messages: VecDeque<Vec<u8>>,
    queued: usize,
    /// The connection failed or was dropped; nothing more is written.
    closed: bool,
    /// The client finished: what is queued is written, nothing new taken.
    finishing: bool,
}

pub struct Writer {
    outbox: Mutex<Outbox>,
    ready: Condvar,
    /// Used only to shut the connection down.
    stream: UnixStream,
    pretty: bool,
}

impl Writer {
    /// A writer for `stream`, with its thread started.
    pub fn spawn(stream: UnixStream, pretty: bool, name: String) -> std::io::Result<Arc<Self>> {
        let writer = Arc::new(Writer {
            outbox: Mutex::new(Outbox::default()),
            ready: Condvar::new(),
            stream: stream.try_clone()?,
            pretty,
        });
        let w = writer.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || w.run(stream))?;
        Ok(writer)
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues one message, followed by CRLF as QEMU sends it.
    pub fn send(&self, msg: &Value) -> std::io::Result<()> {
        let mut text = json::to_vec(msg, self.pretty)?;
        text.extend_from_slice(b"\r\n");
        let mut outbox = self.lock();
        if outbox.closed || outbox.finishing {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "monitor connection closed",
            ));
        }
        if outbox.queued + text.len() > MAX_QUEUED {
            outbox.closed = true;
            drop(outbox);
            self.close();
            return Err(std::io::Error::other(format!(
                "client left more than {MAX_QUEUED} bytes unread; disconnected"
            )));
        }
        outbox.queued += text.len();
        outbox.messages.push_back(text);
        self.ready.notify_one();
        Ok(())
    }

    /// Stops writing and shuts the connection, which also ends the
    /// session's reading thread.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
        // The peer may already be gone; nothing to do then.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Writes what is queued, then shuts the connection down.
    pub fn finish(&self) {
        self.lock().finishing = true;
        self.ready.notify_one();
    }

    fn run(&self, mut stream: UnixStream) {
        loop {
            let text = {
                let mut outbox = self.lock();
                loop {
                    if outbox.closed {
                        return;
                    }
                    if let Some(text) = outbox.messages.pop_front() {
                        outbox.queued -= text.len();
                        break text;
                    }
                    if outbox.finishing {
                        drop(outbox);
                        self.close();
                        return;
                    }
                    outbox = self
                        .ready
                        .wait(outbox)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            if let Err(e) = stream.write_all(&text) {
                log::info!("monitor connection: {e}");
                self.close();
                return;
            }
        }
    }
}
