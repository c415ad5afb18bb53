//! I/O throttling with QEMU's semantics: leaky buckets per limit
//! ([`state`]), the limits and their validation ([`config`]). Groups,
//! the filter driver and `block_set_io_throttle` build on these.

pub mod config;
pub mod group;
pub mod limits;
pub mod shared;
pub mod state;

pub use config::{Bucket, Config, ConfigError, Direction, Limit};
pub use group::{Group, MemberId, Step};
pub use state::State;
