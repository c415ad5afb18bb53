//! One monitor connection: the greeting, reading and checking requests,
//! capability negotiation, and handing commands to the control plane.
//!
//! Each connection has a thread that reads and checks requests. In-band
//! commands run on the control thread, in the order they arrived, which
//! writes their replies; a request refused by the checks here keeps its
//! place among them (its error goes through the control thread too when
//! commands are still waiting there). Until the client enables `oob` the
//! session reads its next request only after the last reply, as QEMU
//! does. With `oob` it reads on while up to `MAX_IN_BAND` commands wait,
//! and runs `exec-oob` requests at once on this thread, so their replies
//! may overtake in-band ones.

use super::framing::{Frame, Splitter};
use super::writer::Writer;
use super::{json, oob};
use crate::daemon::ControlMsg;
use crate::error::QmpError;
use crate::qapi::QapiErrorClass;
use serde_json::{json, Map, Value};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

/// In-band commands a session with `oob` may have waiting before it stops
/// reading (QEMU's limit too).
pub const MAX_IN_BAND: usize = 8;

/// What an in-band request asks of the control plane.
pub enum Body {
    /// Run a command.
    Command { name: String, args: Value },
    /// Answer with an error the session found, in the request's turn.
    Refused(QmpError),
}

/// An in-band request sent to the control plane by a session.
pub struct Request {
    pub session: u64,
    pub body: Body,
    pub id: Option<Value>,
    pub writer: Arc<Writer>,
    pub negotiated: Arc<AtomicBool>,
    /// Set when the client enabled out-of-band execution.
    pub oob: Arc<AtomicBool>,
    /// Told when the reply has been queued.
    pub done: Sender<()>,
}

impl Request {
    /// Writes the reply to this request.
    pub fn reply(&self, result: Result<Value, QmpError>) {
        let msg = reply_message(result, self.id.clone());
        if let Err(e) = self.writer.send(&msg) {
            log::info!("monitor session {}: reply not delivered: {e}", self.session);
        }
    }
}

/// `{"return": ...}` or `{"error": ...}`, with the request's id: after the
/// return value, before the error, where QEMU puts it.
pub fn reply_message(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut msg = Map::new();
    match result {
        Ok(v) => {
            msg.insert("return".into(), v);
            if let Some(id) = id {
                msg.insert("id".into(), id);
            }
        }
        Err(e) => {
            if let Some(id) = id {
                msg.insert("id".into(), id);
            }
            msg.insert(
                "error".into(),
                json!({"class": e.class.as_str(), "desc": e.desc}),
            );
        }
    }
    Value::Object(msg)
}

/// A request after the checks that need no control plane.
enum Parsed {
    InBand {
        body: Body,
        id: Option<Value>,
    },
    OutOfBand {
        name: String,
        args: Value,
        id: Option<Value>,
    },
}

fn refused(err: QmpError, id: Option<Value>) -> Parsed {
    Parsed::InBand {
        body: Body::Refused(err),
        id,
    }
}

pub struct Session {
    pub id: u64,
    pub writer: Arc<Writer>,
    pub negotiated: Arc<AtomicBool>,
    pub oob: Arc<AtomicBool>,
    pub control: Sender<ControlMsg>,
    /// Clients connected to the session's chardev now.
    pub clients: Arc<AtomicUsize>,
}

/// The in-band commands of a session that the control plane has not
/// answered yet.
struct InFlight {
    count: usize,
    done_tx: Sender<()>,
    done_rx: Receiver<()>,
}

impl InFlight {
    fn new() -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        InFlight {
            count: 0,
            done_tx,
            done_rx,
        }
    }

    /// Counts the replies written so far, without waiting.
    fn collect(&mut self) {
        while self.count > 0 && self.done_rx.try_recv().is_ok() {
            self.count -= 1;
        }
    }

    /// Waits until at most `limit` commands are unanswered; false when
    /// the control plane is gone.
    fn wait_until(&mut self, limit: usize) -> bool {
        while self.count > limit {
            if self.done_rx.recv().is_err() {
                return false;
            }
            self.count -= 1;
        }
        true
    }
}

impl Session {
    /// Serves the connection until the client goes away.
    pub fn run(self, stream: UnixStream, greeting: &Value) {
        self.clients.fetch_add(1, Ordering::SeqCst);
        self.serve(stream, greeting);
        self.clients.fetch_sub(1, Ordering::SeqCst);
    }

    fn serve(&self, mut stream: UnixStream, greeting: &Value) {
        if let Err(e) = self.writer.send(greeting) {
            log::info!("monitor session {}: greeting not delivered: {e}", self.id);
            return;
        }
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = Vec::new();
        let mut in_flight = InFlight::new();
        let mut serving = true;
        while serving {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::info!("monitor session {}: {e}", self.id);
                    break;
                }
            };
            splitter.push(&buf[..n], &mut frames);
            for frame in frames.drain(..) {
                if serving {
                    serving = self.handle(self.parse(frame), &mut in_flight);
                }
            }
        }
        // Replies to what the client sent before it closed its end are
        // still delivered if it reads them.
        in_flight.wait_until(0);
        self.writer.finish();
        // The control plane may already be gone while shutting down.
        let _ = self.control.send(ControlMsg::SessionClosed(self.id));
    }

    /// Carries out one request; false when the control plane is gone.
    fn handle(&self, parsed: Parsed, in_flight: &mut InFlight) -> bool {
        let (body, id) = match parsed {
            Parsed::OutOfBand { name, args, id } => {
                self.write(reply_message(oob::execute(&name, &args), id));
                return true;
            }
            Parsed::InBand { body, id } => (body, id),
        };
        in_flight.collect();
        if let (Body::Refused(err), 0) = (&body, in_flight.count) {
            // Nothing is ahead of it: answer at once.
            self.write(reply_message(Err(err.clone()), id));
            return true;
        }
        let req = Request {
            session: self.id,
            body,
            id,
            writer: self.writer.clone(),
            negotiated: self.negotiated.clone(),
            oob: self.oob.clone(),
            done: in_flight.done_tx.clone(),
        };
        if self
            .control
            .send(ControlMsg::Execute(Box::new(req)))
            .is_err()
        {
            return false;
        }
        in_flight.count += 1;
        // Without oob the next request is read only after this reply
        // (qmp_capabilities may have just enabled oob, which the next
        // request must see).
        let limit = if self.oob.load(Ordering::SeqCst) {
            MAX_IN_BAND - 1
        } else {
            0
        };
        in_flight.wait_until(limit)
    }

    fn write(&self, msg: Value) {
        if let Err(e) = self.writer.send(&msg) {
            log::info!("monitor session {}: {e}", self.id);
        }
    }

    /// Turns one frame into a request or the error that answers it.
    fn parse(&self, frame: Frame) -> Parsed {
        let generic = |desc: String| refused(QmpError::generic(desc), None);
        let text = match frame {
            Frame::Message(text) => text,
            Frame::TooLarge => return generic("JSON parse error, message too large".into()),
            Frame::TooDeep => return generic("JSON nesting depth limit exceeded".into()),
            Frame::Stray(text) => return generic(format!("JSON parse error, stray '{text}'")),
        };
        match json::parse(&text) {
            Ok(Value::Object(map)) => self.request(map),
            Ok(_) => generic("QMP input must be a JSON object".into()),
            Err(e) => generic(format!("JSON parse error, {e}")),
        }
    }

    fn request(&self, mut map: Map<String, Value>) -> Parsed {
        let id = map.remove("id");
        let oob_enabled = self.oob.load(Ordering::SeqCst);
        let err = |desc: String, id| refused(QmpError::generic(desc), id);
        // An out-of-band request is one with exec-oob and no execute.
        let out_of_band =
            oob_enabled && map.contains_key("exec-oob") && !map.contains_key("execute");
        let allowed =
            |k: &str| matches!(k, "execute" | "arguments") || (k == "exec-oob" && oob_enabled);
        if let Some(k) = map.keys().find(|k| !allowed(k)) {
            return err(format!("QMP input member '{k}' is unexpected"), id);
        }
        let (name, key) = match (map.remove("execute"), map.remove("exec-oob")) {
            (Some(_), Some(_)) => {
                return err(
                    "QMP input member 'execute' clashes with 'exec-oob'".into(),
                    id,
                )
            }
            (Some(v), None) => (v, "execute"),
            (None, Some(v)) => (v, "exec-oob"),
            (None, None) => return err("QMP input lacks member 'execute'".into(), id),
        };
        let Value::String(name) = name else {
            return err(format!("QMP input member '{key}' must be a string"), id);
        };
        let args = match map.remove("arguments") {
            None => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v,
            Some(_) => return err("QMP input member 'arguments' must be an object".into(), id),
        };
        if out_of_band {
            return Parsed::OutOfBand { name, args, id };
        }
        let negotiated = self.negotiated.load(Ordering::SeqCst);
        let refuse = |desc: &str, id| {
            refused(
                QmpError::with_class(QapiErrorClass::CommandNotFound, desc),
                id,
            )
        };
        if !negotiated && name != "qmp_capabilities" {
            return refuse(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                id,
            );
        }
        if negotiated && name == "qmp_capabilities" {
            return refuse(
                "Capabilities negotiation is already complete, command ignored",
                id,
            );
        }
        Parsed::InBand {
            body: Body::Command { name, args },
            id,
        }
    }
}
