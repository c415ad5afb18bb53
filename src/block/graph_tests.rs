//! Unit tests of the graph's rules: names, deletion, permissions, locks
//! and the all-or-nothing change.

use super::error::BlockError;
use super::graph::{Graph, Use, UserKind};
use super::open::add_node;
use super::perm::Perm;
use crate::qapi::{rt, BlockdevOptions};
use serde_json::{json, Value};
use std::path::PathBuf;

fn opts(v: Value) -> BlockdevOptions {
    rt::read(&v, rt::Syntax::Json).unwrap()
}

fn add(g: &mut Graph, v: Value) -> Result<String, BlockError> {
    let o = opts(v);
    g.change(|d| add_node(d, &o))
}

struct TempImage(PathBuf);

impl TempImage {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vubd-graph-{tag}-{}.img", std::process::id()));
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        TempImage(p)
    }
    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn writer_use(node: &str) -> Use {
    Use {
        id: 0,
        kind: UserKind::BlockDevice,
        name: "disk0".into(),
        node: node.into(),
        perm: Perm::CONSISTENT_READ | Perm::WRITE,
        shared: Perm::ALL - Perm::WRITE,
        slot: None,
    }
}

#[test]
fn root_node_needs_a_name() {
    let mut g = Graph::default();
    let err = add(&mut g, json!({"driver": "null-co"}))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("'node-name' must be specified for the root node")
    );
}

#[test]
fn duplicate_and_malformed_names_are_refused() {
    let mut g = Graph::default();
    add(&mut g, json!({"driver": "null-co", "node-name": "n0"})).unwrap();
    let dup = add(&mut g, json!({"driver": "null-co", "node-name": "n0"})).err();
    assert_eq!(
        dup.map(|e| e.to_string()).as_deref(),
        Some("Duplicate nodes with node-name='n0'")
    );
    let bad = add(&mut g, json!({"driver": "null-co", "node-name": "0bad"})).err();
    assert_eq!(
        bad.map(|e| e.to_string()).as_deref(),
        Some("Invalid node-name: '0bad'")
    );
}

#[test]
fn inline_child_gets_generated_name_and_goes_with_its_parent() {
    let img = TempImage::new("inline");
    let mut g = Graph::default();
    add(&mut g, json!({"driver": "raw", "node-name": "fmt", "file": {"driver": "file", "filename": img.path()}}))
        .unwrap();
    let names: Vec<String> = g.nodes().iter().map(|n| n.name.clone()).collect();
    assert_eq!(names.len(), 2);
    assert!(names[0].starts_with("#block"), "{names:?}");
    let child_del = g
        .change(|d| d.remove_node(&names[0]))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        child_del,
        Some(format!("Node {} is not owned by the monitor", names[0]))
    );
    g.change(|d| d.remove_node("fmt")).unwrap();
    assert!(g.nodes().is_empty());
}

#[test]
fn node_with_parent_or_user_cannot_be_deleted() {
    let img = TempImage::new("inuse");
    let mut g = Graph::default();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "f0", "filename": img.path()}),
    )
    .unwrap();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    )
    .unwrap();
    let err = g
        .change(|d| d.remove_node("f0"))
        .err()
        .map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("Block device f0 is in use"));
    g.change(|d| Ok(d.add_use(writer_use("r0")))).unwrap();
    let err = g
        .change(|d| d.remove_node("r0"))
        .err()
        .map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("Node r0 is in use"));
}

#[test]
fn a_writer_locks_its_image_against_writers_in_other_processes() {
    let img = TempImage::new("lock");
    let mut first = Graph::default();
    add(
        &mut first,
        json!({"driver": "file", "node-name": "f0", "filename": img.path()}),
    )
    .unwrap();
    add(
        &mut first,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    )
    .unwrap();
    let first_writer = first.change(|d| Ok(d.add_use(writer_use("r0")))).unwrap();
    let mut second = Graph::default();
    add(
        &mut second,
        json!({"driver": "file", "node-name": "f1", "filename": img.path()}),
    )
    .unwrap();
    add(
        &mut second,
        json!({"driver": "raw", "node-name": "r1", "file": "f1"}),
    )
    .unwrap();
    let err = second.change(|d| Ok(d.add_use(writer_use("r1")))).err();
    assert_eq!(
        err.as_ref().map(|e| e.to_string()).as_deref(),
        Some("Failed to get \"write\" lock")
    );
    // The hint names the image as its node was given it; QMP replies
    // leave it out, as QEMU's do.
    let hint = format!("Is another process using the image [{}]?", img.path());
    assert_eq!(err.as_ref().and_then(|e| e.hint()), Some(hint.clone()));
    let qmp = err.map(crate::error::QmpError::from);
    assert_eq!(
        qmp.as_ref().map(|e| e.desc.as_str()),
        Some("Failed to get \"write\" lock")
    );
    assert_eq!(qmp.and_then(|e| e.hint), Some(hint));
    assert!(
        second.uses().is_empty(),
        "a failed change must leave the graph as it was"
    );
    first
        .change(|d| {
            d.remove_use(first_writer);
            Ok(())
        })
        .unwrap();
    second.change(|d| Ok(d.add_use(writer_use("r1")))).unwrap();
}

#[test]
fn resize_under_a_raw_window_conflicts_with_it_but_not_through_it() {
    let img = TempImage::new("resize");
    let mut g = Graph::default();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "f0", "filename": img.path()}),
    )
    .unwrap();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 512}),
    )
    .unwrap();
    let resize = |node: &str| Use {
        id: 0,
        kind: UserKind::Command,
        name: "block_resize".into(),
        node: node.into(),
        perm: Perm::RESIZE,
        shared: Perm::ALL,
        slot: None,
    };
    let err = g.change(|d| Ok(d.add_use(resize("f0")))).err();
    assert!(
        matches!(err, Some(BlockError::PermConflict { .. })),
        "{err:?}"
    );
    assert!(g.change(|d| Ok(d.add_use(resize("r0")))).is_ok());
    assert_eq!(
        g.perm_of("f0").map(|p| p.perm.contains(Perm::RESIZE)),
        Some(true)
    );
}

#[test]
fn writer_on_read_only_node_is_refused() {
    let mut g = Graph::default();
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "n0", "read-only": true}),
    )
    .unwrap();
    let err = g
        .change(|d| Ok(d.add_use(writer_use("n0"))))
        .err()
        .map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("Block node is read-only"));
}

#[test]
fn inline_child_inherits_read_only() {
    let img = TempImage::new("inherit");
    let mut g = Graph::default();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r0", "read-only": true,
               "file": {"driver": "file", "filename": img.path()}}),
    )
    .unwrap();
    assert!(g.nodes().iter().all(|n| n.flags.read_only));
}

#[test]
fn unbuilt_driver_is_named_in_the_error() {
    let mut g = Graph::default();
    let err = add(
        &mut g,
        json!({"driver": "vvfat", "node-name": "v", "dir": "/tmp"}),
    )
    .err();
    assert_eq!(
        err.map(|e| e.to_string()).as_deref(),
        Some("Block driver 'vvfat' is not available in vubd")
    );
}

#[test]
fn raw_window_must_fit_in_file() {
    let img = TempImage::new("window");
    let mut g = Graph::default();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "f0", "filename": img.path()}),
    )
    .unwrap();
    let err = add(
        &mut g,
        json!({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 4096, "size": 1048576}),
    )
    .err()
    .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.starts_with("The sum of offset (4096) and size (1048576)")));
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 4096, "size": 8192}),
    )
    .unwrap();
    let len = g.node("r1").map(|n| n.driver.io().length().unwrap());
    assert_eq!(len, Some(8192));
}

#[test]
fn plain_raw_is_a_filter_and_lets_its_file_be_resized() {
    let img = TempImage::new("filter");
    let mut g = Graph::default();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "f0", "filename": img.path()}),
    )
    .unwrap();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    )
    .unwrap();
    let resize = Use {
        id: 0,
        kind: UserKind::Command,
        name: "block_resize".into(),
        node: "f0".into(),
        perm: Perm::RESIZE,
        shared: Perm::ALL,
        slot: None,
    };
    assert!(g.change(|d| Ok(d.add_use(resize))).is_ok());
}

#[test]
fn a_writer_export_keeps_another_writer_of_the_same_node_out() {
    let mut g = Graph::default();
    add(&mut g, json!({"driver": "null-co", "node-name": "n0"})).unwrap();
    g.change(|d| Ok(d.add_use(writer_use("n0")))).unwrap();
    let err = g.change(|d| Ok(d.add_use(writer_use("n0")))).err();
    assert!(
        matches!(err, Some(BlockError::PermConflict { .. })),
        "{err:?}"
    );
}

fn slot_use(name: &str, node: &str, slot: &std::sync::Arc<super::drain::RootSlot>) -> Use {
    Use {
        name: name.into(),
        slot: Some(slot.clone()),
        ..writer_use(node)
    }
}

/// Raw 'r' over null 'n1' (1 MiB), null 'n2' (2 MiB, read-only if asked)
/// beside it, and a user of `user` with a published root.
fn two_nulls_and_raw(
    n2_read_only: bool,
    user: &str,
) -> (Graph, std::sync::Arc<super::drain::RootSlot>) {
    let mut g = Graph::default();
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "n1", "size": 1 << 20}),
    )
    .unwrap();
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "n2", "size": 2 << 20, "read-only": n2_read_only}),
    )
    .unwrap();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r", "file": "n1"}),
    )
    .unwrap();
    let slot = std::sync::Arc::new(super::drain::RootSlot::new(None));
    g.change(|d| {
        d.add_use(slot_use("dev", user, &slot));
        Ok(())
    })
    .unwrap();
    (g, slot)
}

fn length_of(g: &Graph, node: &str) -> u64 {
    g.node(node).unwrap().io.length().unwrap()
}

#[test]
fn replacing_a_node_re_points_parents_and_users_on_the_data_plane() {
    // Arrange: raw 'r' over null 'n1' (1 MiB); 'n2' (2 MiB) beside; an
    // export-like user on 'n1' with a published root.
    let (mut g, slot) = two_nulls_and_raw(false, "n1");
    assert_eq!(slot.current().unwrap().length().unwrap(), 1 << 20);
    assert_eq!(length_of(&g, "r"), 1 << 20);

    // Act
    g.change(|d| d.replace_node("n1", "n2")).unwrap();

    // Assert: the graph, the raw node's link and the user's root moved.
    assert_eq!(g.node("r").unwrap().children[0].child, "n2");
    assert_eq!(length_of(&g, "r"), 2 << 20);
    let raw = g.node("r").unwrap();
    let link = raw.driver.child(super::driver::ChildRole::File).unwrap();
    assert_eq!(link.get().length().unwrap(), 2 << 20);
    assert_eq!(g.uses()[0].node, "n2");
    assert_eq!(slot.current().unwrap().length().unwrap(), 2 << 20);
}

#[test]
fn the_new_nodes_own_edges_keep_pointing_at_the_old_node() {
    // Arrange: 'top' uses 'base'; 'over' (standing in for an overlay)
    // has 'base' as its child too.
    let mut g = Graph::default();
    add(&mut g, json!({"driver": "null-co", "node-name": "base"})).unwrap();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "top", "file": "base"}),
    )
    .unwrap();
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "over", "file": "base"}),
    )
    .unwrap();

    // Act
    g.change(|d| d.replace_node("base", "over")).unwrap();

    // Assert: no cycle, 'top' goes through 'over', 'over' still to 'base'.
    assert_eq!(g.node("top").unwrap().children[0].child, "over");
    assert_eq!(g.node("over").unwrap().children[0].child, "base");
}

#[test]
fn a_failed_change_leaves_links_and_roots_as_they_were() {
    // Arrange: 'r' over 'n1'; 'n2' is read-only; a writer uses 'r'.
    let (mut g, slot) = two_nulls_and_raw(true, "r");

    // Act: re-pointing the writer's path onto a read-only node fails.
    let err = g.change(|d| d.replace_node("n1", "n2")).err();

    // Assert
    assert!(matches!(err, Some(BlockError::ReadOnly)), "{err:?}");
    assert_eq!(g.node("r").unwrap().children[0].child, "n1");
    let raw = g.node("r").unwrap();
    let link = raw.driver.child(super::driver::ChildRole::File).unwrap();
    assert_eq!(link.get().length().unwrap(), 1 << 20);
    assert_eq!(slot.current().unwrap().length().unwrap(), 1 << 20);
}

#[test]
fn a_change_waits_for_requests_through_a_re_pointed_edge() {
    // Arrange: a user on 'r' (over 'n1') with one request in flight on an
    // I/O thread's view of its slot.
    let (mut g, slot) = two_nulls_and_raw(false, "r");
    let mut local = slot.register();
    assert!(local.enter());
    let finisher = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        local.leave();
        local
    });

    // Act
    let started = std::time::Instant::now();
    g.change(|d| d.replace_node("n1", "n2")).unwrap();

    // Assert: the change waited for the request, then re-pointed.
    assert!(started.elapsed() >= std::time::Duration::from_millis(40));
    let mut local = finisher.join().unwrap();
    assert!(local.enter());
    assert_eq!(local.root().unwrap().length().unwrap(), 2 << 20);
    local.leave();
}

#[test]
fn a_begun_change_commits_only_once_its_drain_is_complete() {
    // Arrange: a user on 'n1' with a request in flight.
    let (mut g, slot) = two_nulls_and_raw(false, "n1");
    let mut local = slot.register();
    assert!(local.enter());

    // Act
    let ((), pending) = g.begin_change(|d| d.replace_node("n1", "n2")).unwrap();

    // Assert: nothing committed, new requests held back, the old one goes on.
    assert_eq!(pending.poll(), super::graph::Progress::Waiting);
    assert_eq!(g.uses()[0].node, "n1");
    let mut other = slot.register();
    assert!(!other.enter());
    local.leave();
    assert_eq!(pending.poll(), super::graph::Progress::Ready);
    g.finish_change(pending).unwrap();
    assert_eq!(g.uses()[0].node, "n2");
    assert!(other.enter());
    assert_eq!(other.root().unwrap().length().unwrap(), 2 << 20);
    other.leave();
}

#[test]
fn a_begun_change_that_times_out_leaves_everything_as_it_was() {
    // Arrange
    let (mut g, slot) = two_nulls_and_raw(false, "r");
    let mut local = slot.register();
    assert!(local.enter());
    let ((), pending) = g.begin_change(|d| d.replace_node("n1", "n2")).unwrap();
    let pending = pending.with_timeout(std::time::Duration::from_millis(20));

    // Act
    std::thread::sleep(std::time::Duration::from_millis(30));
    let progress = pending.poll();
    let err = g.finish_change(pending).err().map(|e| e.to_string());

    // Assert: the drain error, the raw node's link and the root unchanged,
    // and the user runs again.
    assert_eq!(progress, super::graph::Progress::TimedOut);
    let err = err.unwrap_or_default();
    assert!(
        err.starts_with("Cannot drain 'dev': 1 requests still in flight after"),
        "{err}"
    );
    let link = g
        .node("r")
        .unwrap()
        .driver
        .child(super::driver::ChildRole::File);
    assert_eq!(link.unwrap().get().length().unwrap(), 1 << 20);
    local.leave();
    assert!(local.enter());
    assert_eq!(local.root().unwrap().length().unwrap(), 1 << 20);
    local.leave();
}

#[test]
fn an_abandoned_change_resumes_its_users_and_a_stale_one_is_refused() {
    // Arrange
    let (mut g, slot) = two_nulls_and_raw(false, "n1");
    let mut local = slot.register();
    assert!(local.enter());
    let ((), first) = g.begin_change(|d| d.replace_node("n1", "n2")).unwrap();

    // Act: give it up; then begin again, and let another change commit
    // before the second finishes.
    first.abandon();
    let resumed = {
        let mut other = slot.register();
        let ok = other.enter();
        if ok {
            other.leave();
        }
        ok
    };
    local.leave();
    let ((), second) = g.begin_change(|d| d.replace_node("n1", "n2")).unwrap();
    drop(second);
    let ((), stale) = g.begin_change(|d| d.replace_node("n1", "n2")).unwrap();
    add(&mut g, json!({"driver": "null-co", "node-name": "n3"})).unwrap();
    let err = g.finish_change(stale).err();

    // Assert
    assert!(resumed);
    assert!(err.is_some());
    assert_eq!(g.uses()[0].node, "n1");
    assert!(local.enter());
    assert_eq!(local.root().unwrap().length().unwrap(), 1 << 20);
    local.leave();
}
