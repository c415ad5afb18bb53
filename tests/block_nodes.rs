//! Block nodes over QMP: blockdev-add and blockdev-del of every driver
//! vubd builds, with their options and error paths; what
//! query-named-block-nodes and query-blockstats show; block_resize; and
//! image locking against QEMU's own tools.
//!
//! These tests run vubd itself (whatever `VUBD_TEST_BINARY` says) and
//! check it against facts: images are made and measured with qemu-img,
//! locks probed with qemu-io.  Error texts are QEMU 10's, as
//! qemu-storage-daemon 10.0.2 gave them for the same commands, unless a
//! comment says otherwise.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// How long a process that should end may take to do so.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

// --- helpers --------------------------------------------------------------

/// vubd with the monitor `mon0`.
fn vubd(args: &[&str]) -> DaemonBuilder {
    Daemon::with_flavor(Flavor::Vubd, args).monitor()
}

/// A daemon without nodes, and a negotiated session.
fn start() -> (Daemon, Qmp) {
    let d = vubd(&[]).start();
    let qmp = d.qmp();
    (d, qmp)
}

/// Creates a raw image of `size` bytes in `dir`; returns its path.
fn image(dir: &Path, name: &str, size: u64) -> String {
    let path = dir.join(name);
    qemu_img_create(&path, "raw", size);
    path.to_str().expect("UTF-8 path").to_string()
}

/// The virtual size qemu-img reports for an image.
fn virtual_size(path: &str) -> Value {
    qemu_img_info(Path::new(path))["virtual-size"].clone()
}

fn add(qmp: &mut Qmp, opts: Value) -> Value {
    qmp.execute("blockdev-add", opts)
}

fn add_ok(qmp: &mut Qmp, opts: Value) {
    let reply = add(qmp, opts.clone());
    assert_eq!(reply, json!({"return": {}}), "blockdev-add {opts}");
}

/// Runs a blockdev-add that must fail with a GenericError and leave the
/// nodes as they were; returns the error's desc.
fn add_error(qmp: &mut Qmp, opts: Value) -> String {
    let before = node_names(qmp);
    let reply = add(qmp, opts.clone());
    assert_error_class(&reply, "GenericError");
    assert_eq!(
        node_names(qmp),
        before,
        "nodes changed by blockdev-add {opts}"
    );
    error_desc(&reply).to_string()
}

fn del(qmp: &mut Qmp, name: &str) -> Value {
    qmp.execute("blockdev-del", json!({ "node-name": name }))
}

fn nodes(qmp: &mut Qmp) -> Vec<Value> {
    let reply = qmp.execute("query-named-block-nodes", Value::Null);
    assert_return(&reply).as_array().expect("a list").clone()
}

fn node_names(qmp: &mut Qmp) -> BTreeSet<String> {
    nodes(qmp)
        .iter()
        .map(|n| n["node-name"].as_str().expect("node-name").to_string())
        .collect()
}

/// The query-named-block-nodes entry of one node.
fn node(qmp: &mut Qmp, name: &str) -> Value {
    let all = nodes(qmp);
    all.iter()
        .find(|n| n["node-name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {all:?}"))
        .clone()
}

/// Checks members given as JSON pointers, e.g. `/image/format`.
fn assert_members(v: &Value, expected: &[(&str, Value)]) {
    for (pointer, want) in expected {
        assert_eq!(v.pointer(pointer), Some(want), "{pointer} of {v}");
    }
}

/// The members every node shows when no option changes them.
fn assert_defaults(v: &Value) {
    assert_members(
        v,
        &[
            ("/cache/direct", json!(false)),
            ("/cache/no-flush", json!(false)),
            ("/cache/writeback", json!(true)),
            ("/detect_zeroes", json!("off")),
            ("/active", json!(true)),
            ("/write_threshold", json!(0)),
        ],
    );
}

/// True if a blockdev-add failed because the file system refuses
/// O_DIRECT (tmpfs, for one); the caller then skips.
fn o_direct_refused(reply: &Value, test: &str) -> bool {
    let refused = error_desc(reply).ends_with(": Invalid argument");
    if refused {
        eprintln!("{test}: skipped, the temp dir does not support O_DIRECT");
    }
    refused
}

/// The JSON object of a `json:{...}` filename.
fn json_filename(v: &Value) -> Value {
    let text = v.as_str().unwrap_or_default();
    let body = text
        .strip_prefix("json:")
        .unwrap_or_else(|| panic!("{v} is not a json: filename"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// `qemu-io -f raw -c quit IMAGE`: opens the image read-write, as QEMU
/// does, taking its locks, and exits.
fn qemu_io_write_open(path: &str) -> Output {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", "quit", path])
        .output()
        .expect("cannot run qemu-io")
}

/// Checks that qemu-io could open the image read-write.
fn assert_qemu_can_write(path: &str) {
    let out = qemu_io_write_open(path);
    assert!(
        out.status.success(),
        "qemu-io could not open {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks that qemu-io could not open the image read-write because of
/// the locks.
fn assert_qemu_locked_out(path: &str) {
    let out = qemu_io_write_open(path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu-io opened {path} for writing");
    assert!(
        stderr.contains("Failed to get \"write\" lock"),
        "qemu-io failed otherwise: {stderr}"
    );
}

/// Reads a pipe to the end in a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 1024];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// An interactive qemu-io holding an image open read-write (with QEMU's
/// locks) until it is closed or dropped.
struct QemuIoHolder {
    child: Child,
}

impl QemuIoHolder {
    fn open(path: &str) -> QemuIoHolder {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", path])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run qemu-io");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        // qemu-io opens the image first, then prompts for commands.
        let prompted = poll_until(EXIT_TIMEOUT, || {
            String::from_utf8_lossy(&stdout.lock().unwrap()).contains("qemu-io> ")
                || child.try_wait().unwrap().is_some()
        });
        let running = child.try_wait().unwrap().is_none();
        let holder = QemuIoHolder { child };
        assert!(
            prompted && running,
            "qemu-io did not open {path}: {}",
            String::from_utf8_lossy(&stderr.lock().unwrap())
        );
        holder
    }

    /// Ends qemu-io with EOF on its input and waits for it to exit.
    fn close(mut self) {
        drop(self.child.stdin.take());
        let exited = poll_until(EXIT_TIMEOUT, || self.child.try_wait().unwrap().is_some());
        assert!(exited, "qemu-io still running after EOF");
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs vubd with `args` until it exits; returns the status and stderr.
/// Panics (after killing it) if it is still running after EXIT_TIMEOUT.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(Flavor::Vubd.program())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run vubd");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vubd {args:?} still running after {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

// --- drivers: add, query, delete -------------------------------------------

#[test]
fn file_node_shows_its_image_and_blockdev_del_removes_it() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", 3 * MIB + 1536);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    let f0 = node(&mut qmp, "f0");
    assert_members(
        &f0,
        &[
            ("/node-name", json!("f0")),
            ("/drv", json!("file")),
            ("/ro", json!(false)),
            ("/file", json!(path)),
            ("/image/filename", json!(path)),
            ("/image/format", json!("file")),
            ("/image/virtual-size", virtual_size(&path)),
        ],
    );
    assert_defaults(&f0);
    assert_eq!(del(&mut qmp, "f0"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::new());
}

#[test]
fn host_device_on_a_regular_file_is_refused() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    let desc = add_error(
        &mut qmp,
        json!({"driver": "host_device", "node-name": "h0", "filename": path}),
    );
    assert_eq!(
        desc,
        format!("'host_device' driver requires '{path}' to be either a character or block device")
    );
}

/// A loop device over an image, detached on drop.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(image: &str) -> Result<LoopDevice, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show", image])
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

#[test]
fn host_device_on_a_loop_device() {
    let builder = vubd(&[]);
    let backing = image(builder.dir(), "backing.img", 2 * MIB);
    let dev = match LoopDevice::attach(&backing) {
        Ok(dev) => dev,
        Err(why) => {
            eprintln!("host_device_on_a_loop_device: skipped, no loop device ({why})");
            return;
        }
    };
    let d = builder.start();
    let mut qmp = d.qmp();
    add_ok(
        &mut qmp,
        json!({"driver": "host_device", "node-name": "h0", "filename": dev.path}),
    );
    let h0 = node(&mut qmp, "h0");
    assert_members(
        &h0,
        &[
            ("/drv", json!("host_device")),
            ("/ro", json!(false)),
            ("/file", json!(dev.path)),
            ("/image/filename", json!(dev.path)),
            ("/image/format", json!("host_device")),
            ("/image/virtual-size", json!(2 * MIB)),
        ],
    );
    assert_defaults(&h0);
    let reply = qmp.execute("query-blockstats", json!({"query-nodes": true}));
    assert_eq!(
        assert_return(&reply)[0]["driver-specific"]["driver"],
        "host_device"
    );
    assert_eq!(del(&mut qmp, "h0"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::new());
}

#[test]
fn raw_node_over_a_file_node_reference() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", 5 * MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    );
    let r0 = node(&mut qmp, "r0");
    assert_members(
        &r0,
        &[
            ("/node-name", json!("r0")),
            ("/drv", json!("raw")),
            ("/ro", json!(false)),
            ("/file", json!(path)),
            ("/image/filename", json!(path)),
            ("/image/format", json!("raw")),
            ("/image/virtual-size", virtual_size(&path)),
        ],
    );
    assert_defaults(&r0);
    assert_eq!(del(&mut qmp, "r0"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::from(["f0".to_string()]));
    assert_eq!(del(&mut qmp, "f0"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::new());
}

#[test]
fn raw_node_with_an_inline_file_child_gets_a_generated_child_name() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", 2 * MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r1",
               "file": {"driver": "file", "filename": path}}),
    );
    let all = nodes(&mut qmp);
    assert_eq!(all.len(), 2, "{all:?}");
    let child = all
        .iter()
        .find(|n| n["node-name"] != "r1")
        .expect("the inline child");
    let name = child["node-name"].as_str().unwrap();
    let digits = name
        .strip_prefix("#block")
        .unwrap_or_else(|| panic!("generated name {name:?}"));
    assert!(
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        "generated name {name:?}"
    );
    assert_members(
        child,
        &[
            ("/drv", json!("file")),
            ("/ro", json!(false)),
            ("/file", json!(path)),
            ("/image/format", json!("file")),
            ("/image/virtual-size", virtual_size(&path)),
        ],
    );
    assert_members(
        &node(&mut qmp, "r1"),
        &[
            ("/drv", json!("raw")),
            ("/file", json!(path)),
            ("/image/virtual-size", virtual_size(&path)),
        ],
    );
    assert_eq!(del(&mut qmp, "r1"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::new());
}

#[test]
fn raw_window_with_offset_and_size_shows_the_window_size() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0",
               "offset": 4096, "size": 65536}),
    );
    let r0 = node(&mut qmp, "r0");
    assert_members(
        &r0,
        &[
            ("/drv", json!("raw")),
            ("/ro", json!(false)),
            ("/image/format", json!("raw")),
            ("/image/virtual-size", json!(65536)),
        ],
    );
    assert_defaults(&r0);
    // The file is what it was.
    assert_eq!(virtual_size(&path), MIB);
    assert_eq!(node(&mut qmp, "f0")["image"]["virtual-size"], MIB);
    assert_eq!(del(&mut qmp, "r0"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::from(["f0".to_string()]));
}

#[test]
fn raw_window_filename_describes_the_window() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0",
               "offset": 4096, "size": 65536}),
    );
    // qsd: "json:{\"offset\": 4096, \"driver\": \"raw\", \"size\": 65536,
    //        \"file\": {\"driver\": \"file\", \"filename\": \"PATH\"}}"
    // (offset and size are strong options of raw, so the path alone does
    // not name the data).
    let r0 = node(&mut qmp, "r0");
    let want = json!({"driver": "raw", "offset": 4096, "size": 65536,
                      "file": {"driver": "file", "filename": path}});
    assert_eq!(json_filename(&r0["file"]), want);
    assert_eq!(json_filename(&r0["image"]["filename"]), want);
}

#[test]
fn null_co_nodes_show_their_size() {
    let (_d, mut qmp) = start();
    add_ok(
        &mut qmp,
        json!({"driver": "null-co", "node-name": "n0", "size": MIB}),
    );
    add_ok(&mut qmp, json!({"driver": "null-co", "node-name": "n1"}));
    let n0 = node(&mut qmp, "n0");
    let name = "json:{\"driver\": \"null-co\", \"size\": 1048576}";
    assert_members(
        &n0,
        &[
            ("/drv", json!("null-co")),
            ("/ro", json!(false)),
            ("/file", json!(name)),
            ("/image/filename", json!(name)),
            ("/image/format", json!("null-co")),
            ("/image/virtual-size", json!(MIB)),
        ],
    );
    assert_defaults(&n0);
    // Without options: QEMU's default size of 1 GiB, and a plain name.
    assert_members(
        &node(&mut qmp, "n1"),
        &[
            ("/file", json!("null-co://")),
            ("/image/virtual-size", json!(1u64 << 30)),
        ],
    );
    assert_eq!(del(&mut qmp, "n0"), json!({"return": {}}));
    assert_eq!(del(&mut qmp, "n1"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::new());
}

#[test]
fn null_aio_node_with_latency_and_read_zeroes() {
    let (_d, mut qmp) = start();
    add_ok(
        &mut qmp,
        json!({"driver": "null-aio", "node-name": "n0", "size": 2 * MIB,
               "latency-ns": 1000, "read-zeroes": true}),
    );
    let n0 = node(&mut qmp, "n0");
    assert_members(
        &n0,
        &[
            ("/drv", json!("null-aio")),
            ("/ro", json!(false)),
            ("/image/format", json!("null-aio")),
            ("/image/virtual-size", json!(2 * MIB)),
        ],
    );
    assert_defaults(&n0);
    assert_eq!(n0["file"], n0["image"]["filename"]);
    let described = json_filename(&n0["file"]);
    assert_members(
        &described,
        &[
            ("/driver", json!("null-aio")),
            ("/size", json!(2 * MIB)),
            ("/read-zeroes", json!(true)),
        ],
    );
    assert_eq!(del(&mut qmp, "n0"), json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::new());
}

#[test]
fn null_aio_filename_leaves_out_latency() {
    let (_d, mut qmp) = start();
    add_ok(
        &mut qmp,
        json!({"driver": "null-aio", "node-name": "n0", "size": 2 * MIB,
               "latency-ns": 1000, "read-zeroes": true}),
    );
    // qsd: "json:{\"read-zeroes\": true, \"driver\": \"null-aio\", \"size\": 2097152}"
    assert_eq!(
        json_filename(&node(&mut qmp, "n0")["file"]),
        json!({"driver": "null-aio", "size": 2 * MIB, "read-zeroes": true})
    );
}

#[test]
fn x_blockdev_del_removes_a_node() {
    let (_d, mut qmp) = start();
    add_ok(&mut qmp, json!({"driver": "null-co", "node-name": "n0"}));
    let reply = qmp.execute("x-blockdev-del", json!({"node-name": "n0"}));
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(node_names(&mut qmp), BTreeSet::new());
}

// --- options ----------------------------------------------------------------

#[test]
fn read_only_nodes_show_ro() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path, "read-only": true}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0", "read-only": true}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "null-co", "node-name": "n0", "read-only": true}),
    );
    for name in ["f0", "r0", "n0"] {
        assert_eq!(node(&mut qmp, name)["ro"], true, "{name}");
    }
}

#[test]
fn cache_direct_is_shown() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    let reply = add(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "cache": {"direct": true}}),
    );
    if o_direct_refused(&reply, "cache_direct_is_shown") {
        return;
    }
    assert_eq!(reply, json!({"return": {}}));
    let cache = &node(&mut qmp, "f0")["cache"];
    assert_eq!(
        cache,
        &json!({"writeback": true, "direct": true, "no-flush": false})
    );
}

#[test]
fn cache_no_flush_is_shown() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "cache": {"no-flush": true}}),
    );
    let cache = &node(&mut qmp, "f0")["cache"];
    assert_eq!(
        cache,
        &json!({"writeback": true, "direct": false, "no-flush": true})
    );
}

#[test]
fn detect_zeroes_on_is_shown() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "detect-zeroes": "on"}),
    );
    assert_eq!(node(&mut qmp, "f0")["detect_zeroes"], "on");
}

#[test]
fn detect_zeroes_unmap_needs_discard_unmap() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    let desc = add_error(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "detect-zeroes": "unmap"}),
    );
    assert_eq!(
        desc,
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    );
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "detect-zeroes": "unmap", "discard": "unmap"}),
    );
    assert_eq!(node(&mut qmp, "f0")["detect_zeroes"], "unmap");
}

#[test]
fn aio_io_uring_is_accepted() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path, "aio": "io_uring"}),
    );
    assert_members(
        &node(&mut qmp, "f0"),
        &[("/drv", json!("file")), ("/image/virtual-size", json!(MIB))],
    );
}

#[test]
fn aio_native_needs_cache_direct() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    let desc = add_error(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path, "aio": "native"}),
    );
    assert_eq!(
        desc,
        "aio=native was specified, but it requires cache.direct=on, which was not specified."
    );
    let reply = add(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path, "aio": "native",
               "cache": {"direct": true}}),
    );
    if o_direct_refused(&reply, "aio_native_needs_cache_direct") {
        return;
    }
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(node(&mut qmp, "f0")["cache"]["direct"], true);
}

#[test]
fn auto_read_only_keeps_a_writable_image_read_write() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "auto-read-only": true}),
    );
    assert_eq!(node(&mut qmp, "f0")["ro"], false);
}

/// A file this process cannot open for writing: mode 0444 for an
/// ordinary user, the immutable attribute for root (who ignores modes).
/// Made writable again on drop, so that the temp dir can be removed.
struct Unwritable {
    path: String,
    immutable: bool,
}

impl Unwritable {
    fn make(path: &str) -> Option<Unwritable> {
        use std::os::unix::fs::PermissionsExt;
        let writable = || std::fs::OpenOptions::new().write(true).open(path).is_ok();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).ok()?;
        if !writable() {
            return Some(Unwritable {
                path: path.to_string(),
                immutable: false,
            });
        }
        let guard = Unwritable {
            path: path.to_string(),
            immutable: true,
        };
        let set = Command::new("chattr").args(["+i", path]).output().ok()?;
        (set.status.success() && !writable()).then_some(guard)
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").args(["-i", &self.path]).status();
        }
    }
}

#[test]
fn auto_read_only_opens_an_image_that_cannot_be_written() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    let Some(_guard) = Unwritable::make(&path) else {
        eprintln!("auto_read_only_opens_an_image_that_cannot_be_written: skipped, cannot make a file unwritable");
        return;
    };
    // Without auto-read-only the read-write open fails (EACCES with mode
    // 0444, EPERM for an immutable file).
    let desc = add_error(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    assert!(
        desc.starts_with(&format!("Could not open '{path}': ")),
        "{desc:?}"
    );
    // With it, the node opens.  (QEMU 10 then shows ro false and opens the
    // file read-write only when a writer appears; vubd falls back to a
    // read-only node at once, so ro is not checked here.)
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "auto-read-only": true}),
    );
    assert_eq!(node(&mut qmp, "f0")["image"]["virtual-size"], MIB);
}

#[test]
fn force_share_needs_read_only() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    let desc = add_error(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path, "force-share": true}),
    );
    assert_eq!(
        desc,
        "force-share=on can only be used with read-only images"
    );
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "force-share": true, "read-only": true}),
    );
    assert_eq!(node(&mut qmp, "f0")["ro"], true);
}

// --- blockdev-add errors ----------------------------------------------------

#[test]
fn duplicate_node_name_is_refused() {
    let (d, mut qmp) = start();
    let first = image(d.dir(), "a.img", MIB);
    let second = image(d.dir(), "b.img", 2 * MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": first}),
    );
    let desc = add_error(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": second}),
    );
    assert_eq!(desc, "Duplicate nodes with node-name='f0'");
    // The first node is untouched.
    assert_eq!(node(&mut qmp, "f0")["file"], first);
}

#[test]
fn top_level_node_needs_a_node_name() {
    let (_d, mut qmp) = start();
    let desc = add_error(&mut qmp, json!({"driver": "null-co"}));
    assert_eq!(desc, "'node-name' must be specified for the root node");
}

#[test]
fn invalid_node_name_is_refused() {
    let (_d, mut qmp) = start();
    let desc = add_error(&mut qmp, json!({"driver": "null-co", "node-name": "0bad"}));
    assert_eq!(desc, "Invalid node-name: '0bad'");
}

#[test]
fn missing_file_cannot_be_opened() {
    let (d, mut qmp) = start();
    let path = d.dir().join("missing.img");
    let path = path.to_str().unwrap();
    let desc = add_error(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    assert_eq!(
        desc,
        format!("Could not open '{path}': No such file or directory")
    );
}

#[test]
fn unknown_driver_is_refused() {
    let (_d, mut qmp) = start();
    let desc = add_error(&mut qmp, json!({"driver": "frob", "node-name": "x0"}));
    assert_eq!(desc, "Parameter 'driver' does not accept value 'frob'");
}

#[test]
fn schema_driver_that_vubd_does_not_build_is_refused() {
    let (d, mut qmp) = start();
    let desc = add_error(
        &mut qmp,
        json!({"driver": "vvfat", "node-name": "v0", "dir": d.dir().to_str().unwrap()}),
    );
    // vubd's own wording; qsd does build vvfat.
    assert_eq!(desc, "Block driver 'vvfat' is not available in vubd");
}

#[test]
fn option_of_the_wrong_type_is_refused() {
    let (_d, mut qmp) = start();
    let desc = add_error(
        &mut qmp,
        json!({"driver": "null-co", "node-name": "n0", "size": "big"}),
    );
    assert_eq!(desc, "Invalid parameter type for 'size', expected: integer");
    let desc = add_error(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": 42}),
    );
    assert_eq!(
        desc,
        "Invalid parameter type for 'filename', expected: string"
    );
}

#[test]
fn unexpected_option_is_refused() {
    let (_d, mut qmp) = start();
    let desc = add_error(
        &mut qmp,
        json!({"driver": "null-co", "node-name": "n0", "bogus": 1}),
    );
    assert_eq!(desc, "Parameter 'bogus' is unexpected");
}

#[test]
fn raw_window_beyond_the_file_is_refused() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    // QEMU 10 has two spaces in "to the  actual size"; either is fine.
    for (offset, size) in [(0, 2 * MIB), (MIB, 512)] {
        let desc = add_error(
            &mut qmp,
            json!({"driver": "raw", "node-name": "r0", "file": "f0",
                   "offset": offset, "size": size}),
        );
        let start = format!(
            "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the "
        );
        assert!(desc.starts_with(&start), "{desc:?}");
        assert!(
            desc.ends_with("actual size of the containing file (1048576)"),
            "{desc:?}"
        );
    }
}

#[test]
fn failed_raw_add_leaves_no_inline_child_behind() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    // add_error checks that no node (the inline file included) remains.
    add_error(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "size": 2 * MIB,
               "file": {"driver": "file", "filename": path}}),
    );
    // Nor does it hold a lock on the image.
    assert_qemu_can_write(&path);
}

#[test]
fn raw_file_reference_to_a_missing_node_is_refused() {
    let (_d, mut qmp) = start();
    let desc = add_error(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "nosuch"}),
    );
    assert_eq!(desc, "Cannot find device='nosuch' nor node-name='nosuch'");
}

// --- blockdev-del errors ----------------------------------------------------

/// f0 (file) with r0 (raw) on it, and r1 (raw) with an inline file child;
/// returns the child's generated name.
fn two_raw_nodes(d: &Daemon, qmp: &mut Qmp) -> String {
    let a = image(d.dir(), "a.img", MIB);
    let b = image(d.dir(), "b.img", MIB);
    add_ok(
        qmp,
        json!({"driver": "file", "node-name": "f0", "filename": a}),
    );
    add_ok(
        qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    );
    add_ok(
        qmp,
        json!({"driver": "raw", "node-name": "r1",
               "file": {"driver": "file", "filename": b}}),
    );
    node_names(qmp)
        .into_iter()
        .find(|n| n.starts_with("#block"))
        .expect("the inline child")
}

#[test]
fn blockdev_del_of_a_file_node_used_by_raw_is_refused() {
    let (d, mut qmp) = start();
    two_raw_nodes(&d, &mut qmp);
    let reply = del(&mut qmp, "f0");
    assert_error(&reply, "GenericError", "Block device f0 is in use");
    assert!(node_names(&mut qmp).contains("f0"));
}

#[test]
fn blockdev_del_of_an_inline_child_is_refused() {
    let (d, mut qmp) = start();
    let child = two_raw_nodes(&d, &mut qmp);
    let reply = del(&mut qmp, &child);
    assert_error(
        &reply,
        "GenericError",
        &format!("Node {child} is not owned by the monitor"),
    );
    assert!(node_names(&mut qmp).contains(&child));
}

#[test]
fn blockdev_del_of_an_unknown_node_is_refused() {
    let (_d, mut qmp) = start();
    let reply = del(&mut qmp, "nosuch");
    assert_error(
        &reply,
        "GenericError",
        "Failed to find node with node-name='nosuch'",
    );
}

#[test]
fn blockdev_del_of_an_exported_node_is_refused() {
    let d = vubd(&[
        "--blockdev",
        "null-co,node-name=n0",
        "--export",
        "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={dir}/vu.sock",
    ])
    .start();
    let mut qmp = d.qmp();
    assert_error(&del(&mut qmp, "n0"), "GenericError", "Node n0 is in use");
    assert!(node_names(&mut qmp).contains("n0"));
}

#[test]
fn deleting_raw_nodes_removes_inline_children_but_not_referenced_ones() {
    let (d, mut qmp) = start();
    two_raw_nodes(&d, &mut qmp);
    assert_eq!(del(&mut qmp, "r1"), json!({"return": {}}));
    assert_eq!(del(&mut qmp, "r0"), json!({"return": {}}));
    // r1's inline child went with it; f0 was added on its own and stays.
    assert_eq!(node_names(&mut qmp), BTreeSet::from(["f0".to_string()]));
}

// --- query-blockstats ---------------------------------------------------------

/// The counters of BlockDeviceStats that QEMU 10 always returns.
const COUNTERS: &[&str] = &[
    "rd_bytes",
    "wr_bytes",
    "unmap_bytes",
    "zone_append_bytes",
    "rd_operations",
    "wr_operations",
    "flush_operations",
    "unmap_operations",
    "zone_append_operations",
    "rd_total_time_ns",
    "wr_total_time_ns",
    "flush_total_time_ns",
    "unmap_total_time_ns",
    "zone_append_total_time_ns",
    "wr_highest_offset",
    "rd_merged",
    "wr_merged",
    "unmap_merged",
    "zone_append_merged",
    "failed_rd_operations",
    "failed_wr_operations",
    "failed_flush_operations",
    "failed_unmap_operations",
    "failed_zone_append_operations",
    "invalid_rd_operations",
    "invalid_wr_operations",
    "invalid_flush_operations",
    "invalid_unmap_operations",
    "invalid_zone_append_operations",
];

/// Every counter is there, and zero on a node nothing did I/O on.
fn assert_idle_stats(entry: &Value) {
    let stats = &entry["stats"];
    for counter in COUNTERS {
        assert_eq!(stats[counter], 0, "{counter} of {entry}");
    }
    // qsd shows false for both on nodes without a BlockBackend.
    assert_eq!(stats["account_invalid"], false, "{entry}");
    assert_eq!(stats["account_failed"], false, "{entry}");
    assert_eq!(stats["timed_stats"], json!([]), "{entry}");
}

#[test]
fn blockstats_without_query_nodes_is_empty_when_nothing_is_exported() {
    let (_d, mut qmp) = start();
    add_ok(&mut qmp, json!({"driver": "null-co", "node-name": "n0"}));
    let reply = qmp.execute("query-blockstats", Value::Null);
    assert_eq!(reply, json!({"return": []}));
    let reply = qmp.execute("query-blockstats", json!({"query-nodes": false}));
    assert_eq!(reply, json!({"return": []}));
}

#[test]
fn blockstats_of_nodes_have_every_counter_and_the_file_as_parent() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    );
    add_ok(&mut qmp, json!({"driver": "null-co", "node-name": "n0"}));
    let reply = qmp.execute("query-blockstats", json!({"query-nodes": true}));
    let list = assert_return(&reply).as_array().expect("a list");
    let entry = |name: &str| {
        let found: Vec<&Value> = list.iter().filter(|e| e["node-name"] == name).collect();
        assert_eq!(found.len(), 1, "entries for {name} in {list:?}");
        found[0].clone()
    };
    assert_eq!(list.len(), 3, "{list:?}");
    let (f0, r0, n0) = (entry("f0"), entry("r0"), entry("n0"));
    for e in [&f0, &r0, &n0, &r0["parent"]] {
        assert_idle_stats(e);
        assert!(e.get("device").is_none(), "a node has no device: {e}");
        assert!(e.get("backing").is_none(), "{e}");
    }
    assert_eq!(r0["parent"], f0);
    assert!(r0.get("driver-specific").is_none(), "{r0}");
    assert_eq!(
        f0["driver-specific"],
        json!({"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0,
               "discard-bytes-ok": 0})
    );
    assert!(f0.get("parent").is_none(), "{f0}");
    assert!(n0.get("parent").is_none() && n0.get("driver-specific").is_none());
}

// --- block_resize -------------------------------------------------------------

fn resize(qmp: &mut Qmp, node: &str, size: i64) -> Value {
    qmp.execute("block_resize", json!({"node-name": node, "size": size}))
}

/// A daemon with f0 (file) and r0 (raw on f0) over a 1 MiB image.
fn raw_on_file(read_only: bool) -> (Daemon, Qmp, String) {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path,
               "read-only": read_only}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0", "read-only": read_only}),
    );
    (d, qmp, path)
}

#[test]
fn block_resize_grows_a_raw_node_and_its_image() {
    let (_d, mut qmp, path) = raw_on_file(false);
    assert_eq!(
        resize(&mut qmp, "r0", 2 * MIB as i64),
        json!({"return": {}})
    );
    assert_eq!(virtual_size(&path), 2 * MIB);
    assert_eq!(node(&mut qmp, "r0")["image"]["virtual-size"], 2 * MIB);
    assert_eq!(node(&mut qmp, "f0")["image"]["virtual-size"], 2 * MIB);
}

#[test]
fn block_resize_shrinks_a_raw_node_and_its_image() {
    let (_d, mut qmp, path) = raw_on_file(false);
    assert_eq!(resize(&mut qmp, "r0", 512 * 1024), json!({"return": {}}));
    assert_eq!(virtual_size(&path), 512 * 1024);
    assert_eq!(node(&mut qmp, "r0")["image"]["virtual-size"], 512 * 1024);
}

#[test]
fn block_resize_of_the_file_under_a_plain_raw_node_is_seen_through_it() {
    // Without a window, raw is a filter (as in QEMU): it lets its file be
    // resized, and shows the new size.
    let (_d, mut qmp, path) = raw_on_file(false);
    assert_eq!(
        resize(&mut qmp, "f0", 4 * MIB as i64),
        json!({"return": {}})
    );
    assert_eq!(virtual_size(&path), 4 * MIB);
    assert_eq!(node(&mut qmp, "r0")["image"]["virtual-size"], 4 * MIB);
}

#[test]
fn block_resize_of_the_file_under_a_raw_window_is_a_permission_conflict() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 4096}),
    );
    let reply = resize(&mut qmp, "f0", 4 * MIB as i64);
    assert_error_class(&reply, "GenericError");
    // QEMU names the resizing user "an unnamed block device"; the rest of
    // the message is the same.
    let desc = error_desc(&reply);
    assert!(
        desc.starts_with(
            "Permission conflict on node 'f0': permissions 'resize' are both required by "
        ),
        "{desc:?}"
    );
    assert!(
        desc.ends_with("and unshared by node 'r0' (uses node 'f0' as 'file' child)."),
        "{desc:?}"
    );
    assert_eq!(virtual_size(&path), MIB);
}

#[test]
fn block_resize_of_a_read_only_node_fails() {
    let (_d, mut qmp, path) = raw_on_file(true);
    let reply = resize(&mut qmp, "r0", 2 * MIB as i64);
    assert_error(&reply, "GenericError", "Image is read-only");
    assert_eq!(virtual_size(&path), MIB);
}

#[test]
fn block_resize_to_a_negative_size_fails() {
    let (_d, mut qmp, path) = raw_on_file(false);
    let reply = resize(&mut qmp, "r0", -1);
    assert_error(&reply, "GenericError", "Parameter 'size' expects a >0 size");
    assert_eq!(virtual_size(&path), MIB);
}

#[test]
fn block_resize_of_an_unknown_node_fails() {
    let (_d, mut qmp) = start();
    let reply = resize(&mut qmp, "nosuch", MIB as i64);
    assert_error(
        &reply,
        "GenericError",
        "Cannot find device='' nor node-name='nosuch'",
    );
}

#[test]
fn block_resize_of_a_fixed_size_raw_window_fails() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 0, "size": 65536}),
    );
    let reply = resize(&mut qmp, "r0", 131072);
    assert_error(&reply, "GenericError", "Cannot resize fixed-size raw disks");
    assert_eq!(node(&mut qmp, "r0")["image"]["virtual-size"], 65536);
    assert_eq!(virtual_size(&path), MIB);
}

#[test]
fn block_resize_of_a_null_node_is_not_supported() {
    let (_d, mut qmp) = start();
    add_ok(
        &mut qmp,
        json!({"driver": "null-co", "node-name": "n0", "size": 1024}),
    );
    let reply = resize(&mut qmp, "n0", 4096);
    assert_error(
        &reply,
        "GenericError",
        "Image format driver does not support resize",
    );
    assert_eq!(node(&mut qmp, "n0")["image"]["virtual-size"], 1024);
}

// --- locking against QEMU -----------------------------------------------------

#[test]
fn writable_export_keeps_qemu_writers_out_until_deleted() {
    let builder = vubd(&[
        "--blockdev",
        "file,node-name=f0,filename={dir}/disk.img",
        "--blockdev",
        "raw,node-name=r0,file=f0",
        "--export",
        "vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={dir}/vu.sock,writable=on",
    ]);
    let path = image(builder.dir(), "disk.img", MIB);
    let d = builder.start();
    let mut qmp = d.qmp();
    // Like a QEMU guest device without share-rw, the export lets nobody
    // else write under the guest.
    assert_qemu_locked_out(&path);
    // Readers are welcome.
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "quit", &path])
        .output()
        .expect("cannot run qemu-io");
    assert!(out.status.success(), "qemu-io -r: {out:?}");
    let reply = qmp.execute("block-export-del", json!({"id": "e0"}));
    assert_eq!(reply, json!({"return": {}}));
    assert_qemu_can_write(&path);
}

#[test]
fn plain_nodes_without_users_leave_the_image_to_others() {
    // As in QEMU, nodes alone take no permissions: only their users do.
    let builder = vubd(&[
        "--blockdev",
        "file,node-name=f0,filename={dir}/disk.img",
        "--blockdev",
        "raw,node-name=r0,file=f0",
    ]);
    let path = image(builder.dir(), "disk.img", MIB);
    let _d = builder.start();
    assert_qemu_can_write(&path);
}

#[test]
fn export_over_an_image_qemu_io_holds_fails_with_a_lock_error() {
    let (d, mut qmp) = start();
    let path = image(d.dir(), "disk.img", MIB);
    let holder = QemuIoHolder::open(&path);
    add_ok(
        &mut qmp,
        json!({"driver": "file", "node-name": "f0", "filename": path}),
    );
    add_ok(
        &mut qmp,
        json!({"driver": "raw", "node-name": "r0", "file": "f0"}),
    );
    let sock = format!("{}/vu.sock", d.dir().display());
    let export = json!({"type": "vhost-user-blk", "id": "e0", "node-name": "r0", "writable": true,
                        "addr": {"type": "unix", "path": sock}});
    let reply = qmp.execute("block-export-add", export.clone());
    assert_error_class(&reply, "GenericError");
    assert!(error_desc(&reply).contains("lock"), "{reply}");
    // Once qemu-io is gone, the same request succeeds.
    holder.close();
    assert_eq!(
        qmp.execute("block-export-add", export),
        json!({"return": {}})
    );
}

#[test]
fn second_daemon_exporting_an_image_a_daemon_writes_fails_at_startup() {
    let builder = vubd(&[
        "--blockdev",
        "file,node-name=f0,filename={dir}/disk.img",
        "--blockdev",
        "raw,node-name=r0,file=f0",
        "--export",
        "vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={dir}/vu.sock,writable=on",
    ]);
    let path = image(builder.dir(), "disk.img", MIB);
    let first = builder.start();
    let file = format!("file,node-name=f0,filename={path}");
    let export = format!(
        "vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={}/vu2.sock,writable=on",
        first.dir().display()
    );
    let (status, stderr) = run_to_exit(&[
        "--blockdev",
        &file,
        "--blockdev",
        "raw,node-name=r0,file=f0",
        "--export",
        &export,
    ]);
    assert_eq!(status.code(), Some(1), "second daemon: {stderr:?}");
    // The error, then QEMU's hint on a line of its own.
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr:?}");
    assert!(
        lines[0].starts_with(&format!("vubd: --export {export}: ")),
        "{stderr:?}"
    );
    assert!(lines[0].contains("lock"), "{stderr:?}");
    assert_eq!(
        lines[1],
        format!("Is another process using the image [{path}]?")
    );
}

#[test]
fn quit_releases_the_image_locks() {
    let builder = vubd(&[
        "--blockdev",
        "file,node-name=f0,filename={dir}/disk.img",
        "--blockdev",
        "raw,node-name=r0,file=f0",
        "--export",
        "vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={dir}/vu.sock,writable=on",
    ]);
    let path = image(builder.dir(), "disk.img", MIB);
    let mut d = builder.start();
    let mut qmp = d.qmp();
    assert_qemu_locked_out(&path);
    assert_eq!(qmp.execute("quit", Value::Null), json!({"return": {}}));
    assert!(qmp.wait_eof(EXIT_TIMEOUT), "connection open after quit");
    let status = d.wait_exit(EXIT_TIMEOUT).expect("daemon still running");
    assert_eq!(status.code(), Some(0), "{}", d.describe());
    assert_qemu_can_write(&path);
}
