//! `change-backing-file`: rewriting the backing file name an image in a
//! device's chain records, with QEMU's checks and messages. The node is
//! not reopened: its backing node stays what it is; only the header and
//! what queries report change.
//!
//! QEMU reopens a read-only image read-write for the update. vubd writes
//! through the image's file node when that is writable, and otherwise,
//! when the file node was opened implicitly with the image (a backing
//! image, or a read-only node's inline file), through a short-lived
//! read-write descriptor of its own; a file node added read-only by the
//! user is refused as qsd refuses it.

use super::driver::{ChildRole, DriverKind};
use super::error::BlockError;
use super::graph::{Graph, Node};
use super::sync_io;
use std::os::unix::fs::FileExt;

pub fn change_backing_file(
    g: &Graph,
    device: &str,
    image: &str,
    backing_file: &str,
) -> Result<(), BlockError> {
    let root = g
        .device_node(device)
        .or_else(|| g.node(device).map(|n| n.name.as_str()))
        .ok_or_else(|| {
            BlockError::invalid(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ))
        })?;
    if !g.is_root(root) {
        return Err(BlockError::invalid("Need a root block node"));
    }
    let node = g.node(image).ok_or_else(|| {
        BlockError::invalid(format!("Cannot find device='' nor node-name='{image}'"))
    })?;
    if child(node, ChildRole::Backing).is_none() {
        return Err(BlockError::invalid(
            "not allowing backing file change on an image without a backing file",
        ));
    }
    if !chain_contains(g, root, image) {
        return Err(BlockError::invalid(format!(
            "'{device}' and image file are not in the same chain"
        )));
    }
    let file = child(node, ChildRole::File)
        .and_then(|f| g.node(f))
        .ok_or_else(|| BlockError::invalid("Block node is read-only"))?;
    let mut write = header_writer(file)?;
    // QEMU records the image's own format name as the backing format.
    let format = node.driver.name();
    node.driver
        .change_backing_file(backing_file, format, &mut *write)
        .map_err(|e| {
            BlockError::invalid(format!(
                "Could not change backing file to '{backing_file}': {}",
                super::error::strerror(&std::io::Error::from_raw_os_error(-e))
            ))
        })?;
    log::info!("node '{image}' now names '{backing_file}' as its backing file");
    Ok(())
}

fn child(node: &Node, role: ChildRole) -> Option<&str> {
    node.children
        .iter()
        .find(|e| e.role == role)
        .map(|e| e.child.as_str())
}

/// Whether `image` is `root` or below it through backing edges (and the
/// file edges of filters).
fn chain_contains(g: &Graph, root: &str, image: &str) -> bool {
    let mut at = Some(root);
    // The graph has no cycles; the bound only guards against a bug.
    for _ in 0..=g.nodes().len() {
        let Some(name) = at else { return false };
        if name == image {
            return true;
        }
        at = g.node(name).and_then(|n| match n.driver.kind() {
            DriverKind::Filter => child(n, ChildRole::File),
            _ => child(n, ChildRole::Backing),
        });
    }
    false
}

type Writer = Box<dyn FnMut(&[u8]) -> Result<(), i32>>;

/// How to write the image's header through its file node.
fn header_writer(file: &Node) -> Result<Writer, BlockError> {
    if !file.driver.is_read_only() {
        let io = file.io.clone();
        return Ok(Box::new(move |buf: &[u8]| {
            sync_io::write_at(&*io, 0, buf)
                .and_then(|()| io.flush())
                .map_err(|e| {
                    log::error!("writing an image header: {e}");
                    -libc::EIO
                })
        }));
    }
    if file.monitor_owned || file.driver.kind() != DriverKind::Protocol {
        return Err(BlockError::invalid("Block node is read-only"));
    }
    let path = file.driver.filename();
    Ok(Box::new(move |buf: &[u8]| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| os_errno(&e))?;
        f.write_all_at(buf, 0).map_err(|e| os_errno(&e))?;
        f.sync_data().map_err(|e| os_errno(&e))
    }))
}

fn os_errno(e: &std::io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}
