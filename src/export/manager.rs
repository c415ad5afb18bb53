//! The exports of the daemon: adding (block-export-add, --export),
//! removing (block-export-del) and listing (query-block-exports) them.
//!
//! An export holds a BlockBackend on its node: a root edge in the graph,
//! named by the export id, with the permissions the export needs, and a
//! root slot through which its I/O threads reach the node.

use super::vhost_user::{Device, NodeGeometry, Server};
use crate::block::drain::RootSlot;
use crate::block::graph::{Graph, Use, UserKind};
use crate::block::perm::Perm;
use crate::error::QmpError;
use crate::iothread::IoThreads;
use crate::qapi::{
    BlockExportInfo, BlockExportOptions, BlockExportOptionsBranch, BlockExportRemoveMode,
    BlockExportType, SocketAddressBranch,
};
use std::sync::Arc;

pub struct Export {
    pub id: String,
    pub node: String,
    use_id: u64,
    server: Server,
}

#[derive(Default)]
pub struct Exports {
    list: Vec<Export>,
    /// Throttle groups made by block_set_io_throttle.
    implicit_groups: super::throttle::ImplicitGroups,
}

impl Export {
    pub fn device(&self) -> &Arc<Device> {
        self.server.device()
    }
}

impl Exports {
    /// The exports and the implicit throttle groups, borrowed apart.
    pub(super) fn parts(&mut self) -> (&[Export], &mut super::throttle::ImplicitGroups) {
        (&self.list, &mut self.implicit_groups)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.list.iter()
    }

    pub fn info(&self) -> Vec<BlockExportInfo> {
        self.list
            .iter()
            .map(|e| BlockExportInfo {
                id: e.id.clone(),
                r#type: BlockExportType::VhostUserBlk,
                node_name: e.node.clone(),
                shutting_down: false,
            })
            .collect()
    }

    /// The exports, with their devices' I/O counters.
    pub fn stats(&self) -> Vec<(String, String, crate::qapi::BlockDeviceStats)> {
        self.list
            .iter()
            .map(|e| (e.id.clone(), e.node.clone(), e.server.device().io_stats()))
            .collect()
    }

    pub fn add(
        &mut self,
        graph: &mut Graph,
        threads: &mut IoThreads,
        opts: &BlockExportOptions,
    ) -> Result<(), QmpError> {
        if self.list.iter().any(|e| e.id == opts.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                opts.id
            )));
        }
        let node = graph.node(&opts.node_name).ok_or_else(|| {
            QmpError::from(crate::block::error::BlockError::NoSuchDeviceOrNode {
                device: String::new(),
                node: opts.node_name.clone(),
            })
        })?;
        let writable = opts.writable.unwrap_or(false);
        if writable && node.driver.is_read_only() {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        let BlockExportOptionsBranch::VhostUserBlk(vu) = &opts.u;
        let path = match &vu.addr.u {
            SocketAddressBranch::Unix(u) => u.path.clone(),
            SocketAddressBranch::Fd(fd) => format!("fd:{}", fd.str),
            _ => {
                return Err(QmpError::generic(
                    "Only socket address types 'unix' and 'fd' are supported",
                ))
            }
        };
        let workers = threads.for_export(opts)?;
        let slot = Arc::new(RootSlot::new(Some(node.io.clone())));
        let geometry = NodeGeometry {
            length: node.io.length()?,
            alignment: node.io.mem_alignment(),
            preferred: node.io.preferred_alignment(),
        };
        let use_id = graph.change(|g| {
            Ok(g.add_use(Use {
                id: 0,
                kind: UserKind::BlockDevice,
                name: opts.id.clone(),
                node: opts.node_name.clone(),
                perm: Perm::CONSISTENT_READ | if writable { Perm::WRITE } else { Perm::NONE },
                // A writer is like a QEMU guest device without share-rw:
                // nobody else may write under the guest (in this process
                // or, through the image locks, another), but the disk may
                // be resized. A reader shares everything, as qsd's exports.
                shared: if writable {
                    Perm::ALL - Perm::WRITE
                } else {
                    Perm::ALL
                },
                slot: Some(slot.clone()),
            }))
        })?;
        let server = Server::start(opts, vu, &geometry, slot, workers).map_err(|e| {
            let _ = graph.change(|g| {
                g.remove_use(use_id);
                Ok(())
            });
            // Each reason names what failed (the option, the socket).
            log::debug!("export '{}' on {path} not started: {e}", opts.id);
            QmpError::generic(e.to_string())
        })?;
        server.device().backend.set_notices(graph.notices());
        log::info!(
            "export '{}' of node '{}' serving on {path}",
            opts.id,
            opts.node_name
        );
        self.list.push(Export {
            id: opts.id.clone(),
            node: opts.node_name.clone(),
            use_id,
            server,
        });
        Ok(())
    }

    /// Removes an export. In safe mode a connected client makes this fail;
    /// in hard mode the client is disconnected.
    pub fn remove(
        &mut self,
        graph: &mut Graph,
        id: &str,
        mode: BlockExportRemoveMode,
    ) -> Result<(), QmpError> {
        let i = self
            .list
            .iter()
            .position(|e| e.id == id)
            .ok_or_else(|| QmpError::generic(format!("Export '{id}' is not found")))?;
        if mode == BlockExportRemoveMode::Safe && self.list[i].server.has_client() {
            return Err(QmpError::generic(format!("export '{id}' still in use")));
        }
        let export = self.list.remove(i);
        export.server.stop();
        graph.change(|g| {
            g.remove_use(export.use_id);
            Ok(())
        })?;
        log::info!("export '{id}' removed");
        Ok(())
    }

    /// Stops every export (shutdown).
    pub fn stop_all(&mut self, graph: &mut Graph) {
        for e in self.list.drain(..) {
            e.server.stop();
            let _ = graph.change(|g| {
                g.remove_use(e.use_id);
                Ok(())
            });
        }
    }
}
