//! Unit tests on hand-made headers, entries, refcount blocks, snapshot
//! tables and compressed clusters.

#![allow(clippy::unwrap_used)]

use super::format::*;

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A version 3 header as QEMU lays it out for a 1 GiB image: refcount
/// table in cluster 1, L1 table in cluster 3, `header_length` 112, no
/// extensions but the end marker.
fn v3(cluster_bits: u32) -> Vec<u8> {
    let cs = 1usize << cluster_bits;
    let mut b = vec![0u8; cs];
    b[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut b, 4, 3);
    put32(&mut b, 20, cluster_bits);
    put64(&mut b, 24, 1 << 30);
    let l1 = (1u64 << 30).div_ceil(1 << (2 * cluster_bits - 3));
    put32(&mut b, 36, l1 as u32);
    put64(&mut b, 40, 3 * cs as u64);
    put64(&mut b, 48, cs as u64);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    b
}

/// The same for version 2 (72 bytes of header).
fn v2(cluster_bits: u32) -> Vec<u8> {
    let mut b = v3(cluster_bits);
    put32(&mut b, 4, 2);
    b[72..112].fill(0);
    b
}

/// Appends an extension at `at`; returns where the next one goes.
fn ext(buf: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
    put32(buf, at, kind);
    put32(buf, at + 4, data.len() as u32);
    buf[at + 8..at + 8 + data.len()].copy_from_slice(data);
    at + 8 + data.len().div_ceil(8) * 8
}

fn feature_entry(kind: u8, bit: u8, name: &str) -> Vec<u8> {
    let mut e = vec![0u8; 48];
    e[0] = kind;
    e[1] = bit;
    e[2..2 + name.len()].copy_from_slice(name.as_bytes());
    e
}

fn err(buf: &[u8]) -> String {
    Header::parse(buf).unwrap_err().to_string()
}

fn roundtrip(buf: &[u8]) -> Header {
    let h = Header::parse(buf).unwrap();
    let mut out = vec![0xaau8; buf.len()];
    h.encode(&mut out).unwrap();
    assert_eq!(out, buf, "encode(parse(x)) != x");
    h
}

// ---------------------------------------------------------------- header

#[test]
fn v3_header_fields() {
    let h = roundtrip(&v3(16));
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.l1_size, 2);
    assert_eq!(h.l1_table_offset, 3 * 65536);
    assert_eq!(h.refcount_table_offset, 65536);
    assert_eq!(h.refcount_table_clusters, 1);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.compression_type, CompressionType::Zlib);
    assert_eq!(h.crypt_method, CryptMethod::None);
    assert!(h.extensions.is_empty());
    assert_eq!(h.backing_file, None);
    assert!(!h.is_dirty() && !h.is_corrupt() && !h.has_extended_l2());
}

#[test]
fn v2_header_implies_v3_fields() {
    let mut b = v2(16);
    let next = ext(&mut b, 72, EXT_BACKING_FORMAT, b"raw");
    put64(&mut b, next, 0);
    let name_at = next + 8;
    b[name_at..name_at + 8].copy_from_slice(b"base.img");
    put64(&mut b, 8, name_at as u64);
    put32(&mut b, 16, 8);
    let h = roundtrip(&b);
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.incompatible_features, 0);
    assert_eq!(h.backing_format(), Some(&b"raw"[..]));
    assert_eq!(h.backing_file.as_deref(), Some(&b"base.img"[..]));
}

#[test]
fn v2_ignores_bytes_where_v3_fields_would_be() {
    // In a version 2 image bytes 72.. are extensions, here an unknown one
    // whose bytes would read as an absurd refcount_order.
    let mut b = v2(12);
    let next = ext(&mut b, 72, 0x1234_5678, &[0xff; 30]);
    assert_eq!(next, 112);
    let h = roundtrip(&b);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.extensions.len(), 1);
    assert_eq!(h.extensions[0].kind, ExtensionKind::Unknown(0x1234_5678));
    assert_eq!(h.extensions[0].padding(), &[0, 0]);
}

#[test]
fn feature_bits_and_compression_type() {
    let mut b = v3(16);
    put64(
        &mut b,
        72,
        incompatible::DIRTY | incompatible::COMPRESSION_TYPE | incompatible::EXTENDED_L2,
    );
    put64(&mut b, 80, compatible::LAZY_REFCOUNTS | 1 << 40);
    put64(&mut b, 88, 1 << 9);
    b[104] = 1;
    // Extended L2 entries halve what an L1 entry maps.
    put32(&mut b, 36, 4);
    let h = roundtrip(&b);
    assert!(h.is_dirty() && h.has_extended_l2() && h.has_lazy_refcounts());
    assert_eq!(h.compression_type, CompressionType::Zstd);
    assert_eq!(h.unknown_autoclear_features(), 1 << 9);
    let g = h.geometry().unwrap();
    assert!(g.extended_l2());
    assert_eq!(g.l2_entries(), 4096);
}

#[test]
fn header_length_104_has_no_compression_type() {
    let mut b = v3(16);
    put32(&mut b, 100, 104);
    // Byte 104 is not a header field any more but the first extension's
    // type word.
    b[104] = 1;
    let h = roundtrip(&b);
    assert_eq!(h.compression_type, CompressionType::Zlib);
    assert_eq!(h.extensions[0].kind, ExtensionKind::Unknown(0x0100_0000));
}

#[test]
fn unknown_header_fields_are_kept() {
    let mut b = v3(16);
    put32(&mut b, 100, 128);
    b[105..128].copy_from_slice(&[7; 23]);
    let h = roundtrip(&b);
    assert_eq!(h.header_length, 128);
}

#[test]
fn qemu_messages_for_bad_headers() {
    let mut b = v3(16);
    b[0] = b'X';
    assert_eq!(err(&b), "Image is not in qcow2 format");
    assert_eq!(err(b"QFX"), "Image is not in qcow2 format");

    for version in [0, 1, 4] {
        let mut b = v3(16);
        put32(&mut b, 4, version);
        assert_eq!(err(&b), format!("Unsupported qcow2 version {version}"));
    }
    for bits in [8, 22, 63, 64] {
        let mut b = v3(16);
        put32(&mut b, 20, bits);
        assert_eq!(err(&b), format!("Unsupported cluster size: 2^{bits}"));
    }
    let mut b = v3(16);
    put32(&mut b, 100, 100);
    assert_eq!(err(&b), "qcow2 header too short");

    let mut b = v3(9);
    put32(&mut b, 100, 520);
    assert_eq!(err(&b), "qcow2 header exceeds cluster size");

    let mut b = v3(16);
    put32(&mut b, 96, 7);
    assert_eq!(
        err(&b),
        "Reference count entry width too large; may not exceed 64 bits"
    );

    let mut b = v3(16);
    put64(&mut b, 8, 65537);
    assert_eq!(err(&b), "Invalid backing file offset");
    put64(&mut b, 8, 64);
    assert_eq!(err(&b), "Invalid backing file offset");

    let mut b = v3(16);
    b[104] = 2;
    assert_eq!(err(&b), "qcow2: unknown compression type: 2");
    let mut b = v3(16);
    put64(&mut b, 72, incompatible::COMPRESSION_TYPE);
    assert_eq!(
        err(&b),
        "qcow2: Compression type incompatible feature bit must not be set"
    );
    let mut b = v3(16);
    b[104] = 1;
    assert_eq!(
        err(&b),
        "qcow2: Compression type incompatible feature bit must be set"
    );

    let mut b = v3(12);
    put64(&mut b, 72, incompatible::EXTENDED_L2);
    assert_eq!(err(&b), "Unsupported subcluster size: 128");

    let mut b = v3(16);
    put32(&mut b, 32, 3);
    assert_eq!(err(&b), "Unsupported encryption method 3");
    put32(&mut b, 32, 2);
    assert_eq!(err(&b), "Missing CRYPTO header for crypt method 2");
}

#[test]
fn unknown_incompatible_features_are_named() {
    let mut b = v3(16);
    put64(&mut b, 72, 1 << 5 | 1 << 6 | 1 << 63);
    assert_eq!(
        err(&b),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000060"
    );
    let mut table = feature_entry(0, 5, "future thing");
    table.extend(feature_entry(1, 6, "compatible, not this"));
    table.extend(feature_entry(0, 63, "top bit"));
    let next = ext(&mut b, 112, EXT_FEATURE_NAME_TABLE, &table);
    put64(&mut b, next, 0);
    assert_eq!(
        err(&b),
        "Unsupported qcow2 feature(s): future thing, top bit, Unknown incompatible feature: 40"
    );
}

#[test]
fn table_limits() {
    // 32 MiB of L1 table is the most QEMU accepts.
    let mut b = v3(16);
    put32(&mut b, 36, (32 << 20) / 8 + 1);
    assert_eq!(err(&b), "Active L1 table too large");
    put32(&mut b, 36, (32 << 20) / 8);
    Header::parse(&b).unwrap();
    put64(&mut b, 40, 3 * 65536 + 512);
    assert_eq!(err(&b), "Active L1 table offset invalid");
    put64(&mut b, 40, i64::MAX as u64 - 65535);
    assert_eq!(err(&b), "Active L1 table offset invalid");

    let mut b = v3(16);
    put32(&mut b, 56, 0);
    assert_eq!(err(&b), "Image does not contain a reference count table");
    put32(&mut b, 56, 129);
    assert_eq!(err(&b), "Reference count table too large");
    put32(&mut b, 56, 1);
    put64(&mut b, 48, 100);
    assert_eq!(err(&b), "Reference count table offset invalid");

    let mut b = v3(16);
    put32(&mut b, 60, 65537);
    assert_eq!(err(&b), "Snapshot table too large");
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 8);
    assert_eq!(err(&b), "Snapshot table offset invalid");
}

#[test]
fn size_limits() {
    let mut b = v3(16);
    put64(&mut b, 24, (1 << 30) + 1);
    assert_eq!(err(&b), "L1 table is too small");
    put64(&mut b, 24, u64::MAX);
    assert_eq!(err(&b), "Image is too big");
    // 512-byte clusters: each L1 entry maps 32 KiB, so 2^31 entries
    // (64 TiB) is past QEMU's limit even before the table size is.
    let mut b = v3(9);
    put64(&mut b, 24, 1 << 46);
    put32(&mut b, 36, u32::MAX);
    assert_eq!(err(&b), "Active L1 table too large");
}

#[test]
fn extension_checks() {
    let mut b = v3(16);
    put32(&mut b, 112, 0x1234);
    put32(&mut b, 116, 65536);
    assert_eq!(err(&b), "Header extension too large");

    let mut b = v3(16);
    ext(&mut b, 112, EXT_BACKING_FORMAT, b"0123456789abcdef");
    assert_eq!(
        err(&b),
        "ERROR: ext_backing_format: len=16 too large (>=16)"
    );

    let mut b = v3(16);
    ext(&mut b, 112, EXT_FULL_DISK_ENCRYPTION, &[0; 16]);
    assert_eq!(
        err(&b),
        "CRYPTO header extension only expected with LUKS encryption method"
    );
    put32(&mut b, 32, 2);
    let h = roundtrip(&b);
    assert_eq!(
        h.encryption_header(),
        Some(EncryptionHeader {
            offset: 0,
            length: 0
        })
    );
    let mut d = [0u8; 16];
    d[7] = 1;
    ext(&mut b, 112, EXT_FULL_DISK_ENCRYPTION, &d);
    assert_eq!(
        err(&b),
        "Encryption header offset '1' is not a multiple of cluster size '65536'"
    );
    ext(&mut b, 112, EXT_FULL_DISK_ENCRYPTION, &[0; 8]);
    assert_eq!(
        err(&b),
        "CRYPTO header extension size 8, but expected size 16"
    );

    let mut b = v3(16);
    ext(&mut b, 112, EXT_BITMAPS, &[0; 16]);
    assert_eq!(err(&b), "bitmaps_ext: Invalid extension length");
    // A stale extension (autoclear bit clear) is not checked further.
    ext(&mut b, 112, EXT_BITMAPS, &[0; 24]);
    assert_eq!(roundtrip(&b).bitmaps(), None);
    put64(&mut b, 88, autoclear::BITMAPS);
    assert_eq!(err(&b), "found bitmaps extension with zero bitmaps");
    let mut d = [0u8; 24];
    d[3] = 1;
    d[7] = 1;
    ext(&mut b, 112, EXT_BITMAPS, &d);
    assert_eq!(err(&b), "bitmaps_ext: Reserved field is not zero");
    d[7] = 0;
    d[0..4].copy_from_slice(&65536u32.to_be_bytes());
    ext(&mut b, 112, EXT_BITMAPS, &d);
    assert_eq!(
        err(&b),
        "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"
    );
    d[0..4].copy_from_slice(&2u32.to_be_bytes());
    d[23] = 1;
    ext(&mut b, 112, EXT_BITMAPS, &d);
    assert_eq!(err(&b), "bitmaps_ext: invalid bitmap directory offset");
    d[23] = 0;
    d[8..16].copy_from_slice(&(1024u64 * 65535 + 1).to_be_bytes());
    ext(&mut b, 112, EXT_BITMAPS, &d);
    assert_eq!(
        err(&b),
        "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)"
    );
    d[8..16].copy_from_slice(&1024u64.to_be_bytes());
    d[16..24].copy_from_slice(&(5u64 << 16).to_be_bytes());
    ext(&mut b, 112, EXT_BITMAPS, &d);
    assert_eq!(
        roundtrip(&b).bitmaps(),
        Some(BitmapsExtension {
            nb_bitmaps: 2,
            reserved: 0,
            directory_size: 1024,
            directory_offset: 5 << 16
        })
    );

    let mut b = v3(16);
    put64(&mut b, 88, autoclear::RAW_EXTERNAL_DATA);
    assert_eq!(err(&b), "data-file-raw requires a data file");
    put64(&mut b, 72, incompatible::EXTERNAL_DATA_FILE);
    ext(&mut b, 112, EXT_EXTERNAL_DATA_FILE, b"data.raw");
    let h = roundtrip(&b);
    assert!(h.has_raw_external_data());
    assert_eq!(h.external_data_file(), Some(&b"data.raw"[..]));
}

#[test]
fn backing_file_name() {
    let mut b = v3(9);
    put64(&mut b, 8, 120);
    put32(&mut b, 16, 393);
    assert_eq!(err(&b), "Backing file name too long");
    put32(&mut b, 16, 392);
    b[120..512].fill(b'a');
    let h = roundtrip(&b);
    assert_eq!(h.backing_file.as_ref().map(Vec::len), Some(392));

    let mut b = v3(16);
    put64(&mut b, 8, 1000);
    put32(&mut b, 16, 1024);
    assert_eq!(err(&b), "Backing file name too long");
}

#[test]
fn truncated_input_says_how_much_to_read() {
    let mut b = v3(16);
    put64(&mut b, 8, 4096);
    put32(&mut b, 16, 10);
    match Header::parse(&b[..200]) {
        Err(FormatError::Truncated { needed, .. }) => assert_eq!(needed, 4106),
        other => panic!("{other:?}"),
    }
    match Header::parse(&b[..50]) {
        Err(FormatError::Truncated { needed, .. }) => assert_eq!(needed, 72),
        other => panic!("{other:?}"),
    }
    match Header::parse(&b[..100]) {
        Err(FormatError::Truncated { needed, .. }) => assert_eq!(needed, 104),
        other => panic!("{other:?}"),
    }
}

#[test]
fn extensions_without_end_marker_fill_the_area() {
    // The extension area ends at the backing file name; with no room for
    // an end marker there is none, and the encoder writes none.
    let mut b = v3(12);
    let next = ext(&mut b, 112, EXT_BACKING_FORMAT, b"qcow2");
    assert_eq!(next, 128);
    put64(&mut b, 8, 128);
    put32(&mut b, 16, 4);
    b[128..132].copy_from_slice(b"base");
    let h = roundtrip(&b);
    assert_eq!(h.backing_format(), Some(&b"qcow2"[..]));
    // Short padding at the end of the area is kept short.
    let mut b = v3(12);
    ext(&mut b, 112, 0xdead_beef, b"abc");
    put64(&mut b, 8, 123);
    put32(&mut b, 16, 1);
    b[123] = b'x';
    let h = roundtrip(&b);
    assert_eq!(h.extensions[0].padding().len(), 0);
}

#[test]
fn extension_padding_is_kept() {
    let mut b = v3(12);
    let next = ext(&mut b, 112, EXT_BACKING_FORMAT, b"raw");
    b[123..128].copy_from_slice(b"junk!");
    put64(&mut b, next, 0);
    let h = roundtrip(&b);
    assert_eq!(h.extensions[0].padding(), b"junk!");
}

#[test]
fn encoder_reports_what_does_not_fit() {
    let mut h = Header::parse(&v3(9)).unwrap();
    h.extensions.push(HeaderExtension::new(
        ExtensionKind::Unknown(7),
        vec![1; 400],
    ));
    let mut out = vec![0; 512];
    assert_eq!(
        h.encode(&mut out),
        Err(FormatError::HeaderDoesNotFit {
            needed: 528,
            available: 512
        })
    );
    h.extensions[0].data.truncate(100);
    let h = HeaderExtension::new(ExtensionKind::Unknown(7), vec![1; 100]);
    assert_eq!(h.encoded_len(), 112);

    let mut h = Header::parse(&v3(16)).unwrap();
    assert_eq!(
        h.encode(&mut [0; 100]),
        Err(FormatError::HeaderDoesNotFit {
            needed: 120,
            available: 100
        })
    );
    h.header_length = 120;
    assert!(matches!(
        h.encode(&mut [0; 65536]),
        Err(FormatError::InconsistentHeader(_))
    ));
}

#[test]
fn set_backing_file_places_the_name_after_the_end_marker() {
    let mut h = Header::parse(&v3(16)).unwrap();
    h.extensions.push(HeaderExtension::new(
        ExtensionKind::BackingFormat,
        b"qcow2".to_vec(),
    ));
    h.set_backing_file(Some(b"base.qcow2")).unwrap();
    assert_eq!(h.backing_file_offset, 112 + 16 + 8);
    assert_eq!(h.backing_file_size, 10);
    let mut out = vec![0; 65536];
    assert_eq!(h.encode(&mut out).unwrap(), 136 + 10);
    let again = Header::parse(&out).unwrap();
    assert_eq!(again, h);
    assert_eq!(&out[136..146], b"base.qcow2");
    assert!(h.set_backing_file(Some(&[b'x'; 1024])).is_err());
    h.set_backing_file(None).unwrap();
    h.encode(&mut out).unwrap();
    assert_eq!(Header::parse(&out).unwrap().backing_file, None);
}

#[test]
fn feature_name_table() {
    let mut b = v3(16);
    let mut table = feature_entry(0, 0, "dirty bit");
    table.extend(feature_entry(2, 1, &"n".repeat(46)));
    table.extend(feature_entry(9, 3, "odd"));
    let next = ext(&mut b, 112, EXT_FEATURE_NAME_TABLE, &table);
    put64(&mut b, next, 0);
    let names = roundtrip(&b).feature_names();
    assert_eq!(names.len(), 3);
    assert_eq!(names[0].kind, FeatureKind::Incompatible);
    assert_eq!(names[0].name, b"dirty bit");
    assert_eq!(names[1].kind, FeatureKind::Autoclear);
    assert_eq!(names[1].bit, 1);
    assert_eq!(names[1].name.len(), 46);
    assert_eq!(names[2].kind, FeatureKind::Other(9));
}

// -------------------------------------------------------------- geometry

#[test]
fn geometry_arithmetic() {
    let g = Geometry::new(16, 4, false, false).unwrap();
    assert_eq!(g.cluster_size(), 65536);
    assert_eq!(g.l2_entries(), 8192);
    assert_eq!(g.l2_entry_size(), 8);
    assert_eq!(g.refcount_block_entries(), 32768);
    assert_eq!(g.subclusters_per_cluster(), 1);
    assert_eq!(g.subcluster_index(65535), 0);
    // 1 GiB + 3 clusters + 5 bytes: L1 entry 2 (each maps 512 MiB).
    let p = g.guest_position((1 << 30) + 3 * 65536 + 5);
    assert_eq!(
        p,
        GuestPosition {
            l1_index: 2,
            l2_index: 3,
            offset_in_cluster: 5
        }
    );
    assert_eq!(g.l1_entries_for(0), 0);
    assert_eq!(g.l1_entries_for(1), 1);
    assert_eq!(g.l1_entries_for(512 << 20), 1);
    assert_eq!(g.l1_entries_for((512 << 20) + 1), 2);
    let r = g.refcount_position(32768 * 65536 + 7 * 65536 + 100);
    assert_eq!(
        r,
        RefcountPosition {
            table_index: 1,
            block_index: 7
        }
    );
    assert_eq!(g.compressed_offset_bits(), 54);
    assert_eq!(g.max_refcount(), 65535);

    let x = Geometry::new(16, 0, true, false).unwrap();
    assert_eq!(x.l2_entries(), 4096);
    assert_eq!(x.l2_entry_size(), 16);
    assert_eq!(x.subcluster_size(), 2048);
    assert_eq!(x.subcluster_index(2047), 0);
    assert_eq!(x.subcluster_index(2048), 1);
    assert_eq!(x.subcluster_index(65535), 31);
    assert_eq!(x.refcount_block_entries(), 524288);
    assert_eq!(x.max_refcount(), 1);
    assert_eq!(x.guest_position(4096 * 65536).l1_index, 1);

    for order in 0..=6 {
        let g = Geometry::new(9, order, false, false).unwrap();
        assert_eq!(g.refcount_block_entries(), 4096 >> order);
        assert_eq!(g.refcount_bits(), 1 << order);
    }
    assert_eq!(
        Geometry::new(9, 6, false, false).unwrap().max_refcount(),
        u64::MAX
    );
    assert_eq!(
        Geometry::new(9, 7, false, false),
        Err(FormatError::RefcountOrderTooLarge)
    );
    assert_eq!(
        Geometry::new(13, 4, true, false),
        Err(FormatError::UnsupportedSubclusterSize(256))
    );
    assert!(Geometry::new(14, 4, true, false).is_ok());
    assert_eq!(
        Geometry::new(21, 4, false, false).unwrap().l2_entries(),
        262144
    );
}

// --------------------------------------------------------------- entries

fn geo(bits: u32) -> Geometry {
    Geometry::new(bits, 4, false, false).unwrap()
}

#[test]
fn l1_entries() {
    let g = geo(16);
    let e = L1Entry::decode(COPIED | 0x5_0000, &g).unwrap();
    assert_eq!(
        e,
        L1Entry {
            l2_offset: 0x5_0000,
            copied: true
        }
    );
    assert_eq!(e.encode(&g).unwrap(), COPIED | 0x5_0000);
    assert_eq!(
        L1Entry::decode(0, &g).unwrap(),
        L1Entry {
            l2_offset: 0,
            copied: false
        }
    );
    for bit in (0..9).chain(56..63) {
        assert_eq!(
            L1Entry::decode(1 << bit, &g),
            Err(FormatError::L1ReservedBits(1 << bit))
        );
    }
    assert_eq!(
        L1Entry::decode(0x5_0200, &g),
        Err(FormatError::TableEntryUnaligned(0x5_0200))
    );
    assert!(L1Entry {
        l2_offset: 1 << 56,
        copied: false
    }
    .encode(&g)
    .is_err());
}

#[test]
fn refcount_table_entries() {
    let g = geo(16);
    assert_eq!(decode_refcount_table_entry(1 << 63, &g), Ok(1 << 63));
    assert_eq!(
        decode_refcount_table_entry(0x1_0100, &g),
        Err(FormatError::RefcountTableReservedBits(0x1_0100))
    );
    assert_eq!(
        decode_refcount_table_entry(0x1_0200, &g),
        Err(FormatError::TableEntryUnaligned(0x1_0200))
    );
    assert_eq!(encode_refcount_table_entry(0x3_0000, &g), Ok(0x3_0000));
}

#[test]
fn standard_l2_entries() {
    let g = geo(16);
    let cases = [
        (0, L2Entry::Unallocated),
        (
            ZERO,
            L2Entry::Zero {
                host_offset: None,
                copied: false,
            },
        ),
        (
            ZERO | COPIED | 0x7_0000,
            L2Entry::Zero {
                host_offset: Some(0x7_0000),
                copied: true,
            },
        ),
        (
            ZERO | 0x7_0000,
            L2Entry::Zero {
                host_offset: Some(0x7_0000),
                copied: false,
            },
        ),
        (
            COPIED | 0x9_0000,
            L2Entry::Normal {
                host_offset: 0x9_0000,
                copied: true,
            },
        ),
        (
            0x00ff_ffff_ffff_0000,
            L2Entry::Normal {
                host_offset: 0x00ff_ffff_ffff_0000,
                copied: false,
            },
        ),
    ];
    for (raw, entry) in cases {
        assert_eq!(L2Entry::decode(raw, &g), Ok(entry), "{raw:#x}");
        assert_eq!(entry.encode(&g), Ok(raw), "{entry:?}");
    }
    for bit in (1..9).chain(56..62) {
        assert_eq!(
            L2Entry::decode(0x1_0000 | 1 << bit, &g),
            Err(FormatError::L2ReservedBits(0x1_0000 | 1 << bit))
        );
    }
    assert_eq!(
        L2Entry::decode(0x1_8000, &g),
        Err(FormatError::ClusterOffsetUnaligned(0x1_8000))
    );
    assert_eq!(
        L2Entry::decode(COPIED, &g),
        Err(FormatError::CopiedWithoutOffset(COPIED))
    );
    assert!(L2Entry::Normal {
        host_offset: 0,
        copied: true
    }
    .encode(&g)
    .is_err());
    assert!(L2Entry::Normal {
        host_offset: 0x1_0200,
        copied: false
    }
    .encode(&g)
    .is_err());

    // With an external data file, offset 0 with COPIED is a cluster.
    let d = Geometry::new(16, 4, false, true).unwrap();
    let at_zero = L2Entry::Normal {
        host_offset: 0,
        copied: true,
    };
    assert_eq!(L2Entry::decode(COPIED, &d), Ok(at_zero));
    assert_eq!(at_zero.encode(&d), Ok(COPIED));
    assert_eq!(L2Entry::decode(0, &d), Ok(L2Entry::Unallocated));
}

#[test]
fn compressed_l2_entries() {
    // 64 KiB clusters: offset in bits 0-53, sector count in 54-61.
    let g = geo(16);
    let raw = COMPRESSED | 3 << 54 | 0x12_3456;
    let c = CompressedCluster {
        host_offset: 0x12_3456,
        additional_sectors: 3,
    };
    assert_eq!(L2Entry::decode(raw, &g), Ok(L2Entry::Compressed(c)));
    assert_eq!(L2Entry::Compressed(c).encode(&g), Ok(raw));
    // The data runs from 0x123456 to the end of the fourth sector.
    assert_eq!(c.compressed_len(), 4 * 512 - 0x56);
    assert_eq!(CompressedCluster::new(0x12_3456, 4 * 512 - 0x56), c);
    assert_eq!(
        CompressedCluster::new(0x12_3456, 4 * 512 - 0x56 + 1).additional_sectors,
        4
    );
    assert_eq!(CompressedCluster::new(1024, 512).additional_sectors, 0);
    assert_eq!(
        L2Entry::decode(raw | COPIED, &g),
        Err(FormatError::CompressedCopied(raw | COPIED))
    );
    let too_long = CompressedCluster {
        host_offset: 0,
        additional_sectors: 256,
    };
    assert!(L2Entry::Compressed(too_long).encode(&g).is_err());

    // 2 MiB clusters: 13 bits of sector count from bit 49.
    let g = geo(21);
    assert_eq!(g.compressed_offset_bits(), 49);
    let raw = COMPRESSED | 0x1fff << 49 | ((1 << 49) - 1);
    match L2Entry::decode(raw, &g).unwrap() {
        L2Entry::Compressed(c) => {
            assert_eq!(c.host_offset, (1 << 49) - 1);
            assert_eq!(c.additional_sectors, 0x1fff);
        }
        other => panic!("{other:?}"),
    }

    // 512-byte clusters: the offset field has bits 0-60, but only 0-55
    // may be used; the sector count is the single bit 61.
    let g = geo(9);
    assert_eq!(g.compressed_offset_bits(), 61);
    assert_eq!(
        L2Entry::decode(COMPRESSED | 1 << 56, &g),
        Err(FormatError::L2ReservedBits(COMPRESSED | 1 << 56))
    );
    match L2Entry::decode(COMPRESSED | 1 << 61 | 0xff_ffff_ffff_ffff, &g).unwrap() {
        L2Entry::Compressed(c) => {
            assert_eq!(c.additional_sectors, 1);
            assert_eq!(c.host_offset, 0xff_ffff_ffff_ffff);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn extended_l2_entries() {
    let g = Geometry::new(16, 4, true, false).unwrap();
    let data = COPIED | 0x4_0000;
    // Subclusters 0-1 data, 2 zero, the rest unallocated.
    let e = ExtendedL2Entry::decode(data, 0b11 | 0b100 << 32, &g).unwrap();
    assert_eq!(e.bitmap.allocated, 0b11);
    assert_eq!(e.bitmap.zero, 0b100);
    assert_eq!(e.encode(&g), Ok((data, 0b11 | 0b100 << 32)));
    assert_eq!(
        e.subcluster(1, &g),
        Ok(Subcluster::Data {
            host_offset: 0x4_0000 + 2048
        })
    );
    assert_eq!(e.subcluster(2, &g), Ok(Subcluster::Zero));
    assert_eq!(e.subcluster(3, &g), Ok(Subcluster::Unallocated));
    assert_eq!(e.subcluster(32, &g), Err(FormatError::SubclusterIndex(32)));

    // Unallocated cluster: zero bits allowed, allocation bits not.
    let z = ExtendedL2Entry::decode(0, 0xffff_ffff << 32, &g).unwrap();
    assert_eq!(z.subcluster(31, &g), Ok(Subcluster::Zero));
    let bad = [
        (0, 1),
        (data, 1 | 1 << 32),
        (COMPRESSED | 0x1234, 1 << 40),
        (ZERO | data, 0),
    ];
    for (entry, bitmap) in bad {
        assert!(
            ExtendedL2Entry::decode(entry, bitmap, &g).is_err(),
            "{entry:#x} {bitmap:#x}"
        );
    }
    let c = ExtendedL2Entry::decode(COMPRESSED | 0x1234, 0, &g).unwrap();
    assert!(matches!(c.subcluster(5, &g), Ok(Subcluster::Compressed(_))));
    assert!(ExtendedL2Entry {
        entry: L2Entry::Zero {
            host_offset: None,
            copied: false
        },
        bitmap: SubclusterBitmap::default()
    }
    .encode(&g)
    .is_err());
}

// -------------------------------------------------------------- refcounts

#[test]
fn refcounts_of_every_width() {
    for order in 0..=6u32 {
        let bits = 1u32 << order;
        let max = u64::MAX >> (64 - bits);
        let mut block = vec![0u8; 512];
        let entries = 4096u64 >> order;
        for i in 0..entries {
            set_refcount(&mut block, order, i, (i * 7 + 3) & max).unwrap();
        }
        for i in 0..entries {
            assert_eq!(get_refcount(&block, order, i), Ok((i * 7 + 3) & max));
        }
        set_refcount(&mut block, order, entries - 1, max).unwrap();
        assert_eq!(get_refcount(&block, order, entries - 1), Ok(max));
        assert_eq!(
            get_refcount(&block, order, entries),
            Err(FormatError::RefcountIndex {
                index: entries,
                entries
            })
        );
        if bits < 64 {
            assert_eq!(
                set_refcount(&mut block, order, 0, max + 1),
                Err(FormatError::RefcountValue {
                    value: max + 1,
                    bits
                })
            );
        }
    }
    assert_eq!(
        get_refcount(&[0; 8], 7, 0),
        Err(FormatError::RefcountOrderTooLarge)
    );
}

#[test]
fn refcount_bit_layout() {
    // Sub-byte entries start at the least significant bit.
    let mut b = [0u8; 2];
    set_refcount(&mut b, 0, 1, 1).unwrap();
    assert_eq!(b, [0b10, 0]);
    set_refcount(&mut b, 1, 3, 2).unwrap();
    assert_eq!(b, [0b1000_0010, 0]);
    set_refcount(&mut b, 2, 3, 0xa).unwrap();
    assert_eq!(b, [0b1000_0010, 0xa0]);
    // Wider ones are big-endian.
    let mut b = [0u8; 16];
    set_refcount(&mut b, 4, 1, 0x0102).unwrap();
    assert_eq!(&b[2..4], &[1, 2]);
    set_refcount(&mut b, 5, 1, 0x0304_0506).unwrap();
    assert_eq!(&b[4..8], &[3, 4, 5, 6]);
    set_refcount(&mut b, 6, 1, 0x0102_0304_0506_0708).unwrap();
    assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
}

// -------------------------------------------------------------- snapshots

fn snapshot_entry(id: &[u8], name: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 40];
    put64(&mut e, 0, 0x5_0000);
    put32(&mut e, 8, 2);
    e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
    e[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
    put32(&mut e, 16, 1_700_000_000);
    put32(&mut e, 20, 123);
    put64(&mut e, 24, 456);
    put32(&mut e, 32, 789);
    put32(&mut e, 36, extra.len() as u32);
    e.extend_from_slice(extra);
    e.extend_from_slice(id);
    e.extend_from_slice(name);
    e
}

#[test]
fn snapshot_table() {
    let mut extra = Vec::new();
    extra.extend_from_slice(&(1u64 << 33).to_be_bytes());
    extra.extend_from_slice(&(1u64 << 30).to_be_bytes());
    extra.extend_from_slice(&u64::MAX.to_be_bytes());
    let mut table = snapshot_entry(b"1", b"first", &extra);
    assert_eq!(table.len(), 70);
    table.extend_from_slice(&[0xee, 0xee]); // padding kept as read
    table.extend(snapshot_entry(b"2", b"second", &extra[..12]));
    table.extend_from_slice(&[0; 5]);
    table.extend(snapshot_entry(b"", b"", &[]));
    let snaps = parse_snapshot_table(&table, 3).unwrap();
    assert_eq!(snaps.len(), 3);
    let s = &snaps[0];
    assert_eq!(s.id, b"1");
    assert_eq!(s.name, b"first");
    assert_eq!(s.l1_table_offset, 0x5_0000);
    assert_eq!(s.l1_size, 2);
    assert_eq!((s.date_sec, s.date_nsec), (1_700_000_000, 123));
    assert_eq!(s.vm_clock_nsec, 456);
    assert_eq!(s.vm_state_size(), 1 << 33);
    assert_eq!(s.disk_size, Some(1 << 30));
    assert_eq!(s.icount, Some(u64::MAX));
    let s = &snaps[1];
    assert_eq!(s.vm_state_size(), 1 << 33);
    assert_eq!(s.disk_size, None);
    assert_eq!(s.unknown_extra, &extra[8..12]);
    assert_eq!(snaps[2].vm_state_size(), 789);
    let encoded = encode_snapshot_table(&snaps).unwrap();
    let len = snapshot_table_len(&snaps);
    assert_eq!(encoded.len(), len);
    // Trailing bytes after the last entry are not part of the table.
    assert_eq!(encoded, table[..len]);
    match parse_snapshot_table(&table[..100], 3) {
        Err(FormatError::Truncated { needed, .. }) => assert_eq!(needed, 112),
        other => panic!("{other:?}"),
    }
}

#[test]
fn snapshot_limits() {
    let table = snapshot_entry(b"1", b"x", &[0; 1025]);
    assert_eq!(
        parse_snapshot_table(&table, 1).unwrap_err().to_string(),
        "Too much extra metadata in snapshot table entry 0"
    );
    let mut s = Snapshot::new(b"1".to_vec(), b"a".to_vec());
    s.set_vm_state_size(1 << 40);
    assert_eq!(s.vm_state_size_32, 0);
    s.disk_size = None;
    assert!(encode_snapshot_table(&[s.clone()]).is_err());
    s.disk_size = Some(5);
    s.name = vec![b'n'; 65536];
    assert!(encode_snapshot_table(&[s.clone()]).is_err());
    s.name = b"n".to_vec();
    let bytes = encode_snapshot_table(&[s.clone(), s.clone()]).unwrap();
    assert_eq!(bytes.len(), 72 + 66);
    assert_eq!(parse_snapshot_table(&bytes, 2).unwrap(), vec![s.clone(), s]);
}

// ------------------------------------------------------ compressed data

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ 0x55).collect()
}

#[test]
fn deflate_clusters() {
    let data = pattern(4096);
    let mut packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
    let mut out = vec![0u8; 4096];
    decompress(CompressionType::Zlib, &packed, &mut out).unwrap();
    assert_eq!(out, data);
    // The sector-rounded read brings junk after the stream.
    packed.extend_from_slice(&[0xff; 300]);
    decompress(CompressionType::Zlib, &packed, &mut out).unwrap();
    assert_eq!(out, data);
    // Too little output.
    let short = miniz_oxide::deflate::compress_to_vec(&data[..4000], 6);
    assert_eq!(
        decompress(CompressionType::Zlib, &short, &mut out),
        Err(FormatError::DecompressedShort {
            got: 4000,
            expected: 4096
        })
    );
    // A stream cut short.
    assert!(matches!(
        decompress(CompressionType::Zlib, &packed[..packed.len() / 2], &mut out),
        Err(FormatError::DecompressedShort { .. })
    ));
    assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
    // As in QEMU, a stream longer than a cluster gives its first cluster.
    let long = miniz_oxide::deflate::compress_to_vec(&pattern(8192), 6);
    decompress(CompressionType::Zlib, &long, &mut out).unwrap();
    assert_eq!(out, data);
}

#[test]
fn zstd_clusters() {
    let data = pattern(65536);
    let mut packed = zstd::bulk::compress(&data, 3).unwrap();
    let mut out = vec![0u8; 65536];
    decompress(CompressionType::Zstd, &packed, &mut out).unwrap();
    assert_eq!(out, data);
    packed.extend_from_slice(&[0; 100]);
    decompress(CompressionType::Zstd, &packed, &mut out).unwrap();
    assert_eq!(out, data);
    let long = zstd::bulk::compress(&pattern(65537), 3).unwrap();
    assert_eq!(
        decompress(CompressionType::Zstd, &long, &mut out),
        Err(FormatError::DecompressedLong(65536))
    );
    let short = zstd::bulk::compress(&data[..1000], 3).unwrap();
    assert_eq!(
        decompress(CompressionType::Zstd, &short, &mut out),
        Err(FormatError::DecompressedShort {
            got: 1000,
            expected: 65536
        })
    );
    assert!(matches!(
        decompress(CompressionType::Zstd, b"not zstd at all", &mut out),
        Err(FormatError::CompressedCorrupt(_))
    ));
}
