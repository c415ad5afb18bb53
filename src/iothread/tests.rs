//! The loop's generic parts on a thread with no built-in client: closures
//! with answers, an fd handler on a socket pair, timers, and a task that
//! does I/O on a node.

use super::polling::PollPolicy;
use super::*;
use crate::block::error::BlockError;
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::io::{task, IoContext};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use vmm_sys_util::epoll::EventSet;

const WAIT: Duration = Duration::from_secs(5);

/// Calls `f` every millisecond until it is true, for at most [`WAIT`].
fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

fn thread() -> Arc<Thread<()>> {
    Thread::<()>::spawn("test", PollPolicy::DEFAULT).unwrap()
}

/// A node of 64 KiB whose byte at offset `o` is `o % 251`; completes at once.
struct PatternIo;

impl BlockIo for PatternIo {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(64 << 10)
    }
    fn truncate(&self, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let (iov, n) = req.iov();
        let mut at = req.offset();
        for i in 0..n as usize {
            // SAFETY: the test's iovecs are valid for the request.
            let v = unsafe { &*iov.add(i) };
            // SAFETY: as above.
            let buf = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
            for b in buf {
                *b = (at % 251) as u8;
                at += 1;
            }
        }
        ctx.complete_now(req.tag(), req.len() as i32);
    }
}

#[test]
fn a_closure_runs_on_the_thread_and_answers() {
    let t = thread();
    let name = t.call(|_| std::thread::current().name().map(str::to_string));
    assert_eq!(name, Some(Some("iothread-test".to_string())));
    // Per-thread state persists between closures.
    t.call(|ctx| *ctx.io.state::<u32>() += 5).unwrap();
    assert_eq!(t.call(|ctx| *ctx.io.state::<u32>()), Some(5));
}

#[test]
fn an_fd_handler_serves_a_socket_until_it_removes_itself() {
    let t = thread();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let id = t
        .call(move |ctx| {
            let fd = theirs.as_raw_fd();
            ctx.register_fd(fd, EventSet::IN, move |_, _| {
                let mut buf = [0u8; 64];
                match (&theirs).read(&mut buf) {
                    Ok(0) | Err(_) => Handled::Remove,
                    Ok(n) => {
                        // Echo back, upper case.
                        let _ = (&theirs).write_all(&buf[..n].to_ascii_uppercase());
                        let _ = tx.send(n);
                        Handled::Keep
                    }
                }
            })
        })
        .unwrap()
        .unwrap();
    for word in ["ping", "pong"] {
        ours.write_all(word.as_bytes()).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), 4);
        let mut back = [0u8; 4];
        ours.read_exact(&mut back).unwrap();
        assert_eq!(&back, word.to_ascii_uppercase().as_bytes());
    }
    // The peer hangs up: the handler removes itself.
    drop(ours);
    assert!(wait_until(|| t.call(|ctx| ctx.handlers()) == Some(0)));
    assert_eq!(t.call(move |ctx| ctx.unregister(id)), Some(false));
}

#[test]
fn timers_fire_once_or_periodically_until_removed() {
    let t = thread();
    let once = Arc::new(AtomicUsize::new(0));
    let ticks = Arc::new(AtomicUsize::new(0));
    let (o, k) = (once.clone(), ticks.clone());
    t.call(move |ctx| {
        ctx.add_timer(Duration::from_millis(1), None, move |_| {
            o.fetch_add(1, Ordering::Relaxed);
            Handled::Keep
        })
        .unwrap();
        ctx.add_timer(
            Duration::from_millis(1),
            Some(Duration::from_millis(2)),
            move |_| {
                let n = k.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 3 {
                    Handled::Remove
                } else {
                    Handled::Keep
                }
            },
        )
        .unwrap();
    })
    .unwrap();
    assert!(wait_until(|| t.call(|ctx| ctx.handlers()) == Some(0)));
    assert_eq!(
        once.load(Ordering::Relaxed),
        1,
        "a one-shot timer fires once"
    );
    assert_eq!(ticks.load(Ordering::Relaxed), 3);
}

#[test]
fn a_spawned_task_reads_a_node_and_sleeps_on_the_thread() {
    let t = thread();
    let node: Arc<dyn BlockIo> = Arc::new(PatternIo);
    let done = t.spawn_task(move || async move {
        let mut sum = 0i32;
        for round in 0..3u64 {
            let mut buf = vec![0u8; 4096];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: `buf` and `iov` live until the request is awaited.
            let req = unsafe { IoRequest::new(IoKind::Read, round * 4096, 4096, &iov, 1, 0) };
            let r = task::submit(&*node, &req).await;
            if r != 4096
                || buf
                    .iter()
                    .enumerate()
                    .any(|(i, &b)| b != ((round * 4096 + i as u64) % 251) as u8)
            {
                return -libc::EIO;
            }
            sum += r;
            task::sleep(100_000).await;
        }
        sum
    });
    assert_eq!(done.recv_timeout(WAIT).unwrap(), 3 * 4096);
    assert_eq!(t.call(|ctx| ctx.tasks()), Some(0));
}

#[test]
fn polling_calls_the_hooks_of_other_clients() {
    let t = Thread::<()>::spawn("hooks", PollPolicy::Fixed(200_000)).unwrap();
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let f = flag.clone();
    let id = t
        .call(move |ctx| {
            ctx.add_poll_hook(move |_| {
                let found = f.swap(false, Ordering::AcqRel);
                if found {
                    let _ = tx.send(());
                }
                found
            })
        })
        .unwrap();
    for _ in 0..3 {
        // Work for the hook, and a message so that the thread, asleep by
        // now, polls again after it.
        flag.store(true, Ordering::Release);
        t.run(|_| {});
        rx.recv_timeout(WAIT).unwrap();
    }
    assert_eq!(t.call(move |ctx| ctx.remove_poll_hook(id)), Some(true));
    assert_eq!(t.call(move |ctx| ctx.remove_poll_hook(id)), Some(false));
    // A hook that removes itself the first time it runs.
    let (tx, rx) = std::sync::mpsc::channel();
    t.call(move |ctx| {
        let me = Arc::new(AtomicUsize::new(0));
        let m = me.clone();
        let id = ctx.add_poll_hook(move |ctx| {
            let _ = tx.send(ctx.remove_poll_hook(m.load(Ordering::Relaxed) as u64));
            false
        });
        me.store(id as usize, Ordering::Relaxed);
    })
    .unwrap();
    t.run(|_| {});
    assert_eq!(rx.recv_timeout(WAIT), Ok(true));
    // Gone: after another round of polling its closure (and sender) was
    // dropped.
    t.run(|_| {});
    assert_eq!(
        rx.recv_timeout(WAIT),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
    );
}

#[test]
fn new_polling_options_reach_a_running_named_thread() {
    let mut threads = IoThreads::default();
    threads.add("io0", PollPolicy::DEFAULT).unwrap();
    let t = threads.get("io0").unwrap();
    assert_eq!(t.call(|ctx| ctx.poll_policy()), Some(PollPolicy::DEFAULT));
    threads.set_poll("io0", PollPolicy::Fixed(5_000)).unwrap();
    assert_eq!(
        t.call(|ctx| ctx.poll_policy()),
        Some(PollPolicy::Fixed(5_000))
    );
    // In use while a handle is held; removable once it is not.
    assert!(threads.remove("io0").is_err());
    drop(t);
    threads.remove("io0").unwrap();
}
