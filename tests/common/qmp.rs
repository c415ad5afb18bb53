//! A small QMP client with timeouts everywhere, so that a hung daemon
//! fails a test instead of hanging it.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Default time a reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What came (or did not come) from the server.
#[derive(Debug)]
pub enum Incoming {
    Message(Value),
    Eof,
    Timeout,
}

pub struct Qmp {
    stream: UnixStream,
    /// Bytes received but not yet parsed into a message.
    buf: Vec<u8>,
    /// Events that arrived while waiting for replies.
    events: Vec<Value>,
    pub timeout: Duration,
}

impl Qmp {
    /// Connects and reads the greeting, which is returned with the client.
    ///
    /// On the socket of a qsd started by the harness, a refused connection
    /// or one closed before the greeting is retried for up to 2 s: under
    /// load qsd 10.0.2 sometimes refuses or hangs up on a client that
    /// connects right after another one left.  With vubd that fails.
    pub fn connect(path: &Path) -> (Qmp, Value) {
        let tolerant = super::daemon::is_qsd_socket(path);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let retry = tolerant && Instant::now() < deadline;
            let stream = match UnixStream::connect(path) {
                Ok(stream) => stream,
                Err(e) if retry => {
                    eprintln!("qsd refused {}: {e}; retrying", path.display());
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            };
            let mut qmp = Qmp::from_stream(stream);
            let greeting = match qmp.read_incoming(REPLY_TIMEOUT) {
                Incoming::Message(m) => m,
                Incoming::Eof if retry => {
                    eprintln!(
                        "qsd hung up on {} before the greeting; retrying",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                other => panic!("no QMP greeting on {}: {other:?}", path.display()),
            };
            assert!(
                greeting.get("QMP").is_some(),
                "not a QMP greeting: {greeting}"
            );
            return (qmp, greeting);
        }
    }

    pub fn from_stream(stream: UnixStream) -> Qmp {
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).unwrap();
        Qmp {
            stream,
            buf: Vec::new(),
            events: Vec::new(),
            timeout: REPLY_TIMEOUT,
        }
    }

    /// Runs `qmp_capabilities` and checks that it succeeded.
    pub fn negotiate(&mut self) {
        let reply = self.execute("qmp_capabilities", Value::Null);
        assert_eq!(reply, json!({"return": {}}), "qmp_capabilities failed");
    }

    /// Sends a command (`args` Null means no `arguments` member) and returns
    /// the whole reply object; events arriving first are kept aside.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let mut msg = json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        self.send_value(&msg);
        self.read_reply(self.timeout)
    }

    /// Like [`execute`](Self::execute) with an `id` member.
    pub fn execute_with_id(&mut self, cmd: &str, args: Value, id: Value) -> Value {
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        self.send_value(&msg);
        self.read_reply(self.timeout)
    }

    pub fn send_value(&mut self, msg: &Value) {
        self.send_raw(&format!("{msg}\n"));
    }

    /// Sends bytes as they are (for malformed input).
    pub fn send_raw(&mut self, text: &str) {
        self.try_send_raw(text)
            .unwrap_or_else(|e| panic!("cannot send {text:?}: {e}"));
    }

    pub fn try_send_raw(&mut self, text: &str) -> std::io::Result<()> {
        self.stream.write_all(text.as_bytes())
    }

    /// Reads the next message that is not an event; panics on EOF or
    /// timeout.
    pub fn read_reply(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_incoming(left) {
                Incoming::Message(m) if m.get("event").is_some() => self.events.push(m),
                Incoming::Message(m) => return m,
                Incoming::Eof => panic!("connection closed while waiting for a reply"),
                Incoming::Timeout => panic!("no reply within {timeout:?}"),
            }
        }
    }

    /// Reads the next message (event or not); `None` on timeout, panics on
    /// EOF.
    pub fn read_message(&mut self, timeout: Duration) -> Option<Value> {
        match self.read_incoming(timeout) {
            Incoming::Message(m) => Some(m),
            Incoming::Timeout => None,
            Incoming::Eof => panic!("connection closed while waiting for a message"),
        }
    }

    /// Reads the next message, or reports EOF or timeout.
    pub fn read_incoming(&mut self, timeout: Duration) -> Incoming {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(msg) = self.parse_one() {
                return Incoming::Message(msg);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Incoming::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    let rest = String::from_utf8_lossy(&self.buf).trim().to_string();
                    assert!(
                        rest.is_empty(),
                        "connection closed after partial message {rest:?}"
                    );
                    return Incoming::Eof;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Incoming::Timeout
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A reset after the peer exited counts as end of stream.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Incoming::Eof,
                Err(e) => panic!("QMP read error: {e}"),
            }
        }
    }

    /// Waits for the server to close the connection, discarding (but
    /// keeping events of) anything before; false on timeout.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_incoming(left) {
                Incoming::Eof => return true,
                Incoming::Timeout => return false,
                Incoming::Message(m) if m.get("event").is_some() => self.events.push(m),
                Incoming::Message(m) => panic!("unexpected message before EOF: {m}"),
            }
        }
    }

    /// Takes the first complete JSON value out of the buffer.  Messages
    /// are separated by CRLF, but any whitespace between values is fine.
    fn parse_one(&mut self) -> Option<Value> {
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match values.next() {
            Some(Ok(v)) => {
                let used = values.byte_offset();
                self.buf.drain(..used);
                assert!(v.is_object(), "server sent a non-object: {v}");
                Some(v)
            }
            Some(Err(e)) if e.is_eof() => None,
            None => {
                self.buf.clear(); // only whitespace so far
                None
            }
            Some(Err(e)) => panic!(
                "server sent invalid JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Returns and forgets the events received so far.
    pub fn events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Waits for an event called `name` (checking stored ones first).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Some(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = self.read_message(left)?;
            if msg["event"] == name {
                return Some(msg);
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            } else {
                panic!("unexpected reply while waiting for event {name}: {msg}");
            }
        }
    }
}
