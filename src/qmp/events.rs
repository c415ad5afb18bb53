//! Delivering events to every monitor that finished capability
//! negotiation.

use super::writer::Writer;
use crate::qapi::Event;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Default)]
pub struct EventHub {
    listeners: Vec<(u64, Arc<Writer>)>,
}

/// The `timestamp` member of an event.
pub fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

/// The whole message of an event.
pub fn message(event: &Event) -> Value {
    let mut msg = serde_json::Map::new();
    msg.insert("timestamp".into(), timestamp());
    msg.insert("event".into(), Value::String(event.name().to_string()));
    match event.data() {
        Ok(Some(data)) => {
            msg.insert("data".into(), data);
        }
        Ok(None) => {}
        Err(e) => log::error!("event {} cannot be serialized: {e}", event.name()),
    }
    Value::Object(msg)
}

impl EventHub {
    pub fn add(&mut self, session: u64, writer: Arc<Writer>) {
        self.listeners.push((session, writer));
    }

    pub fn remove(&mut self, session: u64) {
        self.listeners.retain(|(id, _)| *id != session);
    }

    /// Sends an event to every negotiated monitor; a monitor that cannot
    /// take it is dropped (its session thread notices the closed socket).
    pub fn emit(&mut self, event: &Event) {
        let msg = message(event);
        log::debug!("event {}", event.name());
        self.listeners.retain(|(id, w)| match w.send(&msg) {
            Ok(()) => true,
            Err(e) => {
                log::info!("monitor session {id} dropped: {e}");
                false
            }
        });
    }
}
