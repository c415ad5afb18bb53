//! virtio-blk: the device's features and config space, and parsing and
//! checking requests taken from a virtqueue.
//!
//! Independent of the transport: vhost-user (or anything else) hands over a
//! [`virtio_queue::DescriptorChain`], and gets back a checked [`Request`]
//! or a [`RequestError`] that says which status to answer.
//!
//! Typical use on an I/O thread:
//!
//! ```ignore
//! let head = chain.head_index();
//! match req.parse(chain, &limits) {
//!     Ok(()) => { /* req.host_iovecs(mem, &mut iov)?, submit, then
//!                   write_status(mem, addr, status); used = req.used_len(status) */ }
//!     Err(e) => {
//!         e.log();
//!         let used = match req.status_addr() {
//!             Some(addr) if write_status(mem, addr, e.status()).is_ok() => e.used_len(),
//!             _ => 0,
//!         };
//!         // add_used(head, used)
//!     }
//! }
//! ```
//!
//! Facts come from the virtio 1.2 specification, section 5.2.

mod config;
mod error;
mod features;
mod limits;
mod parse;
mod request;
mod status;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_chain;
#[cfg(test)]
mod tests_ranges;

pub use config::{
    offsets, ConfigError, ConfigSpace, DeviceOptions, CONFIG_SPACE_SIZE, MAX_CONFIG_WINDOW,
    SECTOR_SIZE, VIRTIO_BLK_ID_BYTES,
};
pub use error::RequestError;
pub use features::{
    device_features, feature_bit, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
pub use limits::RequestLimits;
pub use parse::{HEADER_LEN, RANGE_LEN, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP};
pub use request::{DataSegment, DiscardRange, Request, RequestType};
pub use status::{
    prefetch_status, write_status, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
