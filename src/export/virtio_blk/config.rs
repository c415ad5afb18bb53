//! The device's options and its configuration space (`struct
//! virtio_blk_config`, virtio 1.2, 5.2.4).
//!
//! vubd renders the fields up to and including `write_zeroes_may_unmap` and
//! its padding: 60 bytes. The later fields (secure erase, zoned) belong to
//! features vubd does not offer. Every field is little-endian.

use thiserror::Error;

/// Size of the 512-byte sectors the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID string answered to `VIRTIO_BLK_T_GET_ID`.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Bytes of configuration space vubd renders.
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Largest window [`ConfigSpace::read`] answers; vhost-user's own limit on a
/// GET_CONFIG payload (`VHOST_USER_CONFIG_SIZE`).
pub const MAX_CONFIG_WINDOW: u32 = 0x1000;

/// Byte offsets of the fields of `struct virtio_blk_config`.
pub mod offsets {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const GEOMETRY_CYLINDERS: usize = 16;
    pub const GEOMETRY_HEADS: usize = 18;
    pub const GEOMETRY_SECTORS: usize = 19;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const ALIGNMENT_OFFSET: usize = 25;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const UNUSED0: usize = 33;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    pub const UNUSED1: usize = 57;
}

/// What the export decided about the device. Sizes are in bytes unless the
/// name says sectors (512 bytes); the `*_discard_*` and `*_write_zeroes_*`
/// limits are the configuration-space values, in sectors and segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Size of the disk; the guest sees it rounded down to whole sectors.
    pub capacity_bytes: u64,
    /// Power of two in 512..=65536.
    pub logical_block_size: u32,
    /// Power of two, at least the logical block size.
    pub physical_block_size: u32,
    /// Suggested smallest I/O, in bytes (reported in logical blocks).
    pub min_io_size: u32,
    /// Suggested optimal I/O, in bytes (reported in logical blocks; 0: none).
    pub opt_io_size: u32,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Largest number of data segments in one request.
    pub seg_max: u32,
    /// Largest data segment, in bytes.
    pub size_max: u32,
    pub read_only: bool,
    /// Initial cache mode: writeback (true) or writethrough.
    pub writeback: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    /// Answered to GET_ID: at most 20 bytes are used, NUL padded.
    pub serial: String,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            capacity_bytes: 0,
            logical_block_size: 512,
            physical_block_size: 512,
            min_io_size: 512,
            opt_io_size: 0,
            num_queues: 1,
            queue_size: 256,
            // A descriptor each for the header and the status.
            seg_max: 254,
            size_max: 64 * 1024,
            read_only: false,
            writeback: true,
            discard: false,
            write_zeroes: false,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 1,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 1,
            serial: String::new(),
        }
    }
}

/// A set of [`DeviceOptions`] that cannot describe a working device.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("parameter logical-block-size must be a power of 2 between 512 and 65536, not {0}")]
    LogicalBlockSize(u32),
    #[error("physical block size {physical} is not a power of two of at least the logical block size {logical}")]
    PhysicalBlockSize { physical: u32, logical: u32 },
    #[error("num-queues must be greater than 0")]
    NoQueues,
    #[error("parameter queue-size must be a power of 2 between 4 and 32768, not {0}")]
    QueueSize(u16),
    #[error("seg_max {seg_max} must be between 1 and the queue size minus 2 ({limit})")]
    SegMax { seg_max: u32, limit: u32 },
    #[error("size_max {size_max} is smaller than the logical block size {logical}")]
    SizeMax { size_max: u32, logical: u32 },
    #[error("{0} must not be 0 when the command is offered")]
    ZeroLimit(&'static str),
    #[error("discard sector alignment {alignment} is not a multiple of the logical block ({sectors} sectors)")]
    DiscardAlignment { alignment: u32, sectors: u32 },
}

impl DeviceOptions {
    /// Checks the options describe a device a driver can use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=65536).contains(&lbs) {
            return Err(ConfigError::LogicalBlockSize(lbs));
        }
        let pbs = self.physical_block_size;
        if !pbs.is_power_of_two() || pbs < lbs {
            return Err(ConfigError::PhysicalBlockSize {
                physical: pbs,
                logical: lbs,
            });
        }
        if self.num_queues == 0 {
            return Err(ConfigError::NoQueues);
        }
        let qs = self.queue_size;
        if !qs.is_power_of_two() || !(4..=32768).contains(&qs) {
            return Err(ConfigError::QueueSize(qs));
        }
        let seg_limit = u32::from(qs) - 2;
        if self.seg_max == 0 || self.seg_max > seg_limit {
            return Err(ConfigError::SegMax {
                seg_max: self.seg_max,
                limit: seg_limit,
            });
        }
        if self.size_max < lbs {
            return Err(ConfigError::SizeMax {
                size_max: self.size_max,
                logical: lbs,
            });
        }
        if self.discard {
            nonzero(self.max_discard_sectors, "max_discard_sectors")?;
            nonzero(self.max_discard_seg, "max_discard_seg")?;
            nonzero(self.discard_sector_alignment, "discard_sector_alignment")?;
            let sectors = lbs / 512;
            if self.discard_sector_alignment % sectors != 0 {
                return Err(ConfigError::DiscardAlignment {
                    alignment: self.discard_sector_alignment,
                    sectors,
                });
            }
        }
        if self.write_zeroes {
            nonzero(self.max_write_zeroes_sectors, "max_write_zeroes_sectors")?;
            nonzero(self.max_write_zeroes_seg, "max_write_zeroes_seg")?;
        }
        Ok(())
    }

    /// The GET_ID answer: the serial's first 20 bytes, NUL padded.
    pub fn device_id(&self) -> [u8; VIRTIO_BLK_ID_BYTES] {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let src = self.serial.as_bytes();
        let n = src.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&src[..n]);
        id
    }
}

fn nonzero(value: u32, name: &'static str) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::ZeroLimit(name))
    } else {
        Ok(())
    }
}

/// The rendered configuration space, as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
}

impl ConfigSpace {
    /// Renders the configuration space for `opts` (assumed validated; odd
    /// values are clamped rather than refused).
    pub fn new(opts: &DeviceOptions) -> Self {
        let mut space = ConfigSpace {
            bytes: [0u8; CONFIG_SPACE_SIZE],
        };
        space.set_capacity(opts.capacity_bytes);
        space.put_u32(offsets::SIZE_MAX, opts.size_max);
        space.put_u32(offsets::SEG_MAX, opts.seg_max);
        // Geometry stays zero: VIRTIO_BLK_F_GEOMETRY is not offered.
        let lbs = opts.logical_block_size.max(1);
        space.put_u32(offsets::BLK_SIZE, lbs);
        let exp = if opts.physical_block_size > lbs {
            (opts.physical_block_size / lbs).ilog2()
        } else {
            0
        };
        space.bytes[offsets::PHYSICAL_BLOCK_EXP] = u8::try_from(exp).unwrap_or(u8::MAX);
        space.bytes[offsets::ALIGNMENT_OFFSET] = 0;
        let min_io_blocks = u16::try_from(opts.min_io_size / lbs).unwrap_or(u16::MAX);
        space.put_u16(offsets::MIN_IO_SIZE, min_io_blocks);
        space.put_u32(offsets::OPT_IO_SIZE, opts.opt_io_size / lbs);
        space.set_writeback(opts.writeback);
        space.put_u16(offsets::NUM_QUEUES, opts.num_queues);
        if opts.discard {
            space.put_u32(offsets::MAX_DISCARD_SECTORS, opts.max_discard_sectors);
            space.put_u32(offsets::MAX_DISCARD_SEG, opts.max_discard_seg);
            space.put_u32(
                offsets::DISCARD_SECTOR_ALIGNMENT,
                opts.discard_sector_alignment,
            );
        }
        if opts.write_zeroes {
            space.put_u32(
                offsets::MAX_WRITE_ZEROES_SECTORS,
                opts.max_write_zeroes_sectors,
            );
            space.put_u32(offsets::MAX_WRITE_ZEROES_SEG, opts.max_write_zeroes_seg);
            // Write zeroes with UNMAP may deallocate exactly when the backend
            // can discard.
            space.bytes[offsets::WRITE_ZEROES_MAY_UNMAP] = u8::from(opts.discard);
        }
        space
    }

    /// `len` bytes of the space from `offset`: bytes past the end of the
    /// space read as zero, so the answer always has `len` bytes. A window
    /// larger than [`MAX_CONFIG_WINDOW`] (which vhost-user cannot ask for)
    /// gets an empty answer, which the vhost-user layer reports as a failure.
    pub fn read(&self, offset: u32, len: u32) -> Vec<u8> {
        if len > MAX_CONFIG_WINDOW {
            return Vec::new();
        }
        // Both conversions are lossless: len <= 4096, and an offset that does
        // not fit in usize is past the end anyway.
        let len = len as usize;
        let mut out = vec![0u8; len];
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(tail) = self.bytes.get(start..) {
            let n = tail.len().min(len);
            out[..n].copy_from_slice(&tail[..n]);
        }
        out
    }

    /// A driver write of `data` at `offset`. Only the `writeback` byte is
    /// writable (VIRTIO_BLK_F_CONFIG_WCE), with 0 (writethrough) or 1
    /// (writeback); everything else is ignored. Returns the new cache mode
    /// when the write set it.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Option<bool> {
        let wb = offsets::WRITEBACK as u64;
        let start = u64::from(offset);
        let end = start.checked_add(data.len() as u64)?;
        if !(start..end).contains(&wb) {
            return None;
        }
        // wb - start < data.len(), so the index fits.
        let value = *data.get(usize::try_from(wb - start).ok()?)?;
        match value {
            0 | 1 => {
                let on = value == 1;
                self.set_writeback(on);
                Some(on)
            }
            _ => None,
        }
    }

    /// Sets the capacity after a resize (rounded down to whole sectors).
    pub fn set_capacity(&mut self, bytes: u64) {
        self.put_u64(offsets::CAPACITY, bytes / SECTOR_SIZE);
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&self.bytes[offsets::CAPACITY..offsets::CAPACITY + 8]);
        u64::from_le_bytes(raw)
    }

    /// Current cache mode: true for writeback, false for writethrough.
    pub fn writeback(&self) -> bool {
        self.bytes[offsets::WRITEBACK] != 0
    }

    /// Sets the cache mode (e.g. to writethrough when the driver accepted
    /// CONFIG_WCE but not FLUSH, as the specification requires).
    pub fn set_writeback(&mut self, on: bool) {
        self.bytes[offsets::WRITEBACK] = u8::from(on);
    }

    /// The whole rendered space.
    pub fn as_bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.bytes
    }

    fn put_u16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
