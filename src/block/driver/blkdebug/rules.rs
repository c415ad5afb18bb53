//! blkdebug's rules and the little state machine they drive.
//!
//! An event (a point in a parent driver, such as "reading guest data")
//! runs the rules written for it, if their `state` matches the current
//! state (0 matches any): an injection rule becomes *active*, a
//! set-state rule moves the machine to its new state. An event that has
//! injection rules replaces the active set with them; one that has none
//! leaves it alone. A request then fails with the errno of the first
//! active rule that covers one of its sectors (or any sector), and a
//! rule marked `once` is gone after it fired. Flushes are never failed,
//! as in QEMU.

use crate::qapi::BlkdebugEvent;

/// Sectors in blkdebug's rules are 512 bytes.
const SECTOR: u64 = 512;

/// One injection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inject {
    pub event: BlkdebugEvent,
    /// The state the rule applies in; 0: any.
    pub state: i64,
    /// The positive errno the request fails with.
    pub errno: i32,
    /// The sector the request must touch; `None`: any request.
    pub sector: Option<u64>,
    pub once: bool,
    pub immediately: bool,
}

/// One state transition rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    pub event: BlkdebugEvent,
    /// The state the rule applies in; 0: any.
    pub state: i64,
    pub new_state: i64,
}

/// The rules of one node and where it stands.
#[derive(Debug, Clone)]
pub struct Machine {
    inject: Vec<Option<Inject>>,
    set_state: Vec<SetState>,
    /// Indices into `inject` of the active rules, newest first.
    active: Vec<usize>,
    state: i64,
}

impl Machine {
    pub fn new(inject: Vec<Inject>, set_state: Vec<SetState>) -> Self {
        Machine {
            inject: inject.into_iter().map(Some).collect(),
            set_state,
            active: Vec::new(),
            // QEMU starts every blkdebug node in state 1.
            state: 1,
        }
    }

    pub fn state(&self) -> i64 {
        self.state
    }

    /// Whether any rule listens to `event` (so the caller can skip the
    /// lock for the others).
    pub fn listens(&self, event: BlkdebugEvent) -> bool {
        self.inject.iter().flatten().any(|r| r.event == event)
            || self.set_state.iter().any(|r| r.event == event)
    }

    /// Runs the rules of `event`.
    pub fn event(&mut self, event: BlkdebugEvent) {
        let applies = |state: i64, current: i64| state == 0 || state == current;
        let current = self.state;
        let mut next = current;
        let mut replaced = false;
        for (i, rule) in self.inject.iter().enumerate() {
            let Some(rule) = rule else { continue };
            if rule.event != event || !applies(rule.state, current) {
                continue;
            }
            if !replaced {
                self.active.clear();
                replaced = true;
            }
            self.active.insert(0, i);
        }
        for rule in &self.set_state {
            if rule.event == event && applies(rule.state, current) {
                next = rule.new_state;
            }
        }
        self.state = next;
    }

    /// Whether a request over `[offset, offset + len)` fails: its errno
    /// (positive), and whether the rule asked to fail at once.
    pub fn check(&mut self, offset: u64, len: u64) -> Option<(i32, bool)> {
        let first = offset / SECTOR;
        let end = offset.saturating_add(len).div_ceil(SECTOR).max(first + 1);
        let pos = self.active.iter().position(|&i| {
            self.inject[i]
                .as_ref()
                .is_some_and(|r| r.sector.is_none_or(|s| (first..end).contains(&s)))
        })?;
        let index = self.active[pos];
        let rule = self.inject[index].as_ref()?;
        let hit = (rule.errno, rule.immediately);
        if rule.once {
            self.active.remove(pos);
            self.inject[index] = None;
        }
        Some(hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(event: BlkdebugEvent, sector: Option<u64>, once: bool) -> Inject {
        Inject {
            event,
            state: 0,
            errno: libc::EIO,
            sector,
            once,
            immediately: false,
        }
    }

    #[test]
    fn nothing_fails_before_the_event() {
        let mut m = Machine::new(vec![inject(BlkdebugEvent::ReadAio, None, false)], vec![]);
        assert_eq!(m.check(0, 4096), None);
        m.event(BlkdebugEvent::ReadAio);
        assert_eq!(m.check(0, 4096), Some((libc::EIO, false)));
        // It stays active for later requests, of any kind.
        assert_eq!(m.check(8192, 512), Some((libc::EIO, false)));
    }

    #[test]
    fn sector_limits_which_requests_fail() {
        let mut m = Machine::new(vec![inject(BlkdebugEvent::ReadAio, Some(8), false)], vec![]);
        m.event(BlkdebugEvent::ReadAio);
        assert_eq!(m.check(0, 4096), None);
        assert_eq!(m.check(4096, 4096).map(|h| h.0), Some(libc::EIO));
        assert_eq!(m.check(3584, 1024).map(|h| h.0), Some(libc::EIO));
        assert_eq!(m.check(4608, 512), None);
    }

    #[test]
    fn once_fires_a_single_time_and_never_again() {
        let mut m = Machine::new(vec![inject(BlkdebugEvent::Pwritev, None, true)], vec![]);
        m.event(BlkdebugEvent::Pwritev);
        assert!(m.check(0, 512).is_some());
        assert!(m.check(0, 512).is_none());
        m.event(BlkdebugEvent::Pwritev);
        assert!(m.check(0, 512).is_none());
    }

    #[test]
    fn an_event_without_injections_keeps_the_active_set() {
        let mut m = Machine::new(
            vec![
                inject(BlkdebugEvent::ReadAio, Some(1), false),
                inject(BlkdebugEvent::WriteAio, Some(2), false),
            ],
            vec![],
        );
        m.event(BlkdebugEvent::ReadAio);
        m.event(BlkdebugEvent::FlushToDisk);
        assert!(m.check(512, 512).is_some());
        // WriteAio's rules replace ReadAio's.
        m.event(BlkdebugEvent::WriteAio);
        assert!(m.check(512, 512).is_none());
        assert!(m.check(1024, 512).is_some());
    }

    #[test]
    fn states_gate_rules_and_move_on_events() {
        let mut r = inject(BlkdebugEvent::ReadAio, None, false);
        r.state = 2;
        r.errno = libc::ENOSPC;
        let mut m = Machine::new(
            vec![r],
            vec![SetState {
                event: BlkdebugEvent::WriteAio,
                state: 1,
                new_state: 2,
            }],
        );
        assert_eq!(m.state(), 1);
        m.event(BlkdebugEvent::ReadAio);
        assert!(m.check(0, 512).is_none());
        m.event(BlkdebugEvent::WriteAio);
        assert_eq!(m.state(), 2);
        m.event(BlkdebugEvent::ReadAio);
        assert_eq!(m.check(0, 512), Some((libc::ENOSPC, false)));
        // The transition only applies from state 1.
        m.event(BlkdebugEvent::WriteAio);
        assert_eq!(m.state(), 2);
    }

    #[test]
    fn rules_of_one_event_see_the_state_before_it() {
        let mut r = inject(BlkdebugEvent::ReadAio, None, false);
        r.state = 1;
        let mut m = Machine::new(
            vec![r],
            vec![SetState {
                event: BlkdebugEvent::ReadAio,
                state: 1,
                new_state: 5,
            }],
        );
        m.event(BlkdebugEvent::ReadAio);
        assert_eq!(m.state(), 5);
        assert!(m.check(0, 512).is_some());
        assert!(m.listens(BlkdebugEvent::ReadAio));
        assert!(!m.listens(BlkdebugEvent::L2Load));
    }
}
