//! One QMP script, two daemons: the same steps run against
//! qemu-storage-daemon and vubd, started with equivalent options, and the
//! outcomes compared step by step: success or error, error class, and the
//! shape of the return value.  Error descs are printed side by side (run
//! with `-- --nocapture` to see the table when the test passes).

mod common;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use serde_json::{json, Value};

/// Members QEMU 10 returns that vubd may lack, as (command, path) pairs;
/// paths look like `return[].image.format-specific`.  Every entry needs a
/// comment saying why leaving the member out is acceptable.
const ALLOWED_MISSING: &[(&str, &str)] = &[
    // (none yet)
];

struct Step {
    label: &'static str,
    cmd: &'static str,
    /// `{dir}` in strings is replaced by the daemon's directory.
    args: Value,
}

fn step(label: &'static str, cmd: &'static str, args: Value) -> Step {
    Step { label, cmd, args }
}

#[rustfmt::skip]
fn script() -> Vec<Step> {
    let none = Value::Null;
    vec![
        step("capabilities", "qmp_capabilities", none.clone()),
        step("version", "query-version", none.clone()),
        step("nodes at start", "query-named-block-nodes", none.clone()),
        step("block", "query-block", none.clone()),
        step("blockstats", "query-blockstats", none.clone()),
        step("blockstats nodes", "query-blockstats", json!({"query-nodes": true})),
        step("add file", "blockdev-add",
             json!({"driver": "file", "node-name": "file1", "filename": "{dir}/disk1.img"})),
        step("add raw offset/size", "blockdev-add",
             json!({"driver": "raw", "node-name": "fmt1", "file": "file1",
                    "offset": 4096, "size": 65536})),
        step("add null-co", "blockdev-add",
             json!({"driver": "null-co", "node-name": "null1", "size": 1048576})),
        step("add null-aio", "blockdev-add",
             json!({"driver": "null-aio", "node-name": "null2", "size": 1048576,
                    "latency-ns": 1000, "read-zeroes": true})),
        // A regular file where a block or character device is required.
        step("add host_device on file", "blockdev-add",
             json!({"driver": "host_device", "node-name": "hd0", "filename": "{dir}/disk2.img"})),
        step("add duplicate name", "blockdev-add",
             json!({"driver": "null-co", "node-name": "null1"})),
        step("add missing file", "blockdev-add",
             json!({"driver": "file", "node-name": "miss0", "filename": "{dir}/missing.img"})),
        step("add unknown driver", "blockdev-add",
             json!({"driver": "frobnicate", "node-name": "bad0"})),
        step("add wrong type", "blockdev-add",
             json!({"driver": "null-co", "node-name": "bad1", "size": "big"})),
        step("add unexpected option", "blockdev-add",
             json!({"driver": "null-co", "node-name": "bad2", "bogus": 1})),
        // file0 is the file child of fmt0.
        step("del node in use", "blockdev-del", json!({"node-name": "file0"})),
        step("del unknown node", "blockdev-del", json!({"node-name": "nosuch"})),
        step("del free node", "blockdev-del", json!({"node-name": "null1"})),
        step("resize raw grow", "block_resize", json!({"node-name": "fmt0", "size": 2097152})),
        step("resize negative", "block_resize", json!({"node-name": "fmt0", "size": -1})),
        step("resize unknown node", "block_resize", json!({"node-name": "nosuch", "size": 1048576})),
        // Internal snapshots of a qcow2 node.
        step("add qcow2 file", "blockdev-add",
             json!({"driver": "file", "node-name": "file3", "filename": "{dir}/disk3.qcow2"})),
        step("add qcow2", "blockdev-add",
             json!({"driver": "qcow2", "node-name": "q3", "file": "file3"})),
        step("internal snapshot", "blockdev-snapshot-internal-sync",
             json!({"device": "q3", "name": "s1"})),
        step("internal snapshot again", "blockdev-snapshot-internal-sync",
             json!({"device": "q3", "name": "s1"})),
        step("internal snapshot no name", "blockdev-snapshot-internal-sync",
             json!({"device": "q3", "name": ""})),
        step("internal snapshot of raw", "blockdev-snapshot-internal-sync",
             json!({"device": "fmt0", "name": "s1"})),
        step("internal snapshot unknown", "blockdev-snapshot-internal-sync",
             json!({"device": "nosuch", "name": "s1"})),
        step("second internal snapshot", "blockdev-snapshot-internal-sync",
             json!({"device": "q3", "name": "s2"})),
        step("nodes with snapshots", "query-named-block-nodes", none.clone()),
        step("delete snapshot no id/name", "blockdev-snapshot-delete-internal-sync",
             json!({"device": "q3"})),
        step("delete snapshot unknown", "blockdev-snapshot-delete-internal-sync",
             json!({"device": "q3", "id": "9", "name": "s1"})),
        step("delete snapshot of raw", "blockdev-snapshot-delete-internal-sync",
             json!({"device": "fmt0", "name": "s1"})),
        step("delete snapshot", "blockdev-snapshot-delete-internal-sync",
             json!({"device": "q3", "name": "s1"})),
        step("delete snapshot by id", "blockdev-snapshot-delete-internal-sync",
             json!({"device": "q3", "id": "2"})),
        step("nodes at end", "query-named-block-nodes", none.clone()),
        step("blockstats nodes at end", "query-blockstats", json!({"query-nodes": true})),
    ]
}

/// Options giving file0 (raw image file), fmt0 (raw on file0) and null0.
#[rustfmt::skip]
const BLOCKDEVS: &[&str] = &[
    "--blockdev", "file,node-name=file0,filename={dir}/disk0.img",
    "--blockdev", "raw,node-name=fmt0,file=file0",
    "--blockdev", "null-co,node-name=null0,size=67108864",
];

struct Run {
    daemon: Daemon,
    greeting: Value,
    replies: Vec<Value>,
}

/// Runs the script against one daemon; directory names in the replies
/// are replaced by `$DIR`.  If the daemon stops answering, that step and
/// the following ones get a reply of class "NoReply".
fn run(flavor: Flavor) -> Run {
    let builder = Daemon::with_flavor(flavor, BLOCKDEVS).monitor();
    qemu_img_create(&builder.dir().join("disk0.img"), "raw", 1 << 20);
    qemu_img_create(&builder.dir().join("disk1.img"), "raw", 2 << 20);
    qemu_img_create(&builder.dir().join("disk2.img"), "raw", 1 << 20);
    qemu_img_create(&builder.dir().join("disk3.qcow2"), "qcow2", 1 << 20);
    let daemon = builder.start();
    let dir = daemon.dir().to_str().unwrap().to_string();
    let (mut qmp, greeting) = Qmp::connect(daemon.qmp_socket());
    let mut replies = Vec::new();
    let mut dead: Option<Value> = None;
    for s in script() {
        if let Some(r) = &dead {
            replies.push(r.clone());
            continue;
        }
        let text = s.args.to_string().replace("{dir}", &dir);
        let args: Value = serde_json::from_str(&text).unwrap();
        let attempt = catch_unwind(AssertUnwindSafe(|| qmp.execute(s.cmd, args)));
        let reply = attempt.unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let r = json!({"error": {"class": "NoReply", "desc": why}});
            dead = Some(r.clone());
            r
        });
        let text = reply.to_string().replace(&dir, "$DIR");
        replies.push(serde_json::from_str(&text).unwrap());
    }
    if dead.is_some() {
        println!("{flavor:?} stopped answering:\n{}", daemon.describe());
    }
    Run {
        daemon,
        greeting,
        replies,
    }
}

/// One line of the table: "ok" or "Class: desc".
fn outcome(reply: &Value) -> String {
    match reply.get("error") {
        Some(e) => format!(
            "{}: {}",
            e["class"].as_str().unwrap_or("?"),
            e["desc"].as_str().unwrap_or("?")
        ),
        None => "ok".to_string(),
    }
}

/// Differences between a reference value and a candidate, by path.
#[derive(Default)]
struct Diffs {
    /// In the reference, absent from the candidate: fails.
    missing: BTreeSet<String>,
    /// Different types, or a list empty on one side only: fails.
    mismatch: BTreeSet<String>,
    /// Only in the candidate: reported.
    extra: BTreeSet<String>,
}

impl Diffs {
    fn failures(&self) -> usize {
        self.missing.len() + self.mismatch.len()
    }

    fn absorb(&mut self, other: Diffs) {
        self.missing.extend(other.missing);
        self.mismatch.extend(other.mismatch);
        self.extra.extend(other.extra);
    }
}

/// Compares the shapes of `reference` (qsd) and `candidate` (vubd).
/// Lists are compared as sets of element shapes: every kind of element on
/// either side is matched with the closest element of the other side.
fn compare(path: &str, reference: &Value, candidate: &Value, d: &mut Diffs) {
    match (reference, candidate) {
        (Value::Object(r), Value::Object(c)) => {
            for (k, rv) in r {
                let p = format!("{path}.{k}");
                match c.get(k) {
                    Some(cv) => compare(&p, rv, cv, d),
                    None => {
                        d.missing.insert(p);
                    }
                }
            }
            for k in c.keys().filter(|k| !r.contains_key(*k)) {
                d.extra.insert(format!("{path}.{k}"));
            }
        }
        (Value::Array(r), Value::Array(c)) => {
            let p = format!("{path}[]");
            if r.is_empty() != c.is_empty() {
                d.mismatch.insert(format!(
                    "{p} (qsd: {} elements, vubd: {})",
                    r.len(),
                    c.len()
                ));
                return;
            }
            // Elements naming a node are paired by name (the names are the
            // same in both runs); the others by closest shape.
            let r_rest: Vec<Value> = r
                .iter()
                .filter(|x| !c.iter().any(|y| same_node(x, y)))
                .cloned()
                .collect();
            let c_rest: Vec<Value> = c
                .iter()
                .filter(|y| !r.iter().any(|x| same_node(x, y)))
                .cloned()
                .collect();
            for re in r {
                if let Some(ce) = c.iter().find(|ce| same_node(re, ce)) {
                    compare(&p, re, ce, d);
                }
            }
            for re in distinct(&r_rest) {
                d.absorb(best_match(&p, re, c, true));
            }
            for ce in distinct(&c_rest) {
                d.absorb(best_match(&p, ce, r, false));
            }
        }
        (r, c) if scalar_type(r) == scalar_type(c) => {}
        (r, c) => {
            d.mismatch
                .insert(format!("{path} (qsd: {}, vubd: {})", shape(r), shape(c)));
        }
    }
}

/// True when both are objects naming the same node.
fn same_node(a: &Value, b: &Value) -> bool {
    matches!((a["node-name"].as_str(), b["node-name"].as_str()), (Some(x), Some(y)) if x == y)
}

/// One element of each distinct shape.
fn distinct(items: &[Value]) -> Vec<&Value> {
    let mut seen = BTreeSet::new();
    items.iter().filter(|v| seen.insert(shape(v))).collect()
}

/// The differences of the closest pairing of `one` with an element of
/// `others`; `one_is_reference` tells which side `one` comes from.
fn best_match(path: &str, one: &Value, others: &[Value], one_is_reference: bool) -> Diffs {
    let mut best: Option<Diffs> = None;
    for other in others {
        let mut d = Diffs::default();
        if one_is_reference {
            compare(path, one, other, &mut d);
        } else {
            compare(path, other, one, &mut d);
        }
        let key = |d: &Diffs| (d.failures(), d.extra.len());
        if best.as_ref().is_none_or(|b| key(&d) < key(b)) {
            best = Some(d);
        }
    }
    best.unwrap_or_default()
}

fn allowed(cmd: &str, path: &str) -> bool {
    ALLOWED_MISSING.iter().any(|(c, p)| *c == cmd && *p == path)
}

/// Sorted node names of a query-named-block-nodes reply.
fn node_names(reply: &Value) -> Vec<String> {
    let mut names: Vec<String> = reply["return"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|n| n["node-name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn qsd_and_vubd_answer_the_script_alike() {
    if skip_without_qsd("qsd_and_vubd_answer_the_script_alike") {
        return;
    }
    let qsd = run(Flavor::Qsd);
    let vubd = run(Flavor::under_test());

    let mut failures: Vec<String> = Vec::new();
    let mut extras: Vec<String> = Vec::new();
    let mut g = Diffs::default();
    compare("greeting", &qsd.greeting, &vubd.greeting, &mut g);
    failures.extend(
        g.missing
            .iter()
            .map(|p| format!("greeting: vubd lacks {p}")),
    );
    failures.extend(
        g.mismatch
            .iter()
            .map(|p| format!("greeting: shape differs at {p}")),
    );
    extras.extend(g.extra.iter().map(|p| format!("greeting: vubd adds {p}")));

    println!("  {:<24} daemon outcome ('*': the outcomes differ)", "step");
    for (i, s) in script().iter().enumerate() {
        let (q, v) = (&qsd.replies[i], &vubd.replies[i]);
        let (qo, vo) = (outcome(q), outcome(v));
        let mark = if qo == vo { ' ' } else { '*' };
        println!("{mark} {:<24} qsd   {qo}\n  {:<24} vubd  {vo}", s.label, "");

        let what = format!("step '{}' ({})", s.label, s.cmd);
        match (q.get("return"), v.get("return")) {
            (Some(qr), Some(vr)) => {
                let mut d = Diffs::default();
                compare("return", qr, vr, &mut d);
                for p in &d.missing {
                    if !allowed(s.cmd, p) {
                        failures.push(format!("{what}: vubd lacks {p}"));
                    }
                }
                for p in &d.mismatch {
                    failures.push(format!("{what}: shape differs at {p}"));
                }
                for p in &d.extra {
                    extras.push(format!("{what}: vubd adds {p}"));
                }
                if s.cmd == "query-named-block-nodes" && node_names(q) != node_names(v) {
                    failures.push(format!(
                        "{what}: node names differ: qsd {:?}, vubd {:?}",
                        node_names(q),
                        node_names(v)
                    ));
                }
            }
            (None, None) => {
                if q["error"]["class"] != v["error"]["class"] {
                    failures.push(format!(
                        "{what}: error class differs: qsd {qo:?}, vubd {vo:?}"
                    ));
                }
            }
            _ => failures.push(format!("{what}: qsd {qo:?}, vubd {vo:?}")),
        }
    }

    // The resize reached the image file in both cases.
    let size = |r: &Run| qemu_img_info(&r.daemon.dir().join("disk0.img"))["virtual-size"].clone();
    let (qs, vs) = (size(&qsd), size(&vubd));
    println!("\ndisk0.img virtual-size after resize: qsd {qs}, vubd {vs}");
    if qs != vs {
        failures.push(format!("disk0.img virtual-size: qsd {qs}, vubd {vs}"));
    }

    if !extras.is_empty() {
        println!("\nmembers vubd adds (tolerated):");
        for e in &extras {
            println!("  {e}");
        }
    }
    if !failures.is_empty() {
        println!("\ndifferences:");
        for f in &failures {
            println!("  {f}");
        }
    }
    assert!(
        failures.is_empty(),
        "{} difference(s) between qsd and vubd:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn shape_comparison_catches_missing_members() {
    // Self-check of the comparison, needing no daemon.
    let qsd = json!([{"a": 1, "b": {"c": "x"}}, {"a": 2, "d": true}]);
    let vubd = json!([{"a": 1, "b": {}, "e": 0}, {"a": 2, "d": "no"}]);
    let mut d = Diffs::default();
    compare("return", &qsd, &vubd, &mut d);
    assert!(d.missing.contains("return[].b.c"), "{:?}", d.missing);
    assert!(d.extra.contains("return[].e"), "{:?}", d.extra);
    assert!(
        d.mismatch.iter().any(|m| m.starts_with("return[].d ")),
        "{:?}",
        d.mismatch
    );
    let mut same = Diffs::default();
    compare(
        "return",
        &qsd,
        &json!([{"a": 9, "d": false}, {"a": 1, "b": {"c": ""}}]),
        &mut same,
    );
    assert_eq!(same.failures() + same.extra.len(), 0);
    // Elements naming nodes are paired by node name, not by shape.
    let qsd = json!([{"node-name": "a", "x": 1}, {"node-name": "b"}]);
    let vubd = json!([{"node-name": "b", "x": 1}, {"node-name": "a"}]);
    let mut d = Diffs::default();
    compare("return", &qsd, &vubd, &mut d);
    assert!(d.missing.contains("return[].x"), "{:?}", d.missing);
    assert!(d.extra.contains("return[].x"), "{:?}", d.extra);
}
