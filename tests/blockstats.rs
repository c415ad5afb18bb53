//! query-blockstats against the I/O a libblkio client did: operations
//! and bytes per kind, failed requests (injected with blkdebug), the
//! accounting options, invalid requests (past the end, from a hand-made
//! virtqueue), and timed statistics over an interval; the write
//! threshold and its event.

mod common;

use common::blk::Blk;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn serve(dir: &Path, export_extra: &str) -> (Daemon, Blk) {
    let img = dir.join("s.img");
    qemu_img_create(&img, "raw", 4 << 20);
    let sock = dir.join("s.sock");
    let node = json!({
        "driver": "blkdebug", "node-name": "dbg",
        "inject-error": [{"event": "pwritev", "sector": 2048}],
        "image": {"driver": "file", "filename": path(&img)},
    });
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&node.to_string())
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=dbg,writable=on,addr.type=unix,addr.path={}{export_extra}",
            path(&sock)
        ))
        .monitor()
        .start();
    let blk = Blk::connect(&sock);
    (d, blk)
}

fn stats(d: &Daemon) -> Value {
    let mut qmp = d.qmp();
    let r = assert_return(&qmp.execute("query-blockstats", json!({}))).clone();
    r[0]["stats"].clone()
}

#[test]
fn figures_equal_the_io_done_and_intervals_are_timed() {
    let dir = TempDir::new("blockstats");
    let (d, mut blk) = serve(
        dir.path(),
        ",stats-intervals.0=1,stats-intervals.1=60,account-failed=off",
    );
    for i in 0..10u64 {
        assert_eq!(blk.read(i * 4096, 4096).len(), 4096);
    }
    for i in 0..5u64 {
        assert_eq!(blk.write(i * 8192, &[1u8; 8192]), 0);
    }
    // Sector 2048 is 1 MiB in: that write fails (blkdebug).
    assert_ne!(blk.write(1 << 20, &[2u8; 4096]), 0);
    assert_eq!(blk.flush(), 0);
    let s = stats(&d);
    assert_eq!(
        (s["rd_operations"].as_i64(), s["rd_bytes"].as_i64()),
        (Some(10), Some(40960))
    );
    assert_eq!(
        (s["wr_operations"].as_i64(), s["wr_bytes"].as_i64()),
        (Some(5), Some(40960))
    );
    assert_eq!(s["failed_wr_operations"], 1);
    assert_eq!(s["flush_operations"], 1);
    assert_eq!(s["wr_highest_offset"], 40960);
    assert_eq!(s["account_failed"], false);
    assert_eq!(s["account_invalid"], true);
    let timed = s["timed_stats"].as_array().unwrap();
    assert_eq!(timed.len(), 2);
    assert_eq!(timed[0]["interval_length"], 1);
    assert_eq!(timed[1]["interval_length"], 60);
    let t = &timed[1];
    assert!(t["min_rd_latency_ns"].as_i64().unwrap() > 0);
    assert!(t["max_rd_latency_ns"].as_i64().unwrap() >= t["avg_rd_latency_ns"].as_i64().unwrap());
    assert!(t["avg_wr_latency_ns"].as_i64().unwrap() > 0);
    assert!(t["avg_rd_queue_depth"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_zero_interval_is_refused() {
    let dir = TempDir::new("blockstats-zero");
    let img = dir.path().join("z.img");
    qemu_img_create(&img, "raw", 1 << 20);
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!("driver=file,node-name=f,filename={}", path(&img)))
        .monitor()
        .start();
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e0", "node-name": "f",
               "addr": {"type": "unix", "path": path(&dir.path().join("z.sock"))},
               "stats-intervals": [0]}),
    );
    assert!(error_desc(&r).contains("Invalid interval length: 0"), "{r}");
}

#[test]
fn write_threshold_fires_once_for_the_write_that_crossed_it() {
    let dir = TempDir::new("threshold");
    let img = dir.path().join("t.img");
    qemu_img_create(&img, "raw", 4 << 20);
    let sock = dir.path().join("t.sock");
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!("driver=file,node-name=f,filename={}", path(&img)))
        .arg("--blockdev")
        .arg("driver=raw,node-name=r,file=f")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=r,writable=on,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let mut blk = Blk::connect(&sock);
    let mut qmp = d.qmp();
    // On the protocol node under the format node, as for thin storage.
    assert_return(&qmp.execute(
        "block-set-write-threshold",
        json!({"node-name": "f", "write-threshold": 1 << 20}),
    ));
    let node = |qmp: &mut Qmp, name: &str| {
        assert_return(&qmp.execute("query-named-block-nodes", json!({})))
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(node(&mut qmp, "f")["write_threshold"], 1 << 20);
    assert_eq!(blk.write(0, &[1u8; 4096]), 0);
    assert_eq!(blk.write((1 << 20) - 4096, &[1u8; 4096]), 0);
    assert_eq!(blk.write((1 << 20) - 4096, &[2u8; 12288]), 0);
    assert_eq!(blk.write(2 << 20, &[3u8; 4096]), 0);
    let ev = qmp
        .wait_event("BLOCK_WRITE_THRESHOLD", std::time::Duration::from_secs(5))
        .expect("BLOCK_WRITE_THRESHOLD");
    assert_eq!(
        ev["data"],
        json!({"node-name": "f", "amount-exceeded": 8192, "write-threshold": 1 << 20})
    );
    assert!(qmp
        .wait_event(
            "BLOCK_WRITE_THRESHOLD",
            std::time::Duration::from_millis(300)
        )
        .is_none());
    assert_eq!(node(&mut qmp, "f")["write_threshold"], 0);
    assert_error(
        &qmp.execute(
            "block-set-write-threshold",
            json!({"node-name": "nope", "write-threshold": 1}),
        ),
        "GenericError",
        "Device 'nope' not found",
    );
}

/// Blocks the file takes on disk, in 512-byte units.
fn disk_blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks()
}

#[test]
fn discard_reaches_the_file_only_through_nodes_that_allow_it() {
    for (raw_opt, punched) in [("", false), (",discard=unmap", true)] {
        let dir = TempDir::new("discard-chain");
        let img = dir.path().join("d.img");
        std::fs::write(&img, vec![7u8; 2 << 20]).unwrap();
        let sock = dir.path().join("d.sock");
        let d = Daemon::vubd(&[])
            .arg("--blockdev")
            .arg(&format!(
                "driver=file,node-name=f,filename={},discard=unmap",
                path(&img)
            ))
            .arg("--blockdev")
            .arg(&format!("driver=raw,node-name=r,file=f{raw_opt}"))
            .arg("--export")
            .arg(&format!(
                "type=vhost-user-blk,id=e0,node-name=r,writable=on,addr.type=unix,addr.path={}",
                path(&sock)
            ))
            .start();
        let mut blk = Blk::connect(&sock);
        let before = disk_blocks(&img);
        assert_eq!(blk.discard(0, 1 << 20), 0);
        assert_eq!(blk.flush(), 0);
        let after = disk_blocks(&img);
        assert_eq!(after < before, punched, "raw{raw_opt}: {before} -> {after}");
        drop(d);
    }
}

#[test]
fn invalid_requests_are_counted_as_invalid_only() {
    use common::frontend::{Options, TestFrontend, S_IOERR, S_OK};
    let dir = TempDir::new("blockstats-invalid");
    let (d, blk) = serve(dir.path(), "");
    drop(blk);
    let sock = dir.path().join("s.sock");
    let mut fe = TestFrontend::connect(&sock, Options::default());
    let end = fe.capacity_sectors();
    // Past the end, and running over it: invalid reads and writes.
    assert_eq!(fe.read_sectors(end, 4096).0, S_IOERR);
    assert_eq!(fe.read_sectors(end - 4, 4096).0, S_IOERR);
    assert_eq!(fe.write_sectors(end + 8, &[1u8; 4096]), S_IOERR);
    // And valid ones beside them.
    assert_eq!(fe.write_sectors(0, &[1u8; 4096]), S_OK);
    assert_eq!(fe.read_sectors(0, 512).0, S_OK);
    let s = stats(&d);
    assert_eq!(s["invalid_rd_operations"], 2, "{s}");
    assert_eq!(s["invalid_wr_operations"], 1, "{s}");
    assert_eq!(s["invalid_flush_operations"], 0, "{s}");
    assert_eq!(
        (&s["rd_operations"], &s["rd_bytes"]),
        (&json!(1), &json!(512)),
        "{s}"
    );
    assert_eq!(
        (&s["wr_operations"], &s["wr_bytes"]),
        (&json!(1), &json!(4096)),
        "{s}"
    );
    assert_eq!(s["failed_rd_operations"], 0, "{s}");
    assert_eq!(s["failed_wr_operations"], 0, "{s}");
}
