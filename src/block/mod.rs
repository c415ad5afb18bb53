//! The block graph: nodes, their drivers, and the permissions on edges.

pub mod file_lock;
pub mod perm;
