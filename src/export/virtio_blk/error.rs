//! Why a request was refused, and what the guest is told.

use thiserror::Error;

use super::request::RequestType;
use super::status::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

/// A request vubd will not carry out. Every variant is triggered by what the
/// guest (or the frontend) put in memory, so none of them is a daemon error.
///
/// The first group leaves no place for a status byte
/// ([`has_status`](Self::has_status) is false): the chain goes back with used
/// length 0. The others are answered with [`status`](Self::status).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    // ---- No status byte can be written.
    /// The chain stopped before a descriptor without NEXT: a loop, a chain
    /// longer than the queue, a bad or nested indirect table, a descriptor
    /// outside guest memory, or more than 4 GiB in total.
    #[error("descriptor chain is truncated (loop, bad indirect table or unreadable descriptor)")]
    ChainTruncated,
    /// The last descriptor is device-readable or empty.
    #[error("last descriptor is not a device-writable status byte")]
    StatusNotWritable,
    #[error("status byte at {addr:#x} is outside guest memory")]
    StatusOutOfMemory { addr: u64 },
    /// Writing the status failed at completion (see `write_status`).
    #[error("cannot write status byte at {addr:#x}")]
    StatusWrite { addr: u64 },

    // ---- VIRTIO_BLK_S_UNSUPP.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// DISCARD or WRITE_ZEROES on a device that does not offer it.
    #[error("{0} is not offered by this device")]
    NotOffered(RequestType),
    #[error("discard segment has the unmap flag set")]
    DiscardUnmap,
    #[error("{request} segment has unknown flags {flags:#x}")]
    UnknownFlags { request: RequestType, flags: u32 },

    // ---- VIRTIO_BLK_S_IOERR.
    #[error("request header is {0} bytes, shorter than 16")]
    HeaderTooShort(u32),
    #[error("request header is in a device-writable descriptor")]
    HeaderNotReadable,
    #[error("request header at {addr:#x} is outside guest memory")]
    HeaderOutOfMemory { addr: u64 },
    #[error("{0} request on a read-only device")]
    ReadOnly(RequestType),
    #[error("{request} request has device-{} data", if *.writable { "writable" } else { "readable" })]
    WrongDirection {
        request: RequestType,
        writable: bool,
    },
    #[error("{count} data segments, more than seg_max {max}")]
    TooManySegments { count: u64, max: u32 },
    #[error("data segment of {len} bytes, larger than size_max {max}")]
    SegmentTooLarge { len: u32, max: u32 },
    #[error("request carries {len} bytes of data, more than the limit of {max}")]
    RequestTooLarge { len: u64, max: u32 },
    #[error("data segment {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress { addr: u64, len: u64 },
    #[error("data length {len} is not a multiple of the block size {block}")]
    UnalignedLength { len: u32, block: u32 },
    #[error("sector {sector} is not aligned to the block size {block}")]
    UnalignedSector { sector: u64, block: u32 },
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("GET_ID buffer of {0} bytes, shorter than 20")]
    GetIdTooShort(u32),
    #[error("{request} payload of {len} bytes is not a non-empty array of 16-byte segments")]
    BadSegmentPayload { request: RequestType, len: u32 },
    #[error("{request} has {count} segments, more than {max}")]
    TooManyRanges {
        request: RequestType,
        count: u32,
        max: u32,
    },
    #[error("{request} segment of {sectors} sectors exceeds the limit of {max}")]
    RangeTooLarge {
        request: RequestType,
        sectors: u32,
        max: u32,
    },
    #[error("{request} segment {sector}+{sectors} is not aligned to {alignment} sectors")]
    RangeUnaligned {
        request: RequestType,
        sector: u64,
        sectors: u32,
        alignment: u32,
    },
    #[error("{0} segment covers no sectors")]
    EmptyRange(RequestType),
}

impl RequestError {
    /// Whether the chain has a status byte to report this error in. When it
    /// has not, the chain goes back with used length 0 and no status.
    pub fn has_status(&self) -> bool {
        !matches!(
            self,
            RequestError::ChainTruncated
                | RequestError::StatusNotWritable
                | RequestError::StatusOutOfMemory { .. }
                | RequestError::StatusWrite { .. }
        )
    }

    /// The virtio-blk status that answers this error: UNSUPP for requests
    /// the device does not implement (unknown types and flags, commands not
    /// offered), IOERR for everything else.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_)
            | RequestError::NotOffered(_)
            | RequestError::DiscardUnmap
            | RequestError::UnknownFlags { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }

    /// Whether the refusal is about where the request points (past the
    /// capacity, not aligned to the block size, an empty or oversized
    /// range): such requests count as invalid in the device's statistics,
    /// as QEMU's virtio-blk counts them.
    pub fn is_invalid_range(&self) -> bool {
        matches!(
            self,
            RequestError::OutOfRange { .. }
                | RequestError::UnalignedLength { .. }
                | RequestError::UnalignedSector { .. }
                | RequestError::RangeTooLarge { .. }
                | RequestError::RangeUnaligned { .. }
                | RequestError::EmptyRange(_)
        )
    }

    /// Used length to report for the chain: the status byte, if any.
    pub fn used_len(&self) -> u32 {
        u32::from(self.has_status())
    }

    /// The level to log this error at. All of them come from the guest, so
    /// they are `Debug`: a guest must not be able to flood the daemon's log.
    pub fn log_level(&self) -> log::Level {
        log::Level::Debug
    }

    /// Logs the error at its level.
    pub fn log(&self) {
        log::log!(self.log_level(), "virtio-blk request refused: {self}");
    }
}
