//! DISCARD / WRITE_ZEROES segments, read-only devices and unsupported
//! types. Limits used (see `tests::options`): capacity 2048 sectors,
//! discard at most 4 segments of 1024 sectors aligned to 8, write zeroes at
//! most 4 segments of 2048 sectors.

use vm_memory::{Bytes, GuestAddress};

use super::tests::{limits, memory, options, parse, parse_with, put_header, r, w, Mem};
use super::tests::{DATA, HDR, STATUS};
use super::*;

const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;

fn range_bytes(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    b[12..].copy_from_slice(&flags.to_le_bytes());
    b
}

/// Writes `ranges` at DATA and parses a request of type `raw_type` whose
/// payload is one readable descriptor.
fn parse_ranges(
    mem: &Mem,
    raw_type: u32,
    ranges: &[(u64, u32, u32)],
) -> (Request, Result<(), RequestError>) {
    for (i, &(sector, n, flags)) in ranges.iter().enumerate() {
        let at = GuestAddress(DATA + 16 * i as u64);
        mem.write_slice(&range_bytes(sector, n, flags), at).unwrap();
    }
    put_header(mem, HDR, raw_type, 777);
    let len = 16 * ranges.len() as u32;
    parse(mem, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)])
}

#[test]
fn discard_with_two_segments_parses() {
    let mem = memory();
    let (req, res) = parse_ranges(&mem, DISCARD, &[(0, 8, 0), (1024, 1024, 0)]);
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::Discard);
    assert_eq!(req.sector(), 0, "the header sector is ignored");
    assert_eq!(
        req.ranges(),
        &[
            DiscardRange {
                sector: 0,
                num_sectors: 8,
                unmap: false
            },
            DiscardRange {
                sector: 1024,
                num_sectors: 1024,
                unmap: false
            },
        ]
    );
    assert_eq!(req.ranges()[1].offset(), 1024 * 512);
    assert_eq!(req.ranges()[1].len_bytes(), 1024 * 512);
    assert_eq!(req.used_len(VIRTIO_BLK_S_OK), 1);
}

#[test]
fn write_zeroes_with_unmap_is_accepted_with_the_flag_visible() {
    let mem = memory();
    let (req, res) = parse_ranges(&mem, WRITE_ZEROES, &[(3, 5, 1), (100, 2048 - 100, 0)]);
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::WriteZeroes);
    assert!(req.ranges()[0].unmap);
    assert!(!req.ranges()[1].unmap);
    assert_eq!(req.ranges()[0].sector, 3);
}

#[test]
fn discard_with_unmap_is_unsupp() {
    let mem = memory();
    let (req, res) = parse_ranges(&mem, DISCARD, &[(0, 8, 1)]);
    let err = res.unwrap_err();
    assert_eq!(err, RequestError::DiscardUnmap);
    assert_eq!(err.status(), VIRTIO_BLK_S_UNSUPP);
    assert!(req.status_addr().is_some());
}

#[test]
fn unknown_segment_flags_are_unsupp() {
    let mem = memory();
    let (_, res) = parse_ranges(&mem, DISCARD, &[(0, 8, 2)]);
    let err = res.unwrap_err();
    assert_eq!(
        err,
        RequestError::UnknownFlags {
            request: RequestType::Discard,
            flags: 2
        }
    );
    assert_eq!(err.status(), VIRTIO_BLK_S_UNSUPP);
    let (_, res) = parse_ranges(&mem, WRITE_ZEROES, &[(0, 8, 0x8000_0001)]);
    assert_eq!(res.unwrap_err().status(), VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn flag_error_in_a_later_segment_wins_over_a_range_error() {
    let mem = memory();
    let (_, res) = parse_ranges(&mem, DISCARD, &[(5000, 8, 0), (0, 8, 4)]);
    assert_eq!(res.unwrap_err().status(), VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn too_many_discard_segments_is_ioerr() {
    let mem = memory();
    let five = [(0, 8, 0); 5];
    let (_, res) = parse_ranges(&mem, DISCARD, &five);
    assert_eq!(
        res.unwrap_err(),
        RequestError::TooManyRanges {
            request: RequestType::Discard,
            count: 5,
            max: 4
        }
    );
}

#[test]
fn discard_segment_over_max_discard_sectors_is_ioerr() {
    let mem = memory();
    let (_, res) = parse_ranges(&mem, DISCARD, &[(0, 1032, 0)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::RangeTooLarge {
            request: RequestType::Discard,
            sectors: 1032,
            max: 1024
        }
    );
}

#[test]
fn write_zeroes_segment_over_its_limit_is_ioerr() {
    let mem = memory();
    let (_, res) = parse_ranges(&mem, WRITE_ZEROES, &[(0, 2049, 0)]);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::RangeTooLarge { max: 2048, .. }
    ));
}

#[test]
fn discard_not_aligned_to_discard_sector_alignment_is_ioerr() {
    let mem = memory();
    let (_, res) = parse_ranges(&mem, DISCARD, &[(4, 8, 0)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::RangeUnaligned {
            request: RequestType::Discard,
            sector: 4,
            sectors: 8,
            alignment: 8
        }
    );
    let (_, res) = parse_ranges(&mem, DISCARD, &[(8, 12, 0)]);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::RangeUnaligned { .. }
    ));
    // Write zeroes has no such alignment with 512-byte blocks.
    let (_, res) = parse_ranges(&mem, WRITE_ZEROES, &[(4, 3, 0)]);
    res.unwrap();
}

#[test]
fn write_zeroes_must_cover_whole_logical_blocks() {
    let mem = memory();
    let opts = DeviceOptions {
        logical_block_size: 4096,
        physical_block_size: 4096,
        ..options()
    };
    let lim = RequestLimits::new(&opts);
    mem.write_slice(&range_bytes(8, 4, 0), GuestAddress(DATA))
        .unwrap();
    put_header(&mem, HDR, WRITE_ZEROES, 0);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &lim);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::RangeUnaligned { alignment: 8, .. }
    ));
}

#[test]
fn discard_segment_past_capacity_is_ioerr() {
    let mem = memory();
    let (_, res) = parse_ranges(&mem, DISCARD, &[(2040, 16, 0)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::OutOfRange {
            sector: 2040,
            sectors: 16,
            capacity: 2048
        }
    );
    let (_, res) = parse_ranges(&mem, WRITE_ZEROES, &[(u64::MAX - 2, 8, 0)]);
    assert!(matches!(res.unwrap_err(), RequestError::OutOfRange { .. }));
    let (_, res) = parse_ranges(&mem, DISCARD, &[(2040, 8, 0)]);
    res.unwrap();
}

#[test]
fn empty_discard_segment_is_ioerr() {
    let mem = memory();
    let (_, res) = parse_ranges(&mem, DISCARD, &[(0, 0, 0)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::EmptyRange(RequestType::Discard)
    );
}

#[test]
fn discard_payload_not_a_multiple_of_16_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, DISCARD, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), r(DATA, 24), w(STATUS, 1)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::BadSegmentPayload {
            request: RequestType::Discard,
            len: 24
        }
    );
    let (_, res) = parse(&mem, &[r(HDR, 16), w(STATUS, 1)]);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::BadSegmentPayload { len: 0, .. }
    ));
}

#[test]
fn discard_segment_split_over_two_descriptors_is_reassembled() {
    let mem = memory();
    let bytes = range_bytes(64, 16, 0);
    mem.write_slice(&bytes[..5], GuestAddress(DATA)).unwrap();
    mem.write_slice(&bytes[5..], GuestAddress(DATA + 0x800))
        .unwrap();
    put_header(&mem, HDR, DISCARD, 0);
    let (req, res) = parse(
        &mem,
        &[r(HDR, 16), r(DATA, 5), r(DATA + 0x800, 11), w(STATUS, 1)],
    );
    res.unwrap();
    assert_eq!(
        req.ranges(),
        &[DiscardRange {
            sector: 64,
            num_sectors: 16,
            unmap: false
        }]
    );
}

#[test]
fn discard_with_device_writable_payload_is_wrong_direction() {
    let mem = memory();
    put_header(&mem, HDR, DISCARD, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 16), w(STATUS, 1)]);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::WrongDirection { writable: true, .. }
    ));
}

#[test]
fn commands_not_offered_are_unsupp() {
    let mem = memory();
    let lim = RequestLimits::new(&DeviceOptions {
        discard: false,
        write_zeroes: false,
        ..options()
    });
    mem.write_slice(&range_bytes(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    for (raw, ty) in [
        (DISCARD, RequestType::Discard),
        (WRITE_ZEROES, RequestType::WriteZeroes),
    ] {
        put_header(&mem, HDR, raw, 0);
        let (_, res) = parse_with(&mem, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &lim);
        let err = res.unwrap_err();
        assert_eq!(err, RequestError::NotOffered(ty));
        assert_eq!(err.status(), VIRTIO_BLK_S_UNSUPP);
    }
}

#[test]
fn read_only_device_refuses_out_discard_and_write_zeroes() {
    let mem = memory();
    let lim = RequestLimits::new(&DeviceOptions {
        read_only: true,
        ..options()
    });
    mem.write_slice(&range_bytes(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    for (raw, ty) in [
        (1, RequestType::Out),
        (DISCARD, RequestType::Discard),
        (WRITE_ZEROES, RequestType::WriteZeroes),
    ] {
        put_header(&mem, HDR, raw, 0);
        let (_, res) = parse_with(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &lim);
        let err = res.unwrap_err();
        assert_eq!(err, RequestError::ReadOnly(ty));
        assert_eq!(err.status(), VIRTIO_BLK_S_IOERR);
    }
    // Reads, flushes and GET_ID still work.
    put_header(&mem, HDR, 0, 0);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &lim);
    res.unwrap();
    put_header(&mem, HDR, 4, 0);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(STATUS, 1)], &lim);
    res.unwrap();
}

#[test]
fn unknown_request_types_are_unsupp() {
    let mem = memory();
    // SCSI, legacy FLUSH_OUT, GET_LIFETIME, SECURE_ERASE, a zone op, junk.
    for raw in [2, 3, 5, 10, 14, 16, 0x8000_0000, u32::MAX] {
        put_header(&mem, HDR, raw, 0);
        let (req, res) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
        let err = res.unwrap_err();
        assert_eq!(err, RequestError::Unsupported(raw));
        assert_eq!(err.status(), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(err.used_len(), 1);
        assert_eq!(req.status_addr(), Some(GuestAddress(STATUS)));
        assert_eq!(err.log_level(), log::Level::Debug);
    }
}

#[test]
fn limits_follow_a_resize() {
    let mem = memory();
    let mut lim = limits();
    put_header(&mem, HDR, 0, 4096);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &lim);
    assert!(matches!(res.unwrap_err(), RequestError::OutOfRange { .. }));
    lim.set_capacity_bytes(4 * 1024 * 1024);
    assert_eq!(lim.capacity_sectors(), 8192);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &lim);
    res.unwrap();
}
