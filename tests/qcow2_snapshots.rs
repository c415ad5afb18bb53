//! qcow2 internal snapshots: taken and deleted over QMP while a guest
//! writes through a libblkio export, and images with snapshots made by
//! `qemu-img snapshot` written to. QEMU's tools are the judges: `qemu-img
//! check` finds the image clean, `qemu-img snapshot -l` lists what vubd
//! lists, and every snapshot reads (through `qemu-img convert -l`) exactly
//! what the guest had written when it was taken.

mod common;

use common::blk::{Blk, BlkOptions};
use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img: {e}"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vubd-qsnap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Serves `img` (qcow2, writable) as export `e0` on `{dir}/w.sock`.
fn serve_rw(dir: &Path, img: &Path, queues: usize) -> Daemon {
    Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!("driver=file,node-name=f0,filename={}", path(img)))
        .arg("--blockdev")
        // The strictest overlap checks: snapshots taken and deleted while
        // the guest writes must never trip them.
        .arg("driver=qcow2,node-name=q0,file=f0,discard=unmap,overlap-check=all")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={},\
             writable=on,num-queues={queues}",
            path(&dir.join("w.sock"))
        ))
        .monitor()
        .start()
}

fn connect(dir: &Path, queues: usize) -> Blk {
    Blk::connect_with(
        &dir.join("w.sock"),
        BlkOptions {
            num_queues: queues,
            queue_buffer: 1 << 20,
            ..BlkOptions::default()
        },
    )
}

/// A small xorshift generator: random but repeatable workloads.
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

/// `ops` random writes, write-zeroes and discards (whole clusters of
/// 64 KiB) in `[base, base + span)` through queue 0, applied to `shadow`.
fn workload(blk: &mut Blk, shadow: &mut [u8], base: u64, span: u64, ops: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    for op in 0..ops {
        let kind = rng.below(10);
        if kind == 0 {
            // A discard of whole clusters reads as zeroes afterwards.
            let c = 64 * 1024;
            let off = base + rng.below(span / c) * c;
            let len = c * (1 + rng.below(2)).min((base + span - off) / c);
            assert_eq!(blk.discard(off, len), 0, "discard {op}");
            shadow[off as usize..(off + len) as usize].fill(0);
            continue;
        }
        let len = (1 + rng.below(256)) * 512;
        let off = base + rng.below((span - len) / 512) * 512;
        if kind == 1 {
            assert_eq!(blk.write_zeroes(off, len, false), 0, "zeroes {op}");
            shadow[off as usize..(off + len) as usize].fill(0);
        } else {
            let byte = rng.next() as u8;
            let data: Vec<u8> = (0..len).map(|k| byte ^ (k as u8)).collect();
            assert_eq!(blk.write(off, &data), 0, "write {op} at {off}+{len}");
            shadow[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
    assert_eq!(blk.flush(), 0);
}

/// `qemu-img check` finds no corruption and no leak.
#[track_caller]
fn assert_check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path(img)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: exit {:?}\n{}{}",
        img.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `qemu-img` reads from snapshot `name` of `img` (None: the active
/// layer).
fn qemu_reads(dir: &Path, img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = dir.join("read.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let sel;
    if let Some(n) = snapshot {
        sel = format!("snapshot.name={n}");
        args.extend(["-l", sel.as_str()]);
    }
    args.extend([path(img), path(&out)]);
    qemu_img(&args);
    std::fs::read(&out).unwrap()
}

#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs at byte {at} (got {:#x}, want {:#x})",
            got[at], want[at]
        );
    }
}

/// The snapshot names `qemu-img snapshot -l` lists, in order.
fn qemu_snapshot_names(img: &Path) -> Vec<String> {
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2", path(img)]);
    let info: Value = serde_json::from_str(&out).unwrap();
    info["snapshots"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|s| s["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Each snapshot's id, name, date and VM state size as an image info
/// (vubd's or qemu-img's) lists them.
fn snapshot_details(image: &Value) -> Vec<Value> {
    image["snapshots"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|s| {
            json!([
                s["id"],
                s["name"],
                s["date-sec"],
                s["date-nsec"],
                s["vm-state-size"],
                s["vm-clock-sec"],
                s["vm-clock-nsec"]
            ])
        })
        .collect()
}

/// The snapshots vubd lists for node q0 (id, name).
fn vubd_snapshots(qmp: &mut Qmp) -> Vec<(String, String)> {
    let nodes = qmp.execute("query-named-block-nodes", Value::Null);
    let q0 = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q0")
        .cloned()
        .unwrap();
    q0["image"]["snapshots"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_string(),
                        s["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn quit(d: &mut Daemon) {
    let mut qmp = d.qmp();
    assert_eq!(qmp.execute("quit", Value::Null), json!({"return": {}}));
    d.wait_exit(std::time::Duration::from_secs(10))
        .unwrap_or_else(|| panic!("vubd still running after quit"));
}

/// The stamp a background writer puts in a 4 KiB block: its number and a
/// sequence number in every 16 bytes.
fn stamp(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for chunk in b.chunks_exact_mut(16) {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&seq.to_le_bytes());
    }
    b
}

#[test]
fn snapshots_taken_and_deleted_over_qmp_while_a_guest_writes_keep_their_data() {
    // Arrange: a 16 MiB image served on 2 queues. Queue 0 writes the
    // first half in phases (its contents known exactly between phases);
    // queue 1 keeps stamping 4 KiB blocks of the second half the whole
    // time, snapshots included.
    let dir = scratch("qmp");
    let size = 16 * MIB;
    let half = size / 2;
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), &size.to_string()]);
    let mut d = serve_rw(&dir, &img, 2);
    let mut blk = connect(&dir, 2);
    let mut queues = blk.take_queues();
    let mut q1 = queues.pop().unwrap();
    blk.put_queues(queues);
    let stop = Arc::new(AtomicBool::new(false));
    let written: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![vec![0]; 256]));
    let (stop2, written2) = (stop.clone(), written.clone());
    let background = std::thread::spawn(move || {
        let mut rng = Rng(99);
        let mut seq = 0u64;
        while !stop2.load(Ordering::SeqCst) {
            seq += 1;
            let b = rng.below(256);
            written2.lock().unwrap()[b as usize].push(seq);
            assert_eq!(q1.write(half + b * 4096, &stamp(b, seq)), 0);
        }
        assert_eq!(q1.flush(), 0);
        q1
    });
    let mut shadow = vec![0u8; half as usize];
    let mut qmp = d.qmp();
    let mut taken: Vec<(String, Vec<u8>)> = Vec::new();

    // Act: write, snapshot "one", write, snapshot "two", write, delete
    // "one", write; errors on the way are QEMU's.
    workload(&mut blk, &mut shadow, 0, half, 120, 1);
    for name in ["one", "two"] {
        let r = qmp.execute(
            "blockdev-snapshot-internal-sync",
            json!({"device": "e0", "name": name}),
        );
        assert_eq!(r, json!({"return": {}}), "{name}");
        taken.push((name.to_string(), shadow.clone()));
        workload(&mut blk, &mut shadow, 0, half, 120, name.len() as u64 + 7);
    }
    let r = qmp.execute(
        "blockdev-snapshot-internal-sync",
        json!({"device": "q0", "name": "two"}),
    );
    assert_eq!(
        r["error"]["desc"],
        "Snapshot with name 'two' already exists on device 'q0'"
    );
    let listed = vubd_snapshots(&mut qmp);
    assert_eq!(
        listed,
        vec![("1".into(), "one".into()), ("2".into(), "two".into())]
    );
    let r = qmp.execute(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "e0", "name": "one"}),
    );
    assert_eq!(r["return"]["id"], "1", "{r}");
    assert_eq!(r["return"]["name"], "one", "{r}");
    assert_eq!(r["return"]["vm-state-size"], 0, "{r}");
    taken.remove(0);
    let r = qmp.execute(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "e0", "id": "1"}),
    );
    assert_eq!(
        r["error"]["desc"],
        "Snapshot with id '1' and name 'null' does not exist on device 'e0'"
    );
    workload(&mut blk, &mut shadow, 0, half, 120, 3);
    let r = qmp.execute(
        "blockdev-snapshot-internal-sync",
        json!({"device": "e0", "name": "three"}),
    );
    assert_eq!(r, json!({"return": {}}));
    taken.push(("three".to_string(), shadow.clone()));
    workload(&mut blk, &mut shadow, 0, half, 120, 4);
    stop.store(true, Ordering::SeqCst);
    let q1 = background.join().unwrap();
    let listed = vubd_snapshots(&mut qmp);
    let full = snapshot_details(
        &qmp.execute("query-block", Value::Null)["return"][0]["inserted"]["image"],
    );
    drop(q1);
    drop(blk);
    drop(qmp);
    quit(&mut d);

    // Assert: clean, listed alike, and each snapshot holds the first half
    // as it was and only whole stamps in the second.
    assert_check_clean(&img);
    let names: Vec<String> = listed.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(names, vec!["two".to_string(), "three".to_string()]);
    assert_eq!(qemu_snapshot_names(&img), names);
    assert_eq!(listed[1].0, "3", "the next free id");
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2", path(&img)]);
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        snapshot_details(&info),
        full,
        "vubd's list against qemu-img's"
    );
    let written = written.lock().unwrap();
    let check_second_half = |what: &str, data: &[u8]| {
        for b in 0..256u64 {
            let block = &data[(half + b * 4096) as usize..(half + (b + 1) * 4096) as usize];
            let seq = u64::from_le_bytes(block[8..16].try_into().unwrap());
            let ok = (seq == 0 && block.iter().all(|&x| x == 0))
                || (written[b as usize].contains(&seq) && block == stamp(b, seq).as_slice());
            assert!(ok, "{what}: block {b} of the second half is torn");
        }
    };
    for (name, want) in &taken {
        let got = qemu_reads(&dir, &img, Some(name));
        assert_same(name, &got[..half as usize], want);
        check_second_half(name, &got);
    }
    let active = qemu_reads(&dir, &img, None);
    assert_same("active layer", &active[..half as usize], &shadow);
    check_second_half("active layer", &active);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_image_with_snapshots_from_qemu_img_is_written_and_they_stay_intact() {
    // Arrange: data, a snapshot by qemu-img, more data, another snapshot:
    // every cluster and L2 table is shared.
    let dir = scratch("qemu");
    let size = 8 * MIB;
    let img = dir.join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        path(&img),
        &size.to_string(),
    ]);
    let io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, path(&img)])
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-io {cmd}");
    };
    io("write -P 0x5a 0 6M");
    qemu_img(&["snapshot", "-c", "base", path(&img)]);
    io("write -P 0xa5 1M 2M");
    qemu_img(&["snapshot", "-c", "later", path(&img)]);
    let base = qemu_reads(&dir, &img, Some("base"));
    let later = qemu_reads(&dir, &img, Some("later"));
    let mut shadow = later.clone();

    // Act: writes of every kind over the shared clusters, then the first
    // snapshot deleted over QMP.
    let mut d = serve_rw(&dir, &img, 1);
    let mut blk = connect(&dir, 1);
    workload(&mut blk, &mut shadow, 0, size, 250, 5);
    let mut qmp = d.qmp();
    let before = vubd_snapshots(&mut qmp);
    let r = qmp.execute(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "e0", "id": "1", "name": "base"}),
    );
    assert_eq!(r["return"]["name"], "base", "{r}");
    workload(&mut blk, &mut shadow, 0, size, 120, 6);
    drop(blk);
    drop(qmp);
    quit(&mut d);

    // Assert
    assert_eq!(
        before,
        vec![("1".into(), "base".into()), ("2".into(), "later".into())]
    );
    assert_check_clean(&img);
    assert_eq!(qemu_snapshot_names(&img), vec!["later".to_string()]);
    assert_same(
        "snapshot 'later'",
        &qemu_reads(&dir, &img, Some("later")),
        &later,
    );
    assert_same("active layer", &qemu_reads(&dir, &img, None), &shadow);
    // The deleted snapshot's data was not lost before it went: qemu-img
    // read it above, and it differs from what stays.
    assert!(base != later);
    // The image still works for QEMU: a snapshot applied on a copy reads
    // as the snapshot.
    let copy = dir.join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "later", path(&copy)]);
    assert_same(
        "copy after snapshot -a",
        &qemu_reads(&dir, &copy, None),
        &later,
    );
    // QEMU's own writes grow the file past what vubd had reserved: a
    // reservation left counted at close would show as leaks now.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x66 0 2M", path(&copy)])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_check_clean(&copy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn internal_snapshot_errors_are_qemus() {
    let dir = scratch("errors");
    let img = dir.join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "1M"]);
    let raw = dir.join("c.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .write_all_at(&[0u8; 512], 0)
        .unwrap();
    let d = serve_rw(&dir, &img, 1);
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r0",
               "file": {"driver": "file", "filename": path(&raw)}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let cases = [
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "nope", "name": "x"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "r0", "name": "x"}),
            "Block format 'raw' used by device 'r0' does not support internal snapshots",
        ),
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "e0", "name": ""}),
            "Name is empty",
        ),
        (
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": "e0"}),
            "Name or id must be provided",
        ),
        (
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": "q0", "name": "x"}),
            "Snapshot with id 'null' and name 'x' does not exist on device 'q0'",
        ),
    ];
    for (cmd, args, want) in cases {
        let r = qmp.execute(cmd, args.clone());
        assert_eq!(r["error"]["desc"], want, "{cmd} {args}");
        assert_eq!(r["error"]["class"], "GenericError");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bytes the file occupies on disk.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn deleting_a_snapshot_discards_what_it_alone_held_unless_told_not_to() {
    for pass in [true, false] {
        // Arrange: 2 MiB written, a snapshot, the 2 MiB written again: the
        // snapshot alone holds the first copy.
        let dir = scratch(&format!("pass-{pass}"));
        let img = dir.join("d.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "4M"]);
        let d = Daemon::vubd(&[])
            .arg("--blockdev")
            .arg(&format!(
                "driver=file,node-name=f0,filename={},discard=unmap",
                path(&img)
            ))
            .arg("--blockdev")
            .arg(&format!(
                "driver=qcow2,node-name=q0,file=f0,pass-discard-snapshot={}",
                if pass { "on" } else { "off" }
            ))
            .arg("--export")
            .arg(&format!(
                "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={},writable=on",
                path(&dir.join("w.sock"))
            ))
            .monitor()
            .start();
        let mut blk = connect(&dir, 1);
        for half in 0..2 {
            assert_eq!(blk.write(half * MIB, &vec![0x33u8; MIB as usize]), 0);
        }
        let mut qmp = d.qmp();
        let r = qmp.execute(
            "blockdev-snapshot-internal-sync",
            json!({"device": "e0", "name": "old"}),
        );
        assert_eq!(r, json!({"return": {}}));
        for half in 0..2 {
            assert_eq!(blk.write(half * MIB, &vec![0x44u8; MIB as usize]), 0);
        }
        assert_eq!(blk.flush(), 0);
        let block = qmp.execute("query-block", Value::Null);
        assert_eq!(
            block["return"][0]["inserted"]["image"]["snapshots"][0]["name"], "old",
            "{block}"
        );
        let before = allocated(&img);

        // Act
        let r = qmp.execute(
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": "e0", "name": "old"}),
        );
        assert_eq!(r["return"]["name"], "old", "{r}");
        let after = allocated(&img);
        let block = qmp.execute("query-block", Value::Null);

        // Assert: the 2 MiB only the snapshot held left the file (or
        // stayed, with pass-discard-snapshot=off); the image is clean.
        assert!(
            block["return"][0]["inserted"]["image"]
                .get("snapshots")
                .is_none(),
            "{block}"
        );
        if pass {
            assert!(
                after + 2 * MIB <= before,
                "pass-discard-snapshot=on: {before} -> {after} bytes"
            );
        } else {
            assert_eq!(after, before, "pass-discard-snapshot=off");
        }
        assert_eq!(blk.read(0, 4096), vec![0x44u8; 4096]);
        drop(blk);
        drop(qmp);
        let mut d = d;
        quit(&mut d);
        assert_check_clean(&img);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn compressed_clusters_shared_with_a_snapshot_are_overwritten_and_discarded_cleanly() {
    // Arrange: an image whose data is all compressed (several clusters'
    // data packed into one host cluster), with a snapshot of it.
    let dir = scratch("compressed");
    let size = 4 * MIB;
    let src = dir.join("src.raw");
    let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 7) as u8 * 0x11).collect();
    std::fs::write(&src, &data).unwrap();
    let img = dir.join("c.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=16k",
        path(&src),
        path(&img),
    ]);
    qemu_img(&["snapshot", "-c", "packed", path(&img)]);
    let mut shadow = data.clone();

    // Act: writes, zeroes and discards over it, then the snapshot deleted.
    let mut d = serve_rw(&dir, &img, 1);
    let mut blk = connect(&dir, 1);
    workload(&mut blk, &mut shadow, 0, size, 150, 9);
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "e0", "name": "packed"}),
    );
    assert_eq!(r["return"]["name"], "packed", "{r}");
    workload(&mut blk, &mut shadow, 0, size, 100, 10);
    drop(blk);
    drop(qmp);
    quit(&mut d);

    // Assert: no leak, no corruption, the data the guest wrote.
    assert_check_clean(&img);
    assert_same("active layer", &qemu_reads(&dir, &img, None), &shadow);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_queues_writing_the_same_shared_clusters_at_once_both_land() {
    // Arrange: 2 MiB of data and a snapshot of it; every cluster and the
    // L2 table are shared.
    let dir = scratch("race");
    let img = dir.join("r.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "4M"]);
    let mut d = serve_rw(&dir, &img, 2);
    let mut blk = connect(&dir, 2);
    for half in 0..2 {
        assert_eq!(blk.write(half * MIB, &vec![0x77u8; MIB as usize]), 0);
    }
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "blockdev-snapshot-internal-sync",
        json!({"device": "e0", "name": "before"}),
    );
    assert_eq!(r, json!({"return": {}}));

    // Act: queue 0 writes the even 4 KiB blocks, queue 1 the odd ones, at
    // the same time: each first write to a cluster races the other
    // queue's for its copy, and the first two for the table's.
    let queues = blk.take_queues();
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            std::thread::spawn(move || {
                for b in (i as u64..512).step_by(2) {
                    assert_eq!(q.write(b * 4096, &stamp(b, 1)), 0, "block {b}");
                }
                assert_eq!(q.flush(), 0);
                q
            })
        })
        .collect();
    let back: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    blk.put_queues(back);
    drop(blk);
    drop(qmp);
    quit(&mut d);

    // Assert
    assert_check_clean(&img);
    let mut want = vec![0u8; 4 * MIB as usize];
    for b in 0..512u64 {
        want[(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&stamp(b, 1));
    }
    assert_same("active layer", &qemu_reads(&dir, &img, None), &want);
    let mut old = vec![0u8; 4 * MIB as usize];
    old[..2 * MIB as usize].fill(0x77);
    assert_same(
        "snapshot 'before'",
        &qemu_reads(&dir, &img, Some("before")),
        &old,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
