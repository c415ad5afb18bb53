//! Turning a descriptor chain into a checked [`Request`].
//!
//! Layout of a request (virtio 1.2, 5.2.6): a 16-byte device-readable header
//! (`le32 type, le32 reserved, le64 sector`), the data, and a device-writable
//! status byte, which is the last byte of the last descriptor. Descriptor
//! boundaries carry no meaning: the header may be split over descriptors or
//! share one with data, and the status descriptor may start with data.
//!
//! The chain is walked once without touching guest memory; then the status
//! byte is located, the header read, and the request checked. Parsing is a
//! pure function of the chain (with its memory) and the limits.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::config::SECTOR_SIZE;
use super::error::RequestError;
use super::limits::RequestLimits;
use super::request::{DataSegment, DiscardRange, Request, RequestType};

/// Length of the request header.
pub const HEADER_LEN: u32 = 16;
/// Length of one DISCARD / WRITE_ZEROES segment.
pub const RANGE_LEN: u32 = 16;
/// Flag of a WRITE_ZEROES segment allowing deallocation.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

const HEADER_BYTES: usize = HEADER_LEN as usize;

/// What the walk over the chain found besides the data segments.
#[derive(Default)]
struct Walk {
    /// Pieces of the header, each at least one byte long.
    header: [(u64, u32); HEADER_BYTES],
    header_pieces: usize,
    header_len: u32,
    /// A device-writable descriptor came before the header was complete.
    header_writable: bool,
    /// Data segments seen, by direction (including those not stored).
    readable: u64,
    writable: u64,
    longest: u32,
    total: u64,
    /// A data segment whose address wraps around.
    bad_address: Option<(u64, u64)>,
}

impl Request {
    /// Parses `chain` into `self` and checks it against `limits`.
    ///
    /// On error, [`status_addr`](Self::status_addr) tells whether a status
    /// can be reported (it agrees with [`RequestError::has_status`]); the
    /// other fields are unspecified.
    pub fn parse<M>(
        &mut self,
        mut chain: DescriptorChain<M>,
        limits: &RequestLimits,
    ) -> Result<(), RequestError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.clear();
        self.head_index = chain.head_index();
        let mut walk = Walk::default();
        let mut last = None;
        // The iterator stops early (returning None after a descriptor that
        // still has NEXT) on loops, overlong chains, bad indirect tables and
        // unreadable descriptors: such a chain never yields its last one.
        for desc in chain.by_ref() {
            if !desc.has_next() {
                last = Some(desc);
                break;
            }
            self.take_descriptor(&desc, &mut walk, limits);
        }
        let mem = chain.memory();
        let last = last.ok_or(RequestError::ChainTruncated)?;
        let status_addr = locate_status(mem, &last)?;
        self.status_addr = Some(status_addr);
        if last.len() > 1 {
            self.push_data(last.addr(), last.len() - 1, true, &mut walk, limits);
        }
        if walk.header_pieces > 0 {
            self.header_addr = Some(GuestAddress(walk.header[0].0));
        }
        let header = read_header(mem, &walk)?;
        self.check(mem, &header, &walk, limits)
    }

    /// Adds one descriptor before the last to the header and/or the data.
    fn take_descriptor(&mut self, desc: &Descriptor, walk: &mut Walk, limits: &RequestLimits) {
        if walk.header_writable {
            // The header is broken; nothing after it matters.
            return;
        }
        let mut addr = desc.addr();
        let mut len = desc.len();
        if walk.header_len < HEADER_LEN {
            if desc.is_write_only() {
                walk.header_writable = true;
                return;
            }
            let take = len.min(HEADER_LEN - walk.header_len);
            if take > 0 {
                if let Some(piece) = walk.header.get_mut(walk.header_pieces) {
                    *piece = (addr.raw_value(), take);
                    walk.header_pieces += 1;
                    walk.header_len += take;
                }
            }
            len -= take;
            if len == 0 {
                return;
            }
            match addr.checked_add(u64::from(take)) {
                Some(a) => addr = a,
                None => {
                    walk.bad_address = Some((addr.raw_value(), u64::from(len)));
                    return;
                }
            }
        }
        self.push_data(addr, len, desc.is_write_only(), walk, limits);
    }

    /// Records a data segment. Segments past `seg_max` are counted but not
    /// stored (the request is refused anyway), so a long chain cannot make
    /// the vector grow without bound.
    fn push_data(
        &mut self,
        addr: GuestAddress,
        len: u32,
        writable: bool,
        walk: &mut Walk,
        limits: &RequestLimits,
    ) {
        if len == 0 {
            return;
        }
        if writable {
            walk.writable += 1;
        } else {
            walk.readable += 1;
        }
        walk.longest = walk.longest.max(len);
        walk.total += u64::from(len);
        if self.segments.len() < limits.seg_max() as usize {
            self.segments.push(DataSegment { addr, len });
        }
    }

    /// Checks the request once its header is known, in this order: type,
    /// support, read-only, direction, size limits, memory, then the checks
    /// of the type.
    fn check<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        header: &[u8; HEADER_BYTES],
        walk: &Walk,
        limits: &RequestLimits,
    ) -> Result<(), RequestError> {
        let (raw_type, sector) = decode_header(header);
        let request = RequestType::from_raw(raw_type).ok_or(RequestError::Unsupported(raw_type))?;
        self.request_type = request;
        match request {
            RequestType::Flush => {
                // Neither the sector nor any data matter to a flush.
                self.segments.clear();
                return Ok(());
            }
            RequestType::Discard if !limits.discard() => {
                return Err(RequestError::NotOffered(request))
            }
            RequestType::WriteZeroes if !limits.write_zeroes() => {
                return Err(RequestError::NotOffered(request))
            }
            _ => {}
        }
        if request.modifies_disk() && limits.read_only() {
            return Err(RequestError::ReadOnly(request));
        }
        let writable = request.device_writes_data();
        let wrong = if writable {
            walk.readable
        } else {
            walk.writable
        };
        if wrong > 0 {
            return Err(RequestError::WrongDirection {
                request,
                writable: !writable,
            });
        }
        let count = walk.readable + walk.writable;
        if count > u64::from(limits.seg_max()) {
            return Err(RequestError::TooManySegments {
                count,
                max: limits.seg_max(),
            });
        }
        if walk.longest > limits.size_max() {
            return Err(RequestError::SegmentTooLarge {
                len: walk.longest,
                max: limits.size_max(),
            });
        }
        let too_large = RequestError::RequestTooLarge {
            len: walk.total,
            max: limits.max_request_bytes(),
        };
        if walk.total > u64::from(limits.max_request_bytes()) {
            return Err(too_large);
        }
        self.data_len = u32::try_from(walk.total).map_err(|_| too_large)?;
        if let Some((addr, len)) = walk.bad_address {
            return Err(RequestError::BadAddress { addr, len });
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for seg in &self.segments {
            if !mem.check_range(seg.addr, seg.len as usize, access) {
                return Err(RequestError::BadAddress {
                    addr: seg.addr.raw_value(),
                    len: u64::from(seg.len),
                });
            }
        }
        match request {
            RequestType::In | RequestType::Out => {
                check_read_write(sector, self.data_len, limits)?;
                self.sector = sector;
                Ok(())
            }
            RequestType::GetId => {
                if self.data_len < super::config::VIRTIO_BLK_ID_BYTES as u32 {
                    return Err(RequestError::GetIdTooShort(self.data_len));
                }
                Ok(())
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                self.parse_ranges(mem, request, limits)
            }
            RequestType::Flush => Ok(()),
        }
    }

    /// Reads and checks the segments of DISCARD / WRITE_ZEROES. Flag errors
    /// (UNSUPP) of any segment win over range errors (IOERR) of another.
    fn parse_ranges<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        request: RequestType,
        limits: &RequestLimits,
    ) -> Result<(), RequestError> {
        let discard = request == RequestType::Discard;
        let (max_seg, max_sectors) = if discard {
            (limits.max_discard_seg(), limits.max_discard_sectors())
        } else {
            (
                limits.max_write_zeroes_seg(),
                limits.max_write_zeroes_sectors(),
            )
        };
        let len = self.data_len;
        if len == 0 || len % RANGE_LEN != 0 {
            return Err(RequestError::BadSegmentPayload { request, len });
        }
        let count = len / RANGE_LEN;
        if count > max_seg {
            return Err(RequestError::TooManyRanges {
                request,
                count,
                max: max_seg,
            });
        }
        let mut flags_error = None;
        let mut cursor = Cursor::default();
        for _ in 0..count {
            let mut raw = [0u8; RANGE_LEN as usize];
            cursor.read(mem, &self.segments, &mut raw)?;
            let (sector, num_sectors, flags) = decode_range(&raw);
            let unknown = flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags_error.is_none() {
                if unknown != 0 {
                    flags_error = Some(RequestError::UnknownFlags { request, flags });
                } else if discard && unmap {
                    flags_error = Some(RequestError::DiscardUnmap);
                }
            }
            self.ranges.push(DiscardRange {
                sector,
                num_sectors,
                unmap,
            });
        }
        if let Some(err) = flags_error {
            return Err(err);
        }
        let alignment = if discard {
            u64::from(limits.discard_sector_alignment())
        } else {
            1
        };
        for range in &self.ranges {
            check_range(range, request, max_sectors, alignment, limits)?;
        }
        Ok(())
    }
}

/// Where the status byte is: the last byte of the last descriptor, which must
/// be device-writable and inside guest memory.
fn locate_status<M: GuestMemory + ?Sized>(
    mem: &M,
    last: &Descriptor,
) -> Result<GuestAddress, RequestError> {
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::StatusNotWritable);
    }
    let base = last.addr();
    let addr =
        base.checked_add(u64::from(last.len() - 1))
            .ok_or(RequestError::StatusOutOfMemory {
                addr: base.raw_value(),
            })?;
    if !mem.check_range(addr, 1, Permissions::Write) {
        return Err(RequestError::StatusOutOfMemory {
            addr: addr.raw_value(),
        });
    }
    Ok(addr)
}

/// Gathers the 16 header bytes from their pieces.
fn read_header<M: GuestMemory + ?Sized>(
    mem: &M,
    walk: &Walk,
) -> Result<[u8; HEADER_BYTES], RequestError> {
    if walk.header_writable || walk.header_len < HEADER_LEN {
        return Err(if walk.header_writable {
            RequestError::HeaderNotReadable
        } else {
            RequestError::HeaderTooShort(walk.header_len)
        });
    }
    let mut header = [0u8; HEADER_BYTES];
    let mut at = 0usize;
    for &(addr, len) in walk.header.iter().take(walk.header_pieces) {
        let end = at + len as usize;
        let dst = header
            .get_mut(at..end)
            .ok_or(RequestError::HeaderTooShort(walk.header_len))?;
        mem.read_slice(dst, GuestAddress(addr))
            .map_err(|_| RequestError::HeaderOutOfMemory { addr })?;
        at = end;
    }
    Ok(header)
}

fn decode_header(h: &[u8; HEADER_BYTES]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *h;
    (
        u32::from_le_bytes([t0, t1, t2, t3]),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
    )
}

fn decode_range(r: &[u8; RANGE_LEN as usize]) -> (u64, u32, u32) {
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = *r;
    (
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        u32::from_le_bytes([n0, n1, n2, n3]),
        u32::from_le_bytes([f0, f1, f2, f3]),
    )
}

/// IN / OUT: whole logical blocks, inside the disk, no overflow.
fn check_read_write(sector: u64, len: u32, limits: &RequestLimits) -> Result<(), RequestError> {
    let block = limits.logical_block_size();
    if len % block != 0 {
        return Err(RequestError::UnalignedLength { len, block });
    }
    if sector % limits.block_sectors() != 0 {
        return Err(RequestError::UnalignedSector { sector, block });
    }
    let sectors = u64::from(len) / SECTOR_SIZE;
    let capacity = limits.capacity_sectors();
    let out_of_range = RequestError::OutOfRange {
        sector,
        sectors,
        capacity,
    };
    // The byte offset must be representable for the I/O engine.
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(out_of_range.clone())?;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(out_of_range),
    }
}

/// One DISCARD / WRITE_ZEROES segment: not empty, within the per-segment
/// limit, aligned to the logical block (and to `alignment`), inside the disk.
fn check_range(
    range: &DiscardRange,
    request: RequestType,
    max_sectors: u32,
    alignment: u64,
    limits: &RequestLimits,
) -> Result<(), RequestError> {
    let sectors = range.num_sectors;
    if sectors == 0 {
        return Err(RequestError::EmptyRange(request));
    }
    if sectors > max_sectors {
        return Err(RequestError::RangeTooLarge {
            request,
            sectors,
            max: max_sectors,
        });
    }
    for align in [limits.block_sectors(), alignment] {
        if align > 1 && (range.sector % align != 0 || u64::from(sectors) % align != 0) {
            return Err(RequestError::RangeUnaligned {
                request,
                sector: range.sector,
                sectors,
                alignment: u32::try_from(align).unwrap_or(u32::MAX),
            });
        }
    }
    let capacity = limits.capacity_sectors();
    match range.sector.checked_add(u64::from(sectors)) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector: range.sector,
            sectors: u64::from(sectors),
            capacity,
        }),
    }
}

/// Reads a byte stream spread over data segments.
#[derive(Default)]
struct Cursor {
    index: usize,
    offset: u32,
}

impl Cursor {
    fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        segments: &[DataSegment],
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut filled = 0usize;
        while filled < buf.len() {
            let seg = segments.get(self.index).ok_or(RequestError::BadAddress {
                addr: 0,
                len: buf.len() as u64,
            })?;
            let left = seg.len.saturating_sub(self.offset);
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = (left as usize).min(buf.len() - filled);
            let bad = RequestError::BadAddress {
                addr: seg.addr.raw_value(),
                len: u64::from(seg.len),
            };
            let addr = seg
                .addr
                .checked_add(u64::from(self.offset))
                .ok_or(bad.clone())?;
            mem.read_slice(&mut buf[filled..filled + n], addr)
                .map_err(|_| bad)?;
            filled += n;
            // n <= left, which is a u32.
            self.offset += n as u32;
        }
        Ok(())
    }
}
