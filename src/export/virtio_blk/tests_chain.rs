//! Limits, guest memory checks and chain walking (indirect tables, loops,
//! truncated chains).

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::tests::{
    limits, memory, parse, parse_with, put_header, r, seg, w, Mem, DATA, HDR, MEM_END, STATUS,
};
use super::*;

/// Parses a chain whose descriptors are stored exactly as given (flags and
/// next indices untouched).
fn parse_raw(mem: &Mem, descs: &[RawDescriptor]) -> (Request, Result<(), RequestError>) {
    let queue = MockSplitQueue::new(mem, 16);
    let chain = queue.build_multiple_desc_chains(descs).unwrap();
    let mut req = Request::new();
    let res = req.parse(chain, &limits());
    (req, res)
}

#[test]
fn sector_times_512_overflow_is_out_of_range() {
    let mem = memory();
    let mut lim = limits();
    lim.set_capacity_bytes(u64::MAX);
    put_header(&mem, HDR, 1, u64::MAX / 256);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &lim);
    assert!(matches!(res.unwrap_err(), RequestError::OutOfRange { .. }));
    put_header(&mem, HDR, 1, u64::MAX);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &lim);
    assert!(matches!(res.unwrap_err(), RequestError::OutOfRange { .. }));
}

#[test]
fn sector_plus_length_past_the_largest_capacity_is_out_of_range() {
    let mem = memory();
    let mut lim = limits();
    lim.set_capacity_bytes(u64::MAX);
    let last = u64::MAX / 512;
    put_header(&mem, HDR, 0, last - 1);
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &lim);
    res.unwrap();
    let (_, res) = parse_with(&mem, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)], &lim);
    assert!(matches!(res.unwrap_err(), RequestError::OutOfRange { .. }));
}

#[test]
fn chain_longer_than_4_gib_is_truncated() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (req, res) = parse(
        &mem,
        &[
            r(HDR, 16),
            w(DATA, u32::MAX - 8),
            w(DATA, 512),
            w(STATUS, 1),
        ],
    );
    assert_eq!(res.unwrap_err(), RequestError::ChainTruncated);
    assert_eq!(req.status_addr(), None);
}

#[test]
fn too_many_segments_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let mut descs = vec![r(HDR, 16)];
    for i in 0..9 {
        descs.push(w(DATA + i * 0x200, 512));
    }
    descs.push(w(STATUS, 1));
    let (req, res) = parse(&mem, &descs);
    assert_eq!(
        res.unwrap_err(),
        RequestError::TooManySegments { count: 9, max: 8 }
    );
    // Segments past the limit were not stored.
    assert_eq!(req.data().len(), 8);
}

#[test]
fn segment_larger_than_size_max_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), w(DATA, 65536 + 512), w(STATUS, 1)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::SegmentTooLarge {
            len: 65536 + 512,
            max: 65536
        }
    );
}

#[test]
fn request_over_the_byte_limit_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let lim = limits().with_max_request_bytes(1024);
    let (_, res) = parse_with(
        &mem,
        &[
            r(HDR, 16),
            w(DATA, 1024),
            w(DATA + 0x1000, 512),
            w(STATUS, 1),
        ],
        &lim,
    );
    assert_eq!(
        res.unwrap_err(),
        RequestError::RequestTooLarge {
            len: 1536,
            max: 1024
        }
    );
}

#[test]
fn data_past_the_end_of_every_region_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (req, res) = parse(&mem, &[r(HDR, 16), w(0x30_0000, 512), w(STATUS, 1)]);
    let err = res.unwrap_err();
    assert_eq!(
        err,
        RequestError::BadAddress {
            addr: 0x30_0000,
            len: 512
        }
    );
    assert!(err.has_status());
    assert!(req.status_addr().is_some());
}

#[test]
fn data_straddling_the_end_of_memory_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 1, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), r(MEM_END - 256, 512), w(STATUS, 1)]);
    assert!(matches!(res.unwrap_err(), RequestError::BadAddress { .. }));
}

#[test]
fn data_wrapping_the_address_space_is_ioerr() {
    let mem = memory();
    put_header(&mem, HDR, 1, 0);
    let (_, res) = parse(&mem, &[r(HDR, 16), r(u64::MAX - 255, 512), w(STATUS, 1)]);
    assert!(matches!(res.unwrap_err(), RequestError::BadAddress { .. }));
}

#[test]
fn data_spanning_two_regions_gives_iovecs_for_both() {
    let mem = memory();
    put_header(&mem, HDR, 1, 0);
    let start = 0x10_0000 - 256;
    let pattern: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
    mem.write_slice(&pattern, GuestAddress(start)).unwrap();
    let (req, res) = parse(&mem, &[r(HDR, 16), r(start, 512), w(STATUS, 1)]);
    res.unwrap();
    let mut iov = Vec::new();
    req.host_iovecs(&mem, &mut iov).unwrap();
    assert!(!iov.is_empty() && iov.len() <= 2);
    let mut seen = Vec::new();
    for v in &iov {
        // SAFETY: each iovec covers mapped guest memory owned by `mem`,
        // which outlives this read and is not written meanwhile.
        let part = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        seen.extend_from_slice(part);
    }
    assert_eq!(seen, pattern);
}

#[test]
fn host_iovecs_refuses_memory_that_went_away() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let (req, res) = parse(&mem, &[r(HDR, 16), w(0x18_0000, 4096), w(STATUS, 1)]);
    res.unwrap();
    // The frontend replaced the memory table with a smaller one.
    let small: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut iov = vec![];
    assert!(matches!(
        req.host_iovecs(&small, &mut iov),
        Err(RequestError::BadAddress { .. })
    ));
}

#[test]
fn header_outside_guest_memory_is_ioerr_with_status() {
    let mem = memory();
    let (req, res) = parse(&mem, &[r(0x30_0000, 16), w(STATUS, 1)]);
    assert_eq!(
        res.unwrap_err(),
        RequestError::HeaderOutOfMemory { addr: 0x30_0000 }
    );
    assert!(req.status_addr().is_some());
}

#[test]
fn status_outside_guest_memory_has_no_status() {
    let mem = memory();
    put_header(&mem, HDR, 4, 0);
    let (req, res) = parse(&mem, &[r(HDR, 16), w(MEM_END, 1)]);
    let err = res.unwrap_err();
    assert_eq!(err, RequestError::StatusOutOfMemory { addr: MEM_END });
    assert!(!err.has_status());
    assert_eq!(req.status_addr(), None);
}

fn store_indirect_table(mem: &Mem, at: u64, descs: &[(u64, u32, u16)]) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let next = if i + 1 < descs.len() { i as u16 + 1 } else { 0 };
        let flags = if i + 1 < descs.len() {
            flags | VRING_DESC_F_NEXT as u16
        } else {
            flags
        };
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        mem.write_obj(d, GuestAddress(at + 16 * i as u64)).unwrap();
    }
}

#[test]
fn indirect_descriptor_table_parses() {
    let mem = memory();
    put_header(&mem, HDR, 0, 4);
    let wr = VRING_DESC_F_WRITE as u16;
    store_indirect_table(
        &mem,
        0x8000,
        &[(HDR, 16, 0), (DATA, 2048, wr), (STATUS, 1, wr)],
    );
    let main = RawDescriptor::from(SplitDescriptor::new(
        0x8000,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    let (req, res) = parse(&mem, &[main]);
    res.unwrap();
    assert_eq!(req.request_type(), RequestType::In);
    assert_eq!(req.sector(), 4);
    assert_eq!(req.data(), &[seg(DATA, 2048)]);
    assert_eq!(req.status_addr(), Some(GuestAddress(STATUS)));
}

#[test]
fn nested_indirect_table_is_truncated() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let ind = VRING_DESC_F_INDIRECT as u16;
    store_indirect_table(&mem, 0x8000, &[(HDR, 16, 0), (0x8800, 32, ind)]);
    let main = RawDescriptor::from(SplitDescriptor::new(0x8000, 32, ind, 0));
    let (_, res) = parse(&mem, &[main]);
    assert_eq!(res.unwrap_err(), RequestError::ChainTruncated);
}

#[test]
fn descriptor_loop_is_truncated_without_status() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, next | wr, 0)),
    ];
    let (req, res) = parse_raw(&mem, &descs);
    let err = res.unwrap_err();
    assert_eq!(err, RequestError::ChainTruncated);
    assert!(!err.has_status());
    assert_eq!(req.status_addr(), None);
    // The loop did not grow the data past seg_max.
    assert!(req.data().len() <= 8);
}

#[test]
fn next_index_outside_the_queue_is_truncated() {
    let mem = memory();
    put_header(&mem, HDR, 4, 0);
    let descs = [RawDescriptor::from(SplitDescriptor::new(
        HDR,
        16,
        VRING_DESC_F_NEXT as u16,
        200,
    ))];
    let (_, res) = parse_raw(&mem, &descs);
    assert_eq!(res.unwrap_err(), RequestError::ChainTruncated);
}

#[test]
fn reused_request_does_not_grow_once_sized() {
    let mem = memory();
    put_header(&mem, HDR, 0, 0);
    let queue = MockSplitQueue::new(&mem, 16);
    let mut req = Request::with_capacity(8, 4);
    for _ in 0..3 {
        let chain = queue
            .build_desc_chain(&[r(HDR, 16), w(DATA, 512), w(DATA + 0x200, 512), w(STATUS, 1)])
            .unwrap();
        req.parse(chain, &limits()).unwrap();
        assert_eq!(req.data().len(), 2);
        assert_eq!(req.segments.capacity(), 8);
    }
    req.clear();
    assert!(req.data().is_empty());
    assert_eq!(req.status_addr(), None);
}
