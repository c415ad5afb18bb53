//! vubd: a vhost-user-blk storage daemon with a QEMU-compatible block graph
//! and QMP control socket.

#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod block;
pub mod cli;
pub mod daemon;
pub mod error;
pub mod export;
pub mod io;
pub mod iothread;
pub mod qapi;
pub mod qmp;
pub mod qom;
