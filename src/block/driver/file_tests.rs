//! The file driver's reads at the end of a regular file: whatever the
//! engine, a read reaching past the end completes whole, zeroed beyond it.

use super::file::FileDriver;
use super::{Driver, NodeFlags};
use crate::block::io::{IoKind, IoRequest};
use crate::io::{Completion, IoContext};
use crate::qapi::{BlockdevOptionsFile, OnOffAuto};
use std::time::{Duration, Instant};

/// A file of `len` bytes of 0xab, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, len: usize) -> Self {
        let p = std::env::temp_dir().join(format!("vubd-file-{tag}-{}", std::process::id()));
        std::fs::write(&p, vec![0xabu8; len]).unwrap();
        TempFile(p)
    }

    fn open(&self) -> FileDriver {
        let opts = BlockdevOptionsFile {
            filename: self.0.to_string_lossy().into_owned(),
            locking: Some(OnOffAuto::Off),
            ..BlockdevOptionsFile::default()
        };
        FileDriver::open(&opts, &NodeFlags::default(), false).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn wait(ctx: &mut IoContext, want: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < want {
        assert!(Instant::now() < deadline, "only {out:?} of {want} in 5 s");
        ctx.submit().unwrap();
        ctx.reap(&mut out);
        std::thread::sleep(Duration::from_micros(50));
    }
    out.sort_by_key(|c| c.tag);
    out
}

/// Reads `len` bytes at each offset (one request each, all at once) from a
/// file of 1000 bytes into buffers full of 0xff; returns the completions
/// and the buffers.
fn read_at_end(threads_only: bool, offsets: &[u64], len: usize) -> (Vec<Completion>, Vec<Vec<u8>>) {
    let file = TempFile::new(if threads_only { "pool" } else { "uring" }, 1000);
    let node = file.open().io();
    let mut ctx = IoContext::new(32, threads_only).unwrap();
    let mut bufs: Vec<Vec<u8>> = offsets.iter().map(|_| vec![0xffu8; len]).collect();
    // Two iovecs per read, so that the zeroing crosses from one to the next.
    let iovs: Vec<[libc::iovec; 2]> = bufs
        .iter_mut()
        .map(|b| {
            let (a, z) = b.split_at_mut(len / 4);
            [
                libc::iovec {
                    iov_base: a.as_mut_ptr().cast(),
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: z.as_mut_ptr().cast(),
                    iov_len: z.len(),
                },
            ]
        })
        .collect();
    for (i, (&offset, iov)) in offsets.iter().zip(&iovs).enumerate() {
        // SAFETY: `bufs` and `iovs` outlive the wait below.
        let req =
            unsafe { IoRequest::new(IoKind::Read, offset, len as u64, iov.as_ptr(), 2, i as u64) };
        node.submit(&mut ctx, &req);
    }
    let done = wait(&mut ctx, offsets.len());
    assert!(ctx.executor().is_idle());
    (done, bufs)
}

fn reads_past_the_end_complete_whole_with_zeroes(threads_only: bool) {
    // Act: one read across the end, one wholly past it, one inside.
    let (done, bufs) = read_at_end(threads_only, &[512, 4096, 0], 1024);

    // Assert
    let full: Vec<Completion> = (0..3).map(|tag| Completion { tag, result: 1024 }).collect();
    assert_eq!(done, full);
    assert!(bufs[0][..488].iter().all(|&b| b == 0xab));
    assert!(
        bufs[0][488..].iter().all(|&b| b == 0),
        "past the end reads as zeroes"
    );
    assert!(bufs[1].iter().all(|&b| b == 0));
    assert!(bufs[2][..1000].iter().all(|&b| b == 0xab));
    assert!(bufs[2][1000..].iter().all(|&b| b == 0));
}

#[test]
fn reads_past_the_end_of_a_file_complete_whole_with_zeroes_on_io_uring() {
    reads_past_the_end_complete_whole_with_zeroes(false);
}

#[test]
fn reads_past_the_end_of_a_file_complete_whole_with_zeroes_on_the_thread_pool() {
    reads_past_the_end_complete_whole_with_zeroes(true);
}

#[test]
fn a_lone_read_across_the_end_is_filled_too() {
    // A single read goes the non-blocking way first, then to the engine.
    let (done, bufs) = read_at_end(false, &[768], 512);
    assert_eq!(
        done,
        [Completion {
            tag: 0,
            result: 512
        }]
    );
    assert!(bufs[0][..232].iter().all(|&b| b == 0xab));
    assert!(bufs[0][232..].iter().all(|&b| b == 0));
}
