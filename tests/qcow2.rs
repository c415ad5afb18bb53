//! qcow2 images made by QEMU's tools, read through a vubd export with
//! libblkio and compared byte for byte with what `qemu-img convert` reads
//! from the same image: versions 2 and 3, cluster sizes from 4k to 2M,
//! compressed clusters (zlib and zstd), extended L2 entries, zero clusters
//! and discarded ranges, raw and qcow2 backing files, chains.

mod common;

use common::blk::{Blk, BlkOptions};
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(args: &[&str]) {
    tool("qemu-img", args);
}

/// Runs qemu-io commands on an image (format given).
fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().unwrap();
    args.push(p);
    tool("qemu-io", &args);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// What QEMU reads from the image: `qemu-img convert` to raw.
fn qemu_reads(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("expected.raw");
    qemu_img(&["convert", "-O", "raw", path(img), path(&out)]);
    std::fs::read(&out).unwrap()
}

/// Serves `img` (qcow2, read-only) from vubd and reads all of it through
/// libblkio in `chunk`-sized reads.
fn vubd_reads(dir: &Path, img: &Path, extra: &str, chunk: usize) -> (Daemon, Vec<u8>) {
    let sock = dir.join("q.sock");
    let d = Daemon::vubd(&[])
        .arg("--blockdev")
        .arg(&format!(
            "driver=file,node-name=f0,filename={},read-only=on",
            path(img)
        ))
        .arg("--blockdev")
        .arg(&format!(
            "driver=qcow2,node-name=q0,file=f0,read-only=on{extra}"
        ))
        .arg("--export")
        .arg(&format!(
            "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={}",
            path(&sock)
        ))
        .monitor()
        .start();
    let mut blk = Blk::connect_with(
        &sock,
        BlkOptions {
            read_only: true,
            queue_buffer: 1 << 20,
            ..BlkOptions::default()
        },
    );
    let size = blk.capacity();
    let mut data = Vec::with_capacity(size as usize);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        data.extend_from_slice(&blk.read(off, n));
        off += n as u64;
    }
    (d, data)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[track_caller]
fn assert_same_as_qemu(img: &Path, dir: &Path, chunks: &[usize]) {
    let want = qemu_reads(img, dir);
    for &chunk in chunks {
        let (_d, got) = vubd_reads(dir, img, "", chunk);
        if let Some(at) = first_difference(&want, &got) {
            panic!(
                "{}: vubd's read ({chunk}-byte requests) differs from qemu-img's at byte {at} \
                 (lengths {} and {})",
                img.display(),
                got.len(),
                want.len()
            );
        }
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vubd-qcow2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a mix of patterns, zeroes and discards that crosses cluster
/// boundaries for every cluster size used here.
fn scribble(img: &Path) {
    qemu_io(
        img,
        "qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 100k 300k",
            "write -P 0x33 1m 2m",
            "write -P 0x44 3500k 4k",
            "write -z 1200k 128k",
            "discard 2m 512k",
            "write -P 0x55 5m 1k",
        ],
    );
}

#[test]
fn images_of_every_version_and_cluster_size_read_as_qemu_reads_them() {
    let dir = scratch("sizes");
    for (compat, cluster) in [
        ("0.10", "64k"),
        ("1.1", "4k"),
        ("1.1", "64k"),
        ("1.1", "2M"),
        ("1.1", "512"),
    ] {
        let img = dir.join(format!("v{compat}-{cluster}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size={cluster}"),
            path(&img),
            "8M",
        ]);
        scribble(&img);
        assert_same_as_qemu(&img, &dir, &[65536, 12288]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn extended_l2_images_read_subcluster_by_subcluster() {
    let dir = scratch("extl2");
    let img = dir.join("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        path(&img),
        "8M",
    ]);
    // 4k subclusters: writes that cover parts of clusters leave the rest
    // unallocated, which must read as zeroes (or from the backing file).
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x66 4k 8k",
            "write -P 0x67 130k 2k",
            "write -z 200k 8k",
        ],
    );
    assert_same_as_qemu(&img, &dir, &[65536, 4096, 1536]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compressed_clusters_read_as_qemu_reads_them() {
    let dir = scratch("compressed");
    let src = dir.join("src.raw");
    let mut data = vec![0u8; 4 * MIB as usize];
    for (i, b) in data.iter_mut().enumerate() {
        // Compressible but not trivial.
        *b = ((i / 7) % 13) as u8 ^ ((i >> 12) as u8);
    }
    std::fs::write(&src, &data).unwrap();
    for ctype in ["zlib", "zstd"] {
        let img = dir.join(format!("{ctype}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype}"),
            path(&src),
            path(&img),
        ]);
        // Some clusters rewritten uncompressed on top.
        qemu_io(&img, "qcow2", &["write -P 0x77 192k 64k"]);
        assert_same_as_qemu(&img, &dir, &[65536, 4608]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overlays_read_through_to_raw_and_qcow2_backing_files() {
    let dir = scratch("backing");
    let base = dir.join("base.raw");
    let mut data = vec![0u8; 6 * MIB as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&base, &data).unwrap();
    let mid = dir.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path(&mid),
    ]);
    qemu_io(&mid, "qcow2", &["write -P 0x88 1m 64k", "write -z 2m 64k"]);
    // The top is larger than its backing chain: beyond it reads zeroes.
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        path(&top),
        "8M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x99 1040k 8k", "write -P 0xaa 6m 4k"],
    );
    assert_same_as_qemu(&top, &dir, &[65536, 12288]);
    assert_same_as_qemu(&mid, &dir, &[65536]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_backing_chain_shows_in_the_queries() {
    let dir = scratch("query");
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&base), "4M"]);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path(&top),
    ]);
    let (d, _) = vubd_reads(&dir, &top, "", 1 << 20);
    let mut qmp = d.qmp();
    let nodes = qmp.execute("query-named-block-nodes", Value::Null);
    let q0 = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "q0")
        .cloned()
        .unwrap();
    assert_eq!(q0["drv"], "qcow2");
    assert_eq!(q0["backing_file_depth"], 1, "{q0}");
    let image = &q0["image"];
    assert_eq!(image["backing-filename"], "base.qcow2", "{image}");
    assert_eq!(image["backing-filename-format"], "qcow2");
    assert_eq!(image["cluster-size"], 65536);
    assert_eq!(image["format-specific"]["type"], "qcow2");
    assert_eq!(image["format-specific"]["data"]["compat"], "1.1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_qcow2_node_without_read_only_is_refused_with_a_clear_error_for_now() {
    let dir = scratch("rw");
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path(&img), "1M"]);
    let d = Daemon::vubd(&[]).monitor().start();
    let mut qmp = d.qmp();
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q0",
               "file": {"driver": "file", "filename": path(&img)}}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("read-only"), "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}
