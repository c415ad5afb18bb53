//! The parser against images QEMU made: `qemu-img` creates them with
//! the options under test, `qemu-io` writes data, zeros and compressed
//! clusters, and the tests read the files back with `std::fs` and check
//! what the format code makes of them. Every test passes with a note
//! when `qemu-img` is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use super::format::*;

/// A scratch directory named for the process and the test, removed when
/// dropped.
struct Scratch(PathBuf);

impl Scratch {
    /// `None` (with a note) when QEMU's tools are missing.
    fn new(test: &str) -> Option<Self> {
        let have = |tool: &str| {
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !have("qemu-img") || !have("qemu-io") {
            println!("skipping {test}: qemu-img or qemu-io is not installed");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("vubd-qcow2-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Some(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Runs a tool in the directory (so relative backing names resolve
    /// there), failing the test if it fails.
    fn run(&self, tool: &str, args: &[&str]) {
        let out = Command::new(tool)
            .args(args)
            .current_dir(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn create(&self, name: &str, options: &str, size: &str) -> Image {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend([name, size]);
        self.run("qemu-img", &args);
        Image::load(&self.path(name))
    }

    /// Runs qemu-io commands on an image and reloads it.
    fn io(&self, name: &str, commands: &[&str]) -> Image {
        let mut args = Vec::new();
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(name);
        self.run("qemu-io", &args);
        Image::load(&self.path(name))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An image file read whole, with its parsed header.
struct Image {
    bytes: Vec<u8>,
    header: Header,
    geometry: Geometry,
}

impl Image {
    fn load(path: &Path) -> Image {
        let bytes = std::fs::read(path).unwrap();
        let header = Header::parse(&bytes).unwrap();
        let geometry = header.geometry().unwrap();
        let image = Image {
            bytes,
            header,
            geometry,
        };
        image.check_header_roundtrip();
        image
    }

    /// The first cluster, as the driver would read it.
    fn cluster0(&self) -> Vec<u8> {
        let mut c =
            self.bytes[..self.bytes.len().min(self.geometry.cluster_size() as usize)].to_vec();
        c.resize(self.geometry.cluster_size() as usize, 0);
        c
    }

    /// Every image QEMU writes must come back byte for byte.
    fn check_header_roundtrip(&self) {
        let cluster0 = self.cluster0();
        let mut out = vec![0xa5; cluster0.len()];
        self.header.encode(&mut out).unwrap();
        assert!(out == cluster0, "the encoded header differs from QEMU's");
    }

    fn be64(&self, at: u64) -> u64 {
        let at = at as usize;
        u64::from_be_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }

    fn read(&self, at: u64, len: u64) -> &[u8] {
        &self.bytes[at as usize..(at + len) as usize]
    }

    /// Offset of the L2 entry for a guest offset, if its table exists.
    fn l2_entry_at(&self, guest_offset: u64) -> Option<u64> {
        let g = &self.geometry;
        let pos = g.guest_position(guest_offset);
        assert!(pos.l1_index < u64::from(self.header.l1_size));
        let raw = self.be64(self.header.l1_table_offset + 8 * pos.l1_index);
        let l1 = L1Entry::decode(raw, g).unwrap();
        if l1.l2_offset == 0 {
            return None;
        }
        if self.header.nb_snapshots == 0 {
            assert!(l1.copied, "active L2 tables have refcount 1");
        }
        Some(l1.l2_offset + pos.l2_index * g.l2_entry_size())
    }

    fn l2(&self, guest_offset: u64) -> L2Entry {
        match self.l2_entry_at(guest_offset) {
            None => L2Entry::Unallocated,
            Some(at) => {
                let raw = self.be64(at);
                let entry = L2Entry::decode(raw, &self.geometry).unwrap();
                assert_eq!(entry.encode(&self.geometry), Ok(raw));
                entry
            }
        }
    }

    fn extended_l2(&self, guest_offset: u64) -> ExtendedL2Entry {
        let at = self.l2_entry_at(guest_offset).unwrap();
        let (raw, bitmap) = (self.be64(at), self.be64(at + 8));
        let entry = ExtendedL2Entry::decode(raw, bitmap, &self.geometry).unwrap();
        assert_eq!(entry.encode(&self.geometry), Ok((raw, bitmap)));
        entry
    }

    /// The refcount of the host cluster at `host_offset`.
    fn refcount(&self, host_offset: u64) -> u64 {
        let g = &self.geometry;
        let pos = g.refcount_position(host_offset);
        let raw = self.be64(self.header.refcount_table_offset + 8 * pos.table_index);
        let block = decode_refcount_table_entry(raw, g).unwrap();
        assert_ne!(block, 0, "the refcount block of a used cluster exists");
        let block = self.read(block, g.cluster_size());
        get_refcount(block, g.refcount_order(), pos.block_index).unwrap()
    }

    /// Checks that `len` bytes from `guest_offset` are normal clusters
    /// holding `pattern`, each with refcount 1.
    fn check_data(&self, guest_offset: u64, len: u64, pattern: u8) {
        let cs = self.geometry.cluster_size();
        for cluster in (guest_offset / cs)..(guest_offset + len).div_ceil(cs) {
            let host = match self.l2(cluster * cs) {
                L2Entry::Normal {
                    host_offset,
                    copied: true,
                } => host_offset,
                other => panic!("guest cluster {cluster}: {other:?}"),
            };
            let start = (cluster * cs).max(guest_offset) - cluster * cs;
            let end = ((cluster + 1) * cs).min(guest_offset + len) - cluster * cs;
            assert!(self
                .read(host + start, end - start)
                .iter()
                .all(|&b| b == pattern));
            assert_eq!(self.refcount(host), 1);
        }
    }

    /// The contents of a compressed cluster.
    fn decompress(&self, c: &CompressedCluster) -> Vec<u8> {
        // The last sector may be cut short by the end of the file.
        let end = (c.host_offset + c.compressed_len()).min(self.bytes.len() as u64);
        let input = self.read(c.host_offset, end - c.host_offset);
        let mut out = vec![0u8; self.geometry.cluster_size() as usize];
        decompress(self.header.compression_type, input, &mut out).unwrap();
        out
    }
}

#[test]
fn qemu_v2_image() {
    let Some(dir) = Scratch::new("v2") else {
        return;
    };
    let img = dir.create("v2.qcow2", "compat=0.10", "1G");
    let h = &img.header;
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.l1_size, 2);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.incompatible_features, 0);
    assert!(h.extensions.is_empty());
    assert_eq!(img.refcount(0), 1, "the header cluster is in use");

    let img = dir.io(
        "v2.qcow2",
        &["write -P 0x55 0 64k", "write -P 0x33 512M 100k"],
    );
    img.check_data(0, 64 << 10, 0x55);
    img.check_data(512 << 20, 100 << 10, 0x33);
    assert_eq!(img.l2(64 << 10), L2Entry::Unallocated);
    assert_eq!(img.l2(600 << 20), L2Entry::Unallocated);
}

#[test]
fn qemu_cluster_sizes() {
    let Some(dir) = Scratch::new("cluster-sizes") else {
        return;
    };
    for (bits, size) in [(9u32, 512u64), (12, 4096), (16, 65536), (21, 2 << 20)] {
        let name = format!("c{size}.qcow2");
        let img = dir.create(&name, &format!("cluster_size={size}"), "64M");
        assert_eq!(img.header.version, 3);
        assert_eq!(img.header.cluster_bits, bits);
        assert_eq!(img.header.cluster_size(), size);
        assert_eq!(img.header.size, 64 << 20);
        assert!(u64::from(img.header.l1_size) >= img.geometry.l1_entries_for(64 << 20));
        assert_eq!(img.header.compression_type, CompressionType::Zlib);
        // Writes that start and end inside clusters.
        let img = dir.io(
            &name,
            &["write -P 0x55 0 64k", "write -P 0xaa 3000000 70000"],
        );
        img.check_data(0, 64 << 10, 0x55);
        img.check_data(3_000_000, 70_000, 0xaa);
    }
}

#[test]
fn qemu_feature_name_table_and_lazy_refcounts() {
    let Some(dir) = Scratch::new("lazy") else {
        return;
    };
    let img = dir.create("l.qcow2", "lazy_refcounts=on", "16M");
    assert!(img.header.has_lazy_refcounts());
    assert!(!img.header.is_dirty());
    let names = img.header.feature_names();
    let named = |kind, bit| {
        names
            .iter()
            .find(|n| n.kind == kind && n.bit == bit)
            .map(|n| String::from_utf8_lossy(&n.name).into_owned())
    };
    assert_eq!(
        named(FeatureKind::Incompatible, 0).as_deref(),
        Some("dirty bit")
    );
    assert_eq!(
        named(FeatureKind::Incompatible, 4).as_deref(),
        Some("extended L2 entries")
    );
    assert_eq!(
        named(FeatureKind::Compatible, 0).as_deref(),
        Some("lazy refcounts")
    );
    assert_eq!(named(FeatureKind::Autoclear, 0).as_deref(), Some("bitmaps"));
    let img = dir.io("l.qcow2", &["write -P 0x55 1M 64k"]);
    img.check_data(1 << 20, 64 << 10, 0x55);
}

#[test]
fn qemu_refcount_widths() {
    let Some(dir) = Scratch::new("refcount-bits") else {
        return;
    };
    for (bits, order) in [(1u32, 0u32), (8, 3), (64, 6)] {
        let name = format!("r{bits}.qcow2");
        let img = dir.create(&name, &format!("refcount_bits={bits}"), "16M");
        assert_eq!(img.header.refcount_order, order);
        assert_eq!(img.header.refcount_bits(), bits);
        assert_eq!(img.geometry.refcount_block_entries(), (65536 * 8) >> order);
        let img = dir.io(&name, &["write -P 0x55 0 200k"]);
        img.check_data(0, 200 << 10, 0x55);
        assert_eq!(img.refcount(img.header.l1_table_offset), 1);
        assert_eq!(img.refcount(img.header.refcount_table_offset), 1);
    }
}

#[test]
fn qemu_extended_l2() {
    let Some(dir) = Scratch::new("extended-l2") else {
        return;
    };
    let img = dir.create("x.qcow2", "extended_l2=on", "16M");
    assert!(img.header.has_extended_l2());
    assert_eq!(img.geometry.l2_entries(), 4096);
    assert_eq!(img.geometry.subcluster_size(), 2048);
    // Subclusters 4-5 of cluster 0 get data, 8 reads as zeros.
    let img = dir.io("x.qcow2", &["write -P 0x55 8k 4k", "write -z 16k 2k"]);
    let e = img.extended_l2(0);
    let host = match e.entry {
        L2Entry::Normal { host_offset, .. } => host_offset,
        other => panic!("{other:?}"),
    };
    assert_eq!(e.bitmap.allocated, 0b11 << 4);
    assert_eq!(e.bitmap.zero, 1 << 8);
    let g = &img.geometry;
    for i in 0..32 {
        let expected = match i {
            4 | 5 => Subcluster::Data {
                host_offset: host + u64::from(i) * 2048,
            },
            8 => Subcluster::Zero,
            _ => Subcluster::Unallocated,
        };
        assert_eq!(e.subcluster(i, g), Ok(expected), "subcluster {i}");
    }
    assert_eq!(g.subcluster_index(9 << 10), 4);
    assert!(img.read(host + 8192, 4096).iter().all(|&b| b == 0x55));
    // A cluster that was never written.
    let e = img.extended_l2(1 << 20);
    assert_eq!(e.entry, L2Entry::Unallocated);
    assert_eq!(e.bitmap, SubclusterBitmap::default());
}

#[test]
fn qemu_backing_file() {
    let Some(dir) = Scratch::new("backing") else {
        return;
    };
    dir.create("base.qcow2", "", "32M");
    for compat in ["compat=0.10", "compat=1.1"] {
        dir.run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                compat,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
        let img = Image::load(&dir.path("top.qcow2"));
        let h = &img.header;
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.qcow2"[..]));
        assert_eq!(h.backing_file_size, 10);
        assert_eq!(h.backing_format(), Some(&b"qcow2"[..]));
        assert_eq!(h.size, 32 << 20, "the size comes from the backing file");
        assert_eq!(img.l2(0), L2Entry::Unallocated);
        // Moving the name (as after adding an extension) keeps the rest.
        let mut moved = h.clone();
        moved
            .set_backing_file(Some(b"../other/base.qcow2"))
            .unwrap();
        let mut out = img.cluster0();
        moved.encode(&mut out).unwrap();
        let again = Header::parse(&out).unwrap();
        assert_eq!(
            again.backing_file.as_deref(),
            Some(&b"../other/base.qcow2"[..])
        );
        assert_eq!(again.backing_format(), Some(&b"qcow2"[..]));
    }
}

#[test]
fn qemu_zero_writes() {
    let Some(dir) = Scratch::new("zeros") else {
        return;
    };
    dir.create("z.qcow2", "", "4M");
    let img = dir.io(
        "z.qcow2",
        &[
            "write -P 0x55 0 128k",
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "write -z 192k 64k",
        ],
    );
    // Zeroed in place keeps its cluster; with unmap, or where nothing
    // was allocated, the entry just says zero.
    match img.l2(0) {
        L2Entry::Zero {
            host_offset: Some(host),
            ..
        } => assert_eq!(img.refcount(host), 1),
        other => panic!("{other:?}"),
    }
    let plain = L2Entry::Zero {
        host_offset: None,
        copied: false,
    };
    assert_eq!(img.l2(64 << 10), plain);
    assert_eq!(img.l2(192 << 10), plain);
    assert_eq!(img.l2(128 << 10), L2Entry::Unallocated);
}

#[test]
fn qemu_compressed_deflate() {
    let Some(dir) = Scratch::new("deflate") else {
        return;
    };
    for size in [4096u64, 65536] {
        // A raw file with one cluster of 0x55 and one of varied bytes.
        let raw: Vec<u8> = std::iter::repeat_n(0x55, size as usize)
            .chain((0..size).map(|i| (i * 7 % 251) as u8))
            .collect();
        std::fs::write(dir.path("data.raw"), &raw).unwrap();
        let name = format!("c{size}.qcow2");
        dir.run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={size}"),
                "data.raw",
                &name,
            ],
        );
        let img = Image::load(&dir.path(&name));
        assert_eq!(img.header.compression_type, CompressionType::Zlib);
        for (i, chunk) in raw.chunks(size as usize).enumerate() {
            match img.l2(i as u64 * size) {
                L2Entry::Compressed(c) => assert!(img.decompress(&c) == chunk, "cluster {i}"),
                other => panic!("cluster {i}: {other:?}"),
            }
        }
    }
    // qemu-io writes compressed clusters too.
    dir.create("w.qcow2", "", "1M");
    let img = dir.io("w.qcow2", &["write -c -P 0x55 64k 64k"]);
    match img.l2(64 << 10) {
        L2Entry::Compressed(c) => {
            assert!(img.decompress(&c).iter().all(|&b| b == 0x55));
            assert!(img.refcount(c.host_offset) >= 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn qemu_compressed_zstd() {
    let Some(dir) = Scratch::new("zstd") else {
        return;
    };
    let img = dir.create("z.qcow2", "compression_type=zstd", "1M");
    assert_eq!(img.header.compression_type, CompressionType::Zstd);
    assert_ne!(
        img.header.incompatible_features & incompatible::COMPRESSION_TYPE,
        0
    );
    let img = dir.io(
        "z.qcow2",
        &["write -c -P 0x55 0 64k", "write -P 0x11 64k 64k"],
    );
    match img.l2(0) {
        L2Entry::Compressed(c) => assert!(img.decompress(&c).iter().all(|&b| b == 0x55)),
        other => panic!("{other:?}"),
    }
    img.check_data(64 << 10, 64 << 10, 0x11);

    let raw: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
    std::fs::write(dir.path("data.raw"), &raw).unwrap();
    dir.run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "data.raw",
            "c.qcow2",
        ],
    );
    let img = Image::load(&dir.path("c.qcow2"));
    match img.l2(0) {
        L2Entry::Compressed(c) => assert!(img.decompress(&c) == raw),
        other => panic!("{other:?}"),
    }
}

#[test]
fn qemu_snapshot_table() {
    let Some(dir) = Scratch::new("snapshots") else {
        return;
    };
    dir.create("s.qcow2", "", "8M");
    dir.io("s.qcow2", &["write -P 0x55 0 64k"]);
    dir.run("qemu-img", &["snapshot", "-c", "first", "s.qcow2"]);
    dir.io("s.qcow2", &["write -P 0x66 0 64k"]);
    dir.run("qemu-img", &["snapshot", "-c", "second one", "s.qcow2"]);
    let img = Image::load(&dir.path("s.qcow2"));
    assert_eq!(img.header.nb_snapshots, 2);
    let table = &img.bytes[img.header.snapshots_offset as usize..];
    let snaps = parse_snapshot_table(table, img.header.nb_snapshots).unwrap();
    assert_eq!(snaps[0].id, b"1");
    assert_eq!(snaps[0].name, b"first");
    assert_eq!(snaps[1].id, b"2");
    assert_eq!(snaps[1].name, b"second one");
    for s in &snaps {
        assert_eq!(s.l1_size, img.header.l1_size);
        assert_eq!(s.disk_size, Some(8 << 20));
        assert_eq!(s.vm_state_size(), 0);
        // QEMU 10 writes all three known extra data fields (qemu-img
        // leaves icount 0).
        assert!(s.icount.is_some());
        assert!(s.unknown_extra.is_empty());
        assert!(s.date_sec > 1_600_000_000);
    }
    let encoded = encode_snapshot_table(&snaps).unwrap();
    assert!(encoded[..] == table[..encoded.len()]);
    // The first snapshot still maps the first data written.
    let raw = img.be64(snaps[0].l1_table_offset);
    let l1 = L1Entry::decode(raw, &img.geometry).unwrap();
    let entry = L2Entry::decode(img.be64(l1.l2_offset), &img.geometry).unwrap();
    match entry {
        L2Entry::Normal { host_offset, .. } => {
            assert!(img.read(host_offset, 65536).iter().all(|&b| b == 0x55))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn qemu_bitmaps_extension() {
    let Some(dir) = Scratch::new("bitmaps") else {
        return;
    };
    dir.create("b.qcow2", "", "8M");
    dir.run("qemu-img", &["bitmap", "--add", "b.qcow2", "bm0"]);
    dir.run("qemu-img", &["bitmap", "--add", "b.qcow2", "bm1"]);
    let img = Image::load(&dir.path("b.qcow2"));
    assert!(img.header.bitmaps_consistent());
    let b = img.header.bitmaps().unwrap();
    assert_eq!(b.nb_bitmaps, 2);
    assert_eq!(b.directory_offset % img.geometry.cluster_size(), 0);
    assert!(b.directory_size > 0);
}

#[test]
fn qemu_external_data_file() {
    let Some(dir) = Scratch::new("data-file") else {
        return;
    };
    dir.create("d.qcow2", "data_file=d.raw,data_file_raw=on", "1M");
    let img = dir.io("d.qcow2", &["write -P 0x55 0 64k"]);
    assert!(img.header.has_external_data_file());
    assert!(img.header.has_raw_external_data());
    assert_eq!(img.header.external_data_file(), Some(&b"d.raw"[..]));
    // Guest cluster 0 is host offset 0 of the data file.
    assert_eq!(
        img.l2(0),
        L2Entry::Normal {
            host_offset: 0,
            copied: true
        }
    );
    let data = std::fs::read(dir.path("d.raw")).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0x55));
}

#[test]
fn qemu_luks_encryption_header() {
    let Some(dir) = Scratch::new("luks") else {
        return;
    };
    dir.run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=vubd-test",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "e.qcow2",
            "1M",
        ],
    );
    let img = Image::load(&dir.path("e.qcow2"));
    assert_eq!(img.header.crypt_method, CryptMethod::Luks);
    let luks = img.header.encryption_header().unwrap();
    assert_eq!(luks.offset % img.geometry.cluster_size(), 0);
    assert!(luks.length > 0);
    assert_eq!(img.read(luks.offset, 6), b"LUKS\xba\xbe");
}
