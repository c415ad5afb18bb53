//! Sending QMP messages: replies and events share one writer per session,
//! so messages never interleave.

use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, PoisonError};

pub struct Writer {
    stream: Mutex<UnixStream>,
    pretty: bool,
}

impl Writer {
    pub fn new(stream: UnixStream, pretty: bool) -> Self {
        Writer {
            stream: Mutex::new(stream),
            pretty,
        }
    }

    /// Writes one message followed by CRLF, as QEMU does.
    pub fn send(&self, msg: &Value) -> std::io::Result<()> {
        let mut text = if self.pretty {
            serde_json::to_vec_pretty(msg)?
        } else {
            serde_json::to_vec(msg)?
        };
        text.extend_from_slice(b"\r\n");
        let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        stream.write_all(&text)
    }
}
