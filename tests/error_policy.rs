//! The error policy of an export (rerror/werror) through a real export:
//! a write that fails because the storage is full (injected with
//! blkdebug, errno 28) is held, the export stops (BLOCK_IO_ERROR, STOP,
//! io-status nospace, query-status io-error) and `cont` retries it: the
//! client sees it succeed and its data is in the image. `report` gives
//! the error to the client, `ignore` completes the request, both with
//! the event.

mod common;

use blkio::ReqFlags;
use common::blk::Blk;
use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn a_full_disk_stops_the_export_until_cont_and_the_write_lands() {
    let dir = TempDir::new("werror-enospc");
    let (d, mut blk, img) = serve_over_blkdebug(
        dir.path(),
        json!({"inject-error": [{"event": "write_aio", "errno": 28, "once": true}]}),
        "",
    );
    let mut qmp = d.qmp();
    let mut queues = blk.take_queues();
    let q = &mut queues[0];
    q.fill_buffer(0, &[0x42u8; 4096]);
    q.submit_write(8192, 0, 4096, 7, ReqFlags::empty());
    q.kick();
    // Held: no answer while stopped.
    assert!(q.try_wait(1, Duration::from_millis(500)).is_err());
    let ev = qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(5))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["device"], "e0");
    assert_eq!(ev["data"]["node-name"], "top");
    assert_eq!(ev["data"]["operation"], "write");
    assert_eq!(ev["data"]["action"], "stop");
    assert_eq!(ev["data"]["nospace"], true);
    assert!(qmp.wait_event("STOP", Duration::from_secs(5)).is_some());
    let block = assert_return(&qmp.execute("query-block", json!({}))).clone();
    assert_eq!(block[0]["io-status"], "nospace");
    let status = assert_return(&qmp.execute("query-status", json!({}))).clone();
    assert_eq!(status, json!({"running": false, "status": "io-error"}));

    // Space is back (the rule fired once); cont retries the write.
    assert_return(&qmp.execute("cont", json!({})));
    assert!(qmp.wait_event("RESUME", Duration::from_secs(5)).is_some());
    assert_eq!(q.wait(1), vec![(7, 0)]);
    let block = assert_return(&qmp.execute("query-block", json!({}))).clone();
    assert_eq!(block[0]["io-status"], "ok");
    blk.put_queues(queues);
    assert_eq!(blk.read(8192, 4096), vec![0x42u8; 4096]);
    assert_eq!(blk.flush(), 0);
    drop(blk);
    drop(d);
    assert_eq!(std::fs::read(&img).unwrap()[8192..12288], [0x42u8; 4096]);
}

#[test]
fn report_fails_the_request_and_ignore_completes_it() {
    for (extra, expect_ok, action) in [
        (",werror=report", false, "report"),
        (",werror=ignore", true, "ignore"),
    ] {
        let dir = TempDir::new("werror-report");
        let (d, mut blk, _img) = serve_over_blkdebug(
            dir.path(),
            json!({"inject-error": [{"event": "write_aio", "errno": 5, "once": true}]}),
            extra,
        );
        let mut qmp = d.qmp();
        let r = blk.write(0, &[1u8; 4096]);
        assert_eq!(r == 0, expect_ok, "{extra}: {r}");
        let ev = qmp
            .wait_event("BLOCK_IO_ERROR", Duration::from_secs(5))
            .expect("BLOCK_IO_ERROR");
        assert_eq!(ev["data"]["action"], action);
        assert_eq!(ev["data"]["nospace"], false);
        let status = assert_return(&qmp.execute("query-status", json!({}))).clone();
        assert_eq!(status["running"], true);
        // The export keeps serving.
        assert_eq!(blk.write(4096, &[2u8; 4096]), 0);
    }
}

#[test]
fn read_errors_are_reported_by_default() {
    let dir = TempDir::new("rerror");
    let (d, mut blk, _img) = serve_over_blkdebug(
        dir.path(),
        json!({"inject-error": [{"event": "read_aio", "errno": 28, "once": true}]}),
        "",
    );
    let mut qmp = d.qmp();
    assert!(blk.try_read(0, 4096).is_err());
    let ev = qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(5))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["operation"], "read");
    assert_eq!(ev["data"]["action"], "report");
    assert!(blk.try_read(0, 4096).is_ok());
}

#[test]
fn a_client_leaving_while_stopped_does_not_hang_the_export() {
    let dir = TempDir::new("werror-leave");
    let (d, mut blk, _img) = serve_over_blkdebug(
        dir.path(),
        json!({"inject-error": [{"event": "write_aio", "errno": 28, "once": true}]}),
        "",
    );
    let mut qmp = d.qmp();
    let mut queues = blk.take_queues();
    queues[0].fill_buffer(0, &[3u8; 4096]);
    queues[0].submit_write(0, 0, 4096, 1, ReqFlags::empty());
    queues[0].kick();
    assert!(qmp.wait_event("STOP", Duration::from_secs(5)).is_some());
    // The client goes away with its write held.
    blk.put_queues(queues);
    drop(blk);
    assert_return(&qmp.execute("cont", json!({})));
    // A new client is served.
    let mut again = Blk::connect(&dir.path().join("dbg.sock"));
    assert_eq!(again.write(0, &[4u8; 4096]), 0);
    assert_eq!(again.read(0, 4096), vec![4u8; 4096]);
    assert_return(&qmp.execute("query-version", json!({})));
}
