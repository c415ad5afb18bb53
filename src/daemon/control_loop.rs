//! The control loop: runs commands in arrival order, and parks a command
//! whose graph change waits for its drain while it serves what may run
//! beside it (see [`super::agenda`]).

use super::agenda;
use super::{ControlMsg, Daemon};
use crate::block::error::BlockError;
use crate::block::graph::{Graph, PendingChange, Progress};
use crate::error::QmpError;
use crate::qapi;
use crate::qmp::commands::Cx;
use crate::qmp::session::{Body, Request};
use serde_json::Value;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

/// How often the control thread looks at a waiting change at first, and
/// at most (it doubles the pause while nothing arrives).
const POLL_FIRST: Duration = Duration::from_micros(50);
const POLL_MAX: Duration = Duration::from_millis(5);

/// A command whose graph change waits for its drain: it is answered when
/// the change commits (with `result`) or fails.
pub(super) struct Waiting {
    req: Box<Request>,
    result: Result<Value, QmpError>,
    change: PendingChange,
}

impl agenda::Item for Box<Request> {
    fn session(&self) -> u64 {
        self.session
    }

    fn runs_beside_a_change(&self) -> bool {
        match &self.body {
            Body::Command { name, .. } => agenda::runs_beside_a_change(name),
            // An input error changes nothing.
            Body::Refused(_) => true,
        }
    }
}

impl Daemon {
    /// Makes a graph change for the running command, as its last step:
    /// when the change has to wait for requests in flight, it is left
    /// waiting and the command is answered once it commits (or fails);
    /// the control thread serves other commands meanwhile. The command
    /// must not rely on the change being committed when this returns.
    pub fn change_graph<T>(
        &mut self,
        f: impl FnOnce(&mut Graph) -> Result<T, BlockError>,
    ) -> Result<T, BlockError> {
        let (out, pending) = self.graph.begin_change(f)?;
        self.finish_when_drained(pending)?;
        Ok(out)
    }

    /// Finishes `pending` now if nothing is in flight, else leaves it
    /// waiting like a graph change (see [`Self::change_graph`]): the
    /// command is answered once it finishes, or with its error.
    pub fn finish_when_drained(&mut self, pending: PendingChange) -> Result<(), BlockError> {
        if self.deferred.is_some() {
            return Err(BlockError::invalid(
                "A graph change of this command already waits for its drain",
            ));
        }
        if pending.poll() == Progress::Ready {
            self.graph.finish_change(pending)
        } else {
            self.deferred = Some(pending.with_timeout(self.drain_timeout));
            Ok(())
        }
    }

    /// Runs commands until asked to quit. While a command's change waits
    /// for its drain the loop looks at it every few milliseconds, and in
    /// between serves what may run beside it (see [`agenda`]).
    pub fn run(&mut self) {
        let mut pause = POLL_FIRST;
        while !self.quit {
            let msg = if self.waiting.is_some() {
                match self.rx.recv_timeout(pause) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => {
                        pause = (pause * 2).min(POLL_MAX);
                        None
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                pause = POLL_FIRST;
                match self.rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => break,
                }
            };
            if let Some(msg) = msg {
                self.handle(msg);
            }
            self.progress();
        }
        self.give_up_waiting("the daemon is shutting down");
    }

    pub(super) fn handle(&mut self, msg: ControlMsg) {
        match msg {
            ControlMsg::Execute(req) => {
                let session = req.session;
                if let Some(req) = self.agenda.admit(req, self.busy()) {
                    self.execute(req);
                } else {
                    log::debug!(
                        "session {session}: command queued behind a graph change ({} queued)",
                        self.agenda.len()
                    );
                }
            }
            ControlMsg::SessionClosed(id) => {
                self.events.remove(id);
                log::info!("monitor session {id} closed");
            }
            ControlMsg::Signal(sig) => self.request_quit(&format!("signal {sig}")),
            ControlMsg::Notice(n) => self.notice(n),
        }
    }

    /// The session whose command's change waits, if any.
    fn busy(&self) -> Option<u64> {
        self.waiting.as_ref().map(|w| w.req.session)
    }

    /// Finishes the waiting change once its drain is complete (or overdue),
    /// and runs the queued commands that may run now.
    pub(super) fn progress(&mut self) {
        while !self.quit {
            if let Some(w) = &self.waiting {
                if w.change.poll() != Progress::Waiting {
                    self.complete_waiting();
                }
            }
            let Some(req) = self.agenda.next(self.busy()) else {
                return;
            };
            self.execute(req);
        }
    }

    /// Commits (or fails) the waiting change and answers its command.
    fn complete_waiting(&mut self) {
        let Some(w) = self.waiting.take() else { return };
        let waited = w.change.waited();
        let result = match self.graph.finish_change(w.change) {
            Ok(()) => {
                log::debug!(
                    "session {}: graph change committed after {} ms",
                    w.req.session,
                    waited.as_millis()
                );
                w.result
            }
            Err(e) => {
                log::warn!("session {}: graph change failed: {e}", w.req.session);
                Err(e.into())
            }
        };
        answer(&w.req, result);
    }

    /// Abandons the waiting change, if any: its users resume, the graph
    /// stays as it was, and its command gets an error.
    pub(super) fn give_up_waiting(&mut self, why: &str) {
        if let Some(w) = self.waiting.take() {
            w.change.abandon();
            answer(
                &w.req,
                Err(QmpError::generic(format!("Graph change abandoned: {why}"))),
            );
        }
        let left = self.agenda.take_all();
        if !left.is_empty() {
            log::info!("{} queued commands not run: {why}", left.len());
        }
    }

    fn execute(&mut self, req: Box<Request>) {
        let result = match &req.body {
            Body::Command { name, args } => {
                log::debug!("session {}: {name}", req.session);
                let mut cx = Cx {
                    daemon: self,
                    request: &req,
                };
                qapi::dispatch(&mut cx, name, args)
                    .unwrap_or_else(|| Err(QmpError::command_not_found(name)))
            }
            Body::Refused(err) => Err(err.clone()),
        };
        match self.deferred.take() {
            None => answer(&req, result),
            Some(change) if result.is_ok() => {
                log::debug!(
                    "session {}: graph change waits for {} requests in flight",
                    req.session,
                    change.in_flight()
                );
                self.waiting = Some(Waiting {
                    req,
                    result,
                    change,
                });
            }
            Some(change) => {
                change.abandon();
                answer(&req, result);
            }
        }
    }
}

/// Writes a command's reply and tells its session.
fn answer(req: &Request, result: Result<Value, QmpError>) {
    req.reply(result);
    // The session may have gone; it no longer waits then.
    let _ = req.done.send(());
}
