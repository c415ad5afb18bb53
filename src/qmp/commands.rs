//! The QMP commands vubd implements, run on the control thread.

use crate::block::graph::{Use, UserKind};
use crate::block::open::add_node;
use crate::block::perm::Perm;
use crate::block::{error::BlockError, query};
use crate::daemon::Daemon;
use crate::error::QmpError;
use crate::qapi::{
    self, BlockDeviceInfo, BlockExportDelArg, BlockExportDeletedData, BlockExportInfo,
    BlockExportOptions, BlockExportRemoveMode, BlockInfo, BlockResizeArg, BlockStats,
    BlockdevDelArg, BlockdevOptions, BlockdevSnapshotDeleteInternalSyncArg,
    BlockdevSnapshotInternal, ChardevInfo, CommandInfo, Event, ObjectDelArg, ObjectOptions,
    ObjectPropertyInfo, ObjectTypeInfo, QMPCapability, QapiErrorClass, QmpCapabilitiesArg,
    QomGetArg, QomListArg, QomListPropertiesArg, QomListTypesArg, QomSetArg, QueryBlockstatsArg,
    SchemaInfo, SnapshotInfo, VersionInfo, VersionTriple, XBlockdevDelArg,
};
use crate::qom;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

/// The QEMU version whose QMP interface vubd follows, reported in the
/// greeting and by query-version (management tools decide what to send by
/// it); vubd's own version goes into `package`.
pub const QEMU_API_VERSION: (i64, i64, i64) = (10, 0, 0);

pub fn version_info() -> VersionInfo {
    let (major, minor, micro) = QEMU_API_VERSION;
    VersionInfo {
        qemu: VersionTriple {
            major,
            minor,
            micro,
        },
        package: format!("vubd {}", env!("CARGO_PKG_VERSION")),
    }
}

/// What query-commands answers: every command vubd implements.
pub fn command_list() -> Vec<CommandInfo> {
    qapi::IMPLEMENTED_COMMANDS
        .iter()
        .map(|n| CommandInfo {
            name: n.to_string(),
        })
        .collect()
}

/// The `query-qmp-schema` answer. qapi-gen worked it out from the schema
/// and wrote it as JSON text; it is read into the schema's own types the
/// first time it is asked for, which also checks it against them.
pub fn qmp_schema() -> Result<&'static [SchemaInfo], QmpError> {
    static SCHEMA: OnceLock<Result<Vec<SchemaInfo>, String>> = OnceLock::new();
    let parsed = SCHEMA.get_or_init(|| {
        let text: serde_json::Value =
            serde_json::from_str(qapi::QMP_SCHEMA_JSON).map_err(|e| e.to_string())?;
        let root = qapi::rt::At::root(qapi::rt::Syntax::Json);
        qapi::rt::list(&text, &root, <SchemaInfo as qapi::rt::FromQapi>::from_qapi)
            .map_err(|e| e.desc)
    });
    parsed.as_deref().map_err(|e| {
        log::error!("the generated introspection data does not fit its schema: {e}");
        QmpError::generic(format!("Introspection data is unusable: {e}"))
    })
}

/// A command running on behalf of one monitor session.
pub struct Cx<'a> {
    pub daemon: &'a mut Daemon,
    pub request: &'a crate::qmp::session::Request,
}

impl Cx<'_> {
    fn qom_view(&self) -> qom::View<'_> {
        qom::View {
            objects: &self.daemon.objects,
            chardevs: &self.daemon.chardevs,
        }
    }
}

impl qapi::Commands for Cx<'_> {
    type Error = QmpError;

    fn qmp_capabilities(&mut self, arg: QmpCapabilitiesArg) -> Result<(), QmpError> {
        // Every monitor offers oob, the one capability there is; the
        // schema's enum already refused anything else.
        let oob = arg
            .enable
            .iter()
            .flatten()
            .any(|c| *c == QMPCapability::Oob);
        self.request.oob.store(oob, Ordering::SeqCst);
        self.request.negotiated.store(true, Ordering::SeqCst);
        self.daemon
            .events
            .add(self.request.session, self.request.writer.clone());
        Ok(())
    }

    fn query_version(&mut self) -> Result<VersionInfo, QmpError> {
        Ok(version_info())
    }

    fn query_commands(&mut self) -> Result<Vec<CommandInfo>, QmpError> {
        Ok(command_list())
    }

    fn query_qmp_schema(&mut self) -> Result<Vec<SchemaInfo>, QmpError> {
        qmp_schema().map(<[SchemaInfo]>::to_vec)
    }

    fn quit(&mut self) -> Result<(), QmpError> {
        self.daemon.request_quit("quit command");
        Ok(())
    }

    fn blockdev_add(&mut self, arg: BlockdevOptions) -> Result<(), QmpError> {
        self.daemon
            .change_graph(|g| add_node(g, &arg).map(|_| ()))?;
        Ok(())
    }

    fn blockdev_snapshot_sync(&mut self, arg: qapi::BlockdevSnapshotSync) -> Result<(), QmpError> {
        let change = crate::block::snapshot::snapshot_sync(&mut self.daemon.graph, &arg)?;
        self.daemon.change_graph(change)?;
        Ok(())
    }

    fn blockdev_snapshot(&mut self, arg: qapi::BlockdevSnapshot) -> Result<(), QmpError> {
        let change = crate::block::snapshot::snapshot(&self.daemon.graph, &arg)?;
        self.daemon.change_graph(change)?;
        Ok(())
    }

    fn change_backing_file(&mut self, arg: qapi::ChangeBackingFileArg) -> Result<(), QmpError> {
        crate::block::backing_file::change_backing_file(
            &self.daemon.graph,
            &arg.device,
            &arg.image_node_name,
            &arg.backing_file,
        )?;
        Ok(())
    }

    fn blockdev_del(&mut self, arg: BlockdevDelArg) -> Result<(), QmpError> {
        self.daemon.delete_node(&arg.node_name)
    }

    fn x_blockdev_del(&mut self, arg: XBlockdevDelArg) -> Result<(), QmpError> {
        self.daemon.delete_node(&arg.node_name)
    }

    fn query_named_block_nodes(
        &mut self,
        arg: qapi::QueryNamedBlockNodesArg,
    ) -> Result<Vec<BlockDeviceInfo>, QmpError> {
        let mut nodes = query::named_nodes(&self.daemon.graph);
        // `flat` leaves out the backing images' info (each is listed).
        if arg.flat.unwrap_or(false) {
            for n in &mut nodes {
                n.image.backing_image = None;
            }
        }
        Ok(nodes)
    }

    fn query_block(&mut self) -> Result<Vec<BlockInfo>, QmpError> {
        // Block devices are the exports' backends; each shows its node.
        let g = &self.daemon.graph;
        Ok(g.uses()
            .iter()
            .filter(|u| u.kind == UserKind::BlockDevice)
            .map(|u| BlockInfo {
                device: u.name.clone(),
                r#type: "unknown".into(),
                removable: false,
                locked: false,
                inserted: g.node(&u.node).map(|n| {
                    let mut info = query::device_info(g, n);
                    if let Some((cfg, group)) =
                        crate::export::throttle::device_limits(&self.daemon.exports, &u.name)
                    {
                        crate::block::throttle::limits::describe(&mut info, &cfg, &group);
                    }
                    info
                }),
                tray_open: None,
                io_status: self
                    .daemon
                    .exports
                    .iter()
                    .find(|e| e.id == u.name)
                    .map(|e| e.device().backend.io_status()),
                dirty_bitmaps: None,
            })
            .collect())
    }

    fn query_status(&mut self) -> Result<qapi::StatusInfo, QmpError> {
        let stopped = self.daemon.stopped_on_error
            || self
                .daemon
                .exports
                .iter()
                .any(|e| e.device().backend.is_stopped());
        Ok(qapi::StatusInfo {
            running: !stopped,
            status: if stopped {
                qapi::RunState::IoError
            } else {
                qapi::RunState::Running
            },
        })
    }

    fn cont(&mut self) -> Result<(), QmpError> {
        let mut resumed = false;
        for e in self.daemon.exports.iter() {
            if e.device().backend.resume() {
                log::info!("export '{}' resumed", e.id);
                resumed = true;
            }
        }
        if resumed || self.daemon.stopped_on_error {
            self.daemon.stopped_on_error = false;
            self.daemon.events.emit(&qapi::Event::Resume);
        }
        Ok(())
    }

    fn block_set_write_threshold(
        &mut self,
        arg: qapi::BlockSetWriteThresholdArg,
    ) -> Result<(), QmpError> {
        let node =
            self.daemon.graph.node(&arg.node_name).ok_or_else(|| {
                QmpError::generic(format!("Device '{}' not found", arg.node_name))
            })?;
        node.threshold.set(arg.write_threshold);
        log::info!(
            "node '{}': write threshold {}",
            arg.node_name,
            arg.write_threshold
        );
        Ok(())
    }

    fn block_set_io_throttle(&mut self, arg: qapi::BlockIOThrottle) -> Result<(), QmpError> {
        let d = &mut *self.daemon;
        crate::export::throttle::set_io_throttle(&mut d.exports, &mut d.graph, &arg)
    }

    fn query_blockstats(&mut self, arg: QueryBlockstatsArg) -> Result<Vec<BlockStats>, QmpError> {
        let g = &self.daemon.graph;
        if arg.query_nodes.unwrap_or(false) {
            return Ok(g.nodes().iter().map(|n| query::node_stats(g, n)).collect());
        }
        Ok(self
            .daemon
            .exports
            .stats()
            .into_iter()
            .filter_map(|(id, node, io)| {
                let node = g.node(&node)?;
                let mut stats = query::node_stats(g, node);
                stats.device = Some(id);
                stats.stats = io;
                Some(stats)
            })
            .collect())
    }

    fn block_resize(&mut self, arg: BlockResizeArg) -> Result<(), QmpError> {
        let g = &mut self.daemon.graph;
        let node = match (&arg.device, &arg.node_name) {
            (_, Some(n)) if g.node(n).is_some() => n.clone(),
            (Some(d), None) => match g.device_node(d) {
                Some(n) => n.to_string(),
                None => return Err(not_found(&arg).into()),
            },
            _ => return Err(not_found(&arg).into()),
        };
        if arg.size < 0 {
            return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
        }
        // The resize takes the node for a moment with the resize
        // permission, so parents that do not allow resizing refuse it.
        let id = g.change(|draft| {
            Ok(draft.add_use(Use {
                id: 0,
                kind: UserKind::Command,
                name: "block_resize".into(),
                node: node.clone(),
                perm: Perm::RESIZE,
                shared: Perm::ALL,
                slot: None,
            }))
        })?;
        let result = match g.node(&node) {
            Some(n) if n.driver.is_read_only() => Err(BlockError::invalid("Image is read-only")),
            Some(n) => n.driver.io().truncate(arg.size as u64),
            None => Err(BlockError::NoSuchNode(node.clone())),
        };
        if let Err(e) = g.change(|draft| {
            draft.remove_use(id);
            Ok(())
        }) {
            log::warn!("dropping block_resize's hold on '{node}': {e}");
        }
        result?;
        g.refresh_lengths();
        log::info!("node '{node}' resized to {} bytes", arg.size);
        // Every export whose node's size changed (the resized node, or one
        // above it) tells its frontend.
        let g = &self.daemon.graph;
        for e in self.daemon.exports.iter() {
            let Some(len) = g.node(&e.node).and_then(|n| n.io.length().ok()) else {
                continue;
            };
            let dev = e.device();
            if dev.capacity.load(std::sync::atomic::Ordering::Relaxed) != len {
                dev.resize(len);
            }
        }
        Ok(())
    }

    fn blockdev_snapshot_internal_sync(
        &mut self,
        arg: BlockdevSnapshotInternal,
    ) -> Result<(), QmpError> {
        let pending =
            crate::block::internal_snapshot::create(&self.daemon.graph, &arg.device, &arg.name)?;
        self.daemon.finish_when_drained(pending)?;
        Ok(())
    }

    fn blockdev_snapshot_delete_internal_sync(
        &mut self,
        arg: BlockdevSnapshotDeleteInternalSyncArg,
    ) -> Result<SnapshotInfo, QmpError> {
        let (info, pending) = crate::block::internal_snapshot::delete(
            &self.daemon.graph,
            &arg.device,
            arg.id.as_deref(),
            arg.name.as_deref(),
        )?;
        self.daemon.finish_when_drained(pending)?;
        Ok(info)
    }

    fn block_export_add(&mut self, arg: BlockExportOptions) -> Result<(), QmpError> {
        let d = &mut *self.daemon;
        d.exports.add(&mut d.graph, &mut d.iothreads, &arg)
    }

    fn block_export_del(&mut self, arg: BlockExportDelArg) -> Result<(), QmpError> {
        let d = &mut *self.daemon;
        let mode = arg.mode.unwrap_or(BlockExportRemoveMode::Safe);
        d.exports.remove(&mut d.graph, &arg.id, mode)?;
        d.events
            .emit(&Event::BlockExportDeleted(BlockExportDeletedData {
                id: arg.id,
            }));
        Ok(())
    }

    fn query_block_exports(&mut self) -> Result<Vec<BlockExportInfo>, QmpError> {
        Ok(self.daemon.exports.info())
    }

    fn object_add(&mut self, arg: ObjectOptions) -> Result<(), QmpError> {
        self.daemon.object_add(&arg)
    }

    fn object_del(&mut self, arg: ObjectDelArg) -> Result<(), QmpError> {
        self.daemon.object_del(&arg.id)
    }

    fn qom_list(&mut self, arg: QomListArg) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
        qom::list(&self.qom_view(), &arg.path)
    }

    fn qom_get(&mut self, arg: QomGetArg) -> Result<Value, QmpError> {
        qom::get(&self.qom_view(), &arg.path, &arg.property)
    }

    fn qom_set(&mut self, arg: QomSetArg) -> Result<(), QmpError> {
        let d = &mut *self.daemon;
        let id = qom::set(
            &mut d.objects,
            &d.chardevs,
            &arg.path,
            &arg.property,
            &arg.value,
        )?;
        d.object_changed(&id)?;
        log::info!("object '{id}': {} set to {}", arg.property, arg.value);
        Ok(())
    }

    fn qom_list_types(&mut self, arg: QomListTypesArg) -> Result<Vec<ObjectTypeInfo>, QmpError> {
        Ok(qom::types::list_types(
            arg.implements.as_deref(),
            arg.r#abstract.unwrap_or(false),
        ))
    }

    fn qom_list_properties(
        &mut self,
        arg: QomListPropertiesArg,
    ) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
        if qom::types::find(&arg.typename).is_none() {
            return Err(QmpError::with_class(
                QapiErrorClass::DeviceNotFound,
                format!("Class '{}' not found", arg.typename),
            ));
        }
        Ok(qom::types::properties(&arg.typename)
            .into_iter()
            .map(|p| qom::types::info(p, true))
            .collect())
    }

    fn query_chardev(&mut self) -> Result<Vec<ChardevInfo>, QmpError> {
        Ok(self
            .daemon
            .chardevs
            .iter()
            .map(|c| ChardevInfo {
                label: c.id.clone(),
                filename: c.filename(),
                frontend_open: c.monitor,
            })
            .collect())
    }
}

fn not_found(arg: &BlockResizeArg) -> BlockError {
    BlockError::NoSuchDeviceOrNode {
        device: arg.device.clone().unwrap_or_default(),
        node: arg.node_name.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated text reads into the schema's types and comes back out
    /// unchanged, so nothing (such as `"default": null`) is lost on the way
    /// to the wire.
    #[test]
    fn introspection_survives_the_typed_round_trip() {
        let schema = qmp_schema().map_err(|e| e.desc);
        let schema = schema.as_deref().unwrap_or_else(|e| panic!("{e}"));
        let text: serde_json::Value = serde_json::from_str(qapi::QMP_SCHEMA_JSON).unwrap();
        let again = qapi::rt::to_value(&schema).unwrap();
        assert_eq!(again, text);
        assert!(schema.iter().any(|e| e.name == "query-qmp-schema"));
    }
}
