//! Request parsing against chains built with virtio-queue's mock queue:
//! the shared helpers, and IN/OUT/FLUSH/GET_ID with header and status
//! layouts. Limits, guest memory and chain walking are in `tests_chain.rs`;
//! DISCARD / WRITE_ZEROES and type support in `tests_ranges.rs`.

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

pub(super) type Mem = GuestMemoryMmap<()>;

/// End of guest memory: two adjacent 1 MiB regions, nothing above.
pub(super) const MEM_END: u64 = 0x20_0000;
pub(super) const HDR: u64 = 0x1000;
pub(super) const DATA: u64 = 0x2000;
pub(super) const STATUS: u64 = 0x9000;

pub(super) fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x10_0000), 0x10_0000),
    ])
    .unwrap()
}

pub(super) fn options() -> DeviceOptions {
    DeviceOptions {
        capacity_bytes: 1024 * 1024,
        queue_size: 16,
        seg_max: 8,
        size_max: 65536,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        discard_sector_alignment: 8,
        max_write_zeroes_sectors: 2048,
        max_write_zeroes_seg: 4,
        serial: "vubd-test-serial".to_string(),
        ..DeviceOptions::default()
    }
}

pub(super) fn limits() -> RequestLimits {
    RequestLimits::new(&options())
}

pub(super) fn r(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

pub(super) fn w(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

pub(super) fn put_header(mem: &Mem, addr: u64, raw_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&raw_type.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Builds `descs` as one chain (NEXT flags and indices set for you) and
/// parses it.
pub(super) fn parse_with(
    mem: &Mem,
    descs: &[RawDescriptor],
    limits: &RequestLimits,
) -> (Request, Result<(), RequestError>) {
    let queue = MockSplitQueue::new(mem, 16);
    let chain = queue.build_desc_chain(descs).unwrap();
    let mut req = Request::new();
    let res = req.parse(chain, limits);
    (req, res)
}

pub(super) fn parse(mem: &Mem, descs: &[RawDescriptor]) -> (Request, Result<(), RequestError>) {
    parse_with(mem, descs, &limits())
}

pub(super) fn seg(addr: u64, len: u32) -> DataSegment {
    DataSegment {
        addr: GuestAddress(addr),
        len,
    }
}

#[test]
fn in_request_with_two_data_segments_parses() {
    let mem = memory();
    put_header(&mem, HDR, 0, 8);
    let (req, res) = parse(
        &mem,
        &[
            r(HDR, 16),
            w(DATA, 512),
            w(DATA + 0x1000, 1024),
            w(STATUS, 1),
        ],
    );
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::In);
    assert_eq!(req.sector(), 8);
    assert_eq!(req.offset(), 4096);
    assert_eq!(req.data(), &[seg(DATA, 512), seg(DATA + 0x1000, 1024)]);
    assert_eq!(req.data_len(), 1536);
    assert_eq!(req.status_addr(), Some(GuestAddress(STATUS)));
    assert_eq!(req.header_addr(), Some(GuestAddress(HDR)));
    assert_eq!(req.head_index(), 0);
    assert_eq!(req.used_len(VIRTIO_BLK_S_OK), 1537);
    assert_eq!(req.used_len(VIRTIO_BLK_S_IOERR), 1);
}

#[test]
fn out_request_parses_and_iovecs_point_at_the_data() {
    let mem = memory();
    put_header(&mem, HDR, 1, 0);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let (req, res) = parse(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::Out);
    assert_eq!(req.data_len(), 512);
    assert_eq!(req.used_len(VIRTIO_BLK_S_OK), 1);
    let mut iov = Vec::new();
    req.host_iovecs(&mem, &mut iov).unwrap();
    assert_eq!(iov.len(), 1);
    assert_eq!(iov[0].iov_len, 512);
    // SAFETY: the iovec covers 512 bytes of `mem`, which is alive and not
    // written by anyone during the read.
    let bytes = unsafe { std::slice::from_raw_parts(iov[0].iov_base as *const u8, 512) };
    assert!(bytes.iter().all(|&b| b == 0xab));
}

#[test]
fn flush_ignores_sector_and_data() {
    let mem = memory();
    put_header(&mem, HDR, 4, 1234);
    let (req, res) = parse(&mem, &[r(HDR, 16), w(STATUS, 1)]);
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::Flush);
    assert_eq!(req.sector(), 0);
    assert!(req.data().is_empty());
    let (req, res) = parse(&mem, &[r(HDR, 16), r(DATA, 100), w(STATUS, 1)]);
    res.unwrap();
    assert!(req.data().is_empty());
    assert_eq!(req.used_len(VIRTIO_BLK_S_OK), 1);
}

#[test]
fn get_id_parses_and_gets_the_serial() {
    let mem = memory();
    put_header(&mem, HDR, 8, 99);
    mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    let (req, res) = parse(&mem, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::GetId);
    assert_eq!(req.sector(), 0);
    let n = req.write_device_id(&mem, &options().device_id()).unwrap();
    assert_eq!(n, 20);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..16], b"vubd-test-serial");
    assert_eq!(&id[16..], &[0, 0, 0, 0]);
    assert_eq!(req.used_len(VIRTIO_BLK_S_OK), 21);
}

#[test]
fn get_id_split_over_segments_and_longer_buffer() {
    let mem = memory();
    put_header(&mem, HDR, 8, 0);
    let (req, res) = parse(
        &mem,
        &[r(HDR, 16), w(DATA, 7), w(DATA + 0x100, 64), w(STATUS, 1)],
    );
    res.unwrap();
    assert_eq!(
        req.write_device_id(&mem, b"ABCDEFGHIJKLMNOPQRST").unwrap(),
        20
    );
    let mut a = [0u8; 7];
    let mut b = [0u8; 13];
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut b, GuestAddress(DATA + 0x100)).unwrap();
    assert_eq!(&a, b"ABCDEFG");
    assert_eq!(&b, b"HIJKLMNOPQRST");
    assert_eq!(req.used_len(VIRTIO_BLK_S_OK), 21);
}

#[test]
fn get_id_with_less_than_20_bytes_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 8, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 19), w(STATUS, 1)]);
    let err = res.unwrap_err();
    assert_eq!(err, RequestError::GetIdTooShort(19));
    assert_eq!(err.status(), VIRTIO_BLK_S_IOERR);
}

#[test]
fn header_split_over_two_descriptors() {
    let mem = memory();
    // type in the first piece, reserved + sector in the second.
    put_header(&mem, HDR, 0, 16);
    let mut tail = [0u8; 12];
    mem.read_slice(&mut tail, GuestAddress(HDR + 4)).unwrap();
    mem.write_slice(&tail, GuestAddress(0x5000)).unwrap();
    let (req, res) = parse(
        &mem,
        &[r(HDR, 4), r(0x5000, 12), w(DATA, 512), w(STATUS, 1)],
    );
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::In);
    assert_eq!(req.sector(), 16);
    assert_eq!(req.data(), &[seg(DATA, 512)]);
    assert_eq!(
        req.header_addr(),
        Some(GuestAddress(HDR)),
        "the first piece"
    );
}

#[test]
fn header_sharing_a_descriptor_with_out_data() {
    let mem = memory();
    put_header(&mem, HDR, 1, 2);
    let (req, res) = parse(&mem, &[r(HDR, 16 + 1024), w(STATUS, 1)]);
    res.unwrap();
    assert_eq!(req.data(), &[seg(HDR + 16, 1024)]);
    assert_eq!(req.sector(), 2);
}

#[test]
fn status_descriptor_longer_than_one_byte_carries_in_data() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (req, res) = parse(&mem, &[r(HDR, 16), w(DATA, 513)]);
    res.unwrap();
    assert_eq!(req.data(), &[seg(DATA, 512)]);
    assert_eq!(req.status_addr(), Some(GuestAddress(DATA + 512)));
    assert_eq!(req.used_len(VIRTIO_BLK_S_OK), 513);
}

#[test]
fn in_with_device_readable_data_is_wrong_direction() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (req, res) = parse(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    let err = res.unwrap_err();
    assert_eq!(
        err,
        RequestError::WrongDirection {
            request: RequestType::In,
            writable: false
        }
    );
    assert_eq!(err.status(), VIRTIO_BLK_S_IOERR);
    assert!(err.has_status());
    assert_eq!(req.status_addr(), Some(GuestAddress(STATUS)));
}

#[test]
fn out_with_device_writable_data_is_wrong_direction() {
    let mem = memory();
    put_header(&mem, HDR, 1, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::WrongDirection {
            request: RequestType::Out,
            writable: true
        }
    );
    // The status descriptor's extra bytes are data too.
    let (_, res) = parse(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 2)]);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::WrongDirection { writable: true, .. }
    ));
}

#[test]
fn too_short_header_is_ioerr_with_status() {
    let mem = memory();
    put_header(&mem, HDR, 4, 0);
    let (req, res) = parse(&mem, &[r(HDR, 8), w(STATUS, 1)]);
    let err = res.unwrap_err();
    assert_eq!(err, RequestError::HeaderTooShort(8));
    assert_eq!(err.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(err.used_len(), 1);
    // The caller can report it.
    let addr = req.status_addr().unwrap();
    write_status(&mem, addr, err.status()).unwrap();
    let mut b = [9u8];
    mem.read_slice(&mut b, addr).unwrap();
    assert_eq!(b[0], VIRTIO_BLK_S_IOERR);
}

#[test]
fn header_in_a_device_writable_descriptor_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (_, res) = parse(&mem, &[w(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(res.unwrap_err(), RequestError::HeaderNotReadable);
    // A writable descriptor between two header pieces breaks it as well.
    let (_, res) = parse(&mem, &[r(HDR, 8), w(DATA, 8), r(HDR + 8, 8), w(STATUS, 1)]);
    assert_eq!(res.unwrap_err(), RequestError::HeaderNotReadable);
}

#[test]
fn chain_without_status_descriptor_has_no_status() {
    let mem = memory();
    put_header(&mem, HDR, 1, 0);
    let (req, res) = parse(&mem, &[r(HDR, 16), r(DATA, 512)]);
    let err = res.unwrap_err();
    assert_eq!(err, RequestError::StatusNotWritable);
    assert!(!err.has_status());
    assert_eq!(err.used_len(), 0);
    assert_eq!(req.status_addr(), None);
}

#[test]
fn read_only_status_descriptor_has_no_status() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (req, res) = parse(&mem, &[r(HDR, 16), w(DATA, 512), r(STATUS, 1)]);
    assert_eq!(res.unwrap_err(), RequestError::StatusNotWritable);
    assert_eq!(req.status_addr(), None);
}

#[test]
fn empty_status_descriptor_has_no_status() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 0)]);
    assert_eq!(res.unwrap_err(), RequestError::StatusNotWritable);
}

#[test]
fn lone_header_descriptor_has_no_status() {
    let mem = memory();
    put_header(&mem, HDR, 4, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16)]);
    assert_eq!(res.unwrap_err(), RequestError::StatusNotWritable);
}

#[test]
fn data_length_not_a_multiple_of_512_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 511), w(STATUS, 1)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::UnalignedLength {
            len: 511,
            block: 512
        }
    );
}

#[test]
fn four_k_logical_blocks_need_aligned_length_and_sector() {
    let mem = memory();
    let lim = RequestLimits::new(&DeviceOptions {
        logical_block_size: 4096,
        physical_block_size: 4096,
        ..options()
    });
    put_header(&mem, HDR, 0, 8);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &lim);
    res.unwrap();
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(DATA, 2048), w(STATUS, 1)], &lim);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::UnalignedLength { block: 4096, .. }
    ));
    put_header(&mem, HDR, 1, 9);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)], &lim);
    assert!(matches!(
        res.unwrap_err(),
        RequestError::UnalignedSector { sector: 9, .. }
    ));
}

#[test]
fn request_ending_at_capacity_is_accepted_and_past_it_refused() {
    let mem = memory();
    // Capacity is 2048 sectors.
    put_header(&mem, HDR, 0, 2046);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
    res.unwrap();
    put_header(&mem, HDR, 0, 2047);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
    let err = res.unwrap_err();
    assert_eq!(
        err,
        RequestError::OutOfRange {
            sector: 2047,
            sectors: 2,
            capacity: 2048
        }
    );
    assert_eq!(err.status(), VIRTIO_BLK_S_IOERR);
}
