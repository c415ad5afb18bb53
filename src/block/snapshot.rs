//! External snapshots: an overlay goes on top of a node, takes its place
//! for every parent and user (an export's guest writes go on into the
//! overlay), and keeps the node below as its backing file. One graph
//! change does it all, so a failure leaves everything as it was.

use super::driver::qcow2::create;
use super::driver::ChildRole;
use super::error::BlockError;
use super::graph::Graph;
use super::open::add_implicit_node;
use crate::qapi::{BlockdevOptions, BlockdevSnapshot, BlockdevSnapshotSync, NewImageMode};

/// The node a `device` (an export's id, or a node name) or `node-name`
/// argument names.
fn source(g: &Graph, device: Option<&str>, node: Option<&str>) -> Result<String, BlockError> {
    match (device, node) {
        (Some(_), Some(_)) | (None, None) => Err(BlockError::invalid(
            "Exactly one of 'device' and 'node-name' must be given",
        )),
        (Some(d), None) => g
            .device_node(d)
            .or_else(|| g.node(d).map(|n| n.name.as_str()))
            .map(str::to_string)
            // QEMU's words: the node-name it was not given shows empty.
            .ok_or_else(|| BlockError::NoSuchDeviceOrNode {
                device: d.to_string(),
                node: String::new(),
            }),
        (None, Some(n)) => g
            .node(n)
            .map(|n| n.name.clone())
            .ok_or_else(|| BlockError::NoSuchNode(n.to_string())),
    }
}

/// Puts `overlay` on top of `node` in a draft.
fn attach(draft: &mut Graph, node: &str, overlay: &str) -> Result<(), BlockError> {
    let o = draft
        .node(overlay)
        .ok_or_else(|| BlockError::NoSuchNode(overlay.to_string()))?;
    if o.children.iter().any(|e| e.role == ChildRole::Backing) {
        return Err(BlockError::invalid(format!(
            "The overlay already has a backing image: node '{overlay}'"
        )));
    }
    if o.driver.child(ChildRole::Backing).is_none() {
        return Err(BlockError::invalid(format!(
            "The overlay does not support backing images: node '{overlay}'"
        )));
    }
    if draft.has_parents(overlay) {
        return Err(BlockError::invalid(format!(
            "The overlay is already in use: node '{overlay}'"
        )));
    }
    draft.set_child(overlay, ChildRole::Backing, node)?;
    draft.replace_node(node, overlay)
}

/// The graph change a snapshot command makes (see [`Graph::change`]).
pub type Change<'a> = Box<dyn FnOnce(&mut Graph) -> Result<(), BlockError> + 'a>;

/// blockdev-snapshot: `overlay`, added before without a backing node,
/// goes on top of `node`. Returns the change, for the caller to make.
pub fn snapshot<'a>(g: &Graph, arg: &'a BlockdevSnapshot) -> Result<Change<'a>, BlockError> {
    let node = source(g, Some(&arg.node), None)?;
    Ok(Box::new(move |draft: &mut Graph| {
        attach(draft, &node, &arg.overlay)
    }))
}

/// blockdev-snapshot-sync: creates the overlay file (or opens the one
/// there); returns the change that opens it and puts it on top.
pub fn snapshot_sync(
    g: &mut Graph,
    arg: &BlockdevSnapshotSync,
) -> Result<Change<'static>, BlockError> {
    let node = source(g, arg.device.as_deref(), arg.node_name.as_deref())?;
    let format = arg.format.clone().unwrap_or_else(|| "qcow2".to_string());
    if format != "qcow2" {
        return Err(BlockError::invalid(format!(
            "vubd creates overlays in qcow2 only, not '{format}'"
        )));
    }
    if let Some(n) = &arg.snapshot_node_name {
        g.check_new_name(n)?;
    }
    let src = g
        .node(&node)
        .ok_or_else(|| BlockError::NoSuchNode(node.clone()))?;
    if arg.mode.unwrap_or(NewImageMode::AbsolutePaths) == NewImageMode::AbsolutePaths {
        let size = src.io.length()?;
        let backing_name = src.driver.filename();
        let backing_format = src.driver.name();
        create::create(
            &arg.snapshot_file,
            size,
            Some((backing_name.as_str(), backing_format)),
        )?;
    }
    let mut opts = serde_json::json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": arg.snapshot_file},
        "backing": "",
    });
    // Without snapshot-node-name the overlay gets a generated name (one a
    // user could not give, so it is not checked as theirs).
    if let Some(n) = &arg.snapshot_node_name {
        opts["node-name"] = n.clone().into();
    }
    let opts: BlockdevOptions = crate::qapi::rt::read(&opts, crate::qapi::rt::Syntax::Json)
        .map_err(|e| BlockError::invalid(e.to_string()))?;
    Ok(Box::new(move |draft: &mut Graph| {
        let overlay = add_implicit_node(draft, &opts)?;
        attach(draft, &node, &overlay)
    }))
}
