//! Throttle groups and the throttle filter through a real export: a
//! libblkio client keeping 8 reads in flight gets the group's rate, the
//! limits change while it runs (qom-set) and lifting them restores full
//! speed; the group objects answer as qemu-storage-daemon's do.

mod common;

use common::blk::{Blk, BlkQueue};
use common::*;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn serve(dir: &Path, group: &str) -> (Daemon, Blk) {
    serve_over(dir, group, "driver=null-co,node-name=n0,size=1073741824")
}

/// Serves a throttle node in group `g0` (made by the `group` object) over
/// the node `below` (named `n0`), as the writable export `e0`.
fn serve_over(dir: &Path, group: &str, below: &str) -> (Daemon, Blk) {
    let sock = dir.join("t.sock");
    let d = Daemon::vubd(&[])
        .arg("--object")
        .arg(group)
        .arg("--blockdev")
        .arg(below)
        .arg("--blockdev")
        .arg("driver=throttle,node-name=t0,throttle-group=g0,file=n0")
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=t0,writable=on,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let blk = Blk::connect(&sock);
    (d, blk)
}

/// Reads 4 KiB at QD8 for `secs`; returns completions per second.
fn rate(q: &mut BlkQueue, secs: f64) -> f64 {
    let depth = 8;
    for i in 0..depth {
        q.submit_read((i as u64) * 4096, i * 4096, 4096, i);
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for (tag, ret) in q.wait(1) {
            assert_eq!(ret, 0);
            done += 1;
            q.submit_read((tag as u64) * 4096, tag * 4096, 4096, tag);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    q.wait(depth);
    done as f64 / elapsed
}

#[test]
fn group_limit_holds_changes_live_and_lifts() {
    let dir = TempDir::new("throttle-rate");
    let (d, mut blk) = serve(dir.path(), "throttle-group,id=g0,x-iops-total=200");
    let mut qmp = d.qmp();
    let mut queues = blk.take_queues();
    let q = &mut queues[0];
    let r = rate(q, 2.0);
    assert!((180.0..=235.0).contains(&r), "limited to 200 iops: {r:.0}");
    assert_return(&qmp.execute(
        "qom-set",
        json!({"path": "g0", "property": "limits", "value": {"iops-total": 500}}),
    ));
    let r = rate(q, 1.5);
    assert!((450.0..=560.0).contains(&r), "limited to 500 iops: {r:.0}");
    assert_return(&qmp.execute(
        "qom-set",
        json!({"path": "g0", "property": "limits", "value": {"iops-total": 0}}),
    ));
    let r = rate(q, 0.5);
    assert!(r > 2000.0, "unlimited again: {r:.0}");
    blk.put_queues(queues);
}

#[test]
fn group_objects_answer_as_qemu_does() {
    let dir = TempDir::new("throttle-objects");
    let (d, _blk) = serve(dir.path(), "throttle-group,id=g0,x-iops-total=100");
    let mut qmp = d.qmp();
    let limits =
        assert_return(&qmp.execute("qom-get", json!({"path": "g0", "property": "limits"}))).clone();
    assert_eq!(limits["iops-total"], 100);
    assert_eq!(limits["bps-read-max-length"], 1);
    assert_eq!(
        assert_return(&qmp.execute("qom-get", json!({"path": "g0", "property": "x-iops-total"}))),
        &json!(100)
    );
    for (value, msg) in [
        (
            json!({"bps-total": 1000, "bps-read": 5}),
            "bps/iops/max total values and read/write values cannot be used at the same time",
        ),
        (
            json!({"iops-total-max": 10}),
            "bps_max/iops_max cannot be lower than bps/iops",
        ),
    ] {
        let r = qmp.execute(
            "qom-set",
            json!({"path": "g0", "property": "limits", "value": value}),
        );
        assert_error(&r, "GenericError", msg);
    }
    assert_error(
        &qmp.execute("object-del", json!({"id": "g0"})),
        "GenericError",
        "object 'g0' is in use, can not be deleted",
    );
    assert_error(
        &qmp.execute(
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t1", "throttle-group": "nope", "file": "n0"}),
        ),
        "GenericError",
        "Throttle group 'nope' does not exist",
    );
    for (props, msg) in [
        (
            json!({"x-iops-total": -1}),
            "Property values cannot be negative",
        ),
        (
            json!({"limits": {"iops-total": -1}}),
            "bps/iops/max values must be within [0, 1000000000000000]",
        ),
        (
            json!({"limits": {"iops-total-max-length": 0}}),
            "the burst length cannot be 0",
        ),
    ] {
        let mut args = json!({"qom-type": "throttle-group", "id": "g2"});
        for (k, v) in props.as_object().unwrap() {
            args[k] = v.clone();
        }
        assert_error(&qmp.execute("object-add", args), "GenericError", msg);
    }
    assert_return(&qmp.execute(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "g1", "limits": {"iops-total": 5}, "x-iops-total": 7}),
    ));
    assert_eq!(
        assert_return(&qmp.execute("qom-get", json!({"path": "g1", "property": "x-iops-total"}))),
        &json!(5)
    );
    let node = assert_return(&qmp.execute("query-named-block-nodes", json!({})))
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "t0")
        .unwrap()
        .clone();
    assert_eq!(node["drv"], "throttle");
    assert_eq!(
        node["file"],
        "json:{\"throttle-group\": \"g0\", \"driver\": \"throttle\", \"file\": {\"driver\": \"null-co\", \"size\": 1073741824}}"
    );
    assert_return(&qmp.execute("object-del", json!({"id": "g1"})));
}

/// Two null-co exports, e0 and e1, with no throttle node.
fn serve_two(dir: &Path) -> (Daemon, Blk, Blk) {
    let mut b = Daemon::vubd(&[]);
    for i in 0..2 {
        b = b
            .arg("--blockdev")
            .arg(&format!("driver=null-co,node-name=n{i},size=1073741824"))
            .arg("--export")
            .arg(&format!(
                "type=vhost-user-blk,id=e{i},node-name=n{i},writable=on,addr.type=unix,addr.path={}",
                path(&dir.join(format!("e{i}.sock")))
            ));
    }
    let d = b.monitor().start();
    let b0 = Blk::connect(&dir.join("e0.sock"));
    let b1 = Blk::connect(&dir.join("e1.sock"));
    (d, b0, b1)
}

fn io_throttle(id: &str, iops: i64, bps: i64, group: Option<&str>) -> serde_json::Value {
    let mut a = json!({"id": id, "bps": bps, "bps_rd": 0, "bps_wr": 0,
                       "iops": iops, "iops_rd": 0, "iops_wr": 0});
    if let Some(g) = group {
        a["group"] = json!(g);
    }
    a
}

#[test]
fn block_set_io_throttle_limits_a_device_and_groups_share() {
    let dir = TempDir::new("throttle-device");
    let (d, mut b0, mut b1) = serve_two(dir.path());
    let mut qmp = d.qmp();
    assert_return(&qmp.execute("block_set_io_throttle", io_throttle("e0", 200, 0, None)));
    let mut q0 = b0.take_queues();
    let r = rate(&mut q0[0], 2.0);
    assert!((180.0..=235.0).contains(&r), "iops=200: {r:.0}");
    let block = assert_return(&qmp.execute("query-block", json!({}))).clone();
    let e0 = &block.as_array().unwrap()[0]["inserted"];
    assert_eq!(e0["iops"], 200);
    assert_eq!(e0["group"], "e0");
    // Bytes per second: 800 KiB/s of 4 KiB reads is 200 per second.
    assert_return(&qmp.execute("block_set_io_throttle", io_throttle("e0", 0, 819200, None)));
    let r = rate(&mut q0[0], 2.0);
    assert!((180.0..=235.0).contains(&r), "bps=800k: {r:.0}");
    // Both devices in one group of 300 iops: each about half, the sum 300.
    assert_return(&qmp.execute(
        "block_set_io_throttle",
        io_throttle("e0", 300, 0, Some("pair")),
    ));
    assert_return(&qmp.execute(
        "block_set_io_throttle",
        io_throttle("e1", 300, 0, Some("pair")),
    ));
    let mut q1 = b1.take_queues();
    let (r0, r1) = std::thread::scope(|s| {
        let a = s.spawn(|| rate(&mut q0[0], 2.0));
        let b = s.spawn(|| rate(&mut q1[0], 2.0));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        (270.0..=350.0).contains(&(r0 + r1)),
        "group of 300: {r0:.0} + {r1:.0}"
    );
    assert!(
        r0 > 110.0 && r1 > 110.0,
        "shared fairly: {r0:.0} and {r1:.0}"
    );
    // Every limit 0: out of the group, full speed.
    assert_return(&qmp.execute("block_set_io_throttle", io_throttle("e0", 0, 0, None)));
    let r = rate(&mut q0[0], 0.5);
    assert!(r > 2000.0, "unlimited again: {r:.0}");
    b0.put_queues(q0);
    b1.put_queues(q1);
    let mut both = json!({"device": "e0", "id": "e0"});
    for (k, v) in io_throttle("e0", 1, 0, None).as_object().unwrap() {
        if k != "id" {
            both[k] = v.clone();
        }
    }
    assert_error(
        &qmp.execute("block_set_io_throttle", both),
        "GenericError",
        "Need exactly one of 'device' and 'id'",
    );
    assert_error(
        &qmp.execute("block_set_io_throttle", io_throttle("nope", 1, 0, None)),
        "DeviceNotFound",
        "Device 'nope' not found",
    );
    let mut bad = io_throttle("e0", 10, 0, None);
    bad["iops_max"] = json!(5);
    assert_error(
        &qmp.execute("block_set_io_throttle", bad),
        "GenericError",
        "bps_max/iops_max cannot be lower than bps/iops",
    );
}

#[test]
fn a_burst_runs_at_its_rate_for_its_length_then_falls_back() {
    let dir = TempDir::new("throttle-burst");
    let (d, mut b0, _b1) = serve_two(dir.path());
    let mut qmp = d.qmp();
    let mut a = io_throttle("e0", 100, 0, None);
    a["iops_max"] = json!(1000);
    a["iops_max_length"] = json!(1);
    assert_return(&qmp.execute("block_set_io_throttle", a));
    let mut q = b0.take_queues();
    // The burst: up to 1000 operations at up to 1000 per second.
    let burst = rate(&mut q[0], 0.5);
    assert!(burst > 600.0, "burst rate: {burst:.0}");
    // Once the burst is spent (about a second in), the average rules.
    rate(&mut q[0], 0.8);
    let after = rate(&mut q[0], 1.5);
    assert!(
        (80.0..=125.0).contains(&after),
        "after the burst: {after:.0}"
    );
    b0.put_queues(q);
}

#[test]
fn a_throttled_export_waiting_uses_almost_no_cpu() {
    let dir = TempDir::new("throttle-cpu");
    let (d, mut blk) = serve(dir.path(), "throttle-group,id=g0,limits.iops-total=20");
    let mut queues = blk.take_queues();
    let q = &mut queues[0];
    // Warm up (the first second's burst, the poll time adapting down).
    rate(q, 0.5);
    let before = d.cpu_time();
    let start = Instant::now();
    let r = rate(q, 3.0);
    let used = (d.cpu_time() - before).as_secs_f64();
    let share = used / start.elapsed().as_secs_f64();
    eprintln!(
        "20 iops with 8 requests waiting: {r:.1} iops, daemon CPU {used:.3} s ({:.2} %)",
        share * 100.0
    );
    assert!((15.0..=25.0).contains(&r), "limited to 20 iops: {r:.1}");
    assert!(
        share < 0.02,
        "a waiting export used {:.1} % of a CPU",
        share * 100.0
    );
    blk.put_queues(queues);
}

#[test]
fn a_graph_change_lets_throttled_requests_go_instead_of_waiting_for_them() {
    let dir = TempDir::new("throttle-drain");
    let img = dir.path().join("base.img");
    qemu_img_create(&img, "raw", 16 << 20);
    let (d, mut blk) = serve_over(
        dir.path(),
        "throttle-group,id=g0,limits.iops-total=4",
        &format!("driver=file,node-name=n0,filename={}", path(&img)),
    );
    let mut qmp = d.qmp();
    let mut queues = blk.take_queues();
    let q = &mut queues[0];
    // At 4 IOPS, 16 reads take about 4 s: one goes at once, the others
    // are held.
    for i in 0..16usize {
        q.submit_read((i as u64) * 4096, i * 4096, 4096, i);
    }
    q.kick();
    let mut done = q.wait(1).len();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let start = Instant::now();
    let overlay = dir.path().join("overlay.qcow2");
    assert_return(&qmp.execute(
        "blockdev-snapshot-sync",
        json!({"device": "e0", "snapshot-file": path(&overlay), "format": "qcow2"}),
    ));
    let took = start.elapsed();
    // What was held went while the change drained (the one sleeping on
    // the group's timer when it began goes when the timer fires).
    while done < 16 {
        match q.try_wait(1, std::time::Duration::from_millis(400)) {
            Ok(v) => done += v.len(),
            Err(_) => break,
        }
    }
    let all = start.elapsed();
    eprintln!("snapshot with 15 reads held at 4 IOPS: {took:?}; all done after {all:?}");
    assert_eq!(done, 16, "reads still held after the change");
    assert!(
        took < std::time::Duration::from_millis(900),
        "the snapshot waited {took:?} for throttled requests"
    );
    blk.put_queues(queues);
    // The limits hold again afterwards: 6 more reads take over a second.
    let start = Instant::now();
    for i in 0..6u64 {
        blk.read(i * 4096, 4096);
    }
    assert!(start.elapsed() > std::time::Duration::from_millis(700));
}
