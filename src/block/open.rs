//! Opening nodes from `BlockdevOptions`, inline children included, into a
//! draft graph (see [`Graph::change`]).

use super::driver::blkdebug::BlkdebugDriver;
use super::driver::blkverify::BlkverifyDriver;
use super::driver::file::FileDriver;
use super::driver::null::NullDriver;
use super::driver::qcow2;
use super::driver::raw::RawDriver;
use super::driver::throttle::ThrottleDriver;
use super::driver::{is_built, ChildRole, Driver, NodeFlags};
use super::error::BlockError;
use super::face::{NodeFace, WriteThreshold};
use super::graph::{Edge, Graph, Node};
use super::json_name;
use crate::qapi::{
    BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevOptions, BlockdevOptionsBranch,
    BlockdevRef, BlockdevRefOrNull,
};
use std::sync::Arc;

/// How deep inline children may nest (a guard against absurd input).
const MAX_DEPTH: usize = 16;

/// Opens a top-level node (blockdev-add, --blockdev) and returns its name.
pub fn add_node(graph: &mut Graph, opts: &BlockdevOptions) -> Result<String, BlockError> {
    if opts.node_name.is_none() {
        return Err(BlockError::invalid(
            "'node-name' must be specified for the root node",
        ));
    }
    open_node(graph, opts, None, true, 0)
}

/// Opens a top-level node the daemon makes itself (an overlay without
/// a name given): its name is generated, and it is not the monitor's to
/// delete, as with QEMU.
pub fn add_implicit_node(graph: &mut Graph, opts: &BlockdevOptions) -> Result<String, BlockError> {
    open_node(graph, opts, None, opts.node_name.is_some(), 0)
}

/// The node-level options, with what an inline child inherits from its
/// parent where it does not say otherwise.
fn node_flags(opts: &BlockdevOptions, parent: Option<&NodeFlags>) -> Result<NodeFlags, BlockError> {
    let base = parent.copied().unwrap_or_default();
    let cache = opts.cache.as_ref();
    let flags = NodeFlags {
        read_only: opts.read_only.unwrap_or(base.read_only),
        auto_read_only: opts.auto_read_only.unwrap_or(base.auto_read_only),
        force_share: opts.force_share.unwrap_or(false),
        cache_direct: cache.and_then(|c| c.direct).unwrap_or(base.cache_direct),
        cache_no_flush: cache
            .and_then(|c| c.no_flush)
            .unwrap_or(base.cache_no_flush),
        discard: opts.discard.unwrap_or(base.discard),
        detect_zeroes: opts
            .detect_zeroes
            .unwrap_or(BlockdevDetectZeroesOptions::Off),
    };
    if flags.detect_zeroes == BlockdevDetectZeroesOptions::Unmap
        && flags.discard != BlockdevDiscardOptions::Unmap
    {
        return Err(BlockError::invalid(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    if flags.force_share && !flags.read_only {
        return Err(BlockError::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    Ok(flags)
}

fn open_node(
    graph: &mut Graph,
    opts: &BlockdevOptions,
    parent: Option<&NodeFlags>,
    monitor_owned: bool,
    depth: usize,
) -> Result<String, BlockError> {
    if depth > MAX_DEPTH {
        return Err(BlockError::invalid(
            "Inline block node definitions are nested too deeply",
        ));
    }
    let driver_name = opts.driver();
    if !is_built(driver_name) {
        return Err(BlockError::DriverNotBuilt(driver_name.as_str().to_string()));
    }
    let name = match &opts.node_name {
        Some(n) => {
            graph.check_new_name(n)?;
            n.clone()
        }
        None => graph.generate_node_name(),
    };
    let flags = node_flags(opts, parent)?;
    let mut children = Vec::new();
    let driver: Arc<dyn Driver> = match &opts.u {
        BlockdevOptionsBranch::File(f) => Arc::new(FileDriver::open(f, &flags, false)?),
        BlockdevOptionsBranch::HostDevice(f) => Arc::new(FileDriver::open(f, &flags, true)?),
        BlockdevOptionsBranch::NullCo(n) => Arc::new(NullDriver::open(n, flags.read_only, false)?),
        BlockdevOptionsBranch::NullAio(n) => Arc::new(NullDriver::open(n, flags.read_only, true)?),
        BlockdevOptionsBranch::Raw(r) => {
            let child = open_child(graph, &r.file, &flags, depth)?;
            let child_node = graph
                .node(&child)
                .ok_or_else(|| BlockError::NoSuchNode(child.clone()))?;
            let driver = RawDriver::open(
                child_node.io.clone(),
                child_node.driver.name(),
                child_node.driver.filename(),
                r.offset,
                r.size,
                flags.read_only,
            )?;
            children.push(Edge {
                role: ChildRole::File,
                child,
            });
            Arc::new(driver)
        }
        BlockdevOptionsBranch::Qcow2(q) => {
            let child = open_child(graph, &q.file, &flags, depth)?;
            let file_node = graph
                .node(&child)
                .ok_or_else(|| BlockError::NoSuchNode(child.clone()))?;
            let file_io = file_node.io.clone();
            let file_filename = file_node.driver.filename();
            let header = qcow2::read_header(&file_io)?;
            children.push(Edge {
                role: ChildRole::File,
                child,
            });
            let backing = match q.backing.as_deref() {
                // null, or an empty reference: no backing node, whatever
                // the image says.
                Some(BlockdevRefOrNull::Null(())) => None,
                Some(BlockdevRefOrNull::Reference(r)) if r.is_empty() => None,
                Some(BlockdevRefOrNull::Reference(r)) => Some(open_child(
                    graph,
                    &BlockdevRef::Reference(r.clone()),
                    &backing_flags(&flags),
                    depth,
                )?),
                Some(BlockdevRefOrNull::Definition(o)) => Some(open_child(
                    graph,
                    &BlockdevRef::Definition(o.clone()),
                    &backing_flags(&flags),
                    depth,
                )?),
                None => match qcow2::BackingInfo::from_header(&header) {
                    None => None,
                    Some(b) => Some(open_backing_from_header(
                        graph,
                        &b,
                        &file_filename,
                        &flags,
                        depth,
                    )?),
                },
            };
            let backing_io = match &backing {
                Some(b) => {
                    let node = graph
                        .node(b)
                        .ok_or_else(|| BlockError::NoSuchNode(b.clone()))?;
                    children.push(Edge {
                        role: ChildRole::Backing,
                        child: b.clone(),
                    });
                    Some((node.io.clone(), node.driver.filename()))
                }
                None => None,
            };
            Arc::new(qcow2::Qcow2Driver::open(
                &name,
                file_io,
                file_filename,
                header,
                backing_io,
                qcow2::OpenOptions {
                    cache: qcow2::CacheOptions {
                        cache_size: q.cache_size,
                        l2_cache_size: q.l2_cache_size,
                        refcount_cache_size: q.refcount_cache_size,
                        cache_clean_interval: q.cache_clean_interval,
                        lazy_refcounts: q.lazy_refcounts,
                    },
                    read_only: flags.read_only,
                    discard: qcow2::Discard {
                        unmap: flags.discard == BlockdevDiscardOptions::Unmap,
                        pass_request: q.pass_discard_request,
                        pass_snapshot: q.pass_discard_snapshot,
                    },
                    overlap_checks: qcow2::guard::checks_from(q.overlap_check.as_ref()),
                    notices: graph.notices(),
                },
            )?)
        }
        BlockdevOptionsBranch::Blkdebug(b) => {
            let child = open_child(graph, &b.image, &flags, depth)?;
            let child_node = graph
                .node(&child)
                .ok_or_else(|| BlockError::NoSuchNode(child.clone()))?;
            let child_json =
                json_name::child(child_node.driver.name(), &child_node.driver.filename());
            let driver =
                BlkdebugDriver::open(b, child_node.io.clone(), child_json, flags.read_only)?;
            children.push(Edge {
                role: ChildRole::File,
                child,
            });
            Arc::new(driver)
        }
        BlockdevOptionsBranch::Blkverify(v) => {
            let test = open_child(graph, &v.test, &flags, depth)?;
            let raw = open_child(graph, &v.raw, &flags, depth)?;
            let node = |n: &String| {
                graph
                    .node(n)
                    .map(|c| (c.io.clone(), c.driver.filename()))
                    .ok_or_else(|| BlockError::NoSuchNode(n.clone()))
            };
            let (test_io, test_name) = node(&test)?;
            let (raw_io, raw_name) = node(&raw)?;
            let driver = BlkverifyDriver::open(
                &name,
                test_io,
                &test_name,
                raw_io,
                &raw_name,
                flags.read_only,
            );
            children.push(Edge {
                role: ChildRole::File,
                child: raw,
            });
            children.push(Edge {
                role: ChildRole::Test,
                child: test,
            });
            Arc::new(driver)
        }
        BlockdevOptionsBranch::Throttle(t) => {
            let group = graph
                .throttle_groups
                .get(&t.throttle_group)
                .cloned()
                .ok_or_else(|| {
                    BlockError::invalid(format!(
                        "Throttle group '{}' does not exist",
                        t.throttle_group
                    ))
                })?;
            let child = open_child(graph, &t.file, &flags, depth)?;
            let child_node = graph
                .node(&child)
                .ok_or_else(|| BlockError::NoSuchNode(child.clone()))?;
            let filename = format!(
                "json:{{\"throttle-group\": {}, \"driver\": \"throttle\", \"file\": {}}}",
                serde_json::Value::from(t.throttle_group.as_str()),
                json_name::spaced(&json_name::child(
                    child_node.driver.name(),
                    &child_node.driver.filename()
                ))
            );
            let driver =
                ThrottleDriver::open(child_node.io.clone(), filename, group, flags.read_only);
            children.push(Edge {
                role: ChildRole::File,
                child,
            });
            Arc::new(driver)
        }
        _ => return Err(BlockError::DriverNotBuilt(driver_name.as_str().to_string())),
    };
    let flags = NodeFlags {
        read_only: driver.is_read_only(),
        ..flags
    };
    log::info!("opened node '{name}' ({})", driver.name());
    let zeroes = match flags.detect_zeroes {
        BlockdevDetectZeroesOptions::Off => None,
        mode => Some(mode == BlockdevDetectZeroesOptions::Unmap),
    };
    let threshold = WriteThreshold::new(&name, graph.notices());
    let io: crate::block::drain::Root = Arc::new(NodeFace::new(
        driver.io(),
        zeroes,
        flags.discard == BlockdevDiscardOptions::Unmap,
        threshold.clone(),
    ));
    graph.insert(Node {
        name: name.clone(),
        monitor_owned,
        io,
        driver,
        flags,
        children,
        threshold,
    });
    Ok(name)
}

/// A child given by name must exist; one given inline is opened here.
fn open_child(
    graph: &mut Graph,
    r: &BlockdevRef,
    parent: &NodeFlags,
    depth: usize,
) -> Result<String, BlockError> {
    match r {
        BlockdevRef::Reference(name) => match graph.node(name) {
            Some(_) => Ok(name.clone()),
            None => Err(BlockError::NoSuchDeviceOrNode {
                device: name.clone(),
                node: name.clone(),
            }),
        },
        BlockdevRef::Definition(opts) => open_node(graph, opts, Some(parent), false, depth + 1),
    }
}

/// What a backing node inherits: read-only, and the parent's cache mode.
fn backing_flags(parent: &NodeFlags) -> NodeFlags {
    NodeFlags {
        read_only: true,
        auto_read_only: false,
        force_share: false,
        detect_zeroes: BlockdevDetectZeroesOptions::Off,
        ..*parent
    }
}

/// Opens the backing file an image's header names: its path taken
/// relative to the image's directory, its format as recorded or, when
/// none is, as its contents say (a file without a known signature is
/// raw).
fn open_backing_from_header(
    graph: &mut Graph,
    b: &qcow2::BackingInfo,
    image_filename: &str,
    parent: &NodeFlags,
    depth: usize,
) -> Result<String, BlockError> {
    let path = if b.name.starts_with('/') || b.name.contains("://") {
        b.name.clone()
    } else {
        match std::path::Path::new(image_filename).parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(&b.name).display().to_string(),
            _ => b.name.clone(),
        }
    };
    let format = match &b.format {
        Some(f) => f.clone(),
        None => match super::probe::probe_path(std::path::Path::new(&path)) {
            Ok(Some(d)) => d.as_str().to_string(),
            Ok(None) => "raw".to_string(),
            Err(e) => {
                return Err(BlockError::Open {
                    path: path.clone(),
                    reason: super::error::strerror(&e),
                })
            }
        },
    };
    let v = serde_json::json!({
        "driver": format,
        "file": {"driver": "file", "filename": path},
    });
    let opts: BlockdevOptions = crate::qapi::rt::read(&v, crate::qapi::rt::Syntax::Json)
        .map_err(|e| BlockError::invalid(format!("backing file '{}': {e}", b.name)))?;
    let _ = depth;
    let links = CHAIN.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let result = if links > MAX_CHAIN {
        Err(BlockError::invalid(format!(
            "Backing chain of '{image_filename}' is longer than {MAX_CHAIN} images (or loops)"
        )))
    } else {
        // The backing node's own options are ours, not nested input: its
        // nesting count starts over, its place in the chain does not.
        open_node(graph, &opts, Some(&backing_flags(parent)), false, 0)
    };
    CHAIN.with(|c| c.set(c.get() - 1));
    result
}

/// The longest backing chain opened from image headers.
const MAX_CHAIN: usize = 100;

thread_local! {
    /// Backing files being opened from headers, one inside the other.
    static CHAIN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
