//! A parsed virtio-blk request and what the I/O engine does with it: host
//! iovecs for its data, the GET_ID answer, the used length.
//!
//! Parsing itself is in `parse.rs`.

use std::fmt;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::config::{SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};
use super::error::RequestError;
use super::status::VIRTIO_BLK_S_OK;

/// The request types vubd implements (virtio 1.2, 5.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestType {
    /// Read (`VIRTIO_BLK_T_IN`, 0).
    In,
    /// Write (`VIRTIO_BLK_T_OUT`, 1).
    Out,
    /// Flush the write cache (`VIRTIO_BLK_T_FLUSH`, 4).
    Flush,
    /// Device ID string (`VIRTIO_BLK_T_GET_ID`, 8).
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`, 11.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`, 13.
    WriteZeroes,
}

impl RequestType {
    pub const VIRTIO_BLK_T_IN: u32 = 0;
    pub const VIRTIO_BLK_T_OUT: u32 = 1;
    pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
    pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
    pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
    pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

    /// The type with wire value `raw`, if vubd implements it.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            Self::VIRTIO_BLK_T_IN => RequestType::In,
            Self::VIRTIO_BLK_T_OUT => RequestType::Out,
            Self::VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            Self::VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            Self::VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            Self::VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn raw(self) -> u32 {
        match self {
            RequestType::In => Self::VIRTIO_BLK_T_IN,
            RequestType::Out => Self::VIRTIO_BLK_T_OUT,
            RequestType::Flush => Self::VIRTIO_BLK_T_FLUSH,
            RequestType::GetId => Self::VIRTIO_BLK_T_GET_ID,
            RequestType::Discard => Self::VIRTIO_BLK_T_DISCARD,
            RequestType::WriteZeroes => Self::VIRTIO_BLK_T_WRITE_ZEROES,
        }
    }

    /// Whether the device writes the data buffers (IN, GET_ID); the data of
    /// the other types is read by the device.
    pub fn device_writes_data(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }

    /// Whether the request changes the disk (refused on a read-only device).
    pub fn modifies_disk(self) -> bool {
        matches!(
            self,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    }
}

impl fmt::Display for RequestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestType::In => "IN",
            RequestType::Out => "OUT",
            RequestType::Flush => "FLUSH",
            RequestType::GetId => "GET_ID",
            RequestType::Discard => "DISCARD",
            RequestType::WriteZeroes => "WRITE_ZEROES",
        })
    }
}

/// One piece of a request's data buffer, in guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSegment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One segment of a DISCARD or WRITE_ZEROES request, checked against the
/// device's limits and capacity; `num_sectors` is never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRange {
    pub sector: u64,
    pub num_sectors: u32,
    /// WRITE_ZEROES only: the device may deallocate the range.
    pub unmap: bool,
}

impl DiscardRange {
    /// Byte offset of the range on the disk (cannot overflow: the range was
    /// checked against the capacity).
    pub fn offset(&self) -> u64 {
        self.sector.saturating_mul(SECTOR_SIZE)
    }

    /// Length of the range in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.num_sectors) * SECTOR_SIZE
    }
}

/// A request taken from a descriptor chain. Meant to be kept and reused:
/// [`parse`](Self::parse) clears it and refills its vectors, which allocate
/// only while they grow.
#[derive(Debug, Clone)]
pub struct Request {
    pub(super) request_type: RequestType,
    pub(super) sector: u64,
    pub(super) segments: Vec<DataSegment>,
    pub(super) data_len: u32,
    pub(super) ranges: Vec<DiscardRange>,
    pub(super) status_addr: Option<GuestAddress>,
    pub(super) header_addr: Option<GuestAddress>,
    pub(super) head_index: u16,
}

impl Default for Request {
    fn default() -> Self {
        Request::new()
    }
}

impl Request {
    /// An empty request; its vectors grow on first use.
    pub fn new() -> Self {
        Request::with_capacity(0, 0)
    }

    /// An empty request with room for `segments` data segments and `ranges`
    /// discard/write-zeroes segments.
    pub fn with_capacity(segments: usize, ranges: usize) -> Self {
        Request {
            request_type: RequestType::Flush,
            sector: 0,
            segments: Vec::with_capacity(segments),
            data_len: 0,
            ranges: Vec::with_capacity(ranges),
            status_addr: None,
            header_addr: None,
            head_index: 0,
        }
    }

    /// Forgets the last request, keeping the vectors' capacity.
    pub fn clear(&mut self) {
        self.request_type = RequestType::Flush;
        self.sector = 0;
        self.segments.clear();
        self.data_len = 0;
        self.ranges.clear();
        self.status_addr = None;
        self.header_addr = None;
        self.head_index = 0;
    }

    pub fn request_type(&self) -> RequestType {
        self.request_type
    }

    /// First sector of IN/OUT; 0 for the other types (their header sector is
    /// ignored).
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Byte offset of IN/OUT on the disk (checked not to overflow).
    pub fn offset(&self) -> u64 {
        self.sector.saturating_mul(SECTOR_SIZE)
    }

    /// The data buffer: what IN reads into, OUT writes from, GET_ID fills,
    /// and where DISCARD/WRITE_ZEROES segments came from. Empty for FLUSH.
    pub fn data(&self) -> &[DataSegment] {
        &self.segments
    }

    /// Total length of [`data`](Self::data).
    pub fn data_len(&self) -> u32 {
        self.data_len
    }

    /// DISCARD / WRITE_ZEROES segments; empty for other types.
    pub fn ranges(&self) -> &[DiscardRange] {
        &self.ranges
    }

    /// Where the status byte goes. Set by [`parse`](Self::parse) as soon as
    /// the chain has a usable status byte, even when it then refuses the
    /// request; `None` when the chain has none.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        self.status_addr
    }

    /// Where the header starts (its first piece), once the chain had one.
    pub fn header_addr(&self) -> Option<GuestAddress> {
        self.header_addr
    }

    /// Head descriptor index of the chain, for the used ring.
    pub fn head_index(&self) -> u16 {
        self.head_index
    }

    /// Bytes the device wrote into the chain when it completes with
    /// `status`: the data for a successful IN, the ID for a successful
    /// GET_ID, plus the status byte. On failure only the status byte counts.
    pub fn used_len(&self, status: u8) -> u32 {
        let data = if status == VIRTIO_BLK_S_OK {
            match self.request_type {
                RequestType::In => self.data_len,
                RequestType::GetId => self.data_len.min(VIRTIO_BLK_ID_BYTES as u32),
                _ => 0,
            }
        } else {
            0
        };
        data.saturating_add(1)
    }

    /// Host iovecs covering the data buffer, for preadv/pwritev or io_uring.
    ///
    /// `out` is cleared first. A segment spanning several memory regions
    /// gives several iovecs; iovecs adjacent in host memory are merged. Each
    /// byte is checked to lie in memory the frontend shared, so a failure is
    /// [`RequestError::BadAddress`] (answer IOERR).
    ///
    /// The pointers stay valid as long as `mem`'s regions stay mapped: keep
    /// the memory guard the chain came with until the I/O completes. Writes
    /// through them are not recorded in a dirty bitmap.
    pub fn host_iovecs<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        out: &mut Vec<libc::iovec>,
    ) -> Result<(), RequestError> {
        out.clear();
        let writing = self.request_type.device_writes_data();
        let access = if writing {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for seg in &self.segments {
            let bad = RequestError::BadAddress {
                addr: seg.addr.raw_value(),
                len: u64::from(seg.len),
            };
            let len = usize::try_from(seg.len).map_err(|_| bad.clone())?;
            let slices = mem
                .get_slices(seg.addr, len, access)
                .map_err(|_| bad.clone())?;
            let mut covered = 0usize;
            for slice in slices {
                let slice = slice.map_err(|_| bad.clone())?;
                let base = if writing {
                    slice.ptr_guard_mut().as_ptr()
                } else {
                    slice.ptr_guard().as_ptr().cast_mut()
                };
                push_iovec(out, base, slice.len());
                covered = covered.checked_add(slice.len()).ok_or(bad.clone())?;
            }
            if covered != len {
                return Err(bad);
            }
        }
        Ok(())
    }

    /// Answers GET_ID: writes `id` (the serial, NUL padded, see
    /// `DeviceOptions::device_id`) at the start of the data buffer and
    /// returns the number of bytes written (20 once the request parsed).
    pub fn write_device_id<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        id: &[u8; VIRTIO_BLK_ID_BYTES],
    ) -> Result<u32, RequestError> {
        let mut done = 0usize;
        for seg in &self.segments {
            let Some(rest) = id.get(done..) else { break };
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(seg.len as usize);
            mem.write_slice(&rest[..n], seg.addr)
                .map_err(|_| RequestError::BadAddress {
                    addr: seg.addr.raw_value(),
                    len: n as u64,
                })?;
            done += n;
        }
        // done <= 20.
        Ok(done as u32)
    }
}

/// Appends an iovec, merging it into the previous one when they touch.
fn push_iovec(out: &mut Vec<libc::iovec>, base: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    if let Some(prev) = out.last_mut() {
        let prev_end = (prev.iov_base as usize).checked_add(prev.iov_len);
        if prev_end == Some(base as usize) {
            if let Some(merged) = prev.iov_len.checked_add(len) {
                prev.iov_len = merged;
                return;
            }
        }
    }
    out.push(libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    });
}
