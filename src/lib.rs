//! vubd: a vhost-user-blk storage daemon with a QEMU-compatible block graph
//! and QMP control socket.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod block;
pub mod cli;
pub mod qapi;
