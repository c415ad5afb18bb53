//! One I/O thread, several clients: while a vhost-user queue on iothread
//! `io0` serves a guest's writes and reads, the same thread echoes a
//! socket through an fd handler, runs a periodic timer and runs a task
//! that reads the image's file node through `task::submit`. The daemon
//! runs in this process so that the test can hand the thread closures.

mod common;

use common::blk::Blk;
use common::TempDir;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::epoll::EventSet;
use vubd::block::io::{IoKind, IoRequest};
use vubd::cli::{self, Command};
use vubd::daemon::Daemon;
use vubd::io::task;
use vubd::iothread::Handled;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn byte(seed: u64, off: u64) -> u8 {
    ((off / 7) ^ seed).wrapping_mul(31) as u8
}

fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte(seed, off + i)).collect()
}

#[test]
fn one_iothread_serves_a_queue_a_socket_a_timer_and_a_task() {
    // Arrange: the image holds pattern 1; the guest rewrites its first
    // MiB, the task reads its last.
    let dir = TempDir::new("iothread-clients");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern(1, 0, 4 * MIB as usize)).unwrap();
    let sock = dir.path().join("vhost.sock");
    let args = [
        "--object".to_string(),
        "iothread,id=io0".to_string(),
        "--blockdev".to_string(),
        format!("driver=file,node-name=f0,filename={}", image.display()),
        "--blockdev".to_string(),
        "driver=raw,node-name=d0,file=f0".to_string(),
        "--export".to_string(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
             writable=on,iothread=io0",
            sock.display()
        ),
    ];
    let Ok(Command::Run(inv)) = cli::parse_args(args) else {
        panic!("command line not accepted");
    };
    let mut daemon = Daemon::new();
    daemon.start(&inv).unwrap();
    let thread = daemon.iothreads.get("io0").unwrap();
    let file = daemon.graph.node("f0").unwrap().io.clone();
    let mut blk = Blk::connect(&sock);
    let ran_on = Arc::new(Mutex::new(Vec::<String>::new()));
    let here = |ran_on: &Arc<Mutex<Vec<String>>>, what: &str| {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        ran_on.lock().unwrap().push(format!("{what} on {name}"));
    };

    // Act: an echo handler on a socket pair, a 1 ms timer, and a task
    // that reads the last MiB in 4 KiB steps with a sleep between.
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let (r, t) = (ran_on.clone(), ran_on.clone());
    let ticks = Arc::new(AtomicUsize::new(0));
    let k = ticks.clone();
    let timer = thread
        .call(move |ctx| {
            ctx.register_fd(theirs.as_raw_fd(), EventSet::IN, move |_, _| {
                here(&r, "handler");
                let mut buf = [0u8; 64];
                match (&theirs).read(&mut buf) {
                    Ok(0) | Err(_) => Handled::Remove,
                    Ok(n) => {
                        let _ = (&theirs).write_all(&buf[..n]);
                        Handled::Keep
                    }
                }
            })
            .unwrap();
            ctx.add_timer(
                Duration::from_millis(1),
                Some(Duration::from_millis(1)),
                move |_| {
                    if k.fetch_add(1, Ordering::Relaxed) == 0 {
                        here(&t, "timer");
                    }
                    Handled::Keep
                },
            )
            .unwrap()
        })
        .unwrap();
    let tk = ran_on.clone();
    let task_done = thread.spawn_task(move || async move {
        here(&tk, "task");
        let mut read = 0;
        for step in 0..64u64 {
            let off = 3 * MIB + step * 4096;
            let mut buf = vec![0u8; 4096];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: `buf` and `iov` outlive the awaited request.
            let req = unsafe { IoRequest::new(IoKind::Read, off, 4096, &iov, 1, 0) };
            let r = task::submit(&*file, &req).await;
            if r != 4096 || buf != pattern(1, off, 4096) {
                return -libc::EIO;
            }
            read += r;
            task::sleep(200_000).await;
        }
        read
    });
    // Meanwhile the guest writes and reads back its first MiB, and the
    // socket is echoed now and then.
    for i in 0..256u64 {
        let off = (i % 256) * 4096;
        let data = pattern(2 + i, off, 4096);
        assert_eq!(blk.write(off, &data), 0, "write {i}");
        assert_eq!(blk.read(off, 4096), data, "read back {i}");
        if i % 32 == 0 {
            ours.write_all(b"ping").unwrap();
            let mut back = [0u8; 4];
            ours.set_read_timeout(Some(WAIT)).unwrap();
            ours.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"ping");
        }
    }

    // Assert
    assert_eq!(
        task_done.recv_timeout(WAIT),
        Ok(64 * 4096),
        "the task's reads"
    );
    assert!(ticks.load(Ordering::Relaxed) > 0, "the timer fired");
    assert_eq!(thread.call(move |ctx| ctx.unregister(timer)), Some(true));
    let mut seen = ran_on.lock().unwrap().clone();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        [
            "handler on iothread-io0",
            "task on iothread-io0",
            "timer on iothread-io0"
        ]
    );
    drop(ours);
    drop(blk);
    drop(thread);
    daemon.shutdown();
}
