//! The debugging filters through a real export. blkdebug: errors
//! injected by rules (options and a rules file) reach a libblkio client as
//! I/O errors, only for the requests the rules name, and the node shows in
//! queries as QEMU shows it; option errors answer as qemu-storage-daemon
//! does. qcow2 raises its metadata events on its file (an L2 table read,
//! an L2 update), so rules on them fail those steps and the error policy
//! acts on what reaches the export. blkverify: reads compared with a raw
//! copy catch a corrupted one, writes reach both.

mod common;

use common::blk::Blk;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Serves raw-over-blkdebug-over-file, with the blkdebug options given as
/// JSON members, writable.
fn serve(dir: &Path, blkdebug: Value) -> (Daemon, Blk) {
    let (d, blk, _) = serve_over_blkdebug(dir, blkdebug, "");
    (d, blk)
}

#[test]
fn read_rule_fails_only_the_named_sector_and_stays_active() {
    let dir = TempDir::new("blkdebug-read");
    let (_d, mut blk) = serve(
        dir.path(),
        json!({"inject-error": [{"event": "read_aio", "sector": 8}]}),
    );
    assert!(blk.try_read(0, 4096).is_ok());
    assert!(blk.try_read(4096, 4096).is_err());
    assert!(blk.try_read(8192, 4096).is_ok());
    // The rule stays active: a write touching sector 8 fails too.
    assert_ne!(blk.write(4096, &[1u8; 4096]), 0);
    assert_eq!(blk.write(0, &[1u8; 4096]), 0);
}

#[test]
fn once_rule_from_a_config_file_fails_one_write() {
    let dir = TempDir::new("blkdebug-once");
    let conf = dir.path().join("rules.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"pwritev\"\nerrno = \"5\"\nonce = \"on\"\n",
    )
    .unwrap();
    let (_d, mut blk) = serve(dir.path(), json!({"config": path(&conf)}));
    assert_ne!(blk.write(0, &[7u8; 4096]), 0);
    assert_eq!(blk.write(0, &[7u8; 4096]), 0);
    assert_eq!(blk.read(0, 4096), vec![7u8; 4096]);
    assert_eq!(blk.flush(), 0);
}

#[test]
fn state_rules_arm_an_injection_later() {
    let dir = TempDir::new("blkdebug-state");
    let (_d, mut blk) = serve(
        dir.path(),
        json!({
            "inject-error": [{"event": "read_aio", "state": 2}],
            "set-state": [{"event": "write_aio", "state": 1, "new_state": 2}],
        }),
    );
    assert!(blk.try_read(0, 512).is_ok());
    assert_eq!(blk.write(0, &[1u8; 512]), 0);
    assert!(blk.try_read(0, 512).is_err());
}

#[test]
fn queries_and_option_errors_match_qemu() {
    let dir = TempDir::new("blkdebug-query");
    let (d, _blk) = serve(dir.path(), json!({"inject-error": [{"event": "read_aio"}]}));
    let mut qmp = d.qmp();
    let nodes = assert_return(&qmp.execute("query-named-block-nodes", json!({}))).clone();
    let dbg = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "dbg")
        .unwrap();
    assert_eq!(dbg["drv"], "blkdebug");
    let img = dir.path().join("dbg.img");
    assert_eq!(
        dbg["file"],
        format!(
            "json:{{\"image\": {{\"driver\": \"file\", \"filename\": \"{}\"}}, \"driver\": \"blkdebug\", \"inject-error.0.event\": \"read_aio\"}}",
            path(&img)
        )
    );
    for (align, msg) in [
        (3, "Cannot meet constraints with align 3"),
        (-4096, "Value '-4096' is out of range for parameter 'align'"),
    ] {
        let r = qmp.execute(
            "blockdev-add",
            json!({"driver": "blkdebug", "node-name": "x", "align": align, "image": "dbg"}),
        );
        assert_error(&r, "GenericError", msg);
    }
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "x", "config": "/nonexistent/rules", "image": "dbg"}),
    );
    assert_error(
        &r,
        "GenericError",
        "Could not read blkdebug config file: No such file or directory",
    );
    assert_return(&qmp.execute(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "x", "align": 4096, "image": "dbg"}),
    ));
}

#[test]
fn blkverify_catches_a_corrupted_copy_and_writes_both() {
    let dir = TempDir::new("blkverify");
    let test = dir.path().join("test.img");
    let raw = dir.path().join("raw.img");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&test, &data).unwrap();
    std::fs::write(&raw, &data).unwrap();
    let sock = dir.path().join("v.sock");
    let node = json!({
        "driver": "blkverify", "node-name": "v",
        "test": {"driver": "raw", "file": {"driver": "file", "filename": path(&test)}},
        "raw": {"driver": "file", "filename": path(&raw)},
    });
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&node.to_string())
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=v,writable=on,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let mut blk = Blk::connect(&sock);
    assert_eq!(blk.read(0, 65536), data[..65536].to_vec());
    // One byte of the raw copy changes behind vubd's back.
    let mut corrupted = data.clone();
    corrupted[70000] ^= 0xff;
    std::fs::write(&raw, &corrupted).unwrap();
    assert!(blk.try_read(65536, 8192).is_err());
    assert!(blk.try_read(0, 65536).is_ok());
    // A write reaches both images.
    assert_eq!(blk.write(4096, &[9u8; 4096]), 0);
    assert_eq!(blk.flush(), 0);
    assert_eq!(std::fs::read(&test).unwrap()[4096..8192], [9u8; 4096]);
    assert_eq!(std::fs::read(&raw).unwrap()[4096..8192], [9u8; 4096]);
    let mut qmp = d.qmp();
    let nodes = assert_return(&qmp.execute("query-named-block-nodes", json!({}))).clone();
    let v = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "v")
        .unwrap();
    assert_eq!(v["drv"], "blkverify");
    assert_eq!(
        v["file"],
        format!("blkverify:{}:{}", path(&raw), path(&test))
    );
}

fn qemu_img_check(img: &Path) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(img)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("qemu-img check: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn qcow2_raises_its_metadata_events_on_its_file() {
    // A failed L2 table read reaches the client as an error (rerror
    // report); the table is read again next time.
    let dir = TempDir::new("blkdebug-qcow2-l2");
    let img = dir.path().join("d.qcow2");
    qemu_img_create(&img, "qcow2", 16 << 20);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    {
        let (_d, mut blk) = serve_image_over_blkdebug(
            dir.path(),
            &img,
            "qcow2",
            json!({"inject-error": [{"event": "l2_load", "errno": 5, "once": true}]}),
            "",
        );
        assert!(blk.try_read(0, 4096).is_err());
        assert_eq!(blk.read(0, 4096), vec![0x5au8; 4096]);
    }

    // ENOSPC on the L2 update of an allocating write stops the export
    // (werror=enospc); cont retries the write, which lands; the image
    // checks without corruption.
    let (d, mut blk) = serve_image_over_blkdebug(
        dir.path(),
        &img,
        "qcow2",
        json!({"inject-error": [{"event": "l2_update", "errno": 28, "once": true}]}),
        "",
    );
    let mut qmp = d.qmp();
    let mut queues = blk.take_queues();
    let q = &mut queues[0];
    q.fill_buffer(0, &[0x77u8; 4096]);
    q.submit_write(1 << 20, 0, 4096, 3, blkio::ReqFlags::empty());
    q.kick();
    let ev = qmp
        .wait_event("BLOCK_IO_ERROR", std::time::Duration::from_secs(5))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["nospace"], true);
    assert_eq!(ev["data"]["action"], "stop");
    assert_return(&qmp.execute("cont", json!({})));
    match q.try_wait(1, std::time::Duration::from_secs(5)) {
        Ok(v) => assert_eq!(v, vec![(3, 0)]),
        Err(e) => panic!(
            "the held write did not complete after cont ({e}): {}",
            d.describe()
        ),
    }
    blk.put_queues(queues);
    assert_eq!(blk.read(1 << 20, 4096), vec![0x77u8; 4096]);
    assert_eq!(blk.flush(), 0);
    drop(blk);
    drop(d);
    let check = qemu_img_check(&img);
    assert_eq!(check["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
}
