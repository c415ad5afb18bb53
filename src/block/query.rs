//! What the query commands show of the graph, in QEMU's types.

use super::graph::{Graph, Node};
use crate::qapi::{BlockDeviceInfo, BlockDeviceStats, BlockStats, BlockdevCacheInfo, ImageInfo};

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// ImageInfo of a node (what `qemu-img info` would show of it).
pub fn image_info(node: &Node) -> ImageInfo {
    let io = node.driver.io();
    let mut info = ImageInfo {
        filename: node.driver.filename(),
        format: node.driver.name().to_string(),
        virtual_size: io.length().map(to_i64).unwrap_or(0),
        actual_size: io.allocated_size().map(to_i64),
        ..ImageInfo::default()
    };
    node.driver.describe_image(&mut info);
    info
}

/// BlockDeviceInfo of a node (query-named-block-nodes, query-block).
pub fn device_info(node: &Node) -> BlockDeviceInfo {
    BlockDeviceInfo {
        file: node.driver.filename(),
        node_name: Some(node.name.clone()),
        ro: node.flags.read_only,
        drv: node.driver.name().to_string(),
        backing_file_depth: 0,
        encrypted: false,
        encryption_key_missing: false,
        detect_zeroes: node.flags.detect_zeroes,
        image: image_info(node),
        cache: BlockdevCacheInfo {
            writeback: true,
            direct: node.flags.cache_direct,
            no_flush: node.flags.cache_no_flush,
        },
        write_threshold: to_i64(node.write_threshold),
        active: true,
        backing_file: None,
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
    graph.nodes().iter().rev().map(device_info).collect()
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
