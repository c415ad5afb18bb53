//! One monitor connection: the greeting, reading and checking requests,
//! capability negotiation, and handing commands to the control plane.
//!
//! Each connection has its own thread that only parses; commands run on
//! the control thread, which writes the reply and then lets this thread
//! read the next request, so a session's commands run in order.

use super::framing::{Frame, Splitter};
use super::writer::Writer;
use crate::daemon::ControlMsg;
use crate::error::QmpError;
use crate::qapi::QapiErrorClass;
use serde_json::{json, Map, Value};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

/// A command sent to the control plane by a session.
pub struct Request {
    pub session: u64,
    pub name: String,
    pub args: Value,
    pub id: Option<Value>,
    pub writer: Arc<Writer>,
    pub negotiated: Arc<AtomicBool>,
    /// Set when the client enabled out-of-band execution.
    pub oob: Arc<AtomicBool>,
    /// Told when the reply has been written.
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

/// `{"return": ...}` or `{"error": ...}`, with the request's id.
pub fn reply_message(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut msg = Map::new();
    match result {
        Ok(v) => {
            msg.insert("return".into(), v);
        }
        Err(e) => {
            msg.insert(
                "error".into(),
                json!({"class": e.class.as_str(), "desc": e.desc}),
            );
        }
    }
    if let Some(id) = id {
        msg.insert("id".into(), id);
    }
    Value::Object(msg)
}

pub struct Session {
    pub id: u64,
    pub writer: Arc<Writer>,
    pub negotiated: Arc<AtomicBool>,
    pub oob: Arc<AtomicBool>,
    pub control: Sender<ControlMsg>,
}

impl Session {
    /// Serves the connection until the client goes away.
    pub fn run(self, mut stream: UnixStream, greeting: &Value) {
        if let Err(e) = self.writer.send(greeting) {
            log::info!("monitor session {}: greeting not delivered: {e}", self.id);
            return;
        }
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = Vec::new();
        loop {
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
                if !self.frame(frame) {
                    return;
                }
            }
        }
        // The control plane may already be gone while shutting down.
        let _ = self.control.send(ControlMsg::SessionClosed(self.id));
    }

    fn error(&self, desc: &str, id: Option<Value>) {
        self.error_class(QmpError::generic(desc), id);
    }

    fn error_class(&self, err: QmpError, id: Option<Value>) {
        if let Err(e) = self.writer.send(&reply_message(Err(err), id)) {
            log::info!("monitor session {}: {e}", self.id);
        }
    }

    /// Handles one frame; false when the control plane is gone.
    fn frame(&self, frame: Frame) -> bool {
        let text = match frame {
            Frame::Message(text) => text,
            Frame::TooLarge => {
                self.error("JSON parse error, message too large", None);
                return true;
            }
            Frame::TooDeep => {
                self.error("JSON parse error, nesting too deep", None);
                return true;
            }
        };
        match serde_json::from_slice::<Value>(&text) {
            Ok(Value::Object(map)) => self.request(map),
            Ok(_) => {
                self.error("QMP input must be a JSON object", None);
                true
            }
            Err(e) => {
                self.error(&format!("JSON parse error, {e}"), None);
                true
            }
        }
    }

    fn request(&self, mut map: Map<String, Value>) -> bool {
        let id = map.remove("id");
        let oob_enabled = self.oob.load(Ordering::SeqCst);
        let allowed =
            |k: &str| matches!(k, "execute" | "arguments") || (k == "exec-oob" && oob_enabled);
        if let Some(k) = map.keys().find(|k| !allowed(k)) {
            self.error(&format!("QMP input member '{k}' is unexpected"), id);
            return true;
        }
        let (name, oob) = match (map.remove("execute"), map.remove("exec-oob")) {
            (Some(Value::String(s)), None) => (s, false),
            (None, Some(Value::String(s))) => (s, true),
            (Some(_), Some(_)) => {
                self.error("QMP input member 'exec-oob' is unexpected", id);
                return true;
            }
            (Some(_), None) => {
                self.error("QMP input member 'execute' must be a string", id);
                return true;
            }
            (None, Some(_)) => {
                self.error("QMP input member 'exec-oob' must be a string", id);
                return true;
            }
            (None, None) => {
                self.error("QMP input lacks member 'execute'", id);
                return true;
            }
        };
        let args = match map.remove("arguments") {
            None => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v,
            Some(_) => {
                self.error("QMP input member 'arguments' must be an object", id);
                return true;
            }
        };
        if oob {
            // No vubd command may run out of band.
            let err = if crate::qapi::IMPLEMENTED_COMMANDS.contains(&name.as_str()) {
                QmpError::generic(format!("The command {name} does not support OOB"))
            } else {
                QmpError::command_not_found(&name)
            };
            self.error_class(err, id);
            return true;
        }
        let negotiated = self.negotiated.load(Ordering::SeqCst);
        if !negotiated && name != "qmp_capabilities" {
            let err = QmpError::with_class(
                QapiErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            self.error_class(err, id);
            return true;
        }
        if negotiated && name == "qmp_capabilities" {
            let err = QmpError::with_class(
                QapiErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            );
            self.error_class(err, id);
            return true;
        }
        let (done, wait) = mpsc::channel();
        let req = Request {
            session: self.id,
            name,
            args,
            id,
            writer: self.writer.clone(),
            negotiated: self.negotiated.clone(),
            oob: self.oob.clone(),
            done,
        };
        if self
            .control
            .send(ControlMsg::Execute(Box::new(req)))
            .is_err()
        {
            return false;
        }
        // The control plane answers every request it takes; an error here
        // means it stopped.
        wait.recv().is_ok()
    }
}
