//! The data path of vhost-user-blk exports, driven by libblkio's
//! `virtio-blk-vhost-user` driver: what a frontend writes is what the
//! image holds and the other way round, flush, discard and write-zeroes
//! (checked in the file's allocation), large and scattered requests,
//! several queues and iothreads, what the frontend sees of the device,
//! requests out of range, reconnecting, resizing, and the export's life
//! over QMP.
//!
//! Run with `VUBD_TEST_BINARY=qsd` to check the tests against
//! qemu-storage-daemon; `VUBD_LOG=debug` makes vubd log to the stderr
//! shown on failure.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::blk::{Blk, BlkOptions, BlkQueue, IO_TIMEOUT};
use common::*;
use serde_json::{json, Value};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a group of I/O threads may run before the test fails.
const THREADS_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------
// Data and files

/// A byte that depends on the seed and its position on the disk, so that
/// data at the wrong place or from the wrong write shows.
fn byte_at(seed: u8, pos: u64) -> u8 {
    let x = (pos ^ (u64::from(seed) << 48)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8
}

/// `len` bytes of pattern `seed` as they belong at disk offset `pos`.
fn pattern(seed: u8, pos: u64, len: usize) -> Vec<u8> {
    (pos..pos + len as u64).map(|p| byte_at(seed, p)).collect()
}

/// Asserts two byte strings are equal, naming the first difference
/// instead of printing megabytes.
#[track_caller]
fn assert_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: first difference at byte {i}: {:#04x}, expected {:#04x}",
            actual[i], expected[i]
        );
    }
}

#[track_caller]
fn assert_zeroes(actual: &[u8], what: &str) {
    if let Some(i) = actual.iter().position(|&b| b != 0) {
        panic!("{what}: byte {i} is {:#04x}, expected zero", actual[i]);
    }
}

fn read_file_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read {}+{len} of {}: {e}", off, path.display()));
    buf
}

fn write_file_at(path: &Path, off: u64, data: &[u8]) {
    let f = File::options()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, off).unwrap();
}

/// How an image starts out.
#[derive(Clone, Copy)]
enum Fill {
    /// All holes.
    Sparse,
    /// Written with `pattern(seed, ..)` throughout.
    Pattern(u8),
}

fn create_image(path: &Path, size: u64, fill: Fill) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    match fill {
        Fill::Sparse => f.set_len(size).unwrap(),
        Fill::Pattern(seed) => {
            let chunk = MIB as usize;
            let mut off = 0;
            while off < size {
                let len = chunk.min((size - off) as usize);
                f.write_all_at(&pattern(seed, off, len), off).unwrap();
                off += len as u64;
            }
        }
    }
    f.sync_all().unwrap();
}

/// Bytes of disk space the file occupies.
fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// True if `off..off+len` of the file is a hole (SEEK_DATA finds no data
/// before its end).
fn is_hole(path: &Path, off: u64, len: u64) -> bool {
    let f = File::open(path).unwrap();
    // SAFETY: lseek on a descriptor this function owns.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "SEEK_DATA: {err}");
        return true; // no data up to the end of the file
    }
    data as u64 >= off + len
}

/// True if no byte of `off..off+len` lies in a hole.
fn is_data(path: &Path, off: u64, len: u64) -> bool {
    let f = File::open(path).unwrap();
    // SAFETY: as in is_hole.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
    assert!(hole >= 0, "SEEK_HOLE: {}", std::io::Error::last_os_error());
    hole as u64 >= off + len
}

/// `qemu-img compare` of two raw images: None if identical, else its
/// report.
fn qemu_img_compare(a: &Path, b: &Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("cannot run qemu-img");
    match out.status.code() {
        Some(0) => None,
        _ => Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

// ---------------------------------------------------------------------
// Daemons

/// The image in the daemon's directory (`{dir}/disk.img`).
fn image(d: &Daemon) -> PathBuf {
    d.dir().join("disk.img")
}

/// The export's socket (`{dir}/vhost.sock`).
fn sock(d: &Daemon) -> PathBuf {
    d.dir().join("vhost.sock")
}

/// `--blockdev` of file node `f0` on `{dir}/disk.img`.
fn file_node(extra: &str) -> String {
    format!("driver=file,node-name=f0,filename={{dir}}/disk.img{extra}")
}

/// `--blockdev` of raw node `d0` on `f0`.
fn raw_node(extra: &str) -> String {
    format!("driver=raw,node-name=d0,file=f0{extra}")
}

/// `--export` of writable export `e0` of `d0` on `{dir}/vhost.sock`.
fn export(extra: &str) -> String {
    format!(
        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,\
         addr.path={{dir}}/vhost.sock,writable=on{extra}"
    )
}

/// Starts the daemon under test with `args` and a monitor, after
/// `prepare` has set up its directory.
fn start_with(args: &[String], prepare: impl FnOnce(&Path)) -> Daemon {
    let mut b = Daemon::vubd(&[]);
    prepare(b.dir());
    for a in args {
        b = b.arg(a);
    }
    b.monitor().start()
}

/// A daemon serving `{dir}/disk.img` (`size` bytes, filled as `fill`)
/// through file node `f0`, raw node `d0` and export `e0`, with extra
/// options for each.
fn start_file_raw(
    size: u64,
    fill: Fill,
    file_opts: &str,
    raw_opts: &str,
    exp_opts: &str,
) -> Daemon {
    let args = [
        "--blockdev".to_string(),
        file_node(file_opts),
        "--blockdev".to_string(),
        raw_node(raw_opts),
        "--export".to_string(),
        export(exp_opts),
    ];
    start_with(&args, |dir| create_image(&dir.join("disk.img"), size, fill))
}

/// Number of descriptors the process has open.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("cannot list the daemon's descriptors")
        .count()
}

/// True when every thread of the process is stopped (state `T`): a
/// SIGSTOP has taken effect only then.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

fn quit(d: &mut Daemon) {
    let mut qmp = d.qmp();
    assert_eq!(qmp.execute("quit", Value::Null), json!({"return": {}}));
    d.wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("daemon still running after quit\n{}", d.describe()));
}

/// Checks that the monitor still answers.  (One session per test: a
/// qsd monitor serves one client at a time.)
#[track_caller]
fn assert_qmp_answers(qmp: &mut Qmp) {
    assert_return(&qmp.execute("query-version", Value::Null));
}

/// True (after saying why) when the daemon under test is qsd and the
/// test checks behaviour only vubd has.
fn vubd_only(test: &str, why: &str) -> bool {
    if Flavor::under_test() == Flavor::Vubd {
        return false;
    }
    eprintln!("{test}: skipped with qemu-storage-daemon: {why}");
    true
}

// ---------------------------------------------------------------------
// What is written is what the file holds, and the other way round

#[test]
fn writes_through_the_export_are_what_the_image_file_holds() {
    // Arrange
    let size = 8 * MIB;
    let mut d = start_file_raw(size, Fill::Sparse, "", "", "");
    let writes: [(u64, usize, u8); 5] = [
        (0, 4096, 1),
        (8 * KIB + 512, 1536, 2),
        (MIB + 512, 64 * KIB as usize, 3),
        (5 * MIB - 2048, 8192, 4),
        (size - 4096, 4096, 5),
    ];
    let expected = d.dir().join("expected.img");
    create_image(&expected, size, Fill::Sparse);
    for &(off, len, seed) in &writes {
        write_file_at(&expected, off, &pattern(seed, off, len));
    }

    // Act
    let mut blk = Blk::connect(&sock(&d));
    for &(off, len, seed) in &writes {
        assert_eq!(
            blk.write(off, &pattern(seed, off, len)),
            0,
            "write {off}+{len}"
        );
    }
    drop(blk);
    quit(&mut d);

    // Assert
    for &(off, len, seed) in &writes {
        assert_bytes(
            &read_file_at(&image(&d), off, len),
            &pattern(seed, off, len),
            &format!("file at {off}+{len}"),
        );
    }
    if let Some(report) = qemu_img_compare(&expected, &image(&d)) {
        panic!("qemu-img compare: image differs from the expected one: {report}");
    }
}

#[test]
fn reads_through_the_export_return_what_the_image_file_holds() {
    // Arrange
    let size = 8 * MIB;
    let d = start_file_raw(size, Fill::Pattern(7), "", "", "");
    let mut blk = Blk::connect(&sock(&d));

    for (off, len) in [
        (0, 4096),
        (512, 512),
        (3 * KIB, 7 * KIB as usize),
        (MIB - 512, 128 * KIB as usize),
        (size - 64 * KIB, 64 * KIB as usize),
    ] {
        // Act
        let data = blk.read(off, len);

        // Assert
        assert_bytes(&data, &pattern(7, off, len), &format!("read {off}+{len}"));
    }
}

#[test]
fn raw_offset_and_size_window_maps_to_its_bytes_of_the_file() {
    // Arrange: the window is 2 MiB from 1 MiB on of an 8 MiB file.
    let (start, len) = (MIB, 2 * MIB);
    let d = start_file_raw(
        8 * MIB,
        Fill::Pattern(1),
        "",
        &format!(",offset={start},size={len}"),
        "",
    );
    let mut blk = Blk::connect(&sock(&d));
    let img = image(&d);

    // Act / Assert: reads see the window's bytes.
    assert_eq!(blk.capacity(), len, "capacity is the window's size");
    assert_bytes(
        &blk.read(0, 64 * KIB as usize),
        &pattern(1, start, 64 * KIB as usize),
        "first 64 KiB of the window",
    );
    assert_bytes(
        &blk.read(len - 4096, 4096),
        &pattern(1, start + len - 4096, 4096),
        "last 4 KiB of the window",
    );

    // Act: write the first and last 4 KiB of the window.
    assert_eq!(blk.write(0, &pattern(2, 0, 4096)), 0);
    assert_eq!(blk.write(len - 4096, &pattern(2, len - 4096, 4096)), 0);
    assert_eq!(blk.flush(), 0);

    // Assert: they are at the window's place in the file, and the bytes
    // around the window are untouched.
    assert_bytes(
        &read_file_at(&img, start, 4096),
        &pattern(2, 0, 4096),
        "file at the window's start",
    );
    assert_bytes(
        &read_file_at(&img, start + len - 4096, 4096),
        &pattern(2, len - 4096, 4096),
        "file at the window's end",
    );
    assert_bytes(
        &read_file_at(&img, start - 4096, 4096),
        &pattern(1, start - 4096, 4096),
        "file just before the window",
    );
    assert_bytes(
        &read_file_at(&img, start + len, 4096),
        &pattern(1, start + len, 4096),
        "file just after the window",
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 * MIB);
}

#[test]
fn null_co_accepts_writes_and_with_read_zeroes_reads_zeroes() {
    // Arrange
    let args = [
        "--blockdev".to_string(),
        "driver=null-co,node-name=d0,size=67108864,read-zeroes=on".to_string(),
        "--export".to_string(),
        export(""),
    ];
    let d = start_with(&args, |_| {});
    let mut blk = Blk::connect(&sock(&d));

    // Act
    let wrote = blk.write(MIB, &pattern(3, MIB, 64 * KIB as usize));
    let data = blk.read(MIB, 64 * KIB as usize);

    // Assert
    assert_eq!(blk.capacity(), 64 * MIB);
    assert_eq!(wrote, 0, "write to null-co");
    assert_zeroes(&data, "null-co read with read-zeroes=on");
    assert_eq!(blk.flush(), 0, "flush of null-co");
}

#[test]
fn null_co_without_read_zeroes_accepts_writes_and_reads() {
    // Arrange
    let args = [
        "--blockdev".to_string(),
        "driver=null-co,node-name=d0,size=67108864".to_string(),
        "--export".to_string(),
        export(""),
    ];
    let d = start_with(&args, |_| {});
    let mut blk = Blk::connect(&sock(&d));

    // Act
    let wrote = blk.write(0, &pattern(3, 0, 4096));
    let read = blk.try_read(0, 4096);

    // Assert: both succeed; what a read returns is unspecified.
    assert_eq!(wrote, 0, "write to null-co");
    assert!(read.is_ok(), "read from null-co failed with {read:?}");
}

// ---------------------------------------------------------------------
// Flush, discard, write-zeroes

#[test]
fn flush_succeeds_and_writes_before_it_are_in_the_file() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    assert_eq!(blk.write(0, &pattern(4, 0, 8192)), 0);
    assert_eq!(blk.write(2 * MIB, &pattern(4, 2 * MIB, 4096)), 0);
    assert_eq!(blk.write_fua(3 * MIB, &pattern(4, 3 * MIB, 4096)), 0);

    // Act
    let flushed = blk.flush();

    // Assert: checked in the file while the daemon runs.
    assert_eq!(flushed, 0, "flush");
    let img = image(&d);
    assert_bytes(
        &read_file_at(&img, 0, 8192),
        &pattern(4, 0, 8192),
        "file at 0",
    );
    assert_bytes(
        &read_file_at(&img, 2 * MIB, 4096),
        &pattern(4, 2 * MIB, 4096),
        "file at 2 MiB",
    );
    assert_bytes(
        &read_file_at(&img, 3 * MIB, 4096),
        &pattern(4, 3 * MIB, 4096),
        "file at 3 MiB (FUA write)",
    );
}

/// A daemon on a 4 MiB image full of pattern 9, `discard=unmap` on both
/// nodes if `unmap`; the connected client.
fn start_allocated(unmap: bool) -> (Daemon, Blk) {
    let opt = if unmap { ",discard=unmap" } else { "" };
    let d = start_file_raw(4 * MIB, Fill::Pattern(9), opt, opt, "");
    let blk = Blk::connect(&sock(&d));
    assert!(
        is_data(&image(&d), 0, 4 * MIB),
        "image starts fully allocated"
    );
    (d, blk)
}

/// The range the discard and write-zeroes tests work on.
const RANGE: (u64, u64) = (MIB, MIB);

/// Checks that the MiB before and after RANGE still hold pattern 9.
#[track_caller]
fn assert_neighbours_intact(blk: &mut Blk) {
    let (off, len) = RANGE;
    assert_bytes(
        &blk.read(off - 4096, 4096),
        &pattern(9, off - 4096, 4096),
        "4 KiB before the range",
    );
    assert_bytes(
        &blk.read(off + len, 4096),
        &pattern(9, off + len, 4096),
        "4 KiB after the range",
    );
}

#[test]
fn write_zeroes_with_unmap_on_discard_unmap_node_leaves_a_hole_of_zeroes() {
    // Arrange
    let (d, mut blk) = start_allocated(true);
    let (off, len) = RANGE;
    let before = allocated_bytes(&image(&d));

    // Act
    let ret = blk.write_zeroes(off, len, true);

    // Assert
    assert_eq!(ret, 0, "write-zeroes with unmap");
    assert!(is_hole(&image(&d), off, len), "range is not a hole");
    assert!(
        allocated_bytes(&image(&d)) <= before - len,
        "file did not shrink by the range"
    );
    assert_zeroes(&blk.read(off, len as usize), "range after write-zeroes");
    assert_neighbours_intact(&mut blk);
}

#[test]
fn discard_on_discard_unmap_node_leaves_a_hole_of_zeroes() {
    // Arrange
    let (d, mut blk) = start_allocated(true);
    let (off, len) = RANGE;
    let before = allocated_bytes(&image(&d));

    // Act
    let ret = blk.discard(off, len);

    // Assert
    assert_eq!(ret, 0, "discard");
    assert!(is_hole(&image(&d), off, len), "range is not a hole");
    assert!(
        allocated_bytes(&image(&d)) <= before - len,
        "file did not shrink by the range"
    );
    assert_zeroes(&blk.read(off, len as usize), "range after discard");
    assert_neighbours_intact(&mut blk);
}

/// Write-zeroes without unmap may leave unwritten extents (which SEEK_DATA
/// reports as holes on ext4 and XFS), but no space is given back: the
/// allocation is checked by the blocks the file occupies.
#[test]
fn write_zeroes_no_unmap_reads_zeroes_and_stays_allocated() {
    // Arrange
    let (d, mut blk) = start_allocated(true);
    let (off, len) = RANGE;
    let before = allocated_bytes(&image(&d));

    // Act
    let ret = blk.write_zeroes(off, len, false);

    // Assert
    assert_eq!(ret, 0, "write-zeroes with NO_UNMAP");
    assert_zeroes(&blk.read(off, len as usize), "range after write-zeroes");
    assert_zeroes(
        &read_file_at(&image(&d), off, len as usize),
        "file after write-zeroes",
    );
    assert_eq!(
        allocated_bytes(&image(&d)),
        before,
        "write-zeroes with NO_UNMAP gave space back"
    );
    assert_neighbours_intact(&mut blk);
}

#[test]
fn write_zeroes_with_unmap_without_discard_unmap_reads_zeroes_and_stays_allocated() {
    // Arrange
    let (d, mut blk) = start_allocated(false);
    let (off, len) = RANGE;
    let before = allocated_bytes(&image(&d));

    // Act
    let ret = blk.write_zeroes(off, len, true);

    // Assert
    assert_eq!(ret, 0, "write-zeroes with unmap");
    assert_zeroes(&blk.read(off, len as usize), "range after write-zeroes");
    assert_eq!(
        allocated_bytes(&image(&d)),
        before,
        "node without discard=unmap gave space back"
    );
    assert_neighbours_intact(&mut blk);
}

#[test]
fn discard_without_discard_unmap_succeeds_and_leaves_the_data_allocated() {
    // Arrange
    let (d, mut blk) = start_allocated(false);
    let (off, len) = RANGE;
    let before = allocated_bytes(&image(&d));

    // Act
    let ret = blk.discard(off, len);

    // Assert
    assert_eq!(ret, 0, "discard");
    assert!(is_data(&image(&d), off, len), "range is no longer all data");
    assert_eq!(
        allocated_bytes(&image(&d)),
        before,
        "discard gave space back"
    );
    assert_bytes(
        &blk.read(off, len as usize),
        &pattern(9, off, len as usize),
        "ignored discard changed the data",
    );
}

// ---------------------------------------------------------------------
// Large and scattered requests

#[test]
fn one_mib_single_buffer_write_and_read_round_trip() {
    // Arrange
    let d = start_file_raw(8 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let (off, len) = (3 * MIB + 4096, MIB as usize);
    let data = pattern(11, off, len);

    // Act
    let wrote = blk.write(off, &data);
    let read = blk.read(off, len);

    // Assert
    assert_eq!(wrote, 0, "1 MiB write");
    assert_bytes(&read, &data, "1 MiB read");
    assert_bytes(
        &read_file_at(&image(&d), off, len),
        &data,
        "file after 1 MiB write",
    );
}

/// Seven buffers of odd numbers of sectors.
const SCATTER_WRITE: [usize; 7] = [3 * 512, 7 * 512, 512, 13 * 512, 5 * 512, 9 * 512, 11 * 512];
/// The same total split differently.
const SCATTER_READ: [usize; 7] = [11 * 512, 512, 9 * 512, 3 * 512, 13 * 512, 7 * 512, 5 * 512];

#[test]
fn writev_of_seven_scattered_buffers_lands_in_order() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let off = MIB + 3 * 512;
    let total: usize = SCATTER_WRITE.iter().sum();
    let data = pattern(12, off, total);

    // Act
    let ret = blk.writev(off, &data, &SCATTER_WRITE);

    // Assert
    assert_eq!(ret, 0, "writev");
    assert_bytes(
        &blk.read(off, total),
        &data,
        "single-buffer read after writev",
    );
    assert_bytes(
        &read_file_at(&image(&d), off, total),
        &data,
        "file after writev",
    );
}

#[test]
fn readv_into_seven_scattered_buffers_fills_them_in_order() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Pattern(13), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let off = 2 * MIB + 5 * 512;
    let total: usize = SCATTER_READ.iter().sum();

    // Act (readv also checks nothing outside the buffers was written)
    let data = blk.readv(off, &SCATTER_READ);

    // Assert
    assert_bytes(
        &data.expect("readv failed"),
        &pattern(13, off, total),
        "readv",
    );
}

#[test]
fn writev_then_readv_with_another_split_round_trip() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let off = 512 * 1001;
    let total: usize = SCATTER_WRITE.iter().sum();
    let data = pattern(14, off, total);

    // Act
    let wrote = blk.writev(off, &data, &SCATTER_WRITE);
    let read = blk.readv(off, &SCATTER_READ);

    // Assert
    assert_eq!(wrote, 0, "writev");
    assert_bytes(&read.expect("readv failed"), &data, "readv after writev");
}

// ---------------------------------------------------------------------
// Several queues

/// Writes to and reads back its own 4 MiB of the disk, many times, with
/// 8 requests of 64 KiB in flight; panics on a wrong result.
fn queue_workout(q: &mut BlkQueue, index: usize, base: u64) {
    const DEPTH: usize = 8;
    const CHUNK: usize = 64 * 1024;
    const ROUNDS: usize = 16;
    let read_at = DEPTH * CHUNK; // reads go after the write buffers
    for round in 0..ROUNDS {
        let seed = (index * ROUNDS + round) as u8;
        let start = base + ((round * DEPTH * CHUNK) as u64 % (4 * MIB));
        for i in 0..DEPTH {
            let off = start + (i * CHUNK) as u64;
            q.fill_buffer(i * CHUNK, &pattern(seed, off, CHUNK));
            q.submit_write(off, i * CHUNK, CHUNK, i, ReqFlags::empty());
        }
        let mut done = q.wait(DEPTH);
        done.sort();
        let want: Vec<(usize, i32)> = (0..DEPTH).map(|i| (i, 0)).collect();
        assert_eq!(done, want, "queue {index} round {round}: writes");
        q.set_buffer(read_at, DEPTH * CHUNK, common::blk::POISON);
        for i in 0..DEPTH {
            q.submit_read(
                start + (i * CHUNK) as u64,
                read_at + i * CHUNK,
                CHUNK,
                100 + i,
            );
        }
        let mut done = q.wait(DEPTH);
        done.sort();
        let want: Vec<(usize, i32)> = (0..DEPTH).map(|i| (100 + i, 0)).collect();
        assert_eq!(done, want, "queue {index} round {round}: reads");
        for i in 0..DEPTH {
            let off = start + (i * CHUNK) as u64;
            assert_bytes(
                &q.buffer(read_at + i * CHUNK, CHUNK),
                &pattern(seed, off, CHUNK),
                &format!("queue {index} round {round} read {i}"),
            );
        }
    }
}

/// Runs `queue_workout` on every queue, each from its own thread, with
/// a deadline for all of them.
fn workout_all_queues(blk: &mut Blk) {
    let queues = blk.take_queues();
    let n = queues.len();
    let (tx, rx) = mpsc::channel();
    for (index, mut q) in queues.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| {
                queue_workout(&mut q, index, index as u64 * 4 * MIB)
            }));
            let _ = tx.send((index, q, r.err()));
        });
    }
    let deadline = Instant::now() + THREADS_TIMEOUT;
    let mut back = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        let (index, q, err) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("queue threads did not finish in {THREADS_TIMEOUT:?}"));
        if let Some(p) = err {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("queue {index}: {msg}"));
        }
        back.push((index, q));
    }
    back.sort_by_key(|(i, _)| *i);
    blk.put_queues(back.into_iter().map(|(_, q)| q).collect());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Starts an export of `nq` queues (with `extra` export options and
/// arguments before it), works every queue from its own thread, and
/// checks the file holds each queue's last round.
fn concurrent_queues(nq: usize, pre_args: &[&str], extra: &str) {
    concurrent_queues_on(nq, pre_args, "", extra);
}

/// `concurrent_queues` with extra options for the file node too.
fn concurrent_queues_on(nq: usize, pre_args: &[&str], file_opts: &str, extra: &str) {
    // Arrange
    let size = nq as u64 * 4 * MIB;
    let mut args: Vec<String> = pre_args.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--blockdev".to_string(),
        file_node(file_opts),
        "--blockdev".to_string(),
        raw_node(""),
        "--export".to_string(),
        export(&format!(",num-queues={nq}{extra}")),
    ]);
    let d = start_with(&args, |dir| {
        create_image(&dir.join("disk.img"), size, Fill::Sparse)
    });
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            num_queues: nq,
            ..BlkOptions::default()
        },
    );
    assert_eq!(blk.get_i32("max-queues"), nq as i32, "max-queues");

    // Act
    workout_all_queues(&mut blk);

    // Assert: rounds 8..16 rewrote each queue's 4 MiB; the last round
    // to touch each 512 KiB is in the file.
    assert_eq!(blk.flush(), 0);
    for index in 0..nq {
        let base = index as u64 * 4 * MIB;
        for slot in 0..8u64 {
            let round = 8 + slot as usize;
            let seed = (index * 16 + round) as u8;
            let off = base + slot * 512 * KIB;
            assert_bytes(
                &read_file_at(&image(&d), off, 512 * KIB as usize),
                &pattern(seed, off, 512 * KIB as usize),
                &format!("file: queue {index} slot {slot}"),
            );
        }
    }
}

#[test]
fn two_queues_from_two_threads_each_keep_their_data() {
    concurrent_queues(2, &[], "");
}

#[test]
fn four_queues_from_four_threads_each_keep_their_data() {
    concurrent_queues(4, &[], "");
}

#[test]
fn four_queues_on_two_iothreads_each_keep_their_data() {
    if vubd_only(
        "four_queues_on_two_iothreads_each_keep_their_data",
        "qsd 10.0 takes one iothread per export, not a list",
    ) {
        return;
    }
    concurrent_queues(
        4,
        &["--object", "iothread,id=io0", "--object", "iothread,id=io1"],
        ",iothread.0=io0,iothread.1=io1",
    );
}

#[test]
fn two_queues_on_one_named_iothread_each_keep_their_data() {
    concurrent_queues(2, &["--object", "iothread,id=io0"], ",iothread=io0");
}

#[test]
fn queues_on_iothreads_with_polling_options_keep_their_data() {
    // Adaptive polling with QEMU's knobs, and polling turned off.
    concurrent_queues(
        2,
        &[
            "--object",
            "iothread,id=io0,poll-max-ns=100000,poll-grow=4,poll-shrink=2",
        ],
        ",iothread=io0",
    );
    concurrent_queues(
        2,
        &["--object", "iothread,id=io0,poll-max-ns=0"],
        ",iothread=io0",
    );
}

#[test]
fn queues_with_a_fixed_polling_time_keep_their_data() {
    if vubd_only(
        "queues_with_a_fixed_polling_time_keep_their_data",
        "poll-us is vubd's own export option",
    ) {
        return;
    }
    concurrent_queues(2, &[], ",poll-us=20");
    concurrent_queues(2, &[], ",poll-us=0");
}

// ---------------------------------------------------------------------
// What the frontend sees of the device

#[test]
fn capacity_equals_the_node_size() {
    // Arrange: a size that is no power of two.
    let size = 10 * MIB + 3 * 512;
    let d = start_file_raw(size, Fill::Sparse, "", "", "");
    let mut qmp = d.qmp();
    let nodes = qmp.execute("query-named-block-nodes", Value::Null);
    let node_size = assert_return(&nodes)
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "d0")
        .expect("node d0 in query-named-block-nodes")["image"]["virtual-size"]
        .as_u64()
        .expect("virtual-size of d0");

    // Act
    let mut blk = Blk::connect(&sock(&d));
    let capacity = blk.capacity();

    // Assert
    assert_eq!(node_size, size);
    assert_eq!(capacity, size);
    assert_eq!(blk.get_i32("request-alignment"), 512);
    assert_eq!(blk.get_i32("max-queues"), 1);
    assert!(!blk.get_bool("read-only"));
    assert!(blk.get_i32("max-segments") >= 7, "max-segments");
}

/// The block size of the file system holding `path` (what `statfs` says).
fn fs_block_size(path: &Path) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: an all-zero statfs is a valid value for statfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct statfs fills.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0, "statfs");
    st.f_bsize as i32
}

#[test]
fn physical_block_is_the_file_systems_block_and_logical_stays_512() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let fs_block = fs_block_size(&d.dir().join("disk.img"));

    // Act
    let blk = Blk::connect(&sock(&d));

    // Assert: TOPOLOGY carries the file system's block as the physical
    // block (libblkio shows it as optimal-io-alignment).
    assert_eq!(blk.get_i32("request-alignment"), 512);
    assert_eq!(
        blk.get_i32("optimal-io-alignment"),
        fs_block.clamp(512, 65536),
        "file system block {fs_block}"
    );
}

#[test]
fn logical_block_size_4096_is_the_request_alignment() {
    // Arrange
    let d = start_file_raw(
        4 * MIB,
        Fill::Pattern(15),
        "",
        "",
        ",logical-block-size=4096",
    );

    // Act
    let mut blk = Blk::connect(&sock(&d));

    // Assert
    assert_eq!(blk.get_i32("request-alignment"), 4096);
    assert_eq!(blk.get_i32("optimal-io-alignment") % 4096, 0);
    assert_eq!(blk.capacity(), 4 * MIB);
    assert_bytes(
        &blk.read(8192, 4096),
        &pattern(15, 8192, 4096),
        "aligned read",
    );
    assert_eq!(
        blk.write(4096, &pattern(16, 4096, 8192)),
        0,
        "aligned write"
    );
}

#[test]
fn requests_not_aligned_to_the_logical_block_size_fail() {
    // Arrange
    let d = start_file_raw(
        4 * MIB,
        Fill::Pattern(15),
        "",
        "",
        ",logical-block-size=4096",
    );
    let mut blk = Blk::connect(&sock(&d));

    // Act
    let misplaced_read = blk.try_read(512, 4096);
    let misplaced_write = blk.write(512, &pattern(16, 512, 4096));

    // Assert
    assert_eq!(misplaced_read, Err(-libc::EIO), "read at 512");
    assert_eq!(misplaced_write, -libc::EIO, "write at 512");
    assert_bytes(
        &read_file_at(&image(&d), 0, 8192),
        &pattern(15, 0, 8192),
        "file after refused write",
    );
    assert_bytes(
        &blk.read(0, 4096),
        &pattern(15, 0, 4096),
        "aligned read after",
    );
}

/// A daemon exporting pattern 17 without `writable`.
fn start_read_only() -> Daemon {
    let args = [
        "--blockdev".to_string(),
        file_node(""),
        "--blockdev".to_string(),
        raw_node(""),
        "--export".to_string(),
        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={dir}/vhost.sock"
            .to_string(),
    ];
    start_with(&args, |dir| {
        create_image(&dir.join("disk.img"), 4 * MIB, Fill::Pattern(17))
    })
}

#[test]
fn read_only_export_cannot_be_started_read_write() {
    // Arrange
    let d = start_read_only();

    // Act: libblkio sees VIRTIO_BLK_F_RO and refuses to start.
    let result = Blk::try_connect_with(&sock(&d), BlkOptions::default());

    // Assert
    let err = result
        .err()
        .expect("read-write start on a read-only export");
    assert_eq!(err.errno().raw_os_error(), libc::EROFS, "{err}");
}

/// libblkio itself fails writes on a read-only instance (-EBADF), and
/// write-zeroes and discard (-ENOTSUP: a read-only export offers neither
/// feature), so these requests never reach the daemon: what is checked is
/// that they fail and the file is unchanged.
#[test]
fn read_only_export_refuses_writes_and_serves_reads() {
    // Arrange
    let d = start_read_only();
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            read_only: true,
            ..BlkOptions::default()
        },
    );

    // Act
    let wrote = blk.write(0, &pattern(18, 0, 4096));
    let zeroed = blk.write_zeroes(4096, 4096, false);
    let discarded = blk.discard(8192, 4096);
    let read = blk.read(0, 8192);

    // Assert
    assert!(blk.get_bool("read-only"));
    assert!(wrote < 0, "write completed with {wrote}");
    assert!(zeroed < 0, "write-zeroes completed with {zeroed}");
    assert!(discarded < 0, "discard completed with {discarded}");
    assert_bytes(&read, &pattern(17, 0, 8192), "read from read-only export");
    assert_bytes(
        &read_file_at(&image(&d), 0, 16384),
        &pattern(17, 0, 16384),
        "file after refused writes",
    );
}

// ---------------------------------------------------------------------
// Requests out of range

#[test]
fn requests_past_or_across_the_end_fail_and_the_daemon_keeps_serving() {
    // Arrange
    let size = 4 * MIB;
    let d = start_file_raw(size, Fill::Pattern(19), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let mut qmp = d.qmp();
    /// A request relative to the capacity; its completion's ret.
    type Case = fn(&mut Blk, u64) -> i32;
    let cases: [(&str, Case); 7] = [
        ("read at the end", |b, end| {
            b.try_read(end, 4096).err().unwrap_or(0)
        }),
        ("read across the end", |b, end| {
            b.try_read(end - 2048, 4096).err().unwrap_or(0)
        }),
        ("read 1 GiB past the end", |b, end| {
            b.try_read(end + 1024 * MIB, 512).err().unwrap_or(0)
        }),
        ("write at the end", |b, end| b.write(end, &[0x5a; 4096])),
        ("write across the end", |b, end| {
            b.write(end - 512, &[0x5a; 1024])
        }),
        ("write-zeroes across the end", |b, end| {
            b.write_zeroes(end - 4096, 8192, false)
        }),
        ("discard past the end", |b, end| b.discard(end, 4096)),
    ];

    for (what, case) in cases {
        // Act
        let ret = case(&mut blk, size);

        // Assert
        assert_eq!(ret, -libc::EIO, "{what}");
        assert_bytes(
            &blk.read(size - 4096, 4096),
            &pattern(19, size - 4096, 4096),
            &format!("in-range read after {what}"),
        );
        assert_qmp_answers(&mut qmp);
    }
    assert_eq!(
        std::fs::metadata(image(&d)).unwrap().len(),
        size,
        "the image grew"
    );
}

// ---------------------------------------------------------------------
// Reconnecting

/// Connects and disconnects five times (after a first connection, so
/// that whatever the daemon sets up once for its first client is in the
/// baseline), writing on queue 1 and checking the previous round's data
/// on queue 0 each time; then checks the daemon's descriptors.
fn reconnect_five_times(pre_args: &[&str], exp_opts: &str) {
    // Arrange
    let mut args: Vec<String> = pre_args.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--blockdev".to_string(),
        file_node(""),
        "--blockdev".to_string(),
        raw_node(""),
        "--export".to_string(),
        export(&format!(",num-queues=2{exp_opts}")),
    ]);
    let d = start_with(&args, |dir| {
        create_image(&dir.join("disk.img"), 4 * MIB, Fill::Sparse)
    });
    let path = sock(&d);
    let connect = || {
        Blk::connect_with(
            &path,
            BlkOptions {
                num_queues: 2,
                ..BlkOptions::default()
            },
        )
    };
    let mut blk = connect();
    assert_eq!(blk.write(0, &pattern(0, 0, 4096)), 0);
    drop(blk);
    let mut baseline = 0;
    poll_until(Duration::from_secs(2), || {
        let now = fd_count(d.pid());
        let settled = now == baseline;
        baseline = now;
        settled
    });
    const SLACK: usize = 2;

    for round in 1..=5u8 {
        // Act
        blk = connect();
        let old = blk.read(0, 4096);
        let wrote = blk.queue(1).write(0, &pattern(round, 0, 4096));
        drop(blk);

        // Assert
        assert_bytes(
            &old,
            &pattern(round - 1, 0, 4096),
            &format!("round {round}: data"),
        );
        assert_eq!(wrote, 0, "round {round}: write on queue 1");
    }
    let settled = poll_until(Duration::from_secs(2), || {
        fd_count(d.pid()) <= baseline + SLACK
    });
    assert!(
        settled,
        "daemon holds {} descriptors after 5 reconnections, {baseline} before",
        fd_count(d.pid())
    );
    let mut blk = connect();
    assert_bytes(
        &blk.read(0, 4096),
        &pattern(5, 0, 4096),
        "data after the loop",
    );
}

#[test]
fn reconnecting_five_times_keeps_the_data_and_leaks_no_descriptors() {
    reconnect_five_times(&[], "");
}

#[test]
fn reconnecting_five_times_to_an_export_on_iothreads_leaks_no_descriptors() {
    if vubd_only(
        "reconnecting_five_times_to_an_export_on_iothreads_leaks_no_descriptors",
        "qsd 10.0 takes one iothread per export, not a list",
    ) {
        return;
    }
    reconnect_five_times(
        &["--object", "iothread,id=io0", "--object", "iothread,id=io1"],
        ",iothread.0=io0,iothread.1=io1",
    );
}

// ---------------------------------------------------------------------
// Resizing

/// libblkio reads `capacity` from the config space (GET_CONFIG) on every
/// get, so a connected frontend sees a new size without reconnecting.
#[test]
fn block_resize_is_seen_by_a_connected_frontend() {
    if vubd_only(
        "block_resize_is_seen_by_a_connected_frontend",
        "qsd 10.0.2 dies of SIGSEGV (vu_panic: Error while writing: Bad file descriptor) resizing an export whose frontend has no backend channel",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    assert_eq!(blk.capacity(), 4 * MIB);
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("block_resize", json!({"node-name": "d0", "size": 8 * MIB}));

    // Assert
    assert_return(&reply);
    assert_eq!(blk.capacity(), 8 * MIB, "capacity on the same connection");
    assert_eq!(std::fs::metadata(image(&d)).unwrap().len(), 8 * MIB);
}

/// libblkio never sets up the backend channel (SET_BACKEND_REQ_FD), so
/// the daemon cannot send CONFIG_CHANGE_MSG; it must carry on.
#[test]
fn block_resize_without_backend_channel_keeps_daemon_and_io_running() {
    if vubd_only(
        "block_resize_without_backend_channel_keeps_daemon_and_io_running",
        "qsd 10.0.2 dies of SIGSEGV (vu_panic: Error while writing: Bad file descriptor) resizing an export whose frontend has no backend channel",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Pattern(20), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let mut qmp = d.qmp();

    // Act
    assert_return(&qmp.execute("block_resize", json!({"node-name": "d0", "size": 8 * MIB})));
    let wrote = blk.write(6 * MIB, &pattern(21, 6 * MIB, 8192));

    // Assert
    assert_eq!(wrote, 0, "write in the grown part");
    assert_bytes(
        &blk.read(6 * MIB, 8192),
        &pattern(21, 6 * MIB, 8192),
        "grown part",
    );
    assert_bytes(
        &blk.read(4 * MIB - 4096, 4096),
        &pattern(20, 4 * MIB - 4096, 4096),
        "old end",
    );
    assert_zeroes(&blk.read(4 * MIB, 4096), "new space");
    assert_qmp_answers(&mut qmp);
}

#[test]
fn shrinking_block_resize_makes_the_cut_off_part_out_of_range() {
    if vubd_only(
        "shrinking_block_resize_makes_the_cut_off_part_out_of_range",
        "qsd 10.0.2 dies of SIGSEGV (vu_panic: Error while writing: Bad file descriptor) resizing an export whose frontend has no backend channel",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(8 * MIB, Fill::Pattern(22), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let mut qmp = d.qmp();

    // Act
    assert_return(&qmp.execute("block_resize", json!({"node-name": "d0", "size": 4 * MIB})));

    // Assert
    assert_eq!(blk.capacity(), 4 * MIB);
    assert_eq!(
        blk.try_read(6 * MIB, 4096),
        Err(-libc::EIO),
        "read past the new end"
    );
    assert_bytes(
        &blk.read(4 * MIB - 4096, 4096),
        &pattern(22, 4 * MIB - 4096, 4096),
        "read before the new end",
    );
}

// ---------------------------------------------------------------------
// The export over QMP

#[test]
fn query_block_shows_the_export_backend_and_its_node() {
    if vubd_only(
        "query_block_shows_the_export_backend_and_its_node",
        "exports in qsd have anonymous block backends, which query-block and query-blockstats do not list",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let _blk = Blk::connect(&sock(&d));
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("query-block", Value::Null);

    // Assert
    let list = assert_return(&reply).as_array().expect("a list");
    let entry = list
        .iter()
        .find(|b| b["device"] == "e0")
        .unwrap_or_else(|| panic!("no device e0 in {reply}"));
    assert_eq!(entry["inserted"]["node-name"], "d0", "{entry}");
    assert_eq!(entry["inserted"]["drv"], "raw", "{entry}");
}

#[test]
fn query_blockstats_lists_the_export_backend_with_its_io() {
    if vubd_only(
        "query_blockstats_lists_the_export_backend_with_its_io",
        "exports in qsd have anonymous block backends, which query-block and query-blockstats do not list",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    for i in 0..3u64 {
        assert_eq!(blk.write(i * 8192, &pattern(23, i * 8192, 8192)), 0);
    }
    blk.read(0, 4096);
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("query-blockstats", Value::Null);

    // Assert
    let list = assert_return(&reply).as_array().expect("a list");
    let entry = list
        .iter()
        .find(|s| s["device"] == "e0")
        .unwrap_or_else(|| panic!("no device e0 in {reply}"));
    assert_eq!(entry["node-name"], "d0", "{entry}");
    assert_eq!(entry["stats"]["wr_operations"], 3, "{entry}");
    assert_eq!(entry["stats"]["wr_bytes"], 3 * 8192, "{entry}");
    assert_eq!(entry["stats"]["rd_operations"], 1, "{entry}");
    assert_eq!(entry["stats"]["rd_bytes"], 4096, "{entry}");
}

#[test]
fn block_export_del_safe_with_a_connected_frontend_fails() {
    if vubd_only(
        "block_export_del_safe_with_a_connected_frontend_fails",
        "qsd counts only requests in flight as users, so an idle frontend does not stop a safe removal",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Pattern(24), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("block-export-del", json!({"id": "e0", "mode": "safe"}));

    // Assert
    assert_error_class(&reply, "GenericError");
    let exports = qmp.execute("query-block-exports", Value::Null);
    assert_eq!(assert_return(&exports).as_array().map(Vec::len), Some(1));
    assert_bytes(&blk.read(0, 4096), &pattern(24, 0, 4096), "I/O after");
}

#[test]
fn block_export_del_hard_disconnects_the_frontend() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Pattern(25), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    assert_eq!(blk.read(0, 4096).len(), 4096);
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("block-export-del", json!({"id": "e0", "mode": "hard"}));

    // Assert
    assert_return(&reply);
    let event = qmp
        .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(5))
        .expect("no BLOCK_EXPORT_DELETED event");
    assert_eq!(event["data"], json!({"id": "e0"}));
    assert!(
        poll_until(Duration::from_secs(2), || !sock(&d).exists()),
        "socket file still there"
    );
    let exports = qmp.execute("query-block-exports", Value::Null);
    assert_eq!(assert_return(&exports), &json!([]));
    // The frontend is gone: a request gets no answer (or an error), and
    // reading the config fails.
    let read = blk.queue(0).read_timeout(0, 4096, Duration::from_secs(1));
    assert!(
        !matches!(read, Ok(Ok(_))),
        "read after hard export removal succeeded"
    );
    assert!(blk.try_capacity().is_err(), "config read after removal");
    assert_qmp_answers(&mut qmp);
}

/// The harness itself: a daemon that does not answer fails a request
/// with ETIME after the given time instead of hanging the test.
#[test]
fn helpers_time_out_when_the_daemon_does_not_answer() {
    // Arrange: a daemon stopped with SIGSTOP answers nothing.
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    d.send_signal("STOP");
    assert!(
        poll_until(Duration::from_secs(2), || all_threads_stopped(d.pid())),
        "the daemon did not stop"
    );

    // Act
    let started = Instant::now();
    let read = blk
        .queue(0)
        .read_timeout(0, 4096, Duration::from_millis(300));
    let waited = started.elapsed();
    d.send_signal("CONT");

    // Assert
    let err = read.expect_err("a stopped daemon completed a read");
    assert_eq!(err.errno().raw_os_error(), libc::ETIME, "{err}");
    assert!(waited < IO_TIMEOUT, "waited {waited:?}");
}

// ---------------------------------------------------------------------
// More of the data path: windows, queues, memory, connections

#[test]
fn discard_in_a_raw_window_punches_the_hole_at_the_windows_place_in_the_file() {
    // Arrange: a 2 MiB window from 1 MiB on of a fully written file.
    let (start, len) = (MIB, 2 * MIB);
    let d = start_file_raw(
        4 * MIB,
        Fill::Pattern(26),
        ",discard=unmap",
        &format!(",discard=unmap,offset={start},size={len}"),
        "",
    );
    let mut blk = Blk::connect(&sock(&d));
    let img = image(&d);

    // Act
    let discarded = blk.discard(0, MIB);
    let across_end = blk.discard(len - MIB, 2 * MIB);

    // Assert
    assert_eq!(discarded, 0, "discard of the window's first MiB");
    assert_eq!(across_end, -libc::EIO, "discard across the window's end");
    assert!(is_hole(&img, start, MIB), "no hole at the window's start");
    assert!(
        is_data(&img, 0, start),
        "the MiB before the window lost data"
    );
    assert!(
        is_data(&img, start + MIB, 2 * MIB),
        "the rest of the window or the MiB after it lost data"
    );
    assert_zeroes(&blk.read(0, MIB as usize), "discarded part of the window");
    assert_bytes(
        &read_file_at(&img, start + len, 4096),
        &pattern(26, start + len, 4096),
        "file just after the window",
    );
}

#[test]
fn write_zeroes_and_discard_on_null_co_succeed() {
    // Arrange
    let args = [
        "--blockdev".to_string(),
        "driver=null-co,node-name=d0,size=67108864,read-zeroes=on".to_string(),
        "--export".to_string(),
        export(""),
    ];
    let d = start_with(&args, |_| {});
    let mut blk = Blk::connect(&sock(&d));

    // Act
    let zeroed = blk.write_zeroes(0, MIB, false);
    let unmapped = blk.write_zeroes(MIB, MIB, true);
    let discarded = blk.discard(2 * MIB, MIB);

    // Assert
    assert_eq!((zeroed, unmapped, discarded), (0, 0, 0));
}

#[test]
fn writethrough_export_writes_are_in_the_file_without_a_flush() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", ",writethrough=on");
    let mut blk = Blk::connect(&sock(&d));

    // Act
    let wrote = blk.write(MIB, &pattern(27, MIB, 16384));

    // Assert
    assert_eq!(wrote, 0);
    // The config space's writeback field, as libblkio reads it.
    assert!(
        !blk.get_bool("flush-needed"),
        "a writethrough device tells the frontend no flush is needed"
    );
    assert_bytes(
        &read_file_at(&image(&d), MIB, 16384),
        &pattern(27, MIB, 16384),
        "file after a writethrough write",
    );
}

#[test]
fn flush_on_a_read_only_export_succeeds() {
    // Arrange
    let d = start_read_only();
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            read_only: true,
            ..BlkOptions::default()
        },
    );

    // Act
    let flushed = blk.flush();

    // Assert
    assert_eq!(flushed, 0);
}

#[test]
fn export_with_four_queues_serves_a_frontend_that_starts_one() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Pattern(28), "", "", ",num-queues=4");

    // Act
    let mut blk = Blk::connect(&sock(&d));

    // Assert
    assert_eq!(blk.get_i32("max-queues"), 4);
    assert_bytes(&blk.read(0, 8192), &pattern(28, 0, 8192), "read on queue 0");
    assert_eq!(blk.write(8192, &pattern(29, 8192, 4096)), 0);
    assert_bytes(&blk.read(8192, 4096), &pattern(29, 8192, 4096), "read back");
}

#[test]
fn reconnecting_with_another_number_of_queues_uses_them_all() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", ",num-queues=4");

    for (round, nq) in [4usize, 1, 2, 4].into_iter().enumerate() {
        // Act
        let mut blk = Blk::connect_with(
            &sock(&d),
            BlkOptions {
                num_queues: nq,
                ..BlkOptions::default()
            },
        );
        let mut results = Vec::new();
        for q in 0..nq {
            let off = (q as u64) * 64 * KIB;
            let seed = (round * 4 + q) as u8;
            let wrote = blk.queue(q).write(off, &pattern(seed, off, 4096));
            let read = blk.queue(q).read(off, 4096);
            results.push((q, wrote, read == pattern(seed, off, 4096)));
        }

        // Assert
        let want: Vec<(usize, i32, bool)> = (0..nq).map(|q| (q, 0, true)).collect();
        assert_eq!(
            results, want,
            "round {round} with {nq} queues: (queue, write, data)"
        );
    }
}

#[test]
fn disconnecting_with_requests_in_flight_leaves_the_export_usable() {
    // Arrange
    let d = start_file_raw(8 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let q = blk.queue(0);
    for i in 0..32usize {
        q.fill_buffer(i * 64 * 1024, &pattern(30, (i * 65536) as u64, 65536));
        q.submit_write((i * 65536) as u64, i * 65536, 65536, i, ReqFlags::empty());
    }
    q.kick();

    // Act
    drop(blk);
    let mut blk = Blk::connect(&sock(&d));

    // Assert
    assert_eq!(blk.write(4 * MIB, &pattern(31, 4 * MIB, 4096)), 0);
    assert_bytes(
        &blk.read(4 * MIB, 4096),
        &pattern(31, 4 * MIB, 4096),
        "I/O after the reconnection",
    );
    let mut qmp = d.qmp();
    assert_qmp_answers(&mut qmp);
}

#[test]
fn frontend_that_connects_but_never_starts_leaves_the_export_usable() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Pattern(32), "", "", "");
    let path = sock(&d).to_str().unwrap().to_string();
    common::blk::run_with_timeout("connect without start", IO_TIMEOUT, move || {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", &path).unwrap();
        b.connect().expect("connect");
        b.get_u64("capacity").expect("capacity")
    });

    // Act
    let mut blk = Blk::connect(&sock(&d));

    // Assert
    assert_bytes(&blk.read(0, 4096), &pattern(32, 0, 4096), "read");
}

#[test]
fn queue_full_of_requests_in_flight_all_complete() {
    // Arrange: libblkio's rings have 256 entries.
    const N: usize = 256;
    let d = start_file_raw(4 * MIB, Fill::Pattern(33), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    assert_eq!(blk.get_i32("queue-size"), N as i32);
    let q = blk.queue(0);
    q.set_buffer(0, N * 4096, common::blk::POISON);

    // Act
    for i in 0..N {
        q.submit_read((i * 4096) as u64, i * 4096, 4096, i);
    }
    let mut done = q.wait(N);

    // Assert
    done.sort();
    let want: Vec<(usize, i32)> = (0..N).map(|i| (i, 0)).collect();
    assert_eq!(done, want);
    assert_bytes(
        &q.buffer(0, N * 4096),
        &pattern(33, 0, N * 4096),
        "256 reads",
    );
}

#[test]
fn memory_region_added_and_removed_while_started_is_used_and_dropped() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Pattern(34), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let (second, len) = blk.add_region(MIB as usize);

    // Act: a read split between the first and the second region.
    let q = blk.queue(0);
    q.set_buffer(0, 4096, common::blk::POISON);
    let iov = [
        blkio::iovec {
            iov_base: q.buffer_ptr(0).cast(),
            iov_len: 512,
        },
        blkio::iovec {
            iov_base: (second + 8192) as *mut libc::c_void,
            iov_len: 3584,
        },
    ];
    let ret = q.readv_raw(0, &iov, 7);
    // SAFETY: the second region is mapped and 1 MiB long.
    let tail = unsafe { std::slice::from_raw_parts((second + 8192) as *const u8, 3584) }.to_vec();
    let head = q.buffer(0, 512);
    blk.remove_region(second, len);
    let after = blk.read(4096, 4096);

    // Assert
    assert_eq!(ret, 0, "readv over two regions");
    assert_bytes(&head, &pattern(34, 0, 512), "part in the first region");
    assert_bytes(&tail, &pattern(34, 512, 3584), "part in the second region");
    assert_bytes(&after, &pattern(34, 4096, 4096), "read after removing it");
}

#[test]
fn request_with_a_buffer_outside_shared_memory_does_not_take_the_daemon_down() {
    // Arrange: a buffer libblkio never registered with the daemon.
    let d = start_file_raw(4 * MIB, Fill::Pattern(35), "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let mut private = vec![0u8; 4096];

    // Act
    let q = blk.queue(0);
    q.submit_read_raw(0, private.as_mut_ptr(), 4096, 9);
    let outcome = q.try_wait(1, Duration::from_secs(1));
    drop(blk);
    let mut qmp = d.qmp();

    // Assert: an error or no answer, never data (the daemon cannot reach
    // the buffer); the daemon serves the monitor and the next frontend.
    if let Ok(done) = &outcome {
        assert!(
            done[0].1 < 0,
            "read into unshared memory completed with {done:?}"
        );
    }
    assert_qmp_answers(&mut qmp);
    let mut blk = Blk::connect(&sock(&d));
    assert_bytes(&blk.read(0, 4096), &pattern(35, 0, 4096), "next frontend");
    drop(private);
}

#[test]
fn block_resize_by_export_id_is_seen_by_the_frontend() {
    if vubd_only(
        "block_resize_by_export_id_is_seen_by_the_frontend",
        "qsd 10.0.2 dies of SIGSEGV resizing an export whose frontend has no backend channel",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("block_resize", json!({"device": "e0", "size": 6 * MIB}));

    // Assert
    assert_return(&reply);
    assert_eq!(blk.capacity(), 6 * MIB);
}

/// The file under an exported raw node can grow: a raw node without
/// offset or size passes its parents' permissions through (the export
/// allows resizing), as in QEMU.  (qsd then keeps showing the old size to
/// the frontend; only the resize and the serving afterwards are checked.)
#[test]
fn block_resize_of_the_file_under_an_exported_raw_node_succeeds() {
    // Arrange: no frontend connected (qsd could not cope with one).
    let d = start_file_raw(4 * MIB, Fill::Pattern(36), "", "", "");
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("block_resize", json!({"node-name": "f0", "size": 6 * MIB}));

    // Assert
    assert_return(&reply);
    assert_eq!(std::fs::metadata(image(&d)).unwrap().len(), 6 * MIB);
    let mut blk = Blk::connect(&sock(&d));
    assert_bytes(&blk.read(0, 4096), &pattern(36, 0, 4096), "read after");
    assert_qmp_answers(&mut qmp);
}

// ---------------------------------------------------------------------
// O_DIRECT (cache.direct=on): aligned buffers go straight to the file,
// others through an aligned copy

/// A daemon on an 8 MiB image opened with O_DIRECT.
fn start_direct(fill: Fill) -> Daemon {
    start_file_raw(8 * MIB, fill, ",cache.direct=on", "", "")
}

#[test]
fn direct_io_with_page_aligned_buffers_round_trips_one_mib() {
    // Arrange
    let d = start_direct(Fill::Sparse);
    let mut blk = Blk::connect(&sock(&d));
    let off = 2 * MIB;
    let data = pattern(40, off, MIB as usize);

    // Act
    let wrote = blk.write(off, &data);
    let read = blk.read(off, MIB as usize);

    // Assert
    assert_eq!(wrote, 0);
    assert_bytes(&read, &data, "read back");
    assert_bytes(&read_file_at(&image(&d), off, MIB as usize), &data, "file");
}

#[test]
fn direct_io_with_odd_address_buffers_round_trips() {
    // Arrange
    let d = start_direct(Fill::Pattern(41));
    let mut blk = Blk::connect(&sock(&d));
    blk.set_misalignment(1);

    // Act
    let old = blk.read(MIB + 512, 64 * KIB as usize);
    let wrote = blk.write(3 * MIB, &pattern(42, 3 * MIB, 4096));
    let grown = blk.write(4 * MIB, &pattern(42, 4 * MIB, MIB as usize));
    let new = blk.read(3 * MIB, 4096);
    let big = blk.read(4 * MIB, MIB as usize);

    // Assert
    assert_bytes(
        &old,
        &pattern(41, MIB + 512, 64 * KIB as usize),
        "odd-address read",
    );
    assert_eq!((wrote, grown), (0, 0), "odd-address writes");
    assert_bytes(&new, &pattern(42, 3 * MIB, 4096), "read after 4 KiB write");
    assert_bytes(
        &big,
        &pattern(42, 4 * MIB, MIB as usize),
        "read after 1 MiB write",
    );
    assert_bytes(
        &read_file_at(&image(&d), 4 * MIB, MIB as usize),
        &pattern(42, 4 * MIB, MIB as usize),
        "file after 1 MiB write",
    );
}

#[test]
fn direct_io_with_scattered_sector_aligned_buffers_round_trips() {
    // Arrange
    let d = start_direct(Fill::Sparse);
    let mut blk = Blk::connect(&sock(&d));
    let off = MIB + 7 * 512;
    let total: usize = SCATTER_WRITE.iter().sum();
    let data = pattern(43, off, total);

    // Act
    let wrote = blk.writev(off, &data, &SCATTER_WRITE);
    let read = blk.readv(off, &SCATTER_READ);

    // Assert
    assert_eq!(wrote, 0, "writev");
    assert_bytes(&read.expect("readv failed"), &data, "readv");
    assert_bytes(&read_file_at(&image(&d), off, total), &data, "file");
}

#[test]
fn direct_io_with_scattered_odd_address_buffers_round_trips() {
    // Arrange
    let d = start_direct(Fill::Sparse);
    let mut blk = Blk::connect(&sock(&d));
    blk.set_misalignment(3);
    let off = 2 * MIB + 512;
    let total: usize = SCATTER_WRITE.iter().sum();
    let data = pattern(44, off, total);

    // Act
    let wrote = blk.writev(off, &data, &SCATTER_WRITE);
    let read = blk.readv(off, &SCATTER_READ);

    // Assert
    assert_eq!(wrote, 0, "writev");
    assert_bytes(&read.expect("readv failed"), &data, "readv");
    assert_bytes(&read_file_at(&image(&d), off, total), &data, "file");
}

#[test]
fn direct_io_on_four_queues_from_four_threads_each_keep_their_data() {
    concurrent_queues_on(4, &[], ",cache.direct=on", "");
}

#[test]
fn direct_io_with_odd_buffers_on_two_queues_at_depth_keeps_the_data() {
    // Arrange: every request bounced, several in flight on each queue.
    let d = start_file_raw(
        8 * MIB,
        Fill::Sparse,
        ",cache.direct=on",
        "",
        ",num-queues=2",
    );
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            num_queues: 2,
            ..BlkOptions::default()
        },
    );
    const DEPTH: usize = 16;
    const CHUNK: usize = 16 * 1024;
    // Odd places in the buffer, 1 byte past each 20 KiB step.
    let place = |i: usize| i * 20 * 1024 + 1;

    for qi in 0..2 {
        let q = blk.queue(qi);
        let base = qi as u64 * 4 * MIB;
        // Act
        for i in 0..DEPTH {
            let off = base + (i * CHUNK) as u64;
            q.fill_buffer(place(i), &pattern(45, off, CHUNK));
            q.submit_write(off, place(i), CHUNK, i, ReqFlags::empty());
        }
        let writes = q.wait(DEPTH);
        q.set_buffer(0, place(DEPTH), common::blk::POISON);
        for i in 0..DEPTH {
            q.submit_read(base + (i * CHUNK) as u64, place(i), CHUNK, i);
        }
        let reads = q.wait(DEPTH);

        // Assert
        assert!(
            writes.iter().all(|&(_, r)| r == 0),
            "queue {qi} writes: {writes:?}"
        );
        assert!(
            reads.iter().all(|&(_, r)| r == 0),
            "queue {qi} reads: {reads:?}"
        );
        for i in 0..DEPTH {
            let off = base + (i * CHUNK) as u64;
            assert_bytes(
                &q.buffer(place(i), CHUNK),
                &pattern(45, off, CHUNK),
                &format!("queue {qi} read {i}"),
            );
        }
    }
}

// ---------------------------------------------------------------------
// Node options the data path honours

/// With `detect-zeroes=unmap` (and `discard=unmap`), a write of zeroes
/// becomes a write-zeroes that may unmap: the range turns into a hole.
#[test]
fn zero_write_on_detect_zeroes_unmap_node_leaves_a_hole() {
    // Arrange
    let opts = ",discard=unmap,detect-zeroes=unmap";
    let d = start_file_raw(4 * MIB, Fill::Pattern(46), opts, opts, "");
    let mut blk = Blk::connect(&sock(&d));
    let (off, len) = RANGE;
    let before = allocated_bytes(&image(&d));

    // Act
    let wrote = blk.write(off, &vec![0u8; len as usize]);

    // Assert
    assert_eq!(wrote, 0);
    assert_zeroes(&blk.read(off, len as usize), "range after the zero write");
    assert!(is_hole(&image(&d), off, len), "range is not a hole");
    assert!(
        allocated_bytes(&image(&d)) <= before - len,
        "file did not shrink by the range"
    );
}

#[test]
fn zero_write_without_detect_zeroes_stays_allocated() {
    // Arrange
    let opts = ",discard=unmap";
    let d = start_file_raw(4 * MIB, Fill::Pattern(46), opts, opts, "");
    let mut blk = Blk::connect(&sock(&d));
    let (off, len) = RANGE;
    let before = allocated_bytes(&image(&d));

    // Act
    let wrote = blk.write(off, &vec![0u8; len as usize]);

    // Assert
    assert_eq!(wrote, 0);
    assert_zeroes(&read_file_at(&image(&d), off, len as usize), "file");
    assert!(is_data(&image(&d), off, len), "a plain write left a hole");
    assert_eq!(allocated_bytes(&image(&d)), before);
}

/// qsd 10.0.2 starts this (its exports share every permission; even two
/// writable exports of one node start).
#[test]
fn two_exports_of_one_node_see_each_others_writes() {
    // Arrange: e0 writable, e1 read-only, both on d0.
    let args = [
        "--blockdev".to_string(),
        file_node(""),
        "--blockdev".to_string(),
        raw_node(""),
        "--export".to_string(),
        export(""),
        "--export".to_string(),
        "type=vhost-user-blk,id=e1,node-name=d0,addr.type=unix,addr.path={dir}/ro.sock".to_string(),
    ];
    let d = start_with(&args, |dir| {
        create_image(&dir.join("disk.img"), 4 * MIB, Fill::Sparse)
    });
    let mut rw = Blk::connect(&sock(&d));
    let mut ro = Blk::connect_with(
        &d.dir().join("ro.sock"),
        BlkOptions {
            read_only: true,
            ..BlkOptions::default()
        },
    );

    // Act
    let wrote = rw.write(MIB, &pattern(47, MIB, 8192));
    let seen = ro.read(MIB, 8192);

    // Assert
    assert_eq!(wrote, 0);
    assert_bytes(
        &seen,
        &pattern(47, MIB, 8192),
        "read through the other export",
    );
}

#[test]
fn poll_queue_serves_requests_without_notifications() {
    // Arrange: one queue libblkio polls (it asks for no interrupts) next
    // to a normal one.
    let d = start_file_raw(4 * MIB, Fill::Pattern(48), "", "", ",num-queues=2");
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            num_queues: 1,
            num_poll_queues: 1,
            ..BlkOptions::default()
        },
    );

    // Act
    let poll = blk.queue(1);
    let read = poll.read(0, 8192);
    let wrote = poll.write(MIB, &pattern(49, MIB, 4096));
    let flushed = poll.flush();

    // Assert
    assert_bytes(&read, &pattern(48, 0, 8192), "read on the poll queue");
    assert_eq!((wrote, flushed), (0, 0));
    assert_bytes(
        &blk.read(MIB, 4096),
        &pattern(49, MIB, 4096),
        "read on queue 0",
    );
}

/// CPU the daemon uses over `span` while nothing happens.
fn idle_cpu(d: &Daemon, span: Duration) -> Duration {
    let before = d.cpu_time();
    std::thread::sleep(span);
    d.cpu_time() - before
}

#[test]
fn polling_stops_once_the_guest_goes_quiet() {
    // Arrange: a client that polls makes the export's thread poll for it
    // (by default it polls adaptively, up to 32 µs before each sleep).
    let d = start_file_raw(4 * MIB, Fill::Pattern(51), "", "", ",num-queues=2");
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            num_queues: 1,
            num_poll_queues: 1,
            ..BlkOptions::default()
        },
    );
    let q = blk.queue(1);
    let busy_until = Instant::now() + Duration::from_millis(300);
    let mut served = 0u64;
    while Instant::now() < busy_until {
        let off = (served % 512) * 4096;
        let got = q
            .try_read(off, 4096)
            .unwrap_or_else(|e| panic!("read {served} at {off}: {e}; daemon log:\n{}", d.stderr()));
        assert_bytes(&got, &pattern(51, off, 4096), "read");
        served += 1;
    }

    // Act: the client stops sending, but stays connected.
    let cpu = idle_cpu(&d, Duration::from_millis(500));

    // Assert: the thread went to sleep instead of polling on (polling
    // throughout would use all 500 ms).
    assert!(served > 100, "only {served} requests in 300 ms");
    assert!(
        cpu < Duration::from_millis(100),
        "{cpu:?} of CPU in 500 ms with nothing to do"
    );
    // And it still answers.
    let after = q
        .try_read(0, 4096)
        .unwrap_or_else(|e| panic!("read after idling: {e}; daemon log:\n{}", d.stderr()));
    assert_bytes(&after, &pattern(51, 0, 4096), "read after idling");
}

#[test]
fn block_export_added_over_qmp_with_a_list_of_iothreads_serves_every_queue() {
    if vubd_only(
        "block_export_added_over_qmp_with_a_list_of_iothreads_serves_every_queue",
        "qsd 10.0 takes one iothread per export, not a list",
    ) {
        return;
    }
    // Arrange
    let args = [
        "--blockdev".to_string(),
        file_node(""),
        "--blockdev".to_string(),
        raw_node(""),
    ];
    let d = start_with(&args, |dir| {
        create_image(&dir.join("disk.img"), 16 * MIB, Fill::Sparse)
    });
    let mut qmp = d.qmp();
    for id in ["io0", "io1"] {
        assert_return(&qmp.execute("object-add", json!({"qom-type": "iothread", "id": id})));
    }

    // Act
    let reply = qmp.execute(
        "block-export-add",
        json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0", "writable": true,
            "addr": {"type": "unix", "path": sock(&d)},
            "num-queues": 4, "iothread": ["io0", "io1"]
        }),
    );

    // Assert
    assert_return(&reply);
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            num_queues: 4,
            ..BlkOptions::default()
        },
    );
    workout_all_queues(&mut blk);
}

#[test]
fn export_added_again_after_hard_removal_serves_the_same_data() {
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    assert_eq!(blk.write(0, &pattern(50, 0, 4096)), 0);
    let mut qmp = d.qmp();
    assert_return(&qmp.execute("block-export-del", json!({"id": "e0", "mode": "hard"})));
    qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(5))
        .expect("no BLOCK_EXPORT_DELETED event");
    drop(blk);

    // Act
    let reply = qmp.execute(
        "block-export-add",
        json!({
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0", "writable": true,
            "addr": {"type": "unix", "path": sock(&d)}
        }),
    );
    let mut blk = Blk::connect(&sock(&d));

    // Assert
    assert_return(&reply);
    assert_bytes(
        &blk.read(0, 4096),
        &pattern(50, 0, 4096),
        "data after re-adding",
    );
}

#[test]
fn blockstats_add_up_the_requests_of_every_queue() {
    if vubd_only(
        "blockstats_add_up_the_requests_of_every_queue",
        "exports in qsd have anonymous block backends, which query-blockstats does not list",
    ) {
        return;
    }
    // Arrange
    let d = start_file_raw(4 * MIB, Fill::Sparse, "", "", ",num-queues=2");
    let mut blk = Blk::connect_with(
        &sock(&d),
        BlkOptions {
            num_queues: 2,
            ..BlkOptions::default()
        },
    );
    for q in 0..2 {
        for i in 0..5u64 {
            let off = (q as u64 * 5 + i) * 4096;
            assert_eq!(blk.queue(q).write(off, &pattern(51, off, 4096)), 0);
        }
        blk.queue(q).read(0, 512);
    }
    let mut qmp = d.qmp();

    // Act
    let reply = qmp.execute("query-blockstats", Value::Null);

    // Assert
    let entry = assert_return(&reply)
        .as_array()
        .expect("a list")
        .iter()
        .find(|s| s["device"] == "e0")
        .unwrap_or_else(|| panic!("no device e0 in {reply}"))
        .clone();
    let stats = &entry["stats"];
    assert_eq!(stats["wr_operations"], 10, "{stats}");
    assert_eq!(stats["wr_bytes"], 10 * 4096, "{stats}");
    assert_eq!(stats["rd_operations"], 2, "{stats}");
    assert_eq!(stats["rd_bytes"], 1024, "{stats}");
}

// ---------------------------------------------------------------------
// Stopping while a frontend is busy

/// Queues `n` 64 KiB writes on queue 0 and notifies the device, without
/// waiting for them.
fn writes_in_flight(blk: &mut Blk, n: usize) {
    let q = blk.queue(0);
    for i in 0..n {
        let off = (i * 65536) as u64;
        q.fill_buffer(i * 65536, &pattern(52, off, 65536));
        q.submit_write(off, i * 65536, 65536, i, ReqFlags::empty());
    }
    q.kick();
}

#[test]
fn block_export_del_hard_with_requests_in_flight_completes() {
    // Arrange
    let d = start_file_raw(8 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    let mut qmp = d.qmp();
    writes_in_flight(&mut blk, 32);

    // Act
    let reply = qmp.execute("block-export-del", json!({"id": "e0", "mode": "hard"}));

    // Assert
    assert_return(&reply);
    qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(5))
        .expect("no BLOCK_EXPORT_DELETED event");
    let exports = qmp.execute("query-block-exports", Value::Null);
    assert_eq!(assert_return(&exports), &json!([]));
    // The node is free again: it can be removed.
    let del = qmp.execute("blockdev-del", json!({"node-name": "d0"}));
    assert_return(&del);
}

#[test]
fn quit_with_a_busy_frontend_connected_exits() {
    // Arrange
    let mut d = start_file_raw(8 * MIB, Fill::Sparse, "", "", "");
    let mut blk = Blk::connect(&sock(&d));
    writes_in_flight(&mut blk, 32);

    // Act / Assert
    quit(&mut d);
    assert!(
        d.wait_exit(Duration::ZERO).is_some_and(|s| s.success()),
        "{}",
        d.describe()
    );
}

#[test]
fn raw_window_at_an_odd_offset_maps_to_its_bytes_of_the_file() {
    // Arrange: a window 100 bytes into the file (no sector alignment).
    let d = start_file_raw(
        2 * MIB,
        Fill::Pattern(53),
        "",
        ",offset=100,size=1048576",
        "",
    );
    let mut blk = Blk::connect(&sock(&d));

    // Act
    let read = blk.read(0, 4096);
    let wrote = blk.write(4096, &pattern(54, 4096, 4096));

    // Assert
    assert_bytes(&read, &pattern(53, 100, 4096), "read at the window's start");
    assert_eq!(wrote, 0);
    assert_bytes(
        &read_file_at(&image(&d), 4196, 4096),
        &pattern(54, 4096, 4096),
        "file 100 bytes after the write's offset",
    );
    assert_bytes(
        &read_file_at(&image(&d), 4096, 100),
        &pattern(53, 4096, 100),
        "file bytes before the write",
    );
}
