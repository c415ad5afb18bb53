//! What the query commands show of the graph, in QEMU's types.

use super::graph::{Graph, Node};
use crate::qapi::{BlockDeviceInfo, BlockDeviceStats, BlockStats, BlockdevCacheInfo, ImageInfo};

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The node's backing node, if it has one.
fn backing_of<'g>(graph: &'g Graph, node: &Node) -> Option<&'g Node> {
    node.children
        .iter()
        .find(|e| e.role == super::driver::ChildRole::Backing)
        .and_then(|e| graph.node(&e.child))
}

/// ImageInfo of a node (what `qemu-img info` would show of it), with the
/// backing chain below it as `backing-image`.
pub fn image_info(graph: &Graph, node: &Node) -> ImageInfo {
    let io = node.driver.io();
    let mut info = ImageInfo {
        filename: node.driver.filename(),
        format: node.driver.name().to_string(),
        virtual_size: io.length().map(to_i64).unwrap_or(0),
        actual_size: io.allocated_size().map(to_i64),
        ..ImageInfo::default()
    };
    node.driver.describe_image(&mut info);
    info.backing_image = backing_of(graph, node).map(|b| Box::new(image_info(graph, b)));
    info
}

/// BlockDeviceInfo of a node (query-named-block-nodes, query-block).
pub fn device_info(graph: &Graph, node: &Node) -> BlockDeviceInfo {
    let mut depth = 0;
    let mut below = backing_of(graph, node);
    while let Some(b) = below {
        depth += 1;
        below = backing_of(graph, b);
    }
    let image = image_info(graph, node);
    BlockDeviceInfo {
        file: node.driver.filename(),
        node_name: Some(node.name.clone()),
        ro: node.flags.read_only,
        drv: node.driver.name().to_string(),
        backing_file_depth: depth,
        encrypted: false,
        encryption_key_missing: false,
        detect_zeroes: node.flags.detect_zeroes,
        backing_file: image.backing_filename.clone(),
        image,
        cache: BlockdevCacheInfo {
            writeback: true,
            direct: node.flags.cache_direct,
            no_flush: node.flags.cache_no_flush,
        },
        write_threshold: to_i64(node.threshold.get()),
        active: true,
        bps: 0,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 0,
        bps_max: None,
        bps_rd_max: None,
        bps_wr_max: None,
        iops_max: None,
        iops_rd_max: None,
        iops_wr_max: None,
        bps_max_length: None,
        bps_rd_max_length: None,
        bps_wr_max_length: None,
        iops_max_length: None,
        iops_rd_max_length: None,
        iops_wr_max_length: None,
        iops_size: None,
        group: None,
    }
}

/// Every named node, the newest first (as QEMU lists them).
pub fn named_nodes(graph: &Graph) -> Vec<BlockDeviceInfo> {
    graph
        .nodes()
        .iter()
        .rev()
        .map(|n| device_info(graph, n))
        .collect()
}

/// Statistics of a node and, below it, of its file child (`parent` in
/// QEMU's naming) and backing child.
pub fn node_stats(graph: &Graph, node: &Node) -> BlockStats {
    let child = |role: super::driver::ChildRole| {
        node.children
            .iter()
            .find(|e| e.role == role)
            .and_then(|e| graph.node(&e.child))
            .map(|c| Box::new(node_stats(graph, c)))
    };
    BlockStats {
        node_name: Some(node.name.clone()),
        stats: BlockDeviceStats::default(),
        parent: child(super::driver::ChildRole::File),
        backing: child(super::driver::ChildRole::Backing),
        driver_specific: node.driver.stats_specific(),
        ..BlockStats::default()
    }
}
