//! The QAPI schema in Rust: the generated types, commands and events, and
//! the runtime they use to read input.

pub mod rt;

#[rustfmt::skip]
pub mod generated;

pub use generated::*;

/// Commands that may run out of band (`exec-oob`).
pub const OOB_COMMANDS: &[&str] = &["query-version", "query-commands"];
