//! The QAPI schema in Rust: the generated types, commands and events, and
//! the runtime they use to read input.

pub mod rt;

#[rustfmt::skip]
pub mod generated;

pub use generated::*;
