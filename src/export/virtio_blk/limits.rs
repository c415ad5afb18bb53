//! The per-device values request checking needs, in a small `Copy` struct an
//! I/O thread can own.

use super::config::{DeviceOptions, SECTOR_SIZE};

/// What a request is checked against. Built from [`DeviceOptions`]; the
/// capacity is updated on resize with
/// [`set_capacity_bytes`](Self::set_capacity_bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    capacity_sectors: u64,
    logical_block_size: u32,
    seg_max: u32,
    size_max: u32,
    max_request_bytes: u32,
    read_only: bool,
    discard: bool,
    write_zeroes: bool,
    max_discard_sectors: u32,
    max_discard_seg: u32,
    discard_sector_alignment: u32,
    max_write_zeroes_sectors: u32,
    max_write_zeroes_seg: u32,
}

impl RequestLimits {
    /// Default cap on the data of one request.
    pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 64 * 1024 * 1024;

    /// Limits for a device with `opts`. A logical block size that is not a
    /// power of two of at least 512 is treated as 512 (options should have
    /// been validated), and a zero discard alignment as 1.
    pub fn new(opts: &DeviceOptions) -> Self {
        let lbs = opts.logical_block_size;
        let logical_block_size = if lbs.is_power_of_two() && lbs >= 512 {
            lbs
        } else {
            512
        };
        RequestLimits {
            capacity_sectors: opts.capacity_bytes / SECTOR_SIZE,
            logical_block_size,
            seg_max: opts.seg_max,
            size_max: opts.size_max,
            max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
            read_only: opts.read_only,
            discard: opts.discard,
            write_zeroes: opts.write_zeroes,
            max_discard_sectors: opts.max_discard_sectors,
            max_discard_seg: opts.max_discard_seg,
            discard_sector_alignment: opts.discard_sector_alignment.max(1),
            max_write_zeroes_sectors: opts.max_write_zeroes_sectors,
            max_write_zeroes_seg: opts.max_write_zeroes_seg,
        }
    }

    /// The same limits with another cap on the data of one request.
    pub fn with_max_request_bytes(mut self, max: u32) -> Self {
        self.max_request_bytes = max;
        self
    }

    /// Follows a resize (the guest sees whole sectors only).
    pub fn set_capacity_bytes(&mut self, bytes: u64) {
        self.capacity_sectors = bytes / SECTOR_SIZE;
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Sectors per logical block (a power of two, at least 1).
    pub(super) fn block_sectors(&self) -> u64 {
        u64::from(self.logical_block_size) / SECTOR_SIZE
    }

    pub fn seg_max(&self) -> u32 {
        self.seg_max
    }

    pub fn size_max(&self) -> u32 {
        self.size_max
    }

    pub fn max_request_bytes(&self) -> u32 {
        self.max_request_bytes
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn discard(&self) -> bool {
        self.discard
    }

    pub fn write_zeroes(&self) -> bool {
        self.write_zeroes
    }

    pub fn max_discard_sectors(&self) -> u32 {
        self.max_discard_sectors
    }

    pub fn max_discard_seg(&self) -> u32 {
        self.max_discard_seg
    }

    pub fn discard_sector_alignment(&self) -> u32 {
        self.discard_sector_alignment
    }

    pub fn max_write_zeroes_sectors(&self) -> u32 {
        self.max_write_zeroes_sectors
    }

    pub fn max_write_zeroes_seg(&self) -> u32 {
        self.max_write_zeroes_seg
    }
}

impl From<&DeviceOptions> for RequestLimits {
    fn from(opts: &DeviceOptions) -> Self {
        RequestLimits::new(opts)
    }
}
