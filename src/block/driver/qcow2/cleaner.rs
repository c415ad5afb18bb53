//! `cache-clean-interval`: one thread for the whole process wakes each
//! registered node every so many seconds and has it drop the L2 tables
//! it has not used since the previous pass, as QEMU's timer does. The
//! thread starts with the first registration; a node that goes away is
//! forgotten at its next turn (the registry holds it weakly).

use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// QEMU's default interval on Linux, in seconds.
pub const DEFAULT_INTERVAL_SECS: u64 = 600;

/// What the cleaner calls on each node.
pub trait Clean: Send + Sync {
    fn clean(&self);
}

struct Turn {
    node: Weak<dyn Clean>,
    every: Duration,
    next: Instant,
}

#[derive(Default)]
struct Registry {
    turns: Mutex<Vec<Turn>>,
    wake: Condvar,
}

impl Registry {
    fn add(&self, node: Weak<dyn Clean>, every: Duration) {
        let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
        turns.push(Turn {
            node,
            every,
            next: Instant::now() + every,
        });
        self.wake.notify_one();
    }

    /// Runs the turns that are due; the next deadline, if any node is left.
    fn run_due(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut due = Vec::new();
        let next = {
            let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
            turns.retain(|t| t.node.strong_count() > 0);
            for t in turns.iter_mut().filter(|t| t.next <= now) {
                due.extend(t.node.upgrade());
                t.next = now + t.every;
            }
            turns.iter().map(|t| t.next).min()
        };
        // Outside the registry's lock: a node's own lock is taken here.
        for node in due {
            node.clean();
        }
        next
    }

    fn run(&self) {
        loop {
            let next = self.run_due();
            let turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
            let _unused = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.wake
                        .wait_timeout(turns, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .wake
                    .wait(turns)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

fn registry() -> Option<&'static Arc<Registry>> {
    static REGISTRY: OnceLock<Option<Arc<Registry>>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let r = Arc::new(Registry::default());
            let runner = r.clone();
            match std::thread::Builder::new()
                .name("qcow2-cache-clean".into())
                .spawn(move || runner.run())
            {
                Ok(_) => Some(r),
                Err(e) => {
                    log::error!("cannot start the qcow2 cache cleaner: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Has `node` cleaned every `secs` seconds (0: never).
pub fn register(node: Weak<dyn Clean>, secs: u64) {
    if secs == 0 {
        return;
    }
    if let Some(r) = registry() {
        r.add(node, Duration::from_secs(secs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counter(AtomicUsize);

    impl Clean for Counter {
        fn clean(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn due_nodes_are_cleaned_and_dropped_ones_forgotten() {
        // Arrange: a private registry with two nodes, one already due.
        let r = Registry::default();
        let a: Arc<dyn Clean> = Arc::new(Counter(AtomicUsize::new(0)));
        let b: Arc<dyn Clean> = Arc::new(Counter(AtomicUsize::new(0)));
        r.add(Arc::downgrade(&a), Duration::ZERO);
        r.add(Arc::downgrade(&b), Duration::from_secs(3600));
        // Act
        let next = r.run_due();
        drop(a);
        r.run_due();
        // Assert: b is not due yet, a is gone from the registry.
        assert!(next.is_some());
        assert_eq!(r.turns.lock().unwrap().len(), 1);
    }
}
