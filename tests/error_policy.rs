//! The error policy of an export (rerror/werror) through a real export:
//! a write that fails because the storage is full (injected with
//! blkdebug, errno 28) is held, the export stops (BLOCK_IO_ERROR, STOP,
//! io-status nospace, query-status io-error) and `cont` retries it: the
//! client sees it succeed and its data is in the image. `report` gives
//! the error to the client, `ignore` completes the request, both with
//! the event. The same holds for a file system that is really full (a
//! tmpfs of 1 MiB, mounted when the tests run as root): the export stays
//! stopped through a `cont` while the disk is full, and the held write
//! lands once space is freed and `cont` comes.

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

/// A tmpfs of `bytes`, mounted on `dir` for as long as it lives.
struct SmallTmpfs {
    dir: std::path::PathBuf,
}

impl SmallTmpfs {
    /// Mounts it; `None` where this process may not mount (not root).
    fn mount(dir: &std::path::Path, bytes: u64) -> Option<SmallTmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "cannot mount a tmpfs ({}); the real-ENOSPC test needs root",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallTmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Writes 4 KiB blocks to `path` until the file system is full; returns
/// how many fitted.
fn fill(path: &std::path::Path) -> usize {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = [0xeeu8; 4096];
    let mut n = 0;
    loop {
        match f.write_all(&block) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(28) => return n,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[test]
fn a_really_full_file_system_stops_the_export_until_space_is_freed_and_cont() {
    let dir = TempDir::new("werror-tmpfs");
    let mnt = dir.path().join("mnt");
    let Some(_fs) = SmallTmpfs::mount(&mnt, 1 << 20) else {
        eprintln!("a_really_full_file_system...: skipped");
        return;
    };
    // A sparse image of 8 MiB on a file system of 1 MiB.
    let img = mnt.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("full.sock");
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=f0,filename={}",
            img.display()
        ))
        .arg("--blockdev")
        .arg("driver=raw,node-name=top,file=f0")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=top,writable=on,addr.type=unix,addr.path={}",
            sock.display()
        ))
        .monitor()
        .start();
    let mut blk = Blk::connect(&sock);
    let mut qmp = d.qmp();
    // Some room first: a write lands.
    assert_eq!(blk.write(0, &[0x11u8; 4096]), 0);
    let filler = mnt.join("filler");
    assert!(fill(&filler) > 0);

    let mut queues = blk.take_queues();
    let q = &mut queues[0];
    q.fill_buffer(0, &[0x42u8; 65536]);
    q.submit_write(4 << 20, 0, 65536, 9, ReqFlags::empty());
    q.kick();
    let ev = qmp
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(5))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["device"], "e0");
    assert_eq!(ev["data"]["operation"], "write");
    assert_eq!(ev["data"]["action"], "stop");
    assert_eq!(ev["data"]["nospace"], true);
    assert!(qmp.wait_event("STOP", Duration::from_secs(5)).is_some());
    assert!(q.try_wait(1, Duration::from_millis(300)).is_err());
    let block = assert_return(&qmp.execute("query-block", json!({}))).clone();
    assert_eq!(block[0]["io-status"], "nospace");

    // cont while the disk is still full: the write fails again and the
    // export stops again, the request still held.
    assert_return(&qmp.execute("cont", json!({})));
    assert!(qmp.wait_event("STOP", Duration::from_secs(5)).is_some());
    assert!(q.try_wait(1, Duration::from_millis(300)).is_err());

    // Space freed, then cont: the write completes and is in the image.
    std::fs::remove_file(&filler).unwrap();
    assert_return(&qmp.execute("cont", json!({})));
    assert_eq!(q.wait(1), vec![(9, 0)]);
    let block = assert_return(&qmp.execute("query-block", json!({}))).clone();
    assert_eq!(block[0]["io-status"], "ok");
    blk.put_queues(queues);
    assert_eq!(blk.flush(), 0);
    assert_eq!(blk.read(4 << 20, 65536), vec![0x42u8; 65536]);
    drop(blk);
    drop(d);
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data[..4096], [0x11u8; 4096]);
    assert_eq!(data[4 << 20..(4 << 20) + 65536], [0x42u8; 65536]);
}
