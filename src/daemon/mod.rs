//! The control plane: one thread that owns the block graph and runs every
//! command, fed by a channel from the monitor sessions and the signal
//! thread. Startup turns the command line into the same operations the
//! QMP commands perform.

pub mod process;

use crate::block::graph::Graph;
use crate::block::open::add_node;
use crate::cli::{CliItem, Invocation, OptionValue};
use crate::error::QmpError;
use crate::export::manager::Exports;
use crate::export::vhost_user::polling::{Adaptive, PollPolicy, DEFAULT_POLL_MAX_NS};
use crate::iothread::IoThreads;
use crate::qapi::{self, rt, BlockdevOptions};
use crate::qmp::commands::{version_info, Cx};
use crate::qmp::events::EventHub;
use crate::qmp::server;
use crate::qmp::session::Request;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

/// What reaches the control thread.
pub enum ControlMsg {
    /// A command from a monitor session.
    Execute(Box<Request>),
    /// A monitor connection ended.
    SessionClosed(u64),
    /// SIGTERM, SIGINT or SIGHUP arrived.
    Signal(i32),
}

/// A startup step that failed, named by its option.
#[derive(Debug, thiserror::Error)]
#[error("{option}: {desc}")]
pub struct StartError {
    pub option: &'static str,
    pub desc: String,
}

fn start_error(option: &'static str, desc: impl ToString) -> StartError {
    StartError {
        option,
        desc: desc.to_string(),
    }
}

pub struct Daemon {
    pub graph: Graph,
    pub events: EventHub,
    pub exports: Exports,
    pub iothreads: IoThreads,
    /// Monitor socket files to remove at exit.
    sockets: Vec<PathBuf>,
    quit: bool,
    tx: Sender<ControlMsg>,
    rx: Receiver<ControlMsg>,
    next_session: Arc<AtomicU64>,
}

impl Default for Daemon {
    fn default() -> Self {
        Self::new()
    }
}

impl Daemon {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Daemon {
            graph: Graph::default(),
            events: EventHub::default(),
            exports: Exports::default(),
            iothreads: IoThreads::default(),
            sockets: Vec::new(),
            quit: false,
            tx,
            rx,
            next_session: Arc::new(AtomicU64::new(1)),
        }
    }

    /// A sender for threads that feed the control plane (signals).
    pub fn sender(&self) -> Sender<ControlMsg> {
        self.tx.clone()
    }

    /// Carries out the command line, in order.
    pub fn start(&mut self, inv: &Invocation) -> Result<(), StartError> {
        let chardevs: Vec<&crate::cli::ChardevSpec> = inv
            .items
            .iter()
            .filter_map(|i| match i {
                CliItem::Chardev(c) => Some(c),
                _ => None,
            })
            .collect();
        for item in &inv.items {
            match item {
                CliItem::Blockdev(v) => {
                    let opts: BlockdevOptions =
                        read_option(v).map_err(|e| start_error("--blockdev", e))?;
                    self.graph
                        .change(|g| add_node(g, &opts).map(|_| ()))
                        .map_err(|e| start_error("--blockdev", e))?;
                }
                CliItem::Export(v) => {
                    let opts: qapi::BlockExportOptions =
                        read_option(v).map_err(|e| start_error("--export", e))?;
                    self.exports
                        .add(&mut self.graph, &mut self.iothreads, &opts)
                        .map_err(|e| start_error("--export", e))?;
                }
                CliItem::Object(v) => self.add_object(v)?,
                CliItem::Chardev(_) => {}
                CliItem::Monitor(m) => {
                    let chardev = chardevs.iter().find(|c| c.id == m.chardev).ok_or_else(|| {
                        start_error("--monitor", format!("chardev \"{}\" not found", m.chardev))
                    })?;
                    if chardev.wait {
                        log::warn!(
                            "chardev '{}': wait=on is not supported; vubd does not wait for a client",
                            chardev.id
                        );
                    }
                    self.add_monitor(&chardev.path, m.pretty)?;
                }
            }
        }
        Ok(())
    }

    fn add_object(&mut self, v: &OptionValue) -> Result<(), StartError> {
        let opts: qapi::ObjectOptions = read_option(v).map_err(|e| start_error("--object", e))?;
        self.object_add(&opts)
            .map_err(|e| start_error("--object", e))
    }

    /// object-add and --object.
    pub fn object_add(&mut self, opts: &qapi::ObjectOptions) -> Result<(), QmpError> {
        match &opts.u {
            qapi::ObjectOptionsBranch::Iothread(t) => {
                let poll = iothread_polling(t)?;
                self.iothreads.add(&opts.id, poll)
            }
            other => Err(QmpError::generic(format!(
                "object type '{}' is not available in this build of vubd yet",
                other.qom_type()
            ))),
        }
    }

    fn add_monitor(&mut self, path: &std::path::Path, pretty: bool) -> Result<(), StartError> {
        let listener = server::listen(path).map_err(|e| {
            start_error(
                "--chardev",
                format!("Failed to bind socket to {}: {e}", path.display()),
            )
        })?;
        self.sockets.push(path.to_path_buf());
        server::spawn_acceptor(
            listener,
            pretty,
            greeting(),
            self.tx.clone(),
            self.next_session.clone(),
        )
        .map_err(|e| start_error("--monitor", e))?;
        log::info!("monitor listening on {}", path.display());
        Ok(())
    }

    pub fn request_quit(&mut self, why: &str) {
        log::info!("shutting down: {why}");
        self.quit = true;
    }

    pub fn delete_node(&mut self, name: &str) -> Result<(), QmpError> {
        self.graph.change(|g| g.remove_node(name))?;
        log::info!("node '{name}' deleted");
        Ok(())
    }

    /// Runs commands until asked to quit.
    pub fn run(&mut self) {
        while !self.quit {
            let Ok(msg) = self.rx.recv() else { break };
            match msg {
                ControlMsg::Execute(req) => self.execute(&req),
                ControlMsg::SessionClosed(id) => {
                    self.events.remove(id);
                    log::info!("monitor session {id} closed");
                }
                ControlMsg::Signal(sig) => self.request_quit(&format!("signal {sig}")),
            }
        }
    }

    fn execute(&mut self, req: &Request) {
        log::debug!("session {}: {}", req.session, req.name);
        let result = {
            let mut cx = Cx {
                daemon: self,
                request: req,
            };
            qapi::dispatch(&mut cx, &req.name, &req.args)
        };
        let result = result.unwrap_or_else(|| Err(QmpError::command_not_found(&req.name)));
        req.reply(result);
        // The session may have gone; it no longer waits then.
        let _ = req.done.send(());
    }

    /// Stops serving and releases everything: monitor sockets are removed,
    /// images flushed, unlocked and closed.
    pub fn shutdown(&mut self) {
        self.exports.stop_all(&mut self.graph);
        for path in self.sockets.drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("removing {}: {e}", path.display());
            }
        }
        for node in self.graph.nodes().iter().rev() {
            if let Err(e) = node.driver.close() {
                log::error!("closing node '{}': {e}", node.name);
            }
        }
        self.graph = Graph::default();
    }
}

/// An iothread's polling from its properties, refusing negative values as
/// QEMU does. The time adapts up to `poll-max-ns` (QEMU's default 32768;
/// 0 turns polling off).
fn iothread_polling(t: &qapi::IothreadProperties) -> Result<PollPolicy, QmpError> {
    let value = |name: &str, v: Option<i64>, default: u64| -> Result<u64, QmpError> {
        match v {
            None => Ok(default),
            Some(v) => u64::try_from(v).map_err(|_| {
                QmpError::generic(format!("{name} value must be in range [0, {}]", i64::MAX))
            }),
        }
    };
    Ok(PollPolicy::Adaptive(Adaptive {
        max_ns: value("poll-max-ns", t.poll_max_ns, DEFAULT_POLL_MAX_NS)?,
        grow: value("poll-grow", t.poll_grow, 0)?,
        shrink: value("poll-shrink", t.poll_shrink, 0)?,
    }))
}

/// Reads a command-line option into its schema type, strictly for JSON and
/// converting strings for keyval.
fn read_option<T: rt::FromQapi>(v: &OptionValue) -> Result<T, rt::InputError> {
    match v {
        OptionValue::Json(v) => rt::read(v, rt::Syntax::Json),
        OptionValue::Keyval(v) => rt::read(v, rt::Syntax::Keyval),
    }
}

/// The greeting every monitor connection starts with.
pub fn greeting() -> Value {
    let v = version_info();
    json!({"QMP": {"version": v, "capabilities": ["oob"]}})
}
