//! A graph change that waits for its drain leaves the monitors answering.
//!
//! A `null-co` node with a long `latency-ns` is exported and a guest read
//! is left in flight on it; `blockdev-snapshot` then has to drain the
//! export before it can put an overlay on top. Meanwhile another monitor
//! gets its queries answered at once, while its commands that change
//! state wait their turn; the snapshot is answered when the read is done,
//! and the first monitor's next command only after it.
//!
//! The ordering while a change waits is vubd's own design (docs/design.md,
//! "The graph and its changes"), so these tests always run vubd.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::blk::Blk;
use common::*;
use serde_json::{json, Value};

/// How long the slow node holds each request.
const LATENCY: Duration = Duration::from_secs(3);
/// Well under [`LATENCY`]: what "answered at once" means here.
const PROMPT: Duration = Duration::from_millis(1000);
const DISK_BYTES: u64 = 16 << 20;

/// A monitor session with `oob` enabled, so that it sends its next
/// command before the last one is answered.
fn oob_monitor(d: &Daemon) -> Qmp {
    let (mut qmp, _) = Qmp::connect(d.qmp_socket());
    let r = qmp.execute("qmp_capabilities", json!({"enable": ["oob"]}));
    assert_eq!(r, json!({"return": {}}));
    qmp
}

fn send(qmp: &mut Qmp, cmd: &str, args: Value, id: u64) {
    qmp.send_value(&json!({"execute": cmd, "arguments": args, "id": id}));
}

/// A vubd exporting the slow node, two monitors with `oob`, an overlay
/// node 'over' (no backing yet) and a guest read in flight.
struct Slow {
    _dir: TempDir,
    d: Daemon,
    blk: Blk,
    first: Qmp,
    second: Qmp,
}

fn slow_export_with_a_read_in_flight() -> Slow {
    let dir = TempDir::new("vubd-graph-drain");
    let sock = dir.path().join("vhost.sock");
    let overlay = dir.path().join("over.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&overlay)
        .arg(DISK_BYTES.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let d = Daemon::with_flavor(Flavor::Vubd, &[])
        .monitor()
        .arg("--blockdev")
        .arg(&format!(
            "null-co,node-name=slow,size={DISK_BYTES},read-zeroes=on,latency-ns={}",
            LATENCY.as_nanos()
        ))
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=slow,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .start();
    let mut first = oob_monitor(&d);
    let second = oob_monitor(&d);
    let r = first.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "over", "backing": null,
               "file": {"driver": "file", "filename": overlay.to_str().unwrap()}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let mut blk = Blk::connect(&sock);
    let q = blk.queue(0);
    q.submit_read(0, 0, 4096, 7);
    q.kick();
    // Let the request reach the node (its latency starts there; a loaded
    // machine may take a while).
    std::thread::sleep(Duration::from_millis(400));
    Slow {
        _dir: dir,
        d,
        blk,
        first,
        second,
    }
}

#[test]
fn monitors_answer_while_a_snapshot_waits_for_a_request_in_flight() {
    // Arrange: the slow export, an overlay image added as a node, a guest
    // read in flight.
    let Slow {
        _dir,
        d: _d,
        mut blk,
        mut first,
        mut second,
    } = slow_export_with_a_read_in_flight();

    // Act: the snapshot, then (without waiting) another command on the
    // same monitor; queries and a change on the second monitor.
    let start = Instant::now();
    send(
        &mut first,
        "blockdev-snapshot",
        json!({"node": "slow", "overlay": "over"}),
        1,
    );
    send(&mut first, "query-version", json!({}), 2);
    std::thread::sleep(Duration::from_millis(100));
    let nodes = second.execute_with_id("query-named-block-nodes", json!({}), json!(3));
    let version = second.execute_with_id("query-version", json!({}), json!(4));
    let queried = start.elapsed();
    send(
        &mut second,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "later"}),
        5,
    );
    let early = second.read_message(Duration::from_millis(300));
    let early_first = first.read_message(Duration::from_millis(10));
    let snapshot = first.read_reply(LATENCY * 3);
    let snapshot_at = start.elapsed();
    let after = first.read_reply(Duration::from_secs(5));
    let added = second.read_reply(Duration::from_secs(5));
    let done = blk.queue(0).wait(1);

    // Assert: the second monitor read the graph as it was, promptly; its
    // change and the first monitor's query waited for the snapshot, which
    // waited for the read.
    assert_eq!(nodes["id"], 3, "{nodes}");
    let names: Vec<&str> = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"slow") && names.contains(&"over"),
        "{nodes}"
    );
    assert_eq!(version["id"], 4, "{version}");
    assert!(version["return"]["qemu"].is_object(), "{version}");
    assert!(
        queried < PROMPT,
        "queries took {queried:?} while the drain waited"
    );
    assert_eq!(
        early, None,
        "the second monitor's change ran during the drain"
    );
    assert_eq!(early_first, None, "the first monitor answered out of order");
    assert_eq!(snapshot, json!({"return": {}, "id": 1}));
    assert!(
        snapshot_at >= LATENCY - Duration::from_millis(700),
        "the snapshot did not wait for the read ({snapshot_at:?})"
    );
    assert_eq!(after["id"], 2, "{after}");
    assert_eq!(added, json!({"return": {}, "id": 5}));
    assert_eq!(done, vec![(7, 0)]);
    let block = second.execute("query-block", Value::Null);
    assert_eq!(
        block["return"][0]["inserted"]["node-name"], "over",
        "{block}"
    );
}

#[test]
fn quit_from_another_monitor_gives_a_waiting_snapshot_up() {
    // Arrange
    let Slow {
        _dir,
        mut d,
        blk,
        mut first,
        mut second,
    } = slow_export_with_a_read_in_flight();

    // Act
    let start = Instant::now();
    send(
        &mut first,
        "blockdev-snapshot",
        json!({"node": "slow", "overlay": "over"}),
        1,
    );
    std::thread::sleep(Duration::from_millis(100));
    let quit = second.execute_with_id("quit", json!({}), json!(2));
    let snapshot = first.read_reply(Duration::from_secs(5));
    let answered = start.elapsed();
    let status = d.wait_exit(Duration::from_secs(10));
    drop(blk);

    // Assert: both answered before the read could end; a clean exit.
    assert_eq!(quit, json!({"return": {}, "id": 2}));
    assert_eq!(
        snapshot,
        json!({"id": 1, "error": {"class": "GenericError",
               "desc": "Graph change abandoned: the daemon is shutting down"}})
    );
    assert!(answered < PROMPT, "answers took {answered:?}");
    let status = status.unwrap_or_else(|| panic!("vubd did not exit\n{}", d.describe()));
    assert!(status.success(), "{status:?}\n{}", d.describe());
}

#[test]
fn monitors_answer_while_an_internal_snapshot_waits_for_a_request_in_flight() {
    // Arrange: a qcow2 image exported over a slow backing node, and a
    // guest read of a cluster the image does not hold (so it reaches the
    // slow node) in flight.
    let dir = TempDir::new("vubd-graph-drain-internal");
    let sock = dir.path().join("vhost.sock");
    let img = dir.path().join("top.qcow2");
    qemu_img_create(&img, "qcow2", DISK_BYTES);
    let d = Daemon::with_flavor(Flavor::Vubd, &[])
        .monitor()
        .arg("--blockdev")
        .arg(&format!(
            "null-co,node-name=slow,size={DISK_BYTES},read-zeroes=on,latency-ns={}",
            LATENCY.as_nanos()
        ))
        .arg("--blockdev")
        .arg(
            &json!({"driver": "qcow2", "node-name": "top", "backing": "slow",
                    "file": {"driver": "file", "filename": img.to_str().unwrap()}})
            .to_string(),
        )
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=top,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .start();
    let mut first = oob_monitor(&d);
    let mut second = oob_monitor(&d);
    let mut blk = Blk::connect(&sock);
    let q = blk.queue(0);
    q.submit_read(0, 0, 4096, 9);
    q.kick();
    std::thread::sleep(Duration::from_millis(400));

    // Act: the snapshot waits for the read; the other monitor queries.
    let start = Instant::now();
    send(
        &mut first,
        "blockdev-snapshot-internal-sync",
        json!({"device": "e0", "name": "s1"}),
        1,
    );
    std::thread::sleep(Duration::from_millis(100));
    let version = second.execute_with_id("query-version", json!({}), json!(2));
    let queried = start.elapsed();
    let snapshot = first.read_reply(LATENCY * 3);
    let snapshot_at = start.elapsed();
    let done = blk.queue(0).wait(1);

    // Assert: the query was answered during the drain; the snapshot after
    // the read, and it is in the image.
    assert_eq!(version["id"], 2, "{version}");
    assert!(
        queried < PROMPT,
        "a query took {queried:?} while the snapshot drained"
    );
    assert_eq!(snapshot, json!({"return": {}, "id": 1}));
    assert!(
        snapshot_at >= LATENCY - Duration::from_millis(700),
        "the snapshot did not wait for the read ({snapshot_at:?})"
    );
    assert_eq!(done, vec![(9, 0)]);
    let info = qemu_img_info(&img);
    assert_eq!(info["snapshots"][0]["name"], "s1", "{info}");
}
