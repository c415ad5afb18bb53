//! The QMP monitor: sockets, sessions, the protocol's framing and checks,
//! events, and the block-core commands.

pub mod commands;
pub mod events;
pub mod framing;
pub mod json;
pub mod oob;
pub mod server;
pub mod session;
pub mod writer;
