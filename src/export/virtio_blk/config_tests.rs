use super::*;
use std::mem::offset_of;
use virtio_bindings::bindings::virtio_blk::virtio_blk_config;

fn sample_options() -> DeviceOptions {
    DeviceOptions {
        capacity_bytes: 10 * 1024 * 1024 + 100,
        logical_block_size: 4096,
        physical_block_size: 16384,
        min_io_size: 8192,
        opt_io_size: 65536,
        num_queues: 4,
        queue_size: 128,
        seg_max: 126,
        size_max: 1 << 20,
        read_only: false,
        writeback: true,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 0x1234_5678,
        max_discard_seg: 3,
        discard_sector_alignment: 8,
        max_write_zeroes_sectors: 0x0abc_def0,
        max_write_zeroes_seg: 5,
        serial: "disk0".to_string(),
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

#[test]
fn offsets_match_virtio_bindings_layout() {
    assert_eq!(offsets::CAPACITY, offset_of!(virtio_blk_config, capacity));
    assert_eq!(offsets::SIZE_MAX, offset_of!(virtio_blk_config, size_max));
    assert_eq!(offsets::SEG_MAX, offset_of!(virtio_blk_config, seg_max));
    assert_eq!(
        offsets::GEOMETRY_CYLINDERS,
        offset_of!(virtio_blk_config, geometry)
    );
    assert_eq!(offsets::BLK_SIZE, offset_of!(virtio_blk_config, blk_size));
    assert_eq!(
        offsets::PHYSICAL_BLOCK_EXP,
        offset_of!(virtio_blk_config, physical_block_exp)
    );
    assert_eq!(
        offsets::ALIGNMENT_OFFSET,
        offset_of!(virtio_blk_config, alignment_offset)
    );
    assert_eq!(
        offsets::MIN_IO_SIZE,
        offset_of!(virtio_blk_config, min_io_size)
    );
    assert_eq!(
        offsets::OPT_IO_SIZE,
        offset_of!(virtio_blk_config, opt_io_size)
    );
    assert_eq!(offsets::WRITEBACK, offset_of!(virtio_blk_config, wce));
    assert_eq!(offsets::UNUSED0, offset_of!(virtio_blk_config, unused));
    assert_eq!(
        offsets::NUM_QUEUES,
        offset_of!(virtio_blk_config, num_queues)
    );
    assert_eq!(
        offsets::MAX_DISCARD_SECTORS,
        offset_of!(virtio_blk_config, max_discard_sectors)
    );
    assert_eq!(
        offsets::MAX_DISCARD_SEG,
        offset_of!(virtio_blk_config, max_discard_seg)
    );
    assert_eq!(
        offsets::DISCARD_SECTOR_ALIGNMENT,
        offset_of!(virtio_blk_config, discard_sector_alignment)
    );
    assert_eq!(
        offsets::MAX_WRITE_ZEROES_SECTORS,
        offset_of!(virtio_blk_config, max_write_zeroes_sectors)
    );
    assert_eq!(
        offsets::MAX_WRITE_ZEROES_SEG,
        offset_of!(virtio_blk_config, max_write_zeroes_seg)
    );
    assert_eq!(
        offsets::WRITE_ZEROES_MAY_UNMAP,
        offset_of!(virtio_blk_config, write_zeroes_may_unmap)
    );
    assert_eq!(offsets::UNUSED1, offset_of!(virtio_blk_config, unused1));
    // The space ends where the secure-erase fields (not offered) begin.
    assert_eq!(
        CONFIG_SPACE_SIZE,
        offset_of!(virtio_blk_config, max_secure_erase_sectors)
    );
}

#[test]
fn spec_offsets_of_key_fields() {
    assert_eq!(offsets::CAPACITY, 0);
    assert_eq!(offsets::BLK_SIZE, 20);
    assert_eq!(offsets::NUM_QUEUES, 34);
    assert_eq!(offsets::MAX_DISCARD_SECTORS, 36);
    assert_eq!(offsets::WRITE_ZEROES_MAY_UNMAP, 56);
}

#[test]
fn rendered_fields_are_little_endian_at_their_offsets() {
    let space = ConfigSpace::new(&sample_options());
    let b = space.as_bytes();
    // 10 MiB + 100 bytes: the partial sector is not visible.
    assert_eq!(u64_at(b, 0), 20480);
    assert_eq!(u32_at(b, 8), 1 << 20);
    assert_eq!(u32_at(b, 12), 126);
    assert_eq!(&b[16..20], &[0, 0, 0, 0]);
    assert_eq!(u32_at(b, 20), 4096);
    assert_eq!(b[24], 2, "16 KiB physical / 4 KiB logical = 2^2");
    assert_eq!(b[25], 0);
    assert_eq!(u16_at(b, 26), 2, "8 KiB in 4 KiB blocks");
    assert_eq!(u32_at(b, 28), 16, "64 KiB in 4 KiB blocks");
    assert_eq!(b[32], 1);
    assert_eq!(b[33], 0);
    assert_eq!(u16_at(b, 34), 4);
    assert_eq!(u32_at(b, 36), 0x1234_5678);
    assert_eq!(u32_at(b, 40), 3);
    assert_eq!(u32_at(b, 44), 8);
    assert_eq!(u32_at(b, 48), 0x0abc_def0);
    assert_eq!(u32_at(b, 52), 5);
    assert_eq!(b[56], 1);
    assert_eq!(&b[57..60], &[0, 0, 0]);
}

#[test]
fn discard_and_write_zeroes_fields_are_zero_when_not_offered() {
    let opts = DeviceOptions {
        discard: false,
        write_zeroes: false,
        ..sample_options()
    };
    let space = ConfigSpace::new(&opts);
    assert!(space.as_bytes()[36..60].iter().all(|&b| b == 0));
}

#[test]
fn windowed_read_returns_exactly_the_requested_length() {
    let space = ConfigSpace::new(&sample_options());
    let all = space.as_bytes();
    assert_eq!(space.read(0, 60), all.to_vec());
    assert_eq!(space.read(20, 4), 4096u32.to_le_bytes().to_vec());
    assert_eq!(space.read(34, 2), 4u16.to_le_bytes().to_vec());
    // Straddling the end: the tail is zero padded.
    let w = space.read(56, 8);
    assert_eq!(w.len(), 8);
    assert_eq!(w[0], 1);
    assert!(w[1..].iter().all(|&b| b == 0));
    // QEMU asks for more than the device renders.
    let big = space.read(0, 256);
    assert_eq!(big.len(), 256);
    assert_eq!(&big[..60], &all[..]);
    assert!(big[60..].iter().all(|&b| b == 0));
}

#[test]
fn read_past_the_end_gives_zeroes() {
    let space = ConfigSpace::new(&sample_options());
    assert_eq!(space.read(60, 4), vec![0; 4]);
    assert_eq!(space.read(u32::MAX, 16), vec![0; 16]);
    assert_eq!(space.read(4000, 96), vec![0; 96]);
}

#[test]
fn zero_length_read_is_empty() {
    let space = ConfigSpace::new(&sample_options());
    assert!(space.read(0, 0).is_empty());
}

#[test]
fn oversized_window_is_refused_with_an_empty_answer() {
    let space = ConfigSpace::new(&sample_options());
    assert!(space.read(0, MAX_CONFIG_WINDOW + 1).is_empty());
    assert_eq!(space.read(0, MAX_CONFIG_WINDOW).len(), 4096);
}

#[test]
fn write_switches_writeback_only_through_its_byte() {
    let mut space = ConfigSpace::new(&sample_options());
    assert!(space.writeback());
    assert_eq!(space.write(32, &[0]), Some(false));
    assert!(!space.writeback());
    // A window covering the byte, with other bytes around it.
    assert_eq!(space.write(30, &[9, 9, 1, 9]), Some(true));
    assert!(space.writeback());
    // Other fields are not writable.
    let before = space.clone();
    assert_eq!(space.write(0, &[0xff; 8]), None);
    assert_eq!(space.write(34, &[7, 7]), None);
    assert_eq!(space.write(u32::MAX, &[1, 1]), None);
    assert_eq!(space, before);
}

#[test]
fn writeback_values_other_than_zero_and_one_are_ignored() {
    let mut space = ConfigSpace::new(&sample_options());
    assert_eq!(space.write(32, &[2]), None);
    assert!(space.writeback());
}

#[test]
fn set_capacity_rounds_down_to_sectors() {
    let mut space = ConfigSpace::new(&sample_options());
    space.set_capacity(1024 * 1024 + 511);
    assert_eq!(space.capacity_sectors(), 2048);
    assert_eq!(u64_at(&space.read(0, 8), 0), 2048);
}

#[test]
fn writethrough_option_renders_zero() {
    let opts = DeviceOptions {
        writeback: false,
        ..sample_options()
    };
    assert!(!ConfigSpace::new(&opts).writeback());
}

#[test]
fn sample_and_default_options_validate() {
    assert_eq!(sample_options().validate(), Ok(()));
    assert_eq!(DeviceOptions::default().validate(), Ok(()));
}

#[test]
fn validate_refuses_bad_block_sizes_and_limits() {
    let bad = |f: fn(&mut DeviceOptions)| {
        let mut o = sample_options();
        f(&mut o);
        o.validate()
    };
    assert_eq!(
        bad(|o| o.logical_block_size = 1000),
        Err(ConfigError::LogicalBlockSize(1000))
    );
    assert_eq!(
        bad(|o| o.logical_block_size = 256),
        Err(ConfigError::LogicalBlockSize(256))
    );
    assert_eq!(
        bad(|o| o.logical_block_size = 131072),
        Err(ConfigError::LogicalBlockSize(131072))
    );
    assert!(matches!(
        bad(|o| o.physical_block_size = 512),
        Err(ConfigError::PhysicalBlockSize { .. })
    ));
    assert_eq!(bad(|o| o.num_queues = 0), Err(ConfigError::NoQueues));
    assert_eq!(
        bad(|o| o.queue_size = 100),
        Err(ConfigError::QueueSize(100))
    );
    assert!(matches!(
        bad(|o| o.seg_max = 127),
        Err(ConfigError::SegMax { limit: 126, .. })
    ));
    assert!(matches!(
        bad(|o| o.seg_max = 0),
        Err(ConfigError::SegMax { .. })
    ));
    assert!(matches!(
        bad(|o| o.size_max = 512),
        Err(ConfigError::SizeMax { .. })
    ));
    assert_eq!(
        bad(|o| o.max_discard_seg = 0),
        Err(ConfigError::ZeroLimit("max_discard_seg"))
    );
    assert_eq!(
        bad(|o| o.max_write_zeroes_sectors = 0),
        Err(ConfigError::ZeroLimit("max_write_zeroes_sectors"))
    );
    assert!(matches!(
        bad(|o| o.discard_sector_alignment = 4),
        Err(ConfigError::DiscardAlignment { .. })
    ));
}

#[test]
fn device_id_is_truncated_and_nul_padded() {
    let mut o = sample_options();
    let id = o.device_id();
    assert_eq!(&id[..5], b"disk0");
    assert!(id[5..].iter().all(|&b| b == 0));
    o.serial = "0123456789abcdefghijKLMN".to_string();
    assert_eq!(&o.device_id(), b"0123456789abcdefghij");
}
