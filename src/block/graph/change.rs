//! A graph change as a transaction that may wait for its drain without
//! holding up its caller.
//!
//! [`Graph::begin_change`] makes the change on a copy, checks it and
//! quiesces the data-plane users it affects, and returns at once with a
//! [`PendingChange`]. Its owner looks at [`PendingChange::poll`] whenever
//! it likes; once nothing is in flight, [`Graph::finish_change`] takes the
//! image locks, re-points edges, publishes roots and lets the users
//! resume. Dropping (or [`PendingChange::abandon`]ing) a pending change
//! resumes the users and leaves the graph as it was. [`Graph::change`]
//! drives the same steps to completion, sleeping between polls, for
//! callers that have nothing else to do meanwhile (startup, tests).

use super::{Graph, Node, NodePerm};
use crate::block::drain::{DrainTimeout, Quiesced, RootSlot};
use crate::block::driver::Driver;
use crate::block::error::BlockError;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a graph change waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A checked change whose users are quiesced, waiting until their requests
/// in flight are done.
/// Work on a node that must run while the users reaching it are drained
/// (an internal snapshot); the graph itself does not change.
pub type DrainedAction = Box<dyn FnOnce() -> Result<(), BlockError>>;

pub struct PendingChange {
    draft: Graph,
    /// Instead of a new graph: work to run once drained.
    action: Option<DrainedAction>,
    plan: HashMap<String, NodePerm>,
    /// The users drained, by name (for messages), with their guards.
    slots: Vec<(String, Quiesced)>,
    /// The live graph's commit count when the change began.
    base: u64,
    /// Throttle limits off while the change drains, so that requests a
    /// throttle holds back do not keep it waiting (None: nothing drains).
    _limits_off: Option<crate::block::throttle::shared::LimitsOff>,
    started: Instant,
    timeout: Duration,
}

/// Where a pending change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing is in flight: [`Graph::finish_change`] may commit it.
    Ready,
    /// Requests are still in flight.
    Waiting,
    /// Requests are still in flight and the time allowed is over.
    TimedOut,
}

impl PendingChange {
    /// Sets how long the change may wait (from when it began).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Requests still in flight in the users the change drains.
    pub fn in_flight(&self) -> u64 {
        self.slots.iter().map(|(_, q)| q.in_flight()).sum()
    }

    /// Whether the drain is complete, still going, or overdue.
    pub fn poll(&self) -> Progress {
        if self.in_flight() == 0 {
            Progress::Ready
        } else if self.started.elapsed() >= self.timeout {
            Progress::TimedOut
        } else {
            Progress::Waiting
        }
    }

    /// How long the change has waited so far.
    pub fn waited(&self) -> Duration {
        self.started.elapsed()
    }

    /// Gives the change up: the users resume, the graph stays as it was.
    pub fn abandon(self) {
        if !self.slots.is_empty() {
            log::info!(
                "graph change abandoned after {} ms; {} requests were still in flight",
                self.waited().as_millis(),
                self.in_flight()
            );
        }
    }

    /// The error of a drain that did not complete, naming the first user
    /// with requests left.
    fn drain_error(&self) -> BlockError {
        let (name, pending) = self
            .slots
            .iter()
            .map(|(n, q)| (n.as_str(), q.in_flight()))
            .find(|(_, p)| *p > 0)
            .unwrap_or(("?", 0));
        let e = DrainTimeout {
            pending,
            waited_ms: self.waited().as_millis(),
        };
        BlockError::invalid(format!("Cannot drain '{name}': {e}"))
    }

    /// Sleeps in short steps until the drain completes or times out.
    pub fn wait(&self) {
        let mut pause = Duration::from_micros(20);
        while self.poll() == Progress::Waiting {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

impl Graph {
    /// Makes a change on a copy, checks it and, if it holds, keeps it,
    /// waiting (asleep) for the drain. Nodes that the change removed are
    /// closed afterwards.
    pub fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Graph) -> Result<T, BlockError>,
    ) -> Result<T, BlockError> {
        let (out, pending) = self.begin_change(f)?;
        pending.wait();
        self.finish_change(pending)?;
        Ok(out)
    }

    /// Makes a change on a copy and checks it (cycles, permissions); then
    /// quiesces every data-plane user the change affects (its root
    /// changes, or its requests pass through an edge that is re-pointed)
    /// and returns without waiting for their requests in flight. Nothing
    /// is committed yet: the live graph is unchanged until
    /// [`Graph::finish_change`].
    pub fn begin_change<T>(
        &self,
        f: impl FnOnce(&mut Graph) -> Result<T, BlockError>,
    ) -> Result<(T, PendingChange), BlockError> {
        let mut draft = self.clone();
        draft.relinks.clear();
        let out = f(&mut draft)?;
        let plan = draft.check()?;
        let users = self.slots_to_drain(&draft);
        Ok((out, self.quiesce(users, draft, plan, None)))
    }

    /// Quiesces `users` (with the throttle limits off while they drain, so
    /// that held requests do not keep the drain waiting) into a pending
    /// change that commits `draft` and `plan`, or runs `action`.
    fn quiesce(
        &self,
        users: Vec<(String, Arc<RootSlot>)>,
        draft: Graph,
        plan: HashMap<String, NodePerm>,
        action: Option<DrainedAction>,
    ) -> PendingChange {
        let slots: Vec<(String, Quiesced)> = users
            .into_iter()
            .map(|(name, slot)| (name, slot.quiesce()))
            .collect();
        let limits_off = (!slots.is_empty()).then(|| {
            crate::block::throttle::shared::LimitsOff::new(
                self.throttle_groups.values().cloned().collect(),
            )
        });
        PendingChange {
            draft,
            action,
            plan,
            slots,
            _limits_off: limits_off,
            base: self.commits,
            started: Instant::now(),
            timeout: DRAIN_TIMEOUT,
        }
    }

    /// Commits a change whose drain is complete: the image locks are taken
    /// (all or none); only then are edges re-pointed and roots published,
    /// and the users resume. A drain still incomplete (timed out), a lock
    /// refused, or a graph changed since the change began fails it and
    /// leaves the live graph, its locks and its data plane as they were.
    pub fn finish_change(&mut self, mut pending: PendingChange) -> Result<(), BlockError> {
        if pending.base != self.commits {
            return Err(BlockError::invalid(
                "The block graph changed while the change waited for its drain",
            ));
        }
        if pending.in_flight() > 0 {
            return Err(pending.drain_error());
        }
        if let Some(action) = pending.action.take() {
            // The users resume when `pending` goes, after the work.
            return action();
        }
        let PendingChange {
            mut draft,
            plan,
            slots,
            ..
        } = pending;
        apply_plan(&draft, &plan)?;
        let relinked = !draft.relinks.is_empty();
        for (parent, role) in std::mem::take(&mut draft.relinks) {
            let Some(p) = draft.node(&parent) else {
                continue;
            };
            let new_child = p
                .children
                .iter()
                .find(|e| e.role == role)
                .and_then(|e| draft.node(&e.child))
                .map(|c| c.io.clone());
            match (p.driver.child(role), new_child) {
                (Some(link), Some(io)) => {
                    // SAFETY: every user whose requests can reach `parent`
                    // is quiesced (slots_to_drain) with nothing in flight
                    // (checked above), and nothing here holds a reference
                    // from the link.
                    drop(unsafe { link.replace(io) });
                }
                _ => log::error!("node '{parent}' has no '{}' link to re-point", role.name()),
            }
        }
        for (_, guard) in &slots {
            if let Some(u) = draft
                .uses
                .iter()
                .find(|u| u.slot.as_ref().is_some_and(|s| guard.holds(s)))
            {
                guard.publish(draft.node(&u.node).map(|n| n.io.clone()));
            }
        }
        drop(slots);
        draft.perms = plan;
        draft.commits = self.commits + 1;
        let kept: HashSet<&str> = draft.nodes.iter().map(|n| n.name.as_str()).collect();
        let removed: Vec<Arc<dyn Driver>> = self
            .nodes
            .iter()
            .filter(|n| !kept.contains(n.name.as_str()))
            .map(|n| n.driver.clone())
            .collect();
        *self = draft;
        if relinked {
            self.refresh_lengths();
        }
        // Parents before their children (children come first in the
        // list): a format node may still write to its file as it closes.
        for driver in removed.into_iter().rev() {
            if let Err(e) = driver.close() {
                log::warn!("closing a removed node: {e}");
            }
        }
        Ok(())
    }

    /// Quiesces the data-plane users whose requests reach `node` and
    /// returns without waiting; `action` runs in [`Graph::finish_change`]
    /// once they are drained, as a graph change would be committed then.
    pub fn begin_drained(&self, node: &str, action: DrainedAction) -> PendingChange {
        let users = self.users_reaching(node);
        self.quiesce(users, self.clone(), HashMap::new(), Some(action))
    }

    /// The data-plane users a change from `self` to `draft` must drain:
    /// those whose root node changes, and those whose requests reach the
    /// parent of an edge the draft re-points.
    fn slots_to_drain(&self, draft: &Graph) -> Vec<(String, Arc<RootSlot>)> {
        let mut out: Vec<(String, Arc<RootSlot>)> = Vec::new();
        for u in &draft.uses {
            let Some(slot) = &u.slot else { continue };
            let new_root = draft.node(&u.node).map(|n| n.io.clone());
            let same = match (&new_root, &slot.current()) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            let reaches_relink = !draft.relinks.is_empty() && {
                let below = self.below(&u.node);
                draft
                    .relinks
                    .iter()
                    .any(|(p, _)| below.contains(p.as_str()))
            };
            if (!same || reaches_relink) && !out.iter().any(|(_, s)| Arc::ptr_eq(s, slot)) {
                out.push((u.name.clone(), slot.clone()));
            }
        }
        out
    }
}

/// Takes the image locks of a checked graph: all or none.
fn apply_plan(graph: &Graph, plan: &HashMap<String, NodePerm>) -> Result<(), BlockError> {
    let mut prepared: Vec<&Node> = Vec::new();
    for node in &graph.nodes {
        let Some(np) = plan.get(&node.name) else {
            continue;
        };
        if let Err(e) = node.driver.prepare_perm(np.perm, np.shared) {
            for p in prepared {
                p.driver.abort_perm();
            }
            return Err(e);
        }
        prepared.push(node);
    }
    for node in prepared {
        if let Some(np) = plan.get(&node.name) {
            node.driver.commit_perm(np.perm, np.shared);
        }
    }
    Ok(())
}
