//! qcow2 images made by QEMU's tools, read through a vubd export with
//! libblkio and compared byte for byte with what `qemu-img convert` reads
//! from the same image: versions 2 and 3, cluster sizes from 4k to 2M,
//! compressed clusters (zlib and zstd), extended L2 entries, zero clusters
//! and discarded ranges, raw and qcow2 backing files, chains.

mod common;

use common::blk::{Blk, BlkOptions};
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(args: &[&str]) {
    tool("qemu-img", args);
}

/// Runs qemu-io commands on an image (format given).
fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().unwrap();
    args.push(p);
    tool("qemu-io", &args);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// What QEMU reads from the image: `qemu-img convert` to raw.
fn qemu_reads(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("expected.raw");
    qemu_img(&["convert", "-O", "raw", path(img), path(&out)]);
    std::fs::read(&out).unwrap()
}

/// Serves `img` (qcow2, read-only) from vubd; a connected read-only
/// client with 1 MiB of buffer.
fn serve_ro(dir: &Path, img: &Path, extra: &str) -> (Daemon, Blk) {
    let sock = dir.join("q.sock");
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=f0,filename={},read-only=on",
            path(img)
        ))
        .arg("--blockdev")
        .arg(&format!(
            "driver=qcow2,node-name=q0,file=f0,read-only=on{extra}"
        ))
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let blk = Blk::connect_with(
        &sock,
        BlkOptions {
            read_only: true,
            queue_buffer: 1 << 20,
            ..BlkOptions::default()
        },
    );
    (d, blk)
}

/// Serves `img` (qcow2, read-only) from vubd and reads all of it through
/// libblkio in `chunk`-sized reads.
fn vubd_reads(dir: &Path, img: &Path, extra: &str, chunk: usize) -> (Daemon, Vec<u8>) {
    let (d, mut blk) = serve_ro(dir, img, extra);
    let size = blk.capacity();
    let mut data = Vec::with_capacity(size as usize);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        data.extend_from_slice(&blk.read(off, n));
        off += n as u64;
    }
    (d, data)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[track_caller]
fn assert_same_as_qemu(img: &Path, dir: &Path, chunks: &[usize]) {
    let want = qemu_reads(img, dir);
    for &chunk in chunks {
        let (_d, got) = vubd_reads(dir, img, "", chunk);
        if let Some(at) = first_difference(&want, &got) {
            panic!(
                "{}: vubd's read ({chunk}-byte requests) differs from qemu-img's at byte {at} \
                 (lengths {} and {})",
                img.display(),
                got.len(),
                want.len()
            );
        }
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vubd-qcow2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a mix of patterns, zeroes and discards that crosses cluster
/// boundaries for every cluster size used here.
fn scribble(img: &Path) {
    qemu_io(
        img,
        "qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 100k 300k",
            "write -P 0x33 1m 2m",
            "write -P 0x44 3500k 4k",
            "write -z 1200k 128k",
            "discard 2m 512k",
            "write -P 0x55 5m 1k",
        ],
    );
}

#[test]
fn images_of_every_version_and_cluster_size_read_as_qemu_reads_them() {
    let dir = scratch("sizes");
    for (compat, cluster) in [
        ("0.10", "64k"),
        ("1.1", "4k"),
        ("1.1", "64k"),
        ("1.1", "2M"),
        ("1.1", "512"),
    ] {
        let img = dir.join(format!("v{compat}-{cluster}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size={cluster}"),
            path(&img),
            "8M",
        ]);
        scribble(&img);
        assert_same_as_qemu(&img, &dir, &[65536, 12288]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn extended_l2_images_read_subcluster_by_subcluster() {
    let dir = scratch("extl2");
    let img = dir.join("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        path(&img),
        "8M",
    ]);
    // 4k subclusters: writes that cover parts of clusters leave the rest
    // unallocated, which must read as zeroes (or from the backing file).
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x66 4k 8k",
            "write -P 0x67 130k 2k",
            "write -z 200k 8k",
        ],
    );
    assert_same_as_qemu(&img, &dir, &[65536, 4096, 1536]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compressed_clusters_read_as_qemu_reads_them() {
    let dir = scratch("compressed");
    let src = dir.join("src.raw");
    let mut data = vec![0u8; 4 * MIB as usize];
    for (i, b) in data.iter_mut().enumerate() {
        // Compressible but not trivial.
        *b = ((i / 7) % 13) as u8 ^ ((i >> 12) as u8);
    }
    std::fs::write(&src, &data).unwrap();
    for ctype in ["zlib", "zstd"] {
        let img = dir.join(format!("{ctype}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype}"),
            path(&src),
            path(&img),
        ]);
        // Some clusters rewritten uncompressed on top.
        qemu_io(&img, "qcow2", &["write -P 0x77 192k 64k"]);
        assert_same_as_qemu(&img, &dir, &[65536, 4608]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overlays_read_through_to_raw_and_qcow2_backing_files() {
    let dir = scratch("backing");
    let base = dir.join("base.raw");
    let mut data = vec![0u8; 6 * MIB as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&base, &data).unwrap();
    let mid = dir.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path(&mid),
    ]);
    qemu_io(&mid, "qcow2", &["write -P 0x88 1m 64k", "write -z 2m 64k"]);
    // The top is larger than its backing chain: beyond it reads zeroes.
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        path(&top),
        "8M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x99 1040k 8k", "write -P 0xaa 6m 4k"],
    );
    assert_same_as_qemu(&top, &dir, &[65536, 12288]);
    assert_same_as_qemu(&mid, &dir, &[65536]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_backing_chain_shows_in_the_queries() {
    let dir = scratch("query");
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&base), "4M"]);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path(&top),
    ]);
    let (d, _) = vubd_reads(&dir, &top, "", 1 << 20);
    let mut qmp = d.qmp();
    let nodes = qmp.execute("query-named-block-nodes", Value::Null);
    let q0 = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q0")
        .cloned()
        .unwrap();
    assert_eq!(q0["drv"], "qcow2");
    assert_eq!(q0["backing_file_depth"], 1, "{q0}");
    let image = &q0["image"];
    assert_eq!(image["backing-filename"], "base.qcow2", "{image}");
    assert_eq!(image["backing-filename-format"], "qcow2");
    assert_eq!(image["cluster-size"], 65536);
    assert_eq!(image["format-specific"]["type"], "qcow2");
    assert_eq!(image["format-specific"]["data"]["compat"], "1.1");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serves `img` (qcow2, writable) on `{dir}/w.sock` with `queues` queues.
fn serve_rw(dir: &Path, img: &Path, queues: usize) -> Daemon {
    let sock = dir.join("w.sock");
    Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!("driver=file,node-name=f0,filename={}", path(img)))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q0,file=f0")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={},\
             writable=on,num-queues={queues}",
            path(&sock)
        ))
        .monitor()
        .start()
}

/// A small xorshift generator: the workloads are random but repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes and write-zeroes from one thread per queue (each on its
/// own part of the disk), applied to `shadow` as well.
fn random_workload(blk: &mut Blk, shadow: &Path, size: u64, ops: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let queues = blk.take_queues();
    let n = queues.len() as u64;
    let span = size / n;
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            let shadow = shadow.to_path_buf();
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&shadow)
                    .unwrap();
                let mut rng = Rng(seed + i as u64 * 7919);
                let base = i as u64 * span;
                for op in 0..ops {
                    let len = (1 + rng.below(128)) * 512;
                    let off = base + rng.below((span - len) / 512) * 512;
                    if rng.below(5) == 0 {
                        assert_eq!(
                            q.write_zeroes(off, len, rng.below(2) == 0),
                            0,
                            "zeroes {op}"
                        );
                        f.write_all_at(&vec![0u8; len as usize], off).unwrap();
                    } else {
                        let byte = rng.next() as u8;
                        let data: Vec<u8> = (0..len).map(|k| byte ^ (k as u8)).collect();
                        assert_eq!(q.write(off, &data), 0, "write {op} at {off}+{len}");
                        f.write_all_at(&data, off).unwrap();
                    }
                    if op % 64 == 63 {
                        assert_eq!(q.flush(), 0);
                    }
                    // Read back now and then: the data just written.
                    if op % 16 == 0 {
                        let got = q.read(off, len as usize);
                        let mut want = vec![0u8; len as usize];
                        use std::os::unix::fs::FileExt as _;
                        std::fs::File::open(&shadow)
                            .unwrap()
                            .read_exact_at(&mut want, off)
                            .unwrap();
                        assert!(got == want, "read back {op} at {off}+{len}");
                    }
                }
                q
            })
        })
        .collect();
    let back: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    blk.put_queues(back);
}

/// `qemu-img check` finds no corruption (leaks are allowed, and said).
///
/// Right after a SIGKILL the image's lock may outlive the process for a
/// moment (io_uring work still in flight holds the open file until it
/// ends), so a lock error is retried for a while.
#[track_caller]
fn assert_checks_clean(img: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", path(img)])
            .output()
            .unwrap();
        let code = out.status.code();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if code == Some(1) && stderr.contains("lock") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        assert!(
            matches!(code, Some(0) | Some(3)),
            "qemu-img check {}: exit {code:?}\n{}{stderr}",
            img.display(),
            String::from_utf8_lossy(&out.stdout),
        );
        return;
    }
}

#[track_caller]
fn assert_identical(img: &Path, raw: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", path(img), path(raw)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quit(d: &mut Daemon) {
    let mut qmp = d.qmp();
    assert_eq!(qmp.execute("quit", Value::Null), json!({"return": {}}));
    d.wait_exit(std::time::Duration::from_secs(10))
        .unwrap_or_else(|| panic!("vubd still running after quit"));
}

#[test]
fn random_writes_on_a_fresh_image_and_an_overlay_match_a_raw_image() {
    let dir = scratch("workload");
    let size = 32 * MIB;
    for backing in [false, true] {
        let img = dir.join("disk.qcow2");
        let shadow = dir.join("shadow.raw");
        let _ = std::fs::remove_file(&img);
        if backing {
            let base = dir.join("base.raw");
            let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            std::fs::write(&base, &data).unwrap();
            std::fs::write(&shadow, &data).unwrap();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                path(&img),
            ]);
        } else {
            std::fs::write(&shadow, vec![0u8; size as usize]).unwrap();
            qemu_img(&["create", "-q", "-f", "qcow2", path(&img), &size.to_string()]);
        }
        let mut d = serve_rw(&dir, &img, 2);
        let mut blk = Blk::connect_with(
            &dir.join("w.sock"),
            BlkOptions {
                num_queues: 2,
                queue_buffer: 1 << 20,
                ..BlkOptions::default()
            },
        );
        random_workload(&mut blk, &shadow, size, 400, 0x5eed + backing as u64);
        assert_eq!(blk.flush(), 0);
        drop(blk);
        quit(&mut d);
        assert_checks_clean(&img);
        assert_identical(&img, &shadow);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writes_to_a_preallocated_image_go_in_place() {
    let dir = scratch("prealloc");
    let img = dir.join("p.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        path(&img),
        "8M",
    ]);
    let before = std::fs::metadata(&img).unwrap().len();
    let shadow = dir.join("shadow.raw");
    std::fs::write(&shadow, vec![0u8; 8 * MIB as usize]).unwrap();
    let mut d = serve_rw(&dir, &img, 1);
    let mut blk = Blk::connect_with(
        &dir.join("w.sock"),
        BlkOptions {
            queue_buffer: 1 << 20,
            ..BlkOptions::default()
        },
    );
    random_workload(&mut blk, &shadow, 8 * MIB, 200, 99);
    drop(blk);
    quit(&mut d);
    // No cluster was allocated: every write landed in its place.
    assert_eq!(std::fs::metadata(&img).unwrap().len(), before);
    assert_checks_clean(&img);
    assert_identical(&img, &shadow);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn images_vubd_cannot_write_yet_are_refused_read_write_with_a_clear_error() {
    let dir = scratch("refuse");
    let img = dir.join("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        path(&img),
        "1M",
    ]);
    let d = Daemon::vubd(&[]).monitor().start();
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q0",
               "file": {"driver": "file", "filename": path(&img)}}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(
        desc.contains("extended L2") && desc.contains("read-only"),
        "{r}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// --- crash safety -----------------------------------------------------------

/// Bytes of one block of the crash workload; each write fills a block
/// with its stamp (block number and sequence number).
const BLOCK: usize = 4096;

fn stamp(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for (i, chunk) in b.chunks_exact_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ i as u64).to_le_bytes());
    }
    b
}

/// The sequence number a block holds (0 for zeroes), or None when it is
/// neither zeroes nor one whole stamp of that block.
fn read_stamp(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (stamp(block, seq) == data).then_some(seq)
}

/// What each block may hold after a crash: every sequence number written
/// to it, and the last one a completed flush covered.
#[derive(Default, Clone)]
struct Track {
    written: Vec<Vec<u64>>,
    durable: Vec<u64>,
}

/// Internal snapshots a crash round changes over QMP before its writes
/// start: one to take, and maybe one to delete.
struct RoundSnapshots<'a> {
    take: &'a str,
    delete: Option<&'a str>,
}

/// One round: serve the image, write stamps with flushes in between
/// until the daemon is killed after `kill_after`; returns the writes
/// that completed.
#[allow(clippy::too_many_arguments)]
fn crash_round(
    dir: &Path,
    img: &Path,
    blocks: u64,
    track: &mut Track,
    seq: &mut u64,
    kill_after: std::time::Duration,
    rng: &mut Rng,
    snapshots: Option<RoundSnapshots>,
) -> usize {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let mut d = serve_rw(dir, img, 1);
    if let Some(s) = snapshots {
        // Every cluster the writes below reach is then shared with a
        // snapshot: they copy clusters and L2 tables, and drop references.
        let mut qmp = d.qmp();
        if let Some(old) = s.delete {
            let r = qmp.execute(
                "blockdev-snapshot-delete-internal-sync",
                json!({"device": "e0", "name": old}),
            );
            assert_eq!(r["return"]["name"], old, "{r}");
        }
        let r = qmp.execute(
            "blockdev-snapshot-internal-sync",
            json!({"device": "e0", "name": s.take}),
        );
        assert_eq!(r, json!({"return": {}}));
    }
    let mut blk = Blk::connect_with(
        &dir.join("w.sock"),
        BlkOptions {
            queue_buffer: 1 << 20,
            ..BlkOptions::default()
        },
    );
    let mut q = blk.take_queues().pop().unwrap();
    let killed = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Mutex::new((track.clone(), *seq, 0usize)));
    let (k2, s2) = (killed.clone(), shared.clone());
    let mut local_rng = Rng(rng.next() | 1);
    let worker = std::thread::spawn(move || {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Completed writes since the last flush started: (block, seq).
            let mut since_flush: Vec<(u64, u64)> = Vec::new();
            let mut n = 0u64;
            while !k2.load(Ordering::SeqCst) {
                n += 1;
                let flush = n % 6 == 0;
                let tag = n as usize;
                let mut pending = None;
                if flush {
                    q.submit_flush(tag);
                } else {
                    let b = local_rng.below(blocks);
                    let mut g = s2.lock().unwrap();
                    g.1 += 1;
                    let s = g.1;
                    g.0.written[b as usize].push(s);
                    drop(g);
                    q.fill_buffer(0, &stamp(b, s));
                    q.submit_write(b * BLOCK as u64, 0, BLOCK, tag, blkio::ReqFlags::empty());
                    pending = Some((b, s));
                }
                q.kick();
                let done = loop {
                    match q.try_wait(1, Duration::from_millis(20)) {
                        Ok(c) => break Some(c),
                        Err(_) if k2.load(Ordering::SeqCst) => break None,
                        Err(_) => continue,
                    }
                };
                let Some(c) = done else { return };
                if c[0].1 != 0 {
                    return;
                }
                let mut g = s2.lock().unwrap();
                match pending {
                    Some(w) => {
                        since_flush.push(w);
                        g.2 += 1;
                    }
                    None => {
                        for (b, s) in since_flush.drain(..) {
                            let d = &mut g.0.durable[b as usize];
                            *d = (*d).max(s);
                        }
                    }
                }
            }
        }));
        drop(run);
    });
    std::thread::sleep(kill_after);
    d.send_signal("KILL");
    killed.store(true, Ordering::SeqCst);
    let _ = d.wait_exit(Duration::from_secs(10));
    let _ = worker.join();
    drop(blk);
    let g = shared.lock().unwrap();
    *track = g.0.clone();
    *seq = g.1;
    g.2
}

/// Checks the image after a crash: no corruption, and every block holds
/// its last flushed write or a later one.
fn check_after_crash(dir: &Path, img: &Path, track: &Track, round: usize) {
    assert_checks_clean(img);
    let raw = dir.join("after.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", path(img), path(&raw)]);
    let data = std::fs::read(&raw).unwrap();
    for (b, written) in track.written.iter().enumerate() {
        let block = &data[b * BLOCK..(b + 1) * BLOCK];
        let held = read_stamp(b as u64, block)
            .unwrap_or_else(|| panic!("round {round}: block {b} holds neither zeroes nor a stamp"));
        let durable = track.durable[b];
        let ok = if held == 0 {
            durable == 0
        } else {
            held >= durable && written.contains(&held)
        };
        assert!(
            ok,
            "round {round}: block {b} holds write {held}; the last flushed was {durable}"
        );
    }
}

/// SIGKILLs vubd `rounds` times during a write workload with flushes on
/// one image (optionally over a backing file), checking after each. With
/// `snapshots`, each round first takes an internal snapshot over QMP (and
/// deletes the one from two rounds before), and after each kill every
/// snapshot left must read exactly as the image was when it was taken.
pub fn crash_campaign(rounds: usize, seed: u64, with_backing: bool, snapshots: bool) -> usize {
    let dir = scratch(&format!("crash{seed}"));
    let blocks = 2048u64; // 8 MiB of 4k blocks
    let img = dir.join("crash.qcow2");
    if with_backing {
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0u8; blocks as usize * BLOCK]).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            path(&img),
        ]);
    } else {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k",
            path(&img),
            &(blocks * BLOCK as u64).to_string(),
        ]);
    }
    let mut track = Track {
        written: vec![Vec::new(); blocks as usize],
        durable: vec![0; blocks as usize],
    };
    let mut rng = Rng(seed | 1);
    let mut seq = 0u64;
    let mut writes = 0;
    // The snapshots taken and what each holds; the image before a round.
    let mut held: Vec<(String, Vec<u8>)> = Vec::new();
    let mut before = vec![0u8; blocks as usize * BLOCK];
    for round in 0..rounds {
        let delay = std::time::Duration::from_millis(30 + rng.below(120));
        let take = format!("r{round}");
        let delete = (held.len() >= 2).then(|| held.remove(0).0);
        let plan = snapshots.then(|| RoundSnapshots {
            take: &take,
            delete: delete.as_deref(),
        });
        writes += crash_round(
            &dir, &img, blocks, &mut track, &mut seq, delay, &mut rng, plan,
        );
        check_after_crash(&dir, &img, &track, round);
        if snapshots {
            held.push((take, before));
            for (name, want) in &held {
                let out = dir.join("snap.raw");
                let sel = format!("snapshot.name={name}");
                qemu_img(&[
                    "convert",
                    "-f",
                    "qcow2",
                    "-l",
                    &sel,
                    "-O",
                    "raw",
                    path(&img),
                    path(&out),
                ]);
                assert!(
                    std::fs::read(&out).unwrap() == *want,
                    "round {round}: snapshot {name} changed"
                );
            }
            before = std::fs::read(dir.join("after.raw")).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    writes
}

#[test]
fn killed_during_writes_the_image_stays_consistent_and_keeps_flushed_writes() {
    // 20 rounds on a fresh image and 20 over a backing file in the suite;
    // scripts/crash-qcow2 runs as many as asked.
    let rounds: usize = std::env::var("VUBD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let a = crash_campaign(rounds, 11, false, false);
    let b = crash_campaign(rounds, 23, true, false);
    println!("{} writes completed over {} kills", a + b, 2 * rounds);
    assert!(
        a + b > rounds,
        "only {} writes completed in {} rounds",
        a + b,
        2 * rounds
    );
}

#[test]
fn killed_while_writing_over_internal_snapshots_the_image_and_snapshots_stay_intact() {
    // 6 rounds in the suite; scripts/crash-qcow2 --snapshots runs more.
    let rounds: usize = std::env::var("VUBD_CRASH_SNAPSHOT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let writes = crash_campaign(rounds, 37, false, true);
    println!("{writes} writes completed over {rounds} kills with snapshots");
    assert!(writes > rounds, "only {writes} writes in {rounds} rounds");
}

#[test]
fn snapshots_taken_while_the_guest_writes_lose_nothing() {
    use std::time::Duration;
    // Arrange: an exported qcow2 image with a guest writing on 2 queues.
    let dir = scratch("snap");
    let size = 16 * MIB;
    let base = dir.join("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path(&base),
        &size.to_string(),
    ]);
    let shadow = dir.join("shadow.raw");
    std::fs::write(&shadow, vec![0u8; size as usize]).unwrap();
    let mut d = serve_rw(&dir, &base, 2);
    let mut blk = Blk::connect_with(
        &dir.join("w.sock"),
        BlkOptions {
            num_queues: 2,
            queue_buffer: 1 << 20,
            ..BlkOptions::default()
        },
    );
    let shadow2 = shadow.clone();
    let guest = std::thread::spawn(move || {
        random_workload(&mut blk, &shadow2, size, 500, 77);
        assert_eq!(blk.flush(), 0);
        blk
    });
    let mut qmp = d.qmp();

    // Act: blockdev-snapshot-sync on the export, then blockdev-snapshot
    // with an overlay added by the monitor, both while the guest writes.
    std::thread::sleep(Duration::from_millis(40));
    let s1 = dir.join("s1.qcow2");
    let r = qmp.execute(
        "blockdev-snapshot-sync",
        json!({"device": "e0", "snapshot-file": path(&s1), "snapshot-node-name": "s1",
               "format": "qcow2"}),
    );
    assert_eq!(r, json!({"return": {}}));
    std::thread::sleep(Duration::from_millis(40));
    let s2 = dir.join("s2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        path(&s1),
        "-F",
        "qcow2",
        path(&s2),
        &size.to_string(),
    ]);
    let r = qmp.execute(
        "blockdev-add",
        // null as QEMU takes it since 2.10 (2.8's empty string works too).
        json!({"driver": "qcow2", "node-name": "s2", "backing": null,
               "file": {"driver": "file", "filename": path(&s2)}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = qmp.execute("blockdev-snapshot", json!({"node": "s1", "overlay": "s2"}));
    assert_eq!(r, json!({"return": {}}));
    let block = qmp.execute("query-block", Value::Null);
    let blk = guest.join().unwrap();
    drop(blk);
    drop(qmp);
    quit(&mut d);

    // Assert: the export moved to the top, the chain is s2 -> s1 -> base,
    // and it holds everything the guest wrote.
    let inserted = &block["return"][0]["inserted"];
    assert_eq!(inserted["node-name"], "s2", "{block}");
    assert_eq!(inserted["backing_file_depth"], 2, "{block}");
    let out = Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json", path(&s2)])
        .output()
        .unwrap();
    let chain: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![path(&s2), path(&s1), path(&base)]);
    for img in [&base, &s1, &s2] {
        assert_checks_clean(img);
    }
    assert_identical(&s2, &shadow);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_errors_name_what_is_wrong() {
    let dir = scratch("snaperr");
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "1M"]);
    let d = serve_rw(&dir, &img, 1);
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "blockdev-snapshot-sync",
        json!({"device": "nope", "snapshot-file": path(&dir.join("x.qcow2"))}),
    );
    // QEMU 10's answer, word for word.
    assert_eq!(
        r["error"],
        json!({"class": "GenericError", "desc": "Cannot find device='nope' nor node-name=''"})
    );
    let r = qmp.execute("blockdev-snapshot", json!({"node": "q0", "overlay": "f0"}));
    assert!(r["error"]["desc"].as_str().unwrap().contains("'f0'"), "{r}");
    let r = qmp.execute("query-block", Value::Null);
    assert_eq!(r["return"][0]["inserted"]["node-name"], "q0");
    let _ = std::fs::remove_dir_all(&dir);
}

// --- damaged images -----------------------------------------------------------

/// Overwrites bytes of a file.
fn poke(p: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Reads a big-endian u64 of a file.
fn peek64(p: &Path, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

#[test]
fn damaged_tables_fail_the_request_with_eio_and_the_rest_is_served() {
    // Arrange: data in the first and the second 512 MiB (two L2 tables);
    // the first table's L1 entry then points past the end of the file,
    // and an entry of the second table has reserved bits set.
    let dir = scratch("damaged");
    let img = dir.join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "2G"]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x31 0 64k",
            "write -P 0x32 1g 64k",
            "write -P 0x33 1536m 64k",
        ],
    );
    let l1 = peek64(&img, 40);
    poke(
        &img,
        l1,
        &(0x8000_0000_0000_0000u64 | (1u64 << 40)).to_be_bytes(),
    );
    let l2_third = peek64(&img, l1 + 3 * 8) & 0x00ff_ffff_ffff_fe00;
    poke(&img, l2_third, &0x8000_0000_0000_01feu64.to_be_bytes());

    // Act
    let (d, mut blk) = serve_ro(&dir, &img, "");

    // Assert: the damaged places fail, the sound one reads, the daemon
    // answers its monitor.
    assert_eq!(blk.try_read(0, 4096), Err(-libc::EIO));
    assert_eq!(blk.try_read(1536 << 20, 4096), Err(-libc::EIO));
    assert_eq!(blk.read(1 << 30, 4096), vec![0x32u8; 4096]);
    let mut qmp = d.qmp();
    assert!(qmp
        .execute("query-version", Value::Null)
        .get("return")
        .is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_compressed_cluster_that_does_not_inflate_fails_with_eio() {
    let dir = scratch("badzlib");
    let src = dir.join("src.raw");
    std::fs::write(&src, vec![0x5au8; 256 << 10]).unwrap();
    let img = dir.join("c.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path(&src),
        path(&img),
    ]);
    // The first L2 entry's compressed data: garbage over it.
    let l1 = peek64(&img, 40);
    let l2 = peek64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = peek64(&img, l2);
    let host = entry & ((1u64 << 54) - 1);
    poke(&img, host, &[0xffu8; 64]);
    let (d, mut blk) = serve_ro(&dir, &img, "");
    assert_eq!(blk.try_read(0, 4096), Err(-libc::EIO));
    // The next cluster is sound.
    assert_eq!(blk.read(65536, 4096), vec![0x5au8; 4096]);
    let mut qmp = d.qmp();
    assert!(qmp
        .execute("query-version", Value::Null)
        .get("return")
        .is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backing_chain_that_loops_is_refused_with_a_clear_error() {
    let dir = scratch("loop");
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&a), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        path(&b),
    ]);
    // a's backing becomes b: a loop.
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        path(&a),
    ]);
    let d = Daemon::vubd(&[]).monitor().start();
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "read-only": true,
               "file": {"driver": "file", "filename": path(&b)}}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(
        desc.contains("Backing chain") && desc.contains("loops"),
        "{r}"
    );
    assert!(qmp
        .execute("query-version", Value::Null)
        .get("return")
        .is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn block_resize_grows_an_exported_qcow2_image_and_refuses_to_shrink_it() {
    // Arrange
    let dir = scratch("resize");
    let img = dir.join("r.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "4M"]);
    let mut d = serve_rw(&dir, &img, 1);
    let mut blk = Blk::connect_with(
        &dir.join("w.sock"),
        BlkOptions {
            queue_buffer: 1 << 20,
            ..BlkOptions::default()
        },
    );
    assert_eq!(blk.write(0, &vec![0x41u8; 4096]), 0);
    let mut qmp = d.qmp();

    // Act: past what the first L2 table maps, so the L1 table grows.
    let grown = 3 << 30;
    let r = qmp.execute("block_resize", json!({"node-name": "q0", "size": grown}));
    let shrink = qmp.execute("block_resize", json!({"node-name": "q0", "size": MIB}));
    let odd = qmp.execute(
        "block_resize",
        json!({"node-name": "q0", "size": grown + 1}),
    );

    // Assert: the guest sees the new size and can use it; the image says
    // so and checks clean.
    assert_eq!(r, json!({"return": {}}));
    assert!(
        shrink["error"]["desc"].as_str().unwrap().contains("shrunk"),
        "{shrink}"
    );
    assert_eq!(
        odd["error"]["desc"], "The new size must be a multiple of 512",
        "{odd}"
    );
    assert_eq!(blk.capacity(), grown);
    assert_eq!(blk.write(grown - 8192, &vec![0x42u8; 8192]), 0);
    assert_eq!(blk.read(grown - 8192, 8192), vec![0x42u8; 8192]);
    assert_eq!(blk.read(0, 4096), vec![0x41u8; 4096]);
    drop(blk);
    drop(qmp);
    quit(&mut d);
    assert_eq!(qemu_img_info(&img)["virtual-size"], grown);
    assert_checks_clean(&img);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn discard_frees_whole_clusters_and_they_read_as_zeroes() {
    let dir = scratch("discard");
    for backing in [false, true] {
        let img = dir.join("d.qcow2");
        let _ = std::fs::remove_file(&img);
        let size = 4 * MIB;
        if backing {
            std::fs::write(dir.join("b.raw"), vec![0x77u8; size as usize]).unwrap();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "b.raw",
                "-F",
                "raw",
                path(&img),
            ]);
        } else {
            qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "4M"]);
        }
        let sock = dir.join("w.sock");
        let mut d = Daemon::vubd(&[])
            .arg("--blockdev")
            .arg(&format!(
                "driver=file,node-name=f0,filename={},discard=unmap",
                path(&img)
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=q0,file=f0,discard=unmap")
            .arg("--export")
            .arg(&format!(
                "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={},writable=on",
                path(&sock)
            ))
            .monitor()
            .start();
        let mut blk = Blk::connect_with(
            &sock,
            BlkOptions {
                queue_buffer: 1 << 20,
                ..BlkOptions::default()
            },
        );
        assert_eq!(blk.write(0, &vec![0x11u8; 256 << 10]), 0);
        assert_eq!(blk.flush(), 0);
        // Clusters 1 and 2 whole, and parts of 0 and 3 (left alone).
        assert_eq!(blk.discard(60 << 10, 140 << 10), 0);
        let got = blk.read(0, 256 << 10);
        let mut want = vec![0x11u8; 256 << 10];
        want[64 << 10..192 << 10].fill(0);
        assert!(
            got == want,
            "backing {backing}: discarded clusters do not read as zeroes"
        );
        drop(blk);
        quit(&mut d);
        assert_checks_clean(&img);
        let shadow = dir.join("shadow.raw");
        let mut all = if backing {
            vec![0x77u8; size as usize]
        } else {
            vec![0u8; size as usize]
        };
        all[..256 << 10].copy_from_slice(&want);
        std::fs::write(&shadow, &all).unwrap();
        assert_identical(&img, &shadow);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cache_options_are_checked_as_qemu_checks_them() {
    let dir = scratch("cacheopts");
    let img = dir.join("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        path(&img),
        "1M",
    ]);
    let d = Daemon::vubd(&[]).monitor().start();
    let mut qmp = d.qmp();
    let mut add = |name: &str, extra: Value| {
        let mut o = json!({"driver": "qcow2", "node-name": name, "read-only": true,
                           "file": {"driver": "file", "filename": path(&img)}});
        for (k, v) in extra.as_object().unwrap() {
            o[k] = v.clone();
        }
        qmp.execute("blockdev-add", o)
    };
    let all = add(
        "a",
        json!({"cache-size": 1 << 20, "l2-cache-size": 1 << 19, "refcount-cache-size": 1 << 18}),
    );
    assert!(
        all["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("may not be set at the same time"),
        "{all}"
    );
    let over = add(
        "b",
        json!({"cache-size": 1 << 20, "l2-cache-size": 2 << 20}),
    );
    assert!(
        over["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("may not exceed cache-size"),
        "{over}"
    );
    let lazy = add("c", json!({"lazy-refcounts": true}));
    assert!(
        lazy["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("Lazy refcounts require"),
        "{lazy}"
    );
    let fine = add(
        "d",
        json!({"cache-size": 4 << 20, "cache-clean-interval": 600}),
    );
    assert_eq!(fine, json!({"return": {}}));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn internal_snapshots_are_listed_and_the_active_layer_reads_through_shared_clusters() {
    let dir = scratch("internal");
    let img = dir.join("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "4M"]);
    qemu_io(&img, "qcow2", &["write -P 0x21 0 128k"]);
    qemu_img(&["snapshot", "-c", "first", path(&img)]);
    qemu_io(&img, "qcow2", &["write -P 0x22 64k 64k"]);
    // The snapshot's clusters are shared (not COPIED) where the active
    // layer did not rewrite them.
    assert_same_as_qemu(&img, &dir, &[65536, 4096]);
    let (d, _) = vubd_reads(&dir, &img, "", 1 << 20);
    let mut qmp = d.qmp();
    let nodes = qmp.execute("query-named-block-nodes", Value::Null);
    let q0 = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q0")
        .cloned()
        .unwrap();
    let snaps = &q0["image"]["snapshots"];
    assert_eq!(snaps.as_array().map(Vec::len), Some(1), "{q0}");
    assert_eq!(snaps[0]["name"], "first");
    assert_eq!(snaps[0]["id"], "1");
    let _ = std::fs::remove_dir_all(&dir);
}
