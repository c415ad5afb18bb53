//! Guarding qcow2 metadata: overlap checks refusing a write that would
//! land on the image's tables (image marked corrupt, BLOCK_IMAGE_CORRUPTED
//! sent, the node read-only from then on), `change-backing-file`, dirty
//! lazy-refcounts images repaired at open.

mod common;

use common::blk::Blk;
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn tool(program: &str, args: &[&str]) -> String {
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// `qemu-img info` of an image, as JSON.
fn info(img: &Path) -> Value {
    let out = tool("qemu-img", &["info", "-U", "--output=json", path(img)]);
    serde_json::from_str(&out).unwrap()
}

/// Points the first L2 entry of `img` at its own L1 table (QEMU's
/// iotest 060 case); returns the L1 table's offset.
fn l2_entry_into_l1(img: &Path) -> u64 {
    let mut bytes = std::fs::read(img).unwrap();
    let l1 = be64(&bytes, 40);
    let l2 = (be64(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(l2, 0, "cluster 0 must be allocated");
    bytes[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | l1).to_be_bytes());
    std::fs::write(img, &bytes).unwrap();
    l1
}

#[test]
fn a_write_onto_the_l1_table_marks_the_image_corrupt_and_reads_go_on() {
    // Arrange: a damaged image and a healthy one, each exported.
    let dir = TempDir::new("guard");
    let bad = dir.path().join("bad.qcow2");
    let good = dir.path().join("good.qcow2");
    for img in [&bad, &good] {
        tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", path(img), "64M"],
        );
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x11 0 64k", path(img)],
        );
    }
    let l1 = l2_entry_into_l1(&bad);
    let (s0, s1) = (dir.path().join("s0.sock"), dir.path().join("s1.sock"));
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!("driver=file,node-name=f0,filename={}", path(&bad)))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q0,file=f0")
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=f1,filename={}",
            path(&good)
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q1,file=f1")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,writable=on,addr.type=unix,addr.path={}",
            path(&s0)
        ))
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e1,node-name=q1,writable=on,addr.type=unix,addr.path={}",
            path(&s1)
        ))
        .monitor()
        .start();
    let mut qmp = d.qmp();
    let mut b0 = Blk::connect(&s0);
    let mut b1 = Blk::connect(&s1);
    let before = b0.read(0, 4096);

    // Act
    let refused = b0.write(0, &[0x22; 4096]);
    let event = qmp.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(10));
    let later = b0.write(1 << 20, &[0x33; 4096]);

    // Assert: refused, reported once, marked; reads and the other export
    // go on.
    assert_eq!(refused, -libc::EIO);
    let event = event.expect("BLOCK_IMAGE_CORRUPTED");
    assert_eq!(
        event["data"],
        json!({"device": "e0", "node-name": "q0",
               "msg": "Preventing invalid write on metadata (overlaps with active L1 table)",
               "offset": l1, "size": 4096, "fatal": true})
    );
    assert_eq!(later, -libc::EIO);
    assert_eq!(b0.read(0, 4096), before);
    assert_eq!(b1.write(0, &[0x44; 4096]), 0);
    assert_eq!(b1.read(0, 4096), vec![0x44; 4096]);
    let nodes = assert_return(&qmp.execute("query-named-block-nodes", json!({}))).clone();
    let q0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q0")
        .unwrap();
    assert_eq!(q0["image"]["format-specific"]["data"]["corrupt"], true);
    assert_eq!(info(&bad)["format-specific"]["data"]["corrupt"], true);
    assert_eq!(info(&good)["format-specific"]["data"]["corrupt"], false);
    assert!(qmp
        .events()
        .iter()
        .all(|e| e["event"] != "BLOCK_IMAGE_CORRUPTED"));
}

#[test]
fn damage_met_while_reading_is_reported_and_fatal_on_a_writable_node() {
    // Arrange: the L1 entry points at an unaligned L2 table (QEMU's
    // iotest 060 case); one writable node and one read-only node on it.
    let dir = TempDir::new("unaligned");
    let img = dir.path().join("u.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path(&img), "64M"],
    );
    tool("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", path(&img)]);
    let mut bytes = std::fs::read(&img).unwrap();
    let l1 = be64(&bytes, 40) as usize;
    bytes[l1..l1 + 8].copy_from_slice(&0x2a2a_2a00u64.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let sock = dir.path().join("e.sock");
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!("driver=file,node-name=f0,filename={}", path(&img)))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q0,file=f0")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,writable=on,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let mut qmp = d.qmp();
    let mut blk = Blk::connect(&sock);

    // Act
    let read = blk.try_read(0, 4096);
    let event = qmp.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(10));

    // Assert
    assert_eq!(read, Err(-libc::EIO));
    assert_eq!(
        event.expect("BLOCK_IMAGE_CORRUPTED")["data"],
        json!({"device": "e0", "node-name": "q0",
               "msg": "L2 table offset 0x2a2a2a00 unaligned (L1 index: 0)", "fatal": true})
    );
    assert_eq!(blk.write(1 << 20, &[1; 4096]), -libc::EIO);
    assert_eq!(info(&img)["format-specific"]["data"]["corrupt"], true);
}

#[test]
fn damage_met_by_a_read_only_node_is_reported_once_and_not_fatal() {
    // Arrange: as above, the node read-only.
    let dir = TempDir::new("unaligned-ro");
    let img = dir.path().join("u.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path(&img), "64M"],
    );
    tool("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", path(&img)]);
    let mut bytes = std::fs::read(&img).unwrap();
    let l1 = be64(&bytes, 40) as usize;
    bytes[l1..l1 + 8].copy_from_slice(&0x2a2a_2a00u64.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let sock = dir.path().join("e.sock");
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=f0,filename={},read-only=on",
            path(&img)
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q0,file=f0,read-only=on")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let mut qmp = d.qmp();
    let mut blk = Blk::connect_with(
        &sock,
        common::blk::BlkOptions {
            read_only: true,
            ..Default::default()
        },
    );

    // Act
    let first = blk.try_read(0, 4096);
    let second = blk.try_read(4096, 4096);
    let event = qmp.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(10));

    // Assert: EIO both times, one event, the image left unmarked.
    assert_eq!((first, second), (Err(-libc::EIO), Err(-libc::EIO)));
    assert_eq!(
        event.expect("BLOCK_IMAGE_CORRUPTED")["data"],
        json!({"device": "e0", "node-name": "q0",
               "msg": "L2 table offset 0x2a2a2a00 unaligned (L1 index: 0)", "fatal": false})
    );
    assert!(qmp
        .wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_millis(200))
        .is_none());
    assert_eq!(info(&img)["format-specific"]["data"]["corrupt"], false);
}

fn error_desc(reply: &Value) -> &str {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
}

#[test]
fn change_backing_file_rewrites_the_header_of_an_image_in_the_chain() {
    // Arrange: base <- mid (read-only node on a writable file) <- top,
    // exported; an unrelated image; a read-only file node.
    let dir = TempDir::new("cbf");
    let p = |n: &str| dir.path().join(n);
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path(&p("base.qcow2")), "16M"],
    );
    for (img, backing) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                backing,
                "-F",
                "qcow2",
                path(&p(img)),
            ],
        );
    }
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            path(&p("other.qcow2")),
            "16M",
        ],
    );
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            path(&p("ro.qcow2")),
        ],
    );
    let sock = p("e.sock");
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=fb,filename={}",
            path(&p("base.qcow2"))
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=qb,file=fb,read-only=on")
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=fm,filename={}",
            path(&p("mid.qcow2"))
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=qm,file=fm,backing=qb,read-only=on")
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=ft,filename={}",
            path(&p("top.qcow2"))
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=qt,file=ft,backing=qm")
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=fo,filename={}",
            path(&p("other.qcow2"))
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=qo,file=fo")
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=fr,filename={},read-only=on",
            path(&p("ro.qcow2"))
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=qr,file=fr,read-only=on")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=qt,writable=on,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let mut qmp = d.qmp();
    let mut cbf = |device: &str, image: &str, name: &str| {
        qmp.execute(
            "change-backing-file",
            json!({"device": device, "image-node-name": image, "backing-file": name}),
        )
    };

    // Act / Assert: QEMU's checks, in QEMU's order and words.
    for (device, image, name, desc) in [
        (
            "nope",
            "qm",
            "x",
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            "qt",
            "nope",
            "x",
            "Cannot find device='' nor node-name='nope'",
        ),
        (
            "qt",
            "qb",
            "x",
            "not allowing backing file change on an image without a backing file",
        ),
        ("qm", "qt", "x", "Need a root block node"),
        (
            "qo",
            "qm",
            "x",
            "'qo' and image file are not in the same chain",
        ),
        ("qr", "qr", "x", "Block node is read-only"),
    ] {
        assert_eq!(
            error_desc(&cbf(device, image, name)),
            desc,
            "{device} {image}"
        );
    }
    let long = "x".repeat(1100);
    assert_eq!(
        error_desc(&cbf("qt", "qt", &long)),
        format!("Could not change backing file to '{long}': Invalid argument")
    );
    assert_return(&cbf("e0", "qm", "newmid.qcow2"));
    assert_return(&cbf("qt", "qt", "mid.qcow2"));

    // The header and the queries follow.
    let mid = info(&p("mid.qcow2"));
    assert_eq!(mid["backing-filename"], "newmid.qcow2");
    assert_eq!(mid["backing-filename-format"], "qcow2");
    let nodes = assert_return(&qmp.execute("query-named-block-nodes", json!({}))).clone();
    let qm = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "qm")
        .unwrap();
    assert_eq!(qm["image"]["backing-filename"], "newmid.qcow2");
    assert_eq!(qm["backing_file"], "newmid.qcow2");
    assert_eq!(info(&p("top.qcow2"))["backing-filename"], "mid.qcow2");
    // Named back, the image is whole for QEMU.
    assert_return(&qmp.execute(
        "change-backing-file",
        json!({"device": "qt", "image-node-name": "qm", "backing-file": "base.qcow2"}),
    ));
    tool("qemu-img", &["check", "-q", "-U", path(&p("mid.qcow2"))]);
}

/// An image QEMU wrote with lazy refcounts and died before the refcounts
/// reached it.
fn dirty_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("lazy.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            path(&img),
            "64M",
        ],
    );
    let out = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "write -P 0x5b 1M 64k",
            "-c",
            "abort",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(info(&img)["dirty-flag"], true);
    img
}

/// Opens `img` writable in vubd, writes 4 KiB of 0x5c at 2 MiB and quits;
/// what was read at 0 and 1 MiB.
fn write_with_vubd(dir: &Path, img: &Path) -> (Vec<u8>, Vec<u8>) {
    let sock = dir.join("e.sock");
    let mut d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!("driver=file,node-name=f0,filename={}", path(img)))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q0,file=f0")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,writable=on,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let mut blk = Blk::connect(&sock);
    assert_eq!(blk.write(2 << 20, &[0x5c; 4096]), 0);
    let read = (blk.read(0, 4096), blk.read(1 << 20, 4096));
    drop(blk);
    let mut qmp = d.qmp();
    assert_return(&qmp.execute("quit", json!({})));
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());
    read
}

#[track_caller]
fn assert_whole_for_qemu(img: &Path, read: (Vec<u8>, Vec<u8>)) {
    assert_eq!(read.0, vec![0x5a; 4096]);
    assert_eq!(read.1, vec![0x5b; 4096]);
    assert_eq!(info(img)["dirty-flag"], false);
    tool("qemu-img", &["check", "-q", path(img)]);
    let out = tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x5c 2M 4k", path(img)],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn a_dirty_lazy_refcounts_image_is_repaired_when_opened_for_writing() {
    // Arrange
    let dir = TempDir::new("lazy");
    let img = dirty_image(dir.path());
    // Act
    let read = write_with_vubd(dir.path(), &img);
    // Assert: QEMU's data is there and the image is clean for QEMU.
    assert_whole_for_qemu(&img, read);
}

#[test]
fn a_dirty_image_missing_a_refcount_block_gets_a_new_one() {
    // Arrange: the refcount table's only entry lost as well.
    let dir = TempDir::new("lazy-block");
    let img = dirty_image(dir.path());
    let mut bytes = std::fs::read(&img).unwrap();
    let reftable = be64(&bytes, 48) as usize;
    bytes[reftable..reftable + 8].fill(0);
    std::fs::write(&img, &bytes).unwrap();
    // Act
    let read = write_with_vubd(dir.path(), &img);
    // Assert
    assert_whole_for_qemu(&img, read);
}
