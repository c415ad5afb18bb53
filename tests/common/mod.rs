//! Shared harness of the integration tests: daemons, a QMP client and
//! helpers.  Each test file includes it with `mod common;`.
#![allow(dead_code)]

pub mod blk;
pub mod daemon;
pub mod frontend;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

#[allow(unused_imports)]
pub use daemon::{process_alive, qsd_available, read_pidfile, Daemon, DaemonBuilder, Flavor};
#[allow(unused_imports)]
pub use qmp::{Incoming, Qmp, REPLY_TIMEOUT};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}-{}-{n}-{nanos:x}", std::process::id());
            let path = std::env::temp_dir().join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temp dir {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Calls `f` every few milliseconds until it returns true or `timeout`
/// passes; returns the last result.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Prints why a test that needs qemu-storage-daemon does nothing, and
/// returns true when it should return early.
pub fn skip_without_qsd(test: &str) -> bool {
    if qsd_available() {
        return false;
    }
    eprintln!("{test}: skipped, qemu-storage-daemon is not on PATH");
    true
}

/// The `return` member of a reply; panics if the reply is an error.
pub fn assert_return(reply: &Value) -> &Value {
    reply
        .get("return")
        .unwrap_or_else(|| panic!("expected success, got {reply}"))
}

/// Checks that `reply` is an error of class `class`.
pub fn assert_error_class(reply: &Value, class: &str) {
    let err = reply
        .get("error")
        .unwrap_or_else(|| panic!("expected a {class} error, got {reply}"));
    assert_eq!(err["class"], class, "wrong error class in {reply}");
    assert!(err["desc"].is_string(), "error without a desc: {reply}");
}

/// Checks class and exact desc of an error reply.
pub fn assert_error(reply: &Value, class: &str, desc: &str) {
    assert_error_class(reply, class);
    assert_eq!(reply["error"]["desc"], desc, "wrong error desc in {reply}");
}

/// The error desc of a reply, or "" for a success.
pub fn error_desc(reply: &Value) -> &str {
    reply["error"]["desc"].as_str().unwrap_or("")
}

/// The type name `shape` uses for a scalar.
pub fn scalar_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "number",
        Value::String(_) => "str",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Reduces a value to its shape: objects as `{key:shape,...}` with sorted
/// keys, arrays as `[shape of the first element]` (`[]` when empty),
/// scalars as their type name.
pub fn shape(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{k}:{}", shape(&map[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => match items.first() {
            Some(first) => format!("[{}]", shape(first)),
            None => "[]".to_string(),
        },
        other => scalar_type(other).to_string(),
    }
}

/// Creates an image with `qemu-img create -f <format>`.
pub fn qemu_img_create(path: &Path, format: &str, size: u64) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string())
        .output()
        .expect("cannot run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json` of an image.  `-U` so that it also works
/// while a daemon holds the image's locks.
pub fn qemu_img_info(path: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("cannot run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img info {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img info printed invalid JSON")
}

/// Serves `raw` over `blkdebug` (with the members of `rules` added to its
/// options) over a raw file of 4 MiB, as the writable export `e0` with a
/// monitor; the export gets `extra` options (`,name=value...`). Returns
/// the daemon, a connected client and the image's path.
pub fn serve_over_blkdebug(dir: &Path, rules: Value, extra: &str) -> (Daemon, blk::Blk, PathBuf) {
    let img = dir.join("dbg.img");
    qemu_img_create(&img, "raw", 4 << 20);
    let (d, blk) = serve_image_over_blkdebug(dir, &img, "raw", rules, extra);
    (d, blk, img)
}

/// Serves the image `img` through the format driver `format` over
/// `blkdebug` (with the members of `rules`), as the writable export `e0`
/// with a monitor; the export gets `extra` options.
pub fn serve_image_over_blkdebug(
    dir: &Path,
    img: &Path,
    format: &str,
    rules: Value,
    extra: &str,
) -> (Daemon, blk::Blk) {
    let sock = dir.join("dbg.sock");
    let mut node = serde_json::json!({
        "driver": "blkdebug", "node-name": "dbg",
        "image": {"driver": "file", "filename": img.to_str().expect("UTF-8 path")},
    });
    for (k, v) in rules.as_object().expect("blkdebug rules as an object") {
        node[k] = v.clone();
    }
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&node.to_string())
        .arg("--blockdev")
        .arg(&format!("driver={format},node-name=top,file=dbg"))
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=top,writable=on,addr.type=unix,addr.path={}{extra}",
            sock.display()
        ))
        .monitor()
        .start();
    let blk = blk::Blk::connect(&sock);
    (d, blk)
}
