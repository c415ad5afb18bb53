//! Property tests that fuzz every parser on stable Rust: arbitrary bytes
//! and mutations of valid input must never panic, and whatever parses
//! must encode back to the bytes it was parsed from. The allocations of
//! the parsers are bounded by their input (they copy slices of it) and,
//! for zstd, by the decoder's window cap, so no case can allocate more
//! than a few times its input.
//!
//! 256 cases per property by default; `PROPTEST_CASES=100000 cargo test
//! qcow2` runs longer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use proptest::test_runner::Config;

use super::format::*;

fn config() -> Config {
    // Cases come from PROPTEST_CASES when set (256 otherwise); failures
    // are printed, not saved to files in the source tree.
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

// ------------------------------------------------------------- headers

/// What a valid generated header holds.
#[derive(Clone, Debug)]
struct Spec {
    version: u32,
    cluster_bits: u32,
    size: u64,
    spare_l1: u32,
    refcount_order: u32,
    extended_l2: bool,
    data_file: bool,
    lazy: bool,
    other_compatible: u64,
    other_autoclear: u64,
    zstd: bool,
    extra_header: usize,
    luks: bool,
    bitmaps: Option<bool>,
    extensions: Vec<(u32, Vec<u8>)>,
    padding_junk: bool,
    backing: Option<Vec<u8>>,
}

fn spec() -> impl Strategy<Value = Spec> {
    let unknown_ext = (1u32.., prop::collection::vec(any::<u8>(), 0..40))
        .prop_filter("not a known extension", |(kind, _)| {
            matches!(ExtensionKind::from_raw(*kind), ExtensionKind::Unknown(_))
        });
    let feature_table =
        prop::collection::vec((0u8..4, 0u8..64, "[a-z ]{0,46}"), 0..4).prop_map(|entries| {
            let mut data = Vec::new();
            for (kind, bit, name) in entries {
                let mut e = vec![0u8; 48];
                e[0] = kind;
                e[1] = bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                data.extend(e);
            }
            (EXT_FEATURE_NAME_TABLE, data)
        });
    let extension = prop_oneof![
        unknown_ext,
        feature_table,
        "[a-z0-9]{0,15}".prop_map(|s| (EXT_BACKING_FORMAT, s.into_bytes())),
        "[a-z0-9./]{0,30}".prop_map(|s| (EXT_EXTERNAL_DATA_FILE, s.into_bytes())),
    ];
    (
        (2u32..=3, 9u32..=16, 0u64..(1 << 40), 0u32..4, 0u32..=6),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (
            any::<bool>(),
            0usize..40,
            any::<bool>(),
            prop::option::of(any::<bool>()),
        ),
        prop::collection::vec(extension, 0..4),
        any::<bool>(),
        prop::option::of(prop::collection::vec(1u8..=255, 0..100)),
    )
        .prop_map(
            |(
                (version, cluster_bits, size, spare_l1, refcount_order),
                (extended_l2, data_file, lazy, other_compatible, other_autoclear),
                (zstd, extra_header, luks, bitmaps),
                extensions,
                padding_junk,
                backing,
            )| {
                let v3 = version == 3;
                Spec {
                    version,
                    cluster_bits: if v3 && extended_l2 {
                        cluster_bits.max(14)
                    } else {
                        cluster_bits
                    },
                    size,
                    spare_l1,
                    refcount_order: if v3 { refcount_order } else { 4 },
                    extended_l2: v3 && extended_l2,
                    data_file: v3 && data_file,
                    lazy: v3 && lazy,
                    other_compatible: if v3 { other_compatible & !1 } else { 0 },
                    other_autoclear: if v3 { other_autoclear & !3 } else { 0 },
                    zstd: v3 && zstd,
                    extra_header: if v3 { extra_header } else { 0 },
                    luks,
                    bitmaps: if v3 { bitmaps } else { None },
                    extensions,
                    padding_junk,
                    backing,
                }
            },
        )
}

/// Lays out a valid first cluster by hand (not with the encoder under
/// test), or `None` if the spec does not fit in it.
fn build(s: &Spec) -> Option<Vec<u8>> {
    let cs = 1usize << s.cluster_bits;
    let mut b = vec![0u8; cs];
    b[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut b, 4, s.version);
    put32(&mut b, 20, s.cluster_bits);
    put64(&mut b, 24, s.size);
    put32(&mut b, 32, if s.luks { 2 } else { 0 });
    let l2_bits = s.cluster_bits - if s.extended_l2 { 4 } else { 3 };
    let l1 = s.size.div_ceil(1 << (s.cluster_bits + l2_bits)) + u64::from(s.spare_l1);
    if l1 * 8 > 32 << 20 {
        return None;
    }
    put32(&mut b, 36, l1 as u32);
    put64(&mut b, 40, 4 * cs as u64);
    put64(&mut b, 48, cs as u64);
    put32(&mut b, 56, 2);
    let mut at = 72;
    if s.version == 3 {
        let mut incompat = 0;
        if s.extended_l2 {
            incompat |= incompatible::EXTENDED_L2;
        }
        if s.data_file {
            incompat |= incompatible::EXTERNAL_DATA_FILE;
        }
        if s.zstd {
            incompat |= incompatible::COMPRESSION_TYPE;
        }
        put64(&mut b, 72, incompat);
        put64(&mut b, 80, s.other_compatible | u64::from(s.lazy));
        let mut autoclear = s.other_autoclear;
        if s.bitmaps == Some(true) {
            autoclear |= autoclear::BITMAPS;
        }
        put64(&mut b, 88, autoclear);
        put32(&mut b, 96, s.refcount_order);
        let header_length = if s.zstd {
            105 + s.extra_header
        } else {
            104 + s.extra_header
        };
        if header_length > cs {
            return None;
        }
        put32(&mut b, 100, header_length as u32);
        if header_length > 104 {
            b[104] = u8::from(s.zstd);
            for (i, byte) in b[105..header_length].iter_mut().enumerate() {
                *byte = i as u8;
            }
        }
        at = header_length;
    }
    let mut exts = s.extensions.clone();
    if s.luks {
        let mut d = vec![0u8; 16];
        d[..8].copy_from_slice(&(8 * cs as u64).to_be_bytes());
        d[15] = 99;
        exts.push((EXT_FULL_DISK_ENCRYPTION, d));
    }
    if let Some(consistent) = s.bitmaps {
        let mut d = vec![0u8; 24];
        if consistent {
            d[3] = 1;
            d[8..16].copy_from_slice(&64u64.to_be_bytes());
            d[16..24].copy_from_slice(&(9 * cs as u64).to_be_bytes());
        } else {
            d.fill(0xee);
        }
        exts.push((EXT_BITMAPS, d));
    }
    for (kind, data) in &exts {
        let padded = data.len().div_ceil(8) * 8;
        if at + 8 + padded + 8 > cs {
            return None;
        }
        put32(&mut b, at, *kind);
        put32(&mut b, at + 4, data.len() as u32);
        b[at + 8..at + 8 + data.len()].copy_from_slice(data);
        if s.padding_junk {
            b[at + 8 + data.len()..at + 8 + padded].fill(0x7e);
        }
        at += 8 + padded;
    }
    at += 8; // the end marker, already zero
    if let Some(name) = &s.backing {
        if at + name.len() > cs {
            return None;
        }
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, name.len() as u32);
        b[at..at + name.len()].copy_from_slice(name);
    }
    Some(b)
}

/// A parsed header must encode, and the encoding must parse to the same
/// header and encode to the same bytes again.
fn check_reencodes(h: &Header) {
    let mut out = vec![0u8; h.cluster_size() as usize];
    let n = h.encode(&mut out).expect("a parsed header encodes");
    assert!(n <= out.len());
    let again = Header::parse(&out).expect("an encoded header parses");
    assert_eq!(&again, h);
    let mut out2 = vec![0u8; out.len()];
    again.encode(&mut out2).unwrap();
    assert!(out == out2);
}

/// Positions to mutate: mostly in the header fields, some anywhere.
fn mutations() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec(
        (
            prop_oneof![0usize..112, 0usize..1024, any::<usize>()],
            1u8..=255,
        ),
        1..6,
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn header_from_arbitrary_bytes(mut bytes in prop::collection::vec(any::<u8>(), 0..1024),
                                   qcow in any::<bool>(), version in 0u32..5) {
        if qcow && bytes.len() >= 8 {
            bytes[..4].copy_from_slice(b"QFI\xfb");
            put32(&mut bytes, 4, version);
        }
        if let Ok(h) = Header::parse(&bytes) {
            check_reencodes(&h);
        }
    }

    #[test]
    fn valid_header_roundtrips_exactly(s in spec()) {
        let Some(bytes) = build(&s) else { return Ok(()) };
        let h = Header::parse(&bytes).unwrap_or_else(|e| panic!("{e}: {s:?}"));
        prop_assert_eq!(h.version, s.version);
        prop_assert_eq!(h.cluster_bits, s.cluster_bits);
        prop_assert_eq!(h.has_extended_l2(), s.extended_l2);
        prop_assert_eq!(h.backing_file.as_ref(), s.backing.as_ref());
        let mut out = vec![0x5au8; bytes.len()];
        h.encode(&mut out).unwrap();
        prop_assert!(out == bytes, "encode(parse(x)) != x");
    }

    #[test]
    fn mutated_header_never_panics(s in spec(), muts in mutations()) {
        let Some(mut bytes) = build(&s) else { return Ok(()) };
        for (at, x) in muts {
            let at = at % bytes.len();
            bytes[at] ^= x;
        }
        if let Ok(h) = Header::parse(&bytes) {
            check_reencodes(&h);
        }
    }

    #[test]
    fn truncated_header_asks_for_more(s in spec(), cut in any::<prop::sample::Index>()) {
        let Some(bytes) = build(&s) else { return Ok(()) };
        let cut = cut.index(bytes.len());
        match Header::parse(&bytes[..cut]) {
            Ok(h) => check_reencodes(&h),
            Err(FormatError::Truncated { needed, available, .. }) => {
                prop_assert_eq!(available, cut);
                prop_assert!(needed > cut && needed <= bytes.len());
            }
            Err(e) => panic!("a prefix of a valid header fails with {e}"),
        }
    }
}

// ------------------------------------------------------------- entries

fn geometry() -> impl Strategy<Value = Geometry> {
    (9u32..=21, 0u32..=6, any::<bool>(), any::<bool>()).prop_map(|(bits, order, ext, data)| {
        let bits = if ext { bits.max(14) } else { bits };
        Geometry::new(bits, order, ext, data).unwrap()
    })
}

/// Entry words that are often valid: flags, an aligned offset, and now
/// and then a stray bit.
fn entry_word(bits: u32) -> impl Strategy<Value = u64> {
    (
        any::<u64>(),
        0u8..8,
        prop::option::of(0u32..64),
        any::<u64>(),
    )
        .prop_map(move |(offset, flags, stray, raw)| {
            let mut w = offset & OFFSET_MASK & !((1 << bits) - 1);
            if flags & 1 != 0 {
                w |= COPIED;
            }
            if flags & 2 != 0 {
                w = COMPRESSED | (raw & !(COPIED | COMPRESSED) & ((1 << 62) - 1));
            }
            if flags & 4 != 0 {
                w |= ZERO;
            }
            if let Some(bit) = stray {
                w ^= 1 << bit;
            }
            w
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn l1_entries(g in geometry(), raw in prop_oneof![any::<u64>(), entry_word(16)]) {
        if let Ok(e) = L1Entry::decode(raw, &g) {
            prop_assert_eq!(e.encode(&g), Ok(raw));
        }
        if let Ok(offset) = decode_refcount_table_entry(raw, &g) {
            prop_assert_eq!(encode_refcount_table_entry(offset, &g), Ok(raw));
        }
    }

    #[test]
    fn l2_entries((g, raw) in geometry().prop_flat_map(|g| {
        (Just(g), prop_oneof![any::<u64>(), entry_word(g.cluster_bits())])
    })) {
        if let Ok(e) = L2Entry::decode(raw, &g) {
            prop_assert_eq!(e.encode(&g), Ok(raw));
            if let L2Entry::Compressed(c) = e {
                prop_assert!(c.compressed_len() >= 1);
                // The sector count has cluster_bits - 8 bits: at most two
                // clusters' worth of sectors.
                prop_assert!(c.compressed_len() <= 2 << g.cluster_bits());
            }
        }
    }

    #[test]
    fn extended_l2_entries((g, raw, bitmap) in geometry().prop_flat_map(|g| {
        (Just(g), prop_oneof![any::<u64>(), entry_word(g.cluster_bits())],
         prop_oneof![any::<u64>(), any::<u32>().prop_map(u64::from),
                     any::<u32>().prop_map(|z| u64::from(z) << 32), Just(0u64)])
    }), index in 0u32..40) {
        if let Ok(e) = ExtendedL2Entry::decode(raw, bitmap, &g) {
            prop_assert_eq!(e.encode(&g), Ok((raw, bitmap)));
            match e.subcluster(index, &g) {
                Ok(_) => prop_assert!(index < 32),
                Err(_) => prop_assert!(index >= 32),
            }
        }
    }

    #[test]
    fn l2_entry_values_roundtrip(g in geometry(), offset in any::<u64>(), sectors in any::<u64>(),
                                 kind in 0u8..4, copied in any::<bool>()) {
        let cs = 1u64 << g.cluster_bits();
        let aligned = offset & OFFSET_MASK & !(cs - 1);
        let entry = match kind {
            0 => L2Entry::Normal { host_offset: aligned, copied },
            1 => L2Entry::Zero { host_offset: Some(aligned), copied },
            2 => L2Entry::Zero { host_offset: None, copied: false },
            _ => L2Entry::Compressed(CompressedCluster {
                host_offset: offset & ((1 << g.compressed_offset_bits().min(56)) - 1),
                additional_sectors: sectors % (cs / 256),
            }),
        };
        if let Ok(raw) = entry.encode(&g) {
            prop_assert_eq!(L2Entry::decode(raw, &g), Ok(entry));
        }
    }

    #[test]
    fn refcount_blocks(mut block in prop::collection::vec(any::<u8>(), 0..600), order in 0u32..9,
                       index in prop_oneof![0u64..5000, any::<u64>()], value in any::<u64>()) {
        let before = block.clone();
        let got = get_refcount(&block, order, index);
        let set = set_refcount(&mut block, order, index, value);
        if order > 6 {
            prop_assert!(got.is_err() && set.is_err());
            return Ok(());
        }
        let entries = (block.len() as u64 * 8) >> order;
        prop_assert_eq!(got.is_ok(), index < entries);
        if set.is_ok() {
            prop_assert_eq!(get_refcount(&block, order, index), Ok(value));
            // Nothing else changed.
            set_refcount(&mut block, order, index, got.unwrap()).unwrap();
            prop_assert!(block == before);
        } else {
            prop_assert!(block == before);
        }
    }
}

// ----------------------------------------------------------- snapshots

fn snapshot() -> impl Strategy<Value = Snapshot> {
    (
        ("[0-9]{0,5}", "[ -~]{0,40}"),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
        ),
        (
            0usize..4,
            any::<[u64; 3]>(),
            prop::collection::vec(any::<u8>(), 0..30),
        ),
    )
        .prop_map(
            |((id, name), (l1, l1_size, sec, nsec, clock, vm32), (known, values, tail))| {
                let mut s = Snapshot::new(id.into_bytes(), name.into_bytes());
                s.l1_table_offset = l1;
                s.l1_size = l1_size;
                s.date_sec = sec;
                s.date_nsec = nsec;
                s.vm_clock_nsec = clock;
                s.vm_state_size_32 = vm32;
                s.vm_state_size_large = (known > 0).then_some(values[0]);
                s.disk_size = (known > 1).then_some(values[1]);
                s.icount = (known > 2).then_some(values[2]);
                // Unknown extra data only after all known fields, or too
                // short to be read as the next one.
                s.unknown_extra = if known == 3 {
                    tail
                } else {
                    tail.into_iter().take(7).collect()
                };
                s
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn snapshot_table_roundtrips(snaps in prop::collection::vec(snapshot(), 0..6)) {
        let bytes = encode_snapshot_table(&snaps).unwrap();
        prop_assert_eq!(bytes.len(), snapshot_table_len(&snaps));
        let parsed = parse_snapshot_table(&bytes, snaps.len() as u32).unwrap();
        prop_assert_eq!(&parsed, &snaps);
        prop_assert!(encode_snapshot_table(&parsed).unwrap() == bytes);
    }

    #[test]
    fn mutated_snapshot_table(snaps in prop::collection::vec(snapshot(), 1..6),
                              muts in prop::collection::vec((any::<usize>(), 1u8..=255), 0..6),
                              extra in 0usize..64, count_delta in -2i64..3) {
        let mut bytes = encode_snapshot_table(&snaps).unwrap();
        bytes.resize(bytes.len() + extra, 0xcc);
        for (at, x) in muts {
            let at = at % bytes.len();
            bytes[at] ^= x;
        }
        let count = (snaps.len() as i64 + count_delta).max(0) as u32;
        if let Ok(parsed) = parse_snapshot_table(&bytes, count) {
            let encoded = encode_snapshot_table(&parsed).unwrap();
            prop_assert!(encoded[..] == bytes[..encoded.len()]);
        }
    }

    #[test]
    fn snapshot_table_from_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048),
                                           count in prop_oneof![0u32..50, any::<u32>()]) {
        if let Ok(parsed) = parse_snapshot_table(&bytes, count) {
            let encoded = encode_snapshot_table(&parsed).unwrap();
            prop_assert!(encoded[..] == bytes[..encoded.len()]);
        }
    }
}

// ---------------------------------------------------- compressed data

/// A cluster of 512 bytes to 16 KiB filled from a short repeating seed,
/// and the compression type to use.
fn cluster_data() -> impl Strategy<Value = (CompressionType, Vec<u8>)> {
    (
        prop_oneof![Just(CompressionType::Zlib), Just(CompressionType::Zstd)],
        0u32..6,
        prop::collection::vec(any::<u8>(), 1..64),
    )
        .prop_map(|(kind, shift, seed)| {
            let len = 512usize << shift;
            let data = seed.iter().copied().cycle().take(len).collect();
            (kind, data)
        })
}

fn compress(kind: CompressionType, data: &[u8]) -> Vec<u8> {
    match kind {
        CompressionType::Zlib => miniz_oxide::deflate::compress_to_vec(data, 6),
        CompressionType::Zstd => zstd::bulk::compress(data, 3).unwrap(),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn compressed_clusters_roundtrip((kind, data) in cluster_data(),
                                     junk in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut packed = compress(kind, &data);
        // What follows the stream up to the sector's end is ignored.
        if kind == CompressionType::Zlib || junk.is_empty() {
            packed.extend_from_slice(&junk);
        }
        let mut out = vec![0u8; data.len()];
        decompress(kind, &packed, &mut out).unwrap();
        prop_assert!(out == data);
    }

    #[test]
    fn mutated_compressed_clusters((kind, data) in cluster_data(),
                                   muts in prop::collection::vec((any::<usize>(), 1u8..=255), 0..8),
                                   cut in any::<prop::sample::Index>()) {
        let mut packed = compress(kind, &data);
        for (at, x) in muts {
            let at = at % packed.len();
            packed[at] ^= x;
        }
        let cut = cut.index(packed.len() + 1);
        let mut out = vec![0u8; data.len()];
        let _ = decompress(kind, &packed[..cut], &mut out);
    }

    #[test]
    fn compressed_clusters_from_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048),
                                                zstd_magic in any::<bool>(), shift in 0u32..8) {
        let mut out = vec![0u8; 512 << shift];
        let _ = decompress(CompressionType::Zlib, &bytes, &mut out);
        let mut bytes = bytes;
        if zstd_magic && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
        }
        let _ = decompress(CompressionType::Zstd, &bytes, &mut out);
    }
}
