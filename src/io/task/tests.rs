//! The executor driven by small test nodes: joins, tasks that read a map
//! and then data, timers, range locks across threads, recycled futures.

use super::locks::RangeLocks;
use super::*;
use crate::block::error::BlockError;
use crate::block::io::IoKind;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A node in memory that completes every request at once.
struct MemIo {
    data: Mutex<Vec<u8>>,
}

impl MemIo {
    fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(MemIo {
            data: Mutex::new(data),
        })
    }
}

impl BlockIo for MemIo {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn truncate(&self, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let mut data = self.data.lock().unwrap();
        let mut at = req.offset() as usize;
        let (iov, n) = req.iov();
        for i in 0..n as usize {
            // SAFETY: the test's iovecs are valid for the request.
            let v = unsafe { &*iov.add(i) };
            let end = at + v.iov_len;
            if end > data.len() {
                ctx.complete_now(req.tag(), -libc::EIO);
                return;
            }
            // SAFETY: as above; the buffers do not overlap `data`.
            unsafe {
                match req.kind() {
                    IoKind::Read => std::ptr::copy_nonoverlapping(
                        data[at..].as_ptr(),
                        v.iov_base as *mut u8,
                        v.iov_len,
                    ),
                    IoKind::Write => std::ptr::copy_nonoverlapping(
                        v.iov_base as *const u8,
                        data[at..].as_mut_ptr(),
                        v.iov_len,
                    ),
                    _ => {}
                }
            }
            at = end;
        }
        ctx.complete_now(req.tag(), req.len() as i32);
    }
}

/// Completes every request after `ns` on the engine's timer.
struct SlowIo {
    ns: u64,
}

impl BlockIo for SlowIo {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(1 << 20)
    }
    fn truncate(&self, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let result = if req.offset() == u64::MAX {
            -libc::EIO
        } else {
            req.len() as i32
        };
        // SAFETY: a sleep refers to no memory.
        unsafe {
            ctx.push(
                Op::Sleep {
                    ns: self.ns,
                    result,
                },
                req.tag(),
            )
        };
    }
}

/// A format-like node: the first 8 bytes of its child say where the data
/// starts; a read reads that, waits `pause_ns`, then reads the data.
struct MappedIo {
    child: Arc<MemIo>,
    pause_ns: u64,
}

impl BlockIo for MappedIo {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(4096)
    }
    fn truncate(&self, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let child = self.child.clone();
        let pause = self.pause_ns;
        let req = *req;
        ctx.spawn(req.tag(), async move {
            let mut map = [0u8; 8];
            let iov = [libc::iovec {
                iov_base: map.as_mut_ptr().cast(),
                iov_len: 8,
            }];
            // SAFETY: `map` and `iov` live in this task until the read is
            // awaited.
            let meta = unsafe { IoRequest::new(IoKind::Read, 0, 8, iov.as_ptr(), 1, 0) };
            let r = submit(&*child, &meta).await;
            if r < 0 {
                return r;
            }
            if pause > 0 {
                sleep(pause).await;
            }
            let base = u64::from_le_bytes(map);
            submit(&*child, &req.at(base + req.offset())).await
        });
    }
}

fn run(ctx: &mut IoContext, want: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < want {
        assert!(Instant::now() < deadline, "only {out:?} of {want} in 5 s");
        ctx.submit().unwrap();
        ctx.reap(&mut out);
        if out.len() < want {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    out
}

fn buf_iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

fn mapped_image() -> Arc<MemIo> {
    let mut data = vec![0u8; 8192];
    data[..8].copy_from_slice(&1000u64.to_le_bytes());
    for (i, b) in data[1000..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    MemIo::new(data)
}

#[test]
fn a_task_reads_its_map_then_the_data_and_completes_its_parent() {
    // Arrange
    let mut ctx = IoContext::new(32, false).unwrap();
    let node = MappedIo {
        child: mapped_image(),
        pause_ns: 0,
    };
    let mut buf = vec![0u8; 512];
    let iov = [buf_iov(&mut buf)];

    // Act
    // SAFETY: `buf` and `iov` outlive the run below.
    node.submit(&mut ctx, &unsafe {
        IoRequest::new(IoKind::Read, 100, 512, iov.as_ptr(), 1, 7)
    });
    let done = run(&mut ctx, 1);

    // Assert
    assert_eq!(
        done,
        vec![Completion {
            tag: 7,
            result: 512
        }]
    );
    let want: Vec<u8> = (100..612).map(|i| (i % 251) as u8).collect();
    assert_eq!(buf, want);
    assert!(ctx.executor().is_idle());
}

#[test]
fn a_task_waits_on_a_timer_without_holding_up_other_completions() {
    // Arrange
    let mut ctx = IoContext::new(32, false).unwrap();
    let node = MappedIo {
        child: mapped_image(),
        pause_ns: 20_000_000,
    };
    let mut buf = vec![0u8; 64];
    let iov = [buf_iov(&mut buf)];
    let started = Instant::now();

    // Act: the slow task first, then a direct request that finishes at once.
    // SAFETY: `buf` and `iov` outlive the run below.
    node.submit(&mut ctx, &unsafe {
        IoRequest::new(IoKind::Read, 0, 64, iov.as_ptr(), 1, 1)
    });
    ctx.complete_now(2, 0);
    let first = run(&mut ctx, 1);
    let second = run(&mut ctx, 1);

    // Assert
    assert_eq!(first, vec![Completion { tag: 2, result: 0 }]);
    assert_eq!(second, vec![Completion { tag: 1, result: 64 }]);
    assert!(started.elapsed() >= Duration::from_millis(20));
    assert!(ctx.executor().is_idle());
}

#[test]
fn a_join_completes_its_parent_once_with_the_bytes_of_all_parts() {
    // Arrange
    let mut ctx = IoContext::new(32, false).unwrap();
    let slow = SlowIo { ns: 100_000 };

    // Act: four parts of 512 bytes under one join tag.
    let tag = ctx.start_join(9, 4);
    for i in 0..4 {
        slow.submit(
            &mut ctx,
            &IoRequest::without_data(IoKind::Discard, i * 512, 512, tag),
        );
    }
    let done = run(&mut ctx, 1);

    // Assert
    assert_eq!(
        done,
        vec![Completion {
            tag: 9,
            result: 2048
        }]
    );
    assert!(ctx.executor().is_idle());
}

#[test]
fn a_join_reports_the_first_error_of_its_parts() {
    // Arrange
    let mut ctx = IoContext::new(32, false).unwrap();
    let slow = SlowIo { ns: 10_000 };

    // Act: the second part fails (offset u64::MAX).
    let tag = ctx.start_join(5, 3);
    for off in [0, u64::MAX, 1024] {
        slow.submit(
            &mut ctx,
            &IoRequest::without_data(IoKind::Discard, off, 512, tag),
        );
    }
    let done = run(&mut ctx, 1);

    // Assert
    assert_eq!(
        done,
        vec![Completion {
            tag: 5,
            result: -libc::EIO
        }]
    );
}

#[test]
fn a_join_slot_still_completes_after_its_generation_wraps() {
    // Arrange: a join slot whose generation is the last one a tag holds.
    let mut ctx = IoContext::new(32, false).unwrap();
    let _ = ctx.start_join(1, 1);
    ctx.exec.joins[0].gen = GEN_MASK as u32;
    ctx.exec.joins[0].remaining = 0;
    ctx.exec.live -= 1;
    ctx.exec.free_joins.push(0);

    // Act: the slot is used at that generation, then at the next.
    let done: Vec<_> = [7u64, 8]
        .into_iter()
        .flat_map(|parent| {
            let tag = ctx.start_join(parent, 1);
            ctx.complete_now(tag, 512);
            run(&mut ctx, 1)
        })
        .collect();

    // Assert
    assert_eq!(
        done,
        vec![
            Completion {
                tag: 7,
                result: 512
            },
            Completion {
                tag: 8,
                result: 512
            }
        ]
    );
    assert!(ctx.executor().is_idle());
}

#[test]
fn a_fill_zeroes_what_a_short_read_left_and_passes_errors_on() {
    // Arrange
    let mut ctx = IoContext::new(32, false).unwrap();
    let mut buf = [0xffu8; 64];
    let iov = buf_iov(&mut buf);

    // Act: a read of 64 that transferred 16, then one that failed.
    // SAFETY: `buf` and `iov` outlive both completions.
    let short = unsafe { ctx.start_fill(1, &iov, 1, 64) };
    ctx.complete_now(short, 16);
    let first = run(&mut ctx, 1);
    // SAFETY: as above.
    let failed = unsafe { ctx.start_fill(2, &iov, 1, 64) };
    ctx.complete_now(failed, -libc::EIO);
    let second = run(&mut ctx, 1);

    // Assert
    assert_eq!(first, vec![Completion { tag: 1, result: 64 }]);
    assert_eq!(
        second,
        vec![Completion {
            tag: 2,
            result: -libc::EIO
        }]
    );
    assert!(buf[..16].iter().all(|&b| b == 0xff));
    assert!(buf[16..].iter().all(|&b| b == 0));
    assert!(ctx.executor().is_idle());
}

#[test]
fn an_empty_join_completes_at_once() {
    let mut ctx = IoContext::new(32, false).unwrap();
    let _ = ctx.start_join(3, 0);
    assert_eq!(run(&mut ctx, 1), vec![Completion { tag: 3, result: 0 }]);
    assert!(ctx.executor().is_idle());
}

#[test]
fn tasks_nest_a_task_awaits_a_node_that_runs_a_task() {
    // Arrange: an outer task reads through MappedIo, itself a task.
    let mut ctx = IoContext::new(32, false).unwrap();
    let inner = Arc::new(MappedIo {
        child: mapped_image(),
        pause_ns: 10_000,
    });
    let out = Arc::new(Mutex::new(Vec::new()));
    let (inner2, out2) = (inner.clone(), out.clone());

    // Act
    ctx.spawn(11, async move {
        let mut buf = vec![0u8; 16];
        let iov = [buf_iov(&mut buf)];
        // SAFETY: `buf` and `iov` live until the read is awaited.
        let req = unsafe { IoRequest::new(IoKind::Read, 5, 16, iov.as_ptr(), 1, 0) };
        let r = submit(&*inner2, &req).await;
        out2.lock().unwrap().extend_from_slice(&buf);
        r + 1
    });
    let done = run(&mut ctx, 1);

    // Assert
    assert_eq!(
        done,
        vec![Completion {
            tag: 11,
            result: 17
        }]
    );
    let want: Vec<u8> = (5..21).map(|i| (i % 251) as u8).collect();
    assert_eq!(*out.lock().unwrap(), want);
}

#[test]
fn a_dropped_pending_request_is_forgotten_when_it_completes() {
    // Arrange
    let mut ctx = IoContext::new(32, false).unwrap();
    let slow = Arc::new(SlowIo { ns: 1_000_000 });
    let s2 = slow.clone();

    // Act: the task starts a request and returns without awaiting it.
    ctx.spawn(4, async move {
        let p = submit(&*s2, &IoRequest::without_data(IoKind::Flush, 0, 0, 0));
        drop(p);
        3
    });
    let done = run(&mut ctx, 1);

    // Assert: the task completed; the executor is busy until the request
    // it dropped has completed too, then idle.
    assert_eq!(done, vec![Completion { tag: 4, result: 3 }]);
    assert!(ctx.busy());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ctx.executor().is_idle() {
        assert!(Instant::now() < deadline);
        let mut more = Vec::new();
        ctx.reap(&mut more);
        assert!(more.is_empty(), "{more:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn overlapping_range_locks_run_one_after_the_other() {
    // Arrange: two tasks take overlapping ranges and log their steps.
    let mut ctx = IoContext::new(32, false).unwrap();
    let locks = RangeLocks::default();
    let log = Arc::new(Mutex::new(Vec::new()));
    for (tag, (start, end)) in [(1u64, (0u64, 4096u64)), (2, (2048, 8192))] {
        let (locks, log) = (locks.clone(), log.clone());
        ctx.spawn(tag, async move {
            let Ok(_g) = locks.lock(start, end).await else {
                return -1;
            };
            log.lock().unwrap().push(format!("{tag} in"));
            sleep(2_000_000).await;
            log.lock().unwrap().push(format!("{tag} out"));
            0
        });
    }
    // A third, disjoint range does not wait.
    let (l3, log3) = (locks.clone(), log.clone());
    ctx.spawn(3, async move {
        let Ok(_g) = l3.lock(8192, 9000).await else {
            return -1;
        };
        log3.lock().unwrap().push("3 in".to_string());
        0
    });

    // Act
    let mut done = run(&mut ctx, 3);

    // Assert
    done.sort_by_key(|c| c.tag);
    assert!(done.iter().all(|c| c.result == 0), "{done:?}");
    assert_eq!(
        *log.lock().unwrap(),
        vec!["1 in", "3 in", "1 out", "2 in", "2 out"]
    );
    assert_eq!(locks.held(), 0);
}

#[test]
fn shared_range_locks_overlap_and_exclude_an_exclusive_one() {
    let mut ctx = IoContext::new(32, false).unwrap();
    let locks = RangeLocks::default();
    let order = Arc::new(Mutex::new(Vec::new()));
    for (tag, shared) in [(1u64, true), (2, true), (3, false)] {
        let (locks, order) = (locks.clone(), order.clone());
        ctx.spawn(tag, async move {
            let taking = if shared {
                locks.lock_shared(0, 100)
            } else {
                locks.lock(0, 100)
            };
            let Ok(_g) = taking.await else { return -1 };
            order.lock().unwrap().push(tag);
            sleep(1_000_000).await;
            0
        });
    }
    // Both shared holders are in before the exclusive one waits.
    assert_eq!(*order.lock().unwrap(), vec![1, 2]);
    let done = run(&mut ctx, 3);
    assert_eq!(done.len(), 3);
    assert_eq!(*order.lock().unwrap(), vec![1, 2, 3]);
}

#[test]
fn a_range_lock_held_on_another_thread_wakes_the_waiting_task() {
    // Arrange: this thread holds the range outside any task.
    let locks = RangeLocks::default();
    let guard = locks.try_lock(0, 4096).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let l2 = locks.clone();
    let waiter = std::thread::spawn(move || {
        let mut ctx = IoContext::new(32, false).unwrap();
        ctx.spawn(1, async move {
            match l2.lock(100, 200).await {
                Ok(_g) => 0,
                Err(e) => e,
            }
        });
        tx.send(()).unwrap();
        run(&mut ctx, 1)
    });
    rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(20));

    // Act
    drop(guard);

    // Assert
    let done = waiter.join().unwrap();
    assert_eq!(done, vec![Completion { tag: 1, result: 0 }]);
    assert_eq!(locks.held(), 0);
}

#[test]
fn a_range_lock_awaited_outside_a_task_is_refused_not_hung() {
    let locks = RangeLocks::default();
    let _g = locks.try_lock(0, 10).unwrap();
    let mut f = std::pin::pin!(locks.lock(5, 6));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(
        f.as_mut().poll(&mut cx),
        Poll::Ready(Err(e)) if e == -libc::EDEADLK
    ));
    assert!(locks.try_lock(5, 6).is_none());
}

#[test]
fn submit_outside_a_task_fails_at_once() {
    let slow = SlowIo { ns: 1 };
    let mut p = std::pin::pin!(submit(
        &slow,
        &IoRequest::without_data(IoKind::Flush, 0, 0, 0)
    ));
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(p.as_mut().poll(&mut cx), Poll::Ready(-libc::EINVAL));
}

#[test]
fn task_futures_are_recycled_not_allocated_per_request() {
    // Arrange
    let mut ctx = IoContext::new(32, false).unwrap();
    let node = MappedIo {
        child: mapped_image(),
        pause_ns: 0,
    };
    let mut buf = vec![0u8; 512];
    let iov = [buf_iov(&mut buf)];

    // Act: a thousand requests, eight at a time.
    for round in 0..125u64 {
        for i in 0..8 {
            // SAFETY: `buf` and `iov` outlive the run (all requests read
            // the same bytes into it).
            node.submit(&mut ctx, &unsafe {
                IoRequest::new(IoKind::Read, 0, 512, iov.as_ptr(), 1, round * 8 + i)
            });
        }
        run(&mut ctx, 8);
    }

    // Assert: blocks were taken once, for the first round.
    assert!(
        ctx.executor().blocks_allocated() <= 8,
        "{} blocks",
        ctx.executor().blocks_allocated()
    );
}

#[test]
fn large_futures_get_their_own_allocation_and_still_run() {
    let mut ctx = IoContext::new(32, false).unwrap();
    let big = [7u8; 10_000];
    ctx.spawn(1, async move {
        sleep(1000).await;
        i32::from(big[9_999])
    });
    assert_eq!(run(&mut ctx, 1), vec![Completion { tag: 1, result: 7 }]);
}

#[test]
fn tasks_run_on_the_thread_pool_engine_too() {
    let mut ctx = IoContext::new(32, true).unwrap();
    let node = MappedIo {
        child: mapped_image(),
        pause_ns: 1_000_000,
    };
    let mut buf = vec![0u8; 8];
    let iov = [buf_iov(&mut buf)];
    // SAFETY: `buf` and `iov` outlive the run below.
    node.submit(&mut ctx, &unsafe {
        IoRequest::new(IoKind::Read, 0, 8, iov.as_ptr(), 1, 1)
    });
    assert_eq!(run(&mut ctx, 1), vec![Completion { tag: 1, result: 8 }]);
    assert_eq!(buf, (0..8).collect::<Vec<u8>>());
}

/// A node that finishes every request at once (null-co's direct path).
struct DoneIo;

impl BlockIo for DoneIo {
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

/// Passes each request to its child through a task (the shape of every
/// multi-step request, at its cheapest).
struct TaskPass(Arc<DoneIo>);

impl BlockIo for TaskPass {
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
        let (child, req) = (self.0.clone(), *req);
        ctx.spawn(req.tag(), async move { submit(&*child, &req).await });
    }
}

/// Splits each request in two halves joined on its tag.
struct JoinPass(Arc<DoneIo>);

impl BlockIo for JoinPass {
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
        let tag = ctx.start_join(req.tag(), 2);
        let half = req.len() / 2;
        for off in [0, half] {
            self.0.submit(
                ctx,
                &IoRequest::without_data(IoKind::Discard, req.offset() + off, half, tag),
            );
        }
    }
}

/// Starts each request as a fill, completed at once in full (the file
/// driver's reads of a regular file).
struct FillPass;

impl BlockIo for FillPass {
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
        let (iov, iovcnt) = req.iov();
        // SAFETY: the measurement's requests carry no buffers and complete
        // in full, so nothing is ever zeroed.
        let tag = unsafe { ctx.start_fill(req.tag(), iov, iovcnt, req.len()) };
        ctx.complete_now(tag, req.len() as i32);
    }
}

/// ns per request through `node`, 32 at a time, best of five.
fn per_request(node: &dyn BlockIo) -> f64 {
    let mut ctx = IoContext::new(64, false).unwrap();
    let mut out = Vec::with_capacity(64);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let n = 200_000u64;
        let t = Instant::now();
        for i in 0..n / 32 {
            for j in 0..32 {
                node.submit(
                    &mut ctx,
                    &IoRequest::without_data(IoKind::Discard, 0, 4096, i * 32 + j),
                );
            }
            out.clear();
            ctx.reap(&mut out);
            assert_eq!(out.len(), 32);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

/// What a task and a join cost over the direct path; run with
/// `cargo test --release --lib measure_executor -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_executor_overhead() {
    let direct = per_request(&DoneIo);
    let task = per_request(&TaskPass(Arc::new(DoneIo)));
    let join = per_request(&JoinPass(Arc::new(DoneIo)));
    let fill = per_request(&FillPass);
    println!(
        "ns per request: direct {direct:.1}, through a task {task:.1}, a join of two {join:.1}, \
         a fill {fill:.1}"
    );
}
