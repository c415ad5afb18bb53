//! The control plane: one thread that owns the block graph and runs every
//! command, fed by a channel from the monitor sessions and the signal
//! thread. Startup turns the command line into the same operations the
//! QMP commands perform.

pub mod agenda;
mod control_loop;
pub mod process;
#[cfg(test)]
mod tests;

use crate::block::error::{strerror, BlockError};
use crate::block::graph::{Graph, PendingChange, DRAIN_TIMEOUT};
use crate::block::open::add_node;
use crate::cli::{self, CliItem, Invocation, OptionValue};
use crate::error::QmpError;
use crate::export::manager::Exports;
use crate::iothread::polling::{Adaptive, PollPolicy, DEFAULT_POLL_MAX_NS};
use crate::iothread::IoThreads;
use crate::qapi::{self, rt, BlockdevOptions};
use crate::qmp::commands::version_info;
use crate::qmp::events::EventHub;
use crate::qmp::server;
use crate::qmp::session::Request;
use crate::qom::{self, Chardev};
use agenda::Agenda;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

/// What reaches the control thread.
pub enum ControlMsg {
    /// A command from a monitor session.
    Execute(Box<Request>),
    /// A monitor connection ended.
    SessionClosed(u64),
    /// SIGTERM, SIGINT or SIGHUP arrived.
    Signal(i32),
    /// An I/O thread found an image damaged, or saw a write cross a
    /// node's write threshold.
    Notice(crate::block::notice::Notice),
}

/// A startup step that failed, named by the option it carried out as the
/// user typed it (see [`crate::cli::Definition::origin`]).
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {desc}")]
pub struct StartError {
    pub origin: String,
    pub desc: String,
    /// A further line of advice, as QEMU prints after some errors
    /// (`Is another process using the image [PATH]?`).
    pub hint: Option<String>,
}

impl StartError {
    fn new(origin: &str, desc: impl ToString) -> StartError {
        StartError {
            origin: origin.to_string(),
            desc: desc.to_string(),
            hint: None,
        }
    }

    fn block(origin: &str, e: &BlockError) -> StartError {
        StartError {
            hint: e.hint(),
            ..StartError::new(origin, e)
        }
    }

    fn qmp(origin: &str, e: QmpError) -> StartError {
        StartError {
            origin: origin.to_string(),
            desc: e.desc,
            hint: e.hint,
        }
    }
}

pub struct Daemon {
    pub graph: Graph,
    pub events: EventHub,
    pub exports: Exports,
    pub iothreads: IoThreads,
    /// User-created objects (--object, object-add), as they were given and
    /// since changed by qom-set, in creation order.
    pub objects: Vec<qapi::ObjectOptions>,
    /// Character devices (--chardev), in creation order.
    pub chardevs: Vec<Chardev>,
    /// Monitor socket files to remove at exit.
    sockets: Vec<PathBuf>,
    quit: bool,
    tx: Sender<ControlMsg>,
    rx: Receiver<ControlMsg>,
    next_session: Arc<AtomicU64>,
    /// The graph change the running command began and left waiting for
    /// its drain (see [`Daemon::change_graph`]).
    deferred: Option<PendingChange>,
    /// The command whose change waits for its drain, with its reply.
    waiting: Option<control_loop::Waiting>,
    /// Commands that arrived while a change waited and may not run yet.
    agenda: Agenda<Box<Request>>,
    /// How long a command's change may wait for its drain.
    drain_timeout: Duration,
    /// Some export stopped on an I/O error since the last `cont` (the
    /// run state is io-error; STOP was sent).
    pub stopped_on_error: bool,
}

impl Default for Daemon {
    fn default() -> Self {
        Self::new()
    }
}

impl Daemon {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        let mut graph = Graph::default();
        let notices = tx.clone();
        graph.set_notices(Arc::new(move |c| {
            // The control thread may be gone at exit; nothing to tell then.
            let _ = notices.send(ControlMsg::Notice(c));
        }));
        Daemon {
            graph,
            events: EventHub::default(),
            exports: Exports::default(),
            iothreads: IoThreads::default(),
            objects: Vec::new(),
            chardevs: Vec::new(),
            sockets: Vec::new(),
            quit: false,
            tx,
            rx,
            next_session: Arc::new(AtomicU64::new(1)),
            deferred: None,
            waiting: None,
            agenda: Agenda::default(),
            drain_timeout: DRAIN_TIMEOUT,
            stopped_on_error: false,
        }
    }

    /// A sender for threads that feed the control plane (signals).
    pub fn sender(&self) -> Sender<ControlMsg> {
        self.tx.clone()
    }

    /// Carries out the command line, in order.
    pub fn start(&mut self, inv: &Invocation) -> Result<(), StartError> {
        // The chardevs with the options that defined them.
        let chardevs: Vec<(&crate::cli::ChardevSpec, &str)> = inv
            .items
            .iter()
            .filter_map(|d| match &d.item {
                CliItem::Chardev(c) => Some((c, d.origin.as_str())),
                _ => None,
            })
            .collect();
        for def in &inv.items {
            let origin = def.origin.as_str();
            match &def.item {
                CliItem::Blockdev(v) => {
                    let opts: BlockdevOptions =
                        read_option(v).map_err(|e| StartError::new(origin, e))?;
                    self.graph
                        .change(|g| add_node(g, &opts).map(|_| ()))
                        .map_err(|e| StartError::block(origin, &e))?;
                }
                CliItem::Export(v) => {
                    let opts: qapi::BlockExportOptions =
                        read_option(v).map_err(|e| StartError::new(origin, e))?;
                    self.exports
                        .add(&mut self.graph, &mut self.iothreads, &opts)
                        .map_err(|e| StartError::qmp(origin, e))?;
                }
                CliItem::Object(v) => self.add_object(v, origin)?,
                CliItem::Chardev(c) => self.chardevs.push(Chardev {
                    id: c.id.clone(),
                    path: c.path.clone(),
                    monitor: false,
                    clients: Arc::default(),
                }),
                CliItem::Monitor(m) => {
                    let (chardev, chardev_origin) = chardevs
                        .iter()
                        .find(|(c, _)| c.id == m.chardev)
                        .ok_or_else(|| {
                            StartError::new(origin, format!("chardev \"{}\" not found", m.chardev))
                        })?;
                    if chardev.wait {
                        log::warn!(
                            "chardev '{}': wait=on is not supported; vubd does not wait for a client",
                            chardev.id
                        );
                    }
                    self.add_monitor(&chardev.id, &chardev.path, m.pretty, chardev_origin, origin)?;
                }
                CliItem::RefuseFormatted(image) => {
                    cli::check_unformatted(image).map_err(|e| StartError::new(origin, e))?;
                }
            }
        }
        Ok(())
    }

    fn add_object(&mut self, v: &OptionValue, origin: &str) -> Result<(), StartError> {
        let opts: qapi::ObjectOptions = read_option(v).map_err(|e| StartError::new(origin, e))?;
        self.object_add(&opts)
            .map_err(|e| StartError::qmp(origin, e))
    }

    /// object-add and --object.
    /// Applies an object's properties after qom-set changed them.
    pub fn object_changed(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(opts) = self.objects.iter().find(|o| o.id == id) else {
            return Ok(());
        };
        match &opts.u {
            qapi::ObjectOptionsBranch::Iothread(t) => {
                let poll = iothread_polling(t)?;
                self.iothreads.set_poll(id, poll)
            }
            qapi::ObjectOptionsBranch::ThrottleGroup(g) => {
                let cfg = qom::throttle_config(g)?;
                if let Some(group) = self.graph.throttle_groups.get(id) {
                    group.set_config(cfg);
                }
                Ok(())
            }
        }
    }

    pub fn object_add(&mut self, opts: &qapi::ObjectOptions) -> Result<(), QmpError> {
        match &opts.u {
            qapi::ObjectOptionsBranch::Iothread(t) => {
                qom::check_iothread(t)?;
                let poll = iothread_polling(t)?;
                self.iothreads.add(&opts.id, poll)?;
                self.objects.push(opts.clone());
                Ok(())
            }
            qapi::ObjectOptionsBranch::ThrottleGroup(g) => {
                if self.objects.iter().any(|o| o.id == opts.id) {
                    return Err(QmpError::generic(format!(
                        "attempt to add duplicate property '{}' to object (type 'container')",
                        opts.id
                    )));
                }
                let cfg = qom::throttle_config(g)?;
                self.graph.throttle_groups.insert(
                    opts.id.clone(),
                    crate::block::throttle::shared::SharedGroup::new(cfg),
                );
                // Kept in canonical form: every limit, under `limits`.
                let mut stored = opts.clone();
                stored.u =
                    qapi::ObjectOptionsBranch::ThrottleGroup(qapi::ThrottleGroupProperties {
                        limits: Some(crate::block::throttle::limits::to_limits(&cfg)),
                        ..Default::default()
                    });
                self.objects.push(stored);
                log::info!("throttle group '{}' created", opts.id);
                Ok(())
            }
        }
    }

    /// Listens on the chardev's socket (a failure there belongs to the
    /// `--chardev`, as in qsd, which binds when it meets that option) and
    /// serves QMP on it.
    fn add_monitor(
        &mut self,
        chardev: &str,
        path: &std::path::Path,
        pretty: bool,
        chardev_origin: &str,
        origin: &str,
    ) -> Result<(), StartError> {
        let clients = match self.chardevs.iter_mut().find(|c| c.id == chardev) {
            Some(c) if c.monitor => {
                return Err(StartError::new(
                    origin,
                    format!("Chardev '{chardev}' is busy"),
                ))
            }
            Some(c) => {
                c.monitor = true;
                c.clients.clone()
            }
            None => Arc::default(),
        };
        let listener = server::listen(path).map_err(|e| {
            StartError::new(
                chardev_origin,
                format!(
                    "Failed to bind socket to {}: {}",
                    path.display(),
                    strerror(&e)
                ),
            )
        })?;
        self.sockets.push(path.to_path_buf());
        server::spawn_acceptor(
            listener,
            pretty,
            greeting(),
            self.tx.clone(),
            self.next_session.clone(),
            clients,
        )
        .map_err(|e| StartError::new(origin, e))?;
        log::info!("monitor listening on {}", path.display());
        Ok(())
    }

    /// object-del.
    pub fn object_del(&mut self, id: &str) -> Result<(), QmpError> {
        if let Some(group) = self.graph.throttle_groups.get(id) {
            // The graph holds one reference; every throttle node another.
            if Arc::strong_count(group) > 1 {
                return Err(QmpError::generic(format!(
                    "object '{id}' is in use, can not be deleted"
                )));
            }
            self.graph.throttle_groups.remove(id);
            self.objects.retain(|o| o.id != id);
            return Ok(());
        }
        self.iothreads.remove(id)?;
        self.objects.retain(|o| o.id != id);
        Ok(())
    }

    pub fn request_quit(&mut self, why: &str) {
        log::info!("shutting down: {why}");
        self.quit = true;
    }

    pub fn delete_node(&mut self, name: &str) -> Result<(), QmpError> {
        self.change_graph(|g| g.remove_node(name))?;
        log::info!("node '{name}' deleted");
        Ok(())
    }

    /// Turns a notice of the data plane into its event.
    pub(super) fn notice(&mut self, n: crate::block::notice::Notice) {
        use crate::block::notice::Notice;
        match n {
            Notice::Corruption(c) => self.image_corrupted(c),
            Notice::IoError(e) => {
                let node = self
                    .exports
                    .iter()
                    .find(|x| x.id == e.device)
                    .map(|x| x.node.clone())
                    .unwrap_or_default();
                self.events
                    .emit(&qapi::Event::BlockIoError(qapi::BlockIoErrorData {
                        device: e.device,
                        node_name: node,
                        operation: if e.read {
                            qapi::IoOperationType::Read
                        } else {
                            qapi::IoOperationType::Write
                        },
                        action: e.action,
                        nospace: Some(e.nospace),
                        reason: e.reason,
                    }));
            }
            Notice::Stopped(device) => {
                log::warn!("export '{device}' stopped on an I/O error; cont resumes it");
                if !self.stopped_on_error {
                    self.stopped_on_error = true;
                    self.events.emit(&qapi::Event::Stop);
                }
            }
            Notice::WriteThreshold(t) => {
                log::info!(
                    "node '{}': a write went {} bytes past its write threshold {}",
                    t.node,
                    t.amount_exceeded,
                    t.threshold
                );
                self.events.emit(&qapi::Event::BlockWriteThreshold(
                    qapi::BlockWriteThresholdData {
                        node_name: t.node,
                        amount_exceeded: t.amount_exceeded,
                        write_threshold: t.threshold,
                    },
                ));
            }
        }
    }

    /// Sends `BLOCK_IMAGE_CORRUPTED`, naming the export whose root the
    /// node is as the device (an empty string otherwise).
    fn image_corrupted(&mut self, c: crate::block::notice::Corruption) {
        let device = self.graph.device_of(&c.node).unwrap_or("").to_string();
        let (offset, size) = match c.access {
            Some((o, s)) => (i64::try_from(o).ok(), i64::try_from(s).ok()),
            None => (None, None),
        };
        self.events.emit(&qapi::Event::BlockImageCorrupted(
            qapi::BlockImageCorruptedData {
                device,
                node_name: Some(c.node),
                msg: c.msg,
                offset,
                size,
                fatal: c.fatal,
            },
        ));
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
