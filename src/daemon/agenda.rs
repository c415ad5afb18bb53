//! Which in-band commands may run while a graph change waits for its
//! drain, and the queue of those that may not yet.
//!
//! While one command's change waits (see [`crate::block::graph::PendingChange`]),
//! the control thread keeps serving:
//!
//! * a command from the same monitor session waits behind it, whatever it
//!   is, so that each session's replies stay in order;
//! * a command from another session runs at once if it is listed in
//!   [`BESIDE_A_CHANGE`] (it only reads, or touches only its own session);
//! * any other command (so, by default, anything that may change state)
//!   waits until the change is finished, and waiting commands then run in
//!   their order of arrival.

use std::collections::VecDeque;

/// The commands that run while another session's graph change waits: the
/// queries, which only read state (and read the graph as it is before the
/// change commits), and `qmp_capabilities`, which changes only its own
/// session. `quit` runs too: it gives the waiting change up (see
/// `Daemon::run`). A command not listed here is taken to change state.
pub const BESIDE_A_CHANGE: &[&str] = &[
    "qmp_capabilities",
    "quit",
    "query-version",
    "query-commands",
    "query-qmp-schema",
    "query-named-block-nodes",
    "query-block",
    "query-blockstats",
    "query-block-exports",
    "query-chardev",
    "query-status",
    "qom-list",
    "qom-get",
    "qom-list-types",
    "qom-list-properties",
];

/// Whether `command` may run while another session's change waits.
pub fn runs_beside_a_change(command: &str) -> bool {
    BESIDE_A_CHANGE.contains(&command)
}

/// What the agenda needs to know of a request.
pub trait Item {
    /// The monitor session it came from.
    fn session(&self) -> u64;
    /// Whether it may run while another session's change waits.
    fn runs_beside_a_change(&self) -> bool;
}

/// Requests that arrived while a change waited and could not run yet, in
/// arrival order.
pub struct Agenda<T> {
    queue: VecDeque<T>,
}

impl<T> Default for Agenda<T> {
    fn default() -> Self {
        Agenda {
            queue: VecDeque::new(),
        }
    }
}

impl<T: Item> Agenda<T> {
    /// Takes a request that just arrived: gives it back if it may run now
    /// (`busy` is the session whose change waits, if any), or queues it.
    pub fn admit(&mut self, item: T, busy: Option<u64>) -> Option<T> {
        let runs = match busy {
            // Queued requests go first (they run as soon as the control
            // thread gets to them).
            None => self.queue.is_empty(),
            Some(_) => self.may_run(&item, self.queue.len(), busy),
        };
        if runs {
            return Some(item);
        }
        self.queue.push_back(item);
        None
    }

    /// The next queued request that may run now, taken off the queue.
    pub fn next(&mut self, busy: Option<u64>) -> Option<T> {
        if busy.is_none() {
            return self.queue.pop_front();
        }
        let i = (0..self.queue.len()).find(|&i| self.may_run(&self.queue[i], i, busy))?;
        self.queue.remove(i)
    }

    /// Whether `item`, with the first `ahead` queued requests before it,
    /// may run while `busy`'s change waits.
    fn may_run(&self, item: &T, ahead: usize, busy: Option<u64>) -> bool {
        let s = item.session();
        let behind_own = busy == Some(s) || self.queue.iter().take(ahead).any(|q| q.session() == s);
        !behind_own && (busy.is_none() || item.runs_beside_a_change())
    }

    /// Everything still queued, in order (at shutdown).
    pub fn take_all(&mut self) -> Vec<T> {
        self.queue.drain(..).collect()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Cmd(u64, &'static str);

    impl Item for Cmd {
        fn session(&self) -> u64 {
            self.0
        }
        fn runs_beside_a_change(&self) -> bool {
            runs_beside_a_change(self.1)
        }
    }

    #[test]
    fn without_a_waiting_change_everything_runs_at_once() {
        let mut a = Agenda::default();
        assert_eq!(
            a.admit(Cmd(1, "blockdev-add"), None),
            Some(Cmd(1, "blockdev-add"))
        );
        assert!(a.is_empty());
    }

    #[test]
    fn the_waiting_session_waits_even_for_a_query() {
        let mut a = Agenda::default();
        assert_eq!(a.admit(Cmd(1, "query-version"), Some(1)), None);
        assert_eq!(a.next(Some(1)), None);
        assert_eq!(a.next(None), Some(Cmd(1, "query-version")));
    }

    #[test]
    fn other_sessions_read_at_once_and_change_in_order_afterwards() {
        let mut a = Agenda::default();
        // Arrange: session 1's change waits.
        let busy = Some(1);

        // Act
        let q = a.admit(Cmd(2, "query-named-block-nodes"), busy);
        let c1 = a.admit(Cmd(2, "blockdev-add"), busy);
        let q2 = a.admit(Cmd(2, "query-block"), busy);
        let c2 = a.admit(Cmd(3, "block-export-del"), busy);
        let q3 = a.admit(Cmd(3, "qom-get"), busy);
        let q4 = a.admit(Cmd(4, "query-version"), busy);
        let unknown = a.admit(Cmd(4, "no-such-command"), busy);

        // Assert: queries of sessions with nothing queued ran; the rest
        // waits, and once the change is done runs in arrival order.
        assert_eq!(q, Some(Cmd(2, "query-named-block-nodes")));
        assert_eq!(q4, Some(Cmd(4, "query-version")));
        assert!(c1.is_none() && q2.is_none() && c2.is_none() && q3.is_none());
        assert!(unknown.is_none());
        assert_eq!(a.next(busy), None);
        let order: Vec<_> = std::iter::from_fn(|| a.next(None)).collect();
        assert_eq!(
            order,
            vec![
                Cmd(2, "blockdev-add"),
                Cmd(2, "query-block"),
                Cmd(3, "block-export-del"),
                Cmd(3, "qom-get"),
                Cmd(4, "no-such-command"),
            ]
        );
    }

    #[test]
    fn a_new_wait_lets_queued_queries_of_other_sessions_through() {
        let mut a = Agenda::default();
        assert_eq!(a.admit(Cmd(2, "blockdev-snapshot"), Some(1)), None);
        assert_eq!(a.admit(Cmd(3, "blockdev-add"), Some(1)), None);
        assert_eq!(a.admit(Cmd(3, "query-block"), Some(1)), None);
        // Session 1's change finished; session 2's snapshot runs and waits.
        assert_eq!(a.next(None), Some(Cmd(2, "blockdev-snapshot")));
        // Session 3's add still waits, and its query behind it.
        assert_eq!(a.next(Some(2)), None);
        assert_eq!(a.next(None), Some(Cmd(3, "blockdev-add")));
        assert_eq!(a.next(Some(3)), None);
        assert_eq!(a.next(None), Some(Cmd(3, "query-block")));
    }

    #[test]
    fn every_query_of_the_schema_runs_beside_a_change() {
        for name in crate::qapi::IMPLEMENTED_COMMANDS {
            if name.starts_with("query-") || matches!(*name, "qom-get" | "qom-list") {
                assert!(runs_beside_a_change(name), "{name}");
            }
        }
        for name in BESIDE_A_CHANGE {
            assert!(crate::qapi::IMPLEMENTED_COMMANDS.contains(name), "{name}");
        }
        assert!(!runs_beside_a_change("qom-set"));
        assert!(!runs_beside_a_change("blockdev-add"));
    }
}
