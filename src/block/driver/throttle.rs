//! The `throttle` filter: requests pass to its `file` child within the
//! limits of a throttle group ([`crate::block::throttle`]). Reads count
//! as reads; writes, write-zeroes and discards as writes; flushes are not
//! limited. A request that must wait waits as a task on its own thread
//! (no CPU, no thread of its own); while the group limits nothing, the
//! filter costs one relaxed load per request.

use super::{ChildRole, Driver, DriverKind};
use crate::block::drain::Root;
use crate::block::edge::Child;
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::block::throttle::shared::{wait_turn, SharedGroup, Waiter};
use crate::block::throttle::{Direction, MemberId};
use crate::io::{task, IoContext};
use std::sync::{Arc, Weak};

pub struct ThrottleIo {
    child: Child,
    group: Arc<SharedGroup>,
    member: MemberId,
    me: Weak<ThrottleIo>,
}

impl ThrottleIo {
    pub fn new(child: Root, group: Arc<SharedGroup>) -> Arc<Self> {
        let member = group.join();
        Arc::new_cyclic(|me| ThrottleIo {
            child: Child::new(ChildRole::File, child),
            group,
            member,
            me: me.clone(),
        })
    }
}

impl Drop for ThrottleIo {
    fn drop(&mut self) {
        self.group.leave(self.member);
    }
}

/// Waits for the group's word, then runs the request.
async fn held(io: Arc<ThrottleIo>, waiter: Arc<Waiter>, req: IoRequest, dir: Direction) -> i32 {
    wait_turn(&io.group, io.member, waiter, dir, req.len()).await;
    task::submit(io.child.get(), &req).await
}

impl ThrottleIo {
    fn below(&self) -> &dyn BlockIo {
        self.child.get()
    }
}

impl BlockIo for ThrottleIo {
    crate::block::io::pass_through_block_io!();

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let dir = match req.kind() {
            IoKind::Read => Direction::Read,
            IoKind::Write | IoKind::WriteZeroes { .. } | IoKind::Discard => Direction::Write,
            IoKind::Flush => return self.child.get().submit(ctx, req),
        };
        if !self.group.enabled() {
            return self.child.get().submit(ctx, req);
        }
        match self.group.arrive(self.member, dir, req.len()) {
            None => self.child.get().submit(ctx, req),
            Some(waiter) => match self.me.upgrade() {
                Some(me) => ctx.spawn(req.tag(), held(me, waiter, *req, dir)),
                // The node is going away; nothing can hold the request.
                None => ctx.complete_now(req.tag(), -libc::EIO),
            },
        }
    }
}

pub struct ThrottleDriver {
    io: Arc<ThrottleIo>,
    filename: String,
    read_only: bool,
}

impl ThrottleDriver {
    pub fn open(child: Root, filename: String, group: Arc<SharedGroup>, read_only: bool) -> Self {
        ThrottleDriver {
            io: ThrottleIo::new(child, group),
            filename,
            read_only,
        }
    }
}

impl Driver for ThrottleDriver {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn io(&self) -> Root {
        self.io.clone()
    }

    fn child(&self, role: ChildRole) -> Option<&Child> {
        (role == ChildRole::File).then_some(&self.io.child)
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::error::BlockError;
    use crate::block::throttle::{Bucket, Config, Limit};
    use crate::io::Completion;
    use std::time::{Duration, Instant};

    /// Completes every request at once with its length.
    struct Instant0;

    impl BlockIo for Instant0 {
        fn length(&self) -> Result<u64, BlockError> {
            Ok(1 << 30)
        }
        fn truncate(&self, _: u64) -> Result<(), BlockError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
            ctx.complete_now(req.tag(), req.len() as i32);
        }
    }

    fn iops(n: u64) -> Config {
        let mut c = Config::default();
        *c.limit_mut(Bucket::OpsTotal) = Limit {
            avg: n,
            ..Limit::default()
        };
        c
    }

    /// Keeps `depth` requests in flight on `nodes` (round-robin) for
    /// `secs`; returns completions per node.
    fn saturate(nodes: &[Arc<ThrottleIo>], depth: usize, secs: f64) -> Vec<u64> {
        let mut ctx = IoContext::new(64, false).unwrap();
        let mut done = vec![0u64; nodes.len()];
        let mut out: Vec<Completion> = Vec::new();
        let mut next_tag = 0u64;
        let start = Instant::now();
        let mut inflight = 0;
        let submit_one = |ctx: &mut IoContext, tag: u64| {
            let n = (tag as usize) % nodes.len();
            let req = IoRequest::without_data(IoKind::Discard, 0, 4096, tag);
            nodes[n].submit(ctx, &req);
        };
        while start.elapsed().as_secs_f64() < secs {
            while inflight < depth {
                submit_one(&mut ctx, next_tag);
                next_tag += 1;
                inflight += 1;
            }
            ctx.submit().unwrap();
            out.clear();
            ctx.reap(&mut out);
            for c in &out {
                assert_eq!(c.result, 4096);
                done[(c.tag as usize) % nodes.len()] += 1;
                inflight -= 1;
            }
            if out.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        done
    }

    #[test]
    fn one_member_runs_at_its_limit() {
        let g = SharedGroup::new(iops(200));
        let node = ThrottleIo::new(Arc::new(Instant0), g.clone());
        let done = saturate(&[node], 8, 1.0);
        // 200/s plus the slack of a tenth of a second.
        assert!((180..=240).contains(&done[0]), "{done:?}");
    }

    #[test]
    fn two_members_share_the_group() {
        let g = SharedGroup::new(iops(200));
        let a = ThrottleIo::new(Arc::new(Instant0), g.clone());
        let b = ThrottleIo::new(Arc::new(Instant0), g.clone());
        let done = saturate(&[a, b], 8, 1.0);
        let total: u64 = done.iter().sum();
        assert!((180..=240).contains(&total), "{done:?}");
        assert!(done.iter().all(|&n| n >= 80), "{done:?}");
    }

    #[test]
    fn lifting_the_limits_lets_waiting_requests_go() {
        let g = SharedGroup::new(iops(1));
        let node = ThrottleIo::new(Arc::new(Instant0), g.clone());
        let mut ctx = IoContext::new(64, false).unwrap();
        for tag in 0..5 {
            node.submit(
                &mut ctx,
                &IoRequest::without_data(IoKind::Discard, 0, 512, tag),
            );
        }
        assert!(g.waiting() >= 3);
        g.set_config(Config::default());
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while out.len() < 5 && Instant::now() < deadline {
            ctx.submit().unwrap();
            ctx.reap(&mut out);
        }
        assert_eq!(out.len(), 5);
        assert_eq!(g.waiting(), 0);
    }

    /// Nanoseconds per request through a throttle whose group allows
    /// 10^9 IOPS, against straight to the node, on one thread and on two
    /// sharing the node; run with `cargo test --release --lib
    /// measure_throttle -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_throttle_overhead() {
        fn per_request(node: &Arc<dyn BlockIo>, n: u64) -> f64 {
            let mut ctx = IoContext::new(64, false).unwrap();
            let mut out = Vec::new();
            let start = Instant::now();
            for tag in 0..n {
                let req = IoRequest::without_data(IoKind::Discard, 0, 4096, tag);
                node.submit(&mut ctx, &req);
                if tag % 32 == 31 {
                    out.clear();
                    ctx.reap(&mut out);
                }
            }
            start.elapsed().as_nanos() as f64 / n as f64
        }
        let n = 4_000_000;
        let direct: Arc<dyn BlockIo> = Arc::new(Instant0);
        let throttled: Arc<dyn BlockIo> =
            ThrottleIo::new(Arc::new(Instant0), SharedGroup::new(iops(1_000_000_000)));
        for _ in 0..3 {
            let d = per_request(&direct, n);
            let one = per_request(&throttled, n);
            let two = std::thread::scope(|s| {
                let a = s.spawn(|| per_request(&throttled, n));
                let b = s.spawn(|| per_request(&throttled, n));
                (a.join().unwrap() + b.join().unwrap()) / 2.0
            });
            println!("ns per request: node {d:.1}, throttled {one:.1}, throttled on two threads {two:.1}");
        }
    }

    #[test]
    fn an_unlimited_group_takes_no_lock_path() {
        let g = SharedGroup::new(Config::default());
        let node = ThrottleIo::new(Arc::new(Instant0), g.clone());
        let done = saturate(&[node], 4, 0.05);
        assert!(done[0] > 100);
    }
}
