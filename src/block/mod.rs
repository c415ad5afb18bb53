//! The block graph: nodes, their drivers, the permissions on edges, and
//! the way changes reach the data plane.

pub mod backend;
pub mod backing_file;
pub mod detect_zeroes;
pub mod drain;
pub mod driver;
pub mod edge;
pub mod error;
pub mod face;
pub mod file_lock;
pub mod graph;
#[cfg(test)]
mod graph_tests;
pub mod internal_snapshot;
pub mod io;
pub mod json_name;
pub mod notice;
pub mod open;
pub mod perm;
pub mod probe;
pub mod qcow2;
pub mod query;
pub mod snapshot;
pub mod stats;
pub mod sync_io;
pub mod throttle;
pub mod timed_stats;
