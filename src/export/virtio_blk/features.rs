//! Feature bits of the virtio block device (virtio 1.2, 5.2.3) and the set
//! vubd offers for a given device.
//!
//! The constants are bit *numbers*, as in the specification; use
//! [`feature_bit`] to turn one into a mask.

use super::config::DeviceOptions;

/// `size_max` holds the largest size of one data segment.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// `seg_max` holds the largest number of data segments in one request.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// `geometry` holds a legacy disk geometry (vubd does not offer it).
pub const VIRTIO_BLK_F_GEOMETRY: u32 = 4;
/// The device is read-only: writes fail with `VIRTIO_BLK_S_IOERR`.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// `blk_size` holds the logical block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// The device accepts `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// The `topology` fields are meaningful.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// The driver may switch the cache mode through the `writeback` field.
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
/// More than one request queue; their number is in `num_queues`.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// The device accepts `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// The device accepts `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Indirect descriptor tables (transport feature, virtio 1.2, 6).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// A virtio 1.x (non-legacy) device: little-endian everywhere.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// The mask of feature bit number `bit` (`bit` must be below 64).
pub const fn feature_bit(bit: u32) -> u64 {
    1u64 << bit
}

/// Features offered whatever the options say.
const ALWAYS_OFFERED: [u32; 9] = [
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
];

/// The virtio feature set the device offers (without transport-specific
/// bits such as vhost-user's `VHOST_USER_F_PROTOCOL_FEATURES`).
///
/// FLUSH is offered together with CONFIG_WCE, as the specification requires
/// of a device offering CONFIG_WCE.
pub fn device_features(opts: &DeviceOptions) -> u64 {
    let mut features = ALWAYS_OFFERED
        .iter()
        .fold(0u64, |acc, &bit| acc | feature_bit(bit));
    let optional = [
        (opts.read_only, VIRTIO_BLK_F_RO),
        (opts.discard, VIRTIO_BLK_F_DISCARD),
        (opts.write_zeroes, VIRTIO_BLK_F_WRITE_ZEROES),
        (opts.num_queues > 1, VIRTIO_BLK_F_MQ),
    ];
    for (wanted, bit) in optional {
        if wanted {
            features |= feature_bit(bit);
        }
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_blk as vb;
    use virtio_bindings::bindings::virtio_config as vc;
    use virtio_bindings::bindings::virtio_ring as vr;

    #[test]
    fn bit_numbers_agree_with_virtio_bindings() {
        assert_eq!(VIRTIO_BLK_F_SIZE_MAX, vb::VIRTIO_BLK_F_SIZE_MAX);
        assert_eq!(VIRTIO_BLK_F_SEG_MAX, vb::VIRTIO_BLK_F_SEG_MAX);
        assert_eq!(VIRTIO_BLK_F_GEOMETRY, vb::VIRTIO_BLK_F_GEOMETRY);
        assert_eq!(VIRTIO_BLK_F_RO, vb::VIRTIO_BLK_F_RO);
        assert_eq!(VIRTIO_BLK_F_BLK_SIZE, vb::VIRTIO_BLK_F_BLK_SIZE);
        assert_eq!(VIRTIO_BLK_F_FLUSH, vb::VIRTIO_BLK_F_FLUSH);
        assert_eq!(VIRTIO_BLK_F_TOPOLOGY, vb::VIRTIO_BLK_F_TOPOLOGY);
        assert_eq!(VIRTIO_BLK_F_CONFIG_WCE, vb::VIRTIO_BLK_F_CONFIG_WCE);
        assert_eq!(VIRTIO_BLK_F_MQ, vb::VIRTIO_BLK_F_MQ);
        assert_eq!(VIRTIO_BLK_F_DISCARD, vb::VIRTIO_BLK_F_DISCARD);
        assert_eq!(VIRTIO_BLK_F_WRITE_ZEROES, vb::VIRTIO_BLK_F_WRITE_ZEROES);
        assert_eq!(VIRTIO_F_VERSION_1, vc::VIRTIO_F_VERSION_1);
        assert_eq!(VIRTIO_RING_F_EVENT_IDX, vr::VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(VIRTIO_RING_F_INDIRECT_DESC, vr::VIRTIO_RING_F_INDIRECT_DESC);
    }

    fn has(features: u64, bit: u32) -> bool {
        features & feature_bit(bit) != 0
    }

    #[test]
    fn default_device_offers_the_fixed_set_only() {
        let f = device_features(&DeviceOptions::default());
        for bit in ALWAYS_OFFERED {
            assert!(has(f, bit), "bit {bit} missing");
        }
        for bit in [
            VIRTIO_BLK_F_RO,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_GEOMETRY,
        ] {
            assert!(!has(f, bit), "bit {bit} offered");
        }
    }

    #[test]
    fn options_switch_on_ro_discard_write_zeroes_and_mq() {
        let opts = DeviceOptions {
            read_only: true,
            discard: true,
            write_zeroes: true,
            num_queues: 4,
            ..DeviceOptions::default()
        };
        let f = device_features(&opts);
        assert!(has(f, VIRTIO_BLK_F_RO));
        assert!(has(f, VIRTIO_BLK_F_DISCARD));
        assert!(has(f, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(has(f, VIRTIO_BLK_F_MQ));
        assert!(has(f, VIRTIO_F_VERSION_1));
    }

    #[test]
    fn single_queue_does_not_offer_mq() {
        let opts = DeviceOptions {
            num_queues: 1,
            ..DeviceOptions::default()
        };
        assert!(!has(device_features(&opts), VIRTIO_BLK_F_MQ));
    }
}
