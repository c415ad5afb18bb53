//! blockdev-snapshot-internal-sync and blockdev-snapshot-delete-internal-sync:
//! internal snapshots of a node's image (qcow2), taken and deleted while
//! its users are drained. The checks and their messages are QEMU's. Both
//! return a pending change: the control loop answers other monitors
//! while the users drain, and the snapshot is taken (or deleted) when
//! the change finishes.

use super::driver::Driver;
use super::error::BlockError;
use super::graph::{Graph, PendingChange};
use crate::qapi::SnapshotInfo;
use std::sync::Arc;

/// The node a `device` argument names: an export's id, or a node name.
fn node_of(g: &Graph, device: &str) -> Result<String, BlockError> {
    g.device_node(device)
        .or_else(|| g.node(device).map(|n| n.name.as_str()))
        .map(str::to_string)
        .ok_or_else(|| BlockError::NoSuchDeviceOrNode {
            device: device.to_string(),
            node: device.to_string(),
        })
}

/// The snapshots of `driver` (checked before, so this only fails if the
/// node changed its mind).
fn snapshots_of(
    driver: &Arc<dyn Driver>,
) -> Result<&dyn super::driver::InternalSnapshots, BlockError> {
    driver
        .internal_snapshots()
        .ok_or_else(|| BlockError::invalid("The node no longer supports internal snapshots"))
}

/// Takes the internal snapshot `name` of `device`'s image once its users
/// are drained.
pub fn create(g: &Graph, device: &str, name: &str) -> Result<PendingChange, BlockError> {
    let node = node_of(g, device)?;
    let n = g
        .node(&node)
        .ok_or_else(|| BlockError::NoSuchNode(node.clone()))?;
    if n.driver.is_read_only() {
        return Err(BlockError::invalid(format!(
            "Device '{device}' is read only"
        )));
    }
    let Some(snaps) = n.driver.internal_snapshots() else {
        return Err(BlockError::invalid(format!(
            "Block format '{}' used by device '{device}' does not support internal snapshots",
            n.driver.name()
        )));
    };
    if name.is_empty() {
        return Err(BlockError::invalid("Name is empty"));
    }
    if snaps.find(None, Some(name)).is_some() {
        return Err(BlockError::invalid(format!(
            "Snapshot with name '{name}' already exists on device '{device}'"
        )));
    }
    let driver = n.driver.clone();
    let name = name.to_string();
    Ok(g.begin_drained(
        &node,
        Box::new(move || snapshots_of(&driver)?.create(&name)),
    ))
}

/// Deletes the internal snapshot of `device` with this id and/or name
/// once its users are drained; what it is.
pub fn delete(
    g: &Graph,
    device: &str,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<(SnapshotInfo, PendingChange), BlockError> {
    let node = node_of(g, device)?;
    let n = g
        .node(&node)
        .ok_or_else(|| BlockError::NoSuchNode(node.clone()))?;
    if id.is_none() && name.is_none() {
        return Err(BlockError::invalid("Name or id must be provided"));
    }
    let Some(snaps) = n.driver.internal_snapshots() else {
        return Err(BlockError::invalid(
            "Failed to get a snapshot list: Operation not supported",
        ));
    };
    let Some(info) = snaps.find(id, name) else {
        return Err(BlockError::invalid(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
            id.unwrap_or("null"),
            name.unwrap_or("null")
        )));
    };
    if n.driver.is_read_only() {
        return Err(BlockError::invalid(format!(
            "Device '{device}' is read only"
        )));
    }
    let driver = n.driver.clone();
    let (id, name) = (id.map(str::to_string), name.map(str::to_string));
    let pending = g.begin_drained(
        &node,
        Box::new(move || {
            snapshots_of(&driver)?
                .delete(id.as_deref(), name.as_deref())
                .map(|_| ())
        }),
    );
    Ok((info, pending))
}
