//! The engines against a real file: both must give the same results.

use super::*;

fn temp_file(tag: &str) -> (std::path::PathBuf, std::fs::File) {
    let p = std::env::temp_dir().join(format!("vubd-io-{tag}-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(1 << 20).unwrap();
    (p, f)
}

fn wait(ctx: &mut IoContext, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while out.len() < n && std::time::Instant::now() < deadline {
        ctx.reap(&mut out);
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    out.sort_by_key(|c| c.tag);
    out
}

fn write_then_read(threads_only: bool) {
    use std::os::fd::AsRawFd;
    let (path, file) = temp_file(if threads_only { "pool" } else { "uring" });
    let mut ctx = IoContext::new(64, threads_only).unwrap();
    let data = vec![0xabu8; 8192];
    let wiov = [libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }];
    let fd = file.as_raw_fd();
    // SAFETY: `data` and `wiov` outlive the wait below.
    unsafe {
        ctx.push(
            Op::Writev {
                fd,
                offset: 4096,
                iov: wiov.as_ptr(),
                iovcnt: 1,
            },
            1,
        );
        ctx.push(
            Op::Sleep {
                ns: 1000,
                result: 7,
            },
            2,
        );
    }
    ctx.submit().unwrap();
    let done = wait(&mut ctx, 2);
    assert_eq!(
        done,
        [
            Completion {
                tag: 1,
                result: 8192
            },
            Completion { tag: 2, result: 7 }
        ]
    );
    let mut back = vec![0u8; 8192];
    let riov = [libc::iovec {
        iov_base: back.as_mut_ptr() as *mut libc::c_void,
        iov_len: back.len(),
    }];
    // SAFETY: `back` and `riov` outlive the wait below.
    unsafe {
        ctx.push(
            Op::Readv {
                fd,
                offset: 4096,
                iov: riov.as_ptr(),
                iovcnt: 1,
                cached: true,
            },
            3,
        );
        ctx.push(Op::Flush { fd }, 4);
    }
    ctx.submit().unwrap();
    let done = wait(&mut ctx, 2);
    assert_eq!(
        done,
        [
            Completion {
                tag: 3,
                result: 8192
            },
            Completion { tag: 4, result: 0 }
        ]
    );
    assert_eq!(back, data);
    ctx.complete_now(9, -libc::EIO);
    assert_eq!(
        wait(&mut ctx, 1),
        [Completion {
            tag: 9,
            result: -libc::EIO
        }]
    );
    assert!(!ctx.busy());
    let _ = std::fs::remove_file(path);
}

#[test]
fn uring_engine_writes_reads_flushes_and_sleeps() {
    write_then_read(false);
}

#[test]
fn pool_engine_gives_the_same_results() {
    write_then_read(true);
}

/// A file that refuses RWF_NOWAIT (procfs here; network file systems in
/// real use) still reads correctly, and after the first refusal its lone
/// reads are not held back for an inline attempt any more.
#[test]
fn lone_read_of_a_file_refusing_nowait_goes_to_the_ring_and_is_remembered() {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open("/proc/self/cmdline").unwrap();
    let mut ctx = IoContext::new(64, false).unwrap();
    if matches!(ctx.engine, Engine::Threads(_)) {
        return; // No io_uring here: no lone reads either.
    }
    let mut back = vec![0u8; 64];
    let iov = [libc::iovec {
        iov_base: back.as_mut_ptr() as *mut libc::c_void,
        iov_len: back.len(),
    }];
    let read = Op::Readv {
        fd: file.as_raw_fd(),
        offset: 0,
        iov: iov.as_ptr(),
        iovcnt: 1,
        cached: true,
    };
    for tag in 1..=2 {
        // SAFETY: `back` and `iov` outlive the waits below.
        unsafe { ctx.push(read, tag) };
        assert_eq!(
            ctx.lone.is_some(),
            tag == 1,
            "held back for an inline try only before the first refusal"
        );
        ctx.submit().unwrap();
        assert!(!ctx.has_immediate(), "procfs cannot be read inline");
        let done = wait(&mut ctx, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].tag, tag);
        assert!(done[0].result > 0, "read through the ring: {:?}", done[0]);
    }
    assert_eq!(ctx.no_nowait, [file.as_raw_fd()]);
    assert!(!ctx.busy());
}

/// A batch of one cached read finishes during submit, without the ring; a
/// lone read the page cache cannot fully serve (here: one crossing the end
/// of the file) still completes through the ring with its real count.
#[test]
fn lone_cached_read_finishes_at_submit_and_short_ones_use_the_ring() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let (path, file) = temp_file("lone");
    file.write_all_at(&[0x5a; 4096], 8192).unwrap();
    let mut ctx = IoContext::new(64, false).unwrap();
    let mut back = vec![0u8; 4096];
    let iov = [libc::iovec {
        iov_base: back.as_mut_ptr() as *mut libc::c_void,
        iov_len: back.len(),
    }];
    let read = |offset| Op::Readv {
        fd: file.as_raw_fd(),
        offset,
        iov: iov.as_ptr(),
        iovcnt: 1,
        cached: true,
    };
    // SAFETY: `back` and `iov` outlive the waits below.
    unsafe { ctx.push(read(8192), 1) };
    assert!(ctx.busy(), "a held-back read counts as in flight");
    ctx.submit().unwrap();
    assert!(ctx.has_immediate(), "the cached read finished inline");
    assert_eq!(
        wait(&mut ctx, 1),
        [Completion {
            tag: 1,
            result: 4096
        }]
    );
    assert!(back.iter().all(|&b| b == 0x5a));
    // The file is 1 MiB long: 1024 bytes remain from here.
    // SAFETY: as above.
    unsafe { ctx.push(read((1 << 20) - 1024), 2) };
    ctx.submit().unwrap();
    assert!(!ctx.has_immediate(), "a short read is not taken inline");
    assert_eq!(
        wait(&mut ctx, 1),
        [Completion {
            tag: 2,
            result: 1024
        }]
    );
    assert!(!ctx.busy());
    let _ = std::fs::remove_file(path);
}
