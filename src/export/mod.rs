//! Exports: how block nodes reach clients. The virtio-blk request layer is
//! independent of the transport, so other transports can reuse it.

pub mod cache_hint;
pub mod manager;
pub mod throttle;
pub mod vhost_user;
pub mod virtio_blk;
