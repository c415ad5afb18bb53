//! The `qcow2` format driver: QEMU's copy-on-write images, with backing
//! chains. The on-disk format itself is [`crate::block::qcow2::format`];
//! this is the node that opens an image and serves requests from it.
//!
//! Opening reads the header and the L1 table synchronously on the control
//! thread ([`crate::block::sync_io`]); L2 tables are read on demand by the
//! I/O threads into a shared cache ([`cache`]).
//!
//! Writes go in place to clusters the image owns, and allocate new
//! clusters otherwise ([`write`], [`alloc`]), with metadata written
//! through (no dirty cache to lose). A cluster or L2 table shared with an
//! internal snapshot (no COPIED flag) is copied before it is written;
//! internal snapshots are taken and deleted by [`snapshots`]. A dirty
//! image (lazy refcounts) is repaired before it is written (`repair.rs`);
//! every write to the file is checked against the metadata first
//! ([`guard`]). Not yet: images with extended L2 entries opened for
//! writing, reuse of freed clusters, shrinking.

mod alloc;
mod backing_name;
mod cache;
mod cleaner;
pub mod create;
pub mod guard;
mod io;
mod iov;
mod repair;
mod resize;
mod snapshot_api;
mod snapshots;
mod words;
mod write;

use super::{ChildRole, Driver, DriverKind};
use crate::block::drain::Root;
use crate::block::edge::Child;
use crate::block::error::BlockError;
use crate::block::perm::Perm;
use crate::block::qcow2::format::{
    parse_snapshot_table, snapshot_table_len, CompressionType, CryptMethod, FormatError, Geometry,
    Header, MAX_TABLE_LEN,
};
use crate::block::sync_io;
use io::Qcow2Io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// QEMU's default upper bound for the L2 cache on Linux: 32 MiB.
const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// The longest L1 table read at open (QEMU's limit is 32 MiB as well).
const MAX_L1_BYTES: u64 = 32 << 20;

/// The node options the driver takes at open.
#[derive(Clone, Default)]
pub struct OpenOptions {
    pub cache: CacheOptions,
    pub read_only: bool,
    pub discard: Discard,
    /// The structures `overlap-check` protects ([`guard::checks_from`]).
    pub overlap_checks: u16,
    /// Where corruption found in the image is reported.
    pub notices: Option<crate::block::notice::Sink>,
}

/// The cache options of the seed (QEMU's names in comments).
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheOptions {
    /// `cache-size`: L2 and refcount caches together.
    pub cache_size: Option<i64>,
    /// `l2-cache-size`.
    pub l2_cache_size: Option<i64>,
    /// `refcount-cache-size`.
    pub refcount_cache_size: Option<i64>,
    /// `cache-clean-interval`, in seconds.
    pub cache_clean_interval: Option<i64>,
    /// `lazy-refcounts` (vubd always keeps refcounts current, which is
    /// what an image with lazy refcounts also accepts; a dirty one is
    /// repaired at a writable open, see `repair.rs`).
    pub lazy_refcounts: Option<bool>,
}

/// The L2 cache's bound in bytes from the cache options, checked as QEMU
/// checks them; None for the default.
fn cache_bytes(c: &CacheOptions, cluster: u64) -> Result<Option<u64>, BlockError> {
    let non_negative = |name: &str, v: Option<i64>| -> Result<Option<u64>, BlockError> {
        match v {
            Some(v) if v < 0 => Err(BlockError::invalid(format!(
                "Parameter '{name}' expects a non-negative size"
            ))),
            v => Ok(v.map(|v| v as u64)),
        }
    };
    let total = non_negative("cache-size", c.cache_size)?;
    let l2 = non_negative("l2-cache-size", c.l2_cache_size)?;
    let refcount = non_negative("refcount-cache-size", c.refcount_cache_size)?;
    if let Some(i) = c.cache_clean_interval {
        if !(0..=i64::from(u32::MAX)).contains(&i) {
            return Err(BlockError::invalid(format!(
                "Cache clean interval too big (must be 0 to {})",
                u32::MAX
            )));
        }
    }
    Ok(match (total, l2, refcount) {
        (Some(_), Some(_), Some(_)) => {
            return Err(BlockError::invalid(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            ))
        }
        (Some(t), Some(l), _) if l > t => {
            return Err(BlockError::invalid(
                "l2-cache-size may not exceed cache-size",
            ))
        }
        (Some(t), _, Some(r)) if r > t => {
            return Err(BlockError::invalid(
                "refcount-cache-size may not exceed cache-size",
            ))
        }
        (_, Some(l), _) => Some(l),
        (Some(t), None, Some(r)) => Some(t - r),
        // QEMU gives the L2 cache what it needs of cache-size first; the
        // refcount cache here has no bound of its own.
        (Some(t), None, None) => Some(t.max(2 * cluster)),
        _ => None,
    })
}

/// What the node does with guest discards.
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard {
    /// The node's `discard=unmap`.
    pub unmap: bool,
    /// `pass-discard-request` (default: as `unmap`).
    pub pass_request: Option<bool>,
    /// `pass-discard-snapshot` (default: on).
    pub pass_snapshot: Option<bool>,
}

/// What the image header says about its backing file.
pub struct BackingInfo {
    /// The name as written in the image.
    pub name: String,
    /// The format recorded with it, if any.
    pub format: Option<String>,
}

/// Reads and checks an image's header from its file node.
pub fn read_header(file: &Root) -> Result<Header, BlockError> {
    let mut buf = vec![0u8; 4096];
    sync_io::read_at(&**file, 0, &mut buf)?;
    // The header and its extensions fit in the first cluster, which may
    // be larger than what was read.
    let cluster_bits = u32::from_be_bytes([buf[20], buf[21], buf[22], buf[23]]);
    if buf[..4] == crate::block::qcow2::format::MAGIC && (13..=21).contains(&cluster_bits) {
        buf = vec![0u8; 1 << cluster_bits];
        sync_io::read_at(&**file, 0, &mut buf)?;
    }
    Header::parse(&buf).map_err(|e: FormatError| BlockError::invalid(e.to_string()))
}

impl BackingInfo {
    pub fn from_header(h: &Header) -> Option<BackingInfo> {
        let name = h.backing_file.as_ref()?;
        Some(BackingInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            format: h
                .backing_format()
                .map(|f| String::from_utf8_lossy(f).into_owned()),
        })
    }
}

pub struct Qcow2Driver {
    io: Arc<Qcow2Io>,
    /// The header as read at open, or as change-backing-file rewrote it.
    header: Mutex<Header>,
    read_only: bool,
    file_filename: String,
    backing_filename: Mutex<Option<String>>,
}

/// Writes a new header cluster at the start of the image's file and
/// flushes it; an errno on failure.
pub type HeaderWriter<'a> = &'a mut dyn FnMut(&[u8]) -> Result<(), i32>;

impl Qcow2Driver {
    /// Opens the image on `file`, with `backing` as its backing node.
    pub fn open(
        name: &str,
        file: Root,
        file_filename: String,
        header: Header,
        backing: Option<(Root, String)>,
        opts: OpenOptions,
    ) -> Result<Self, BlockError> {
        let OpenOptions {
            cache: opts_cache,
            read_only,
            discard,
            overlap_checks,
            notices,
        } = opts;
        if header.crypt_method != CryptMethod::None {
            return Err(BlockError::invalid(
                "Encrypted qcow2 images are not supported by vubd yet",
            ));
        }
        if header.has_external_data_file() {
            return Err(BlockError::invalid(
                "qcow2 images with an external data file are not supported by vubd yet",
            ));
        }
        let geo: Geometry = header
            .geometry()
            .map_err(|e| BlockError::invalid(e.to_string()))?;
        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(BlockError::invalid("Active L1 table too large"));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        if !raw.is_empty() {
            sync_io::read_at(&*file, header.l1_table_offset, &mut raw)?;
        }
        // Room for the table to grow within the clusters it has (a resize
        // uses it); the entries past its end are unused, so zero.
        let room = l1_bytes.div_ceil(geo.cluster_size()).max(1) * geo.cluster_size();
        raw.resize(room as usize, 0);
        let l1: Vec<AtomicU64> = words::be_words(&raw).map(AtomicU64::new).collect();
        let cluster = geo.cluster_size();
        // Enough tables to map the whole disk, within the cache bound.
        let whole_disk = geo.l1_entries_for(header.size).max(1);
        let bound = match cache_bytes(&opts_cache, cluster)? {
            Some(b) => (b / cluster).max(2),
            None => DEFAULT_L2_CACHE_BYTES / cluster,
        };
        if opts_cache.lazy_refcounts == Some(true) && header.version < 3 {
            return Err(BlockError::invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        let tables = whole_disk.min(bound).max(2) as usize;
        let mut header = header;
        if !read_only && header.is_dirty() && !header.is_corrupt() && !header.has_extended_l2() {
            repair::repair_dirty(&file, &mut header, &geo)?;
        }
        let table = read_snapshots(&file, &header, read_only)?;
        let alloc = if read_only {
            None
        } else {
            Some(open_for_writing(&file, &header, &geo)?)
        };
        let (backing, backing_filename) = match backing {
            Some((root, filename)) => (Child::new(ChildRole::Backing, root), Some(filename)),
            None => (Child::absent(ChildRole::Backing), None),
        };
        let map = if read_only {
            guard::MetaMap::default()
        } else {
            let words: Vec<u64> = l1.iter().map(|w| w.load(Ordering::Relaxed)).collect();
            guard::build_map(&file, &header, &geo, &words, &table.list, overlap_checks)
        };
        let guard = guard::Guard::new(name, overlap_checks, &geo, map, !read_only, notices);
        let io = Arc::new_cyclic(|me| Qcow2Io {
            me: me.clone(),
            file: Child::new(ChildRole::File, file),
            backing,
            geo,
            size: AtomicU64::new(header.size),
            compression: header.compression_type,
            l1,
            cache: Mutex::new(cache::L2Cache::new(tables)),
            meta_writes: AtomicU64::new(0),
            l1_size: AtomicU64::new(u64::from(header.l1_size)),
            l1_table_offset: header.l1_table_offset,
            alloc,
            name: name.to_string(),
            version: header.version,
            discard_unmap: discard.unmap,
            pass_discard: discard.pass_request.unwrap_or(discard.unmap),
            pass_discard_snapshot: discard.pass_snapshot.unwrap_or(true),
            snapshots: Mutex::new(table),
            guard,
        });
        let interval = opts_cache
            .cache_clean_interval
            .map_or(cleaner::DEFAULT_INTERVAL_SECS, |i| i as u64);
        let weak: std::sync::Weak<dyn cleaner::Clean> = Arc::downgrade(&io) as _;
        cleaner::register(weak, interval);
        Ok(Qcow2Driver {
            io,
            header: Mutex::new(header),
            read_only,
            file_filename,
            backing_filename: Mutex::new(backing_filename),
        })
    }
}

/// Checks that the image can be written and reads what writing needs:
/// the refcount table and the file's length.
fn open_for_writing(
    file: &Root,
    header: &Header,
    geo: &Geometry,
) -> Result<alloc::Allocator, BlockError> {
    if header.is_corrupt() {
        return Err(BlockError::invalid(
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if header.is_dirty() {
        return Err(BlockError::invalid(
            "qcow2: the image was not closed cleanly (dirty, lazy refcounts); repair it with 'qemu-img check -r all' before writing with vubd",
        ));
    }
    if header.has_extended_l2() {
        return Err(BlockError::invalid(
            "qcow2 images with extended L2 entries can only be opened read-only by vubd yet",
        ));
    }
    let bytes = u64::from(header.refcount_table_clusters) * geo.cluster_size();
    if bytes > MAX_L1_BYTES {
        return Err(BlockError::invalid("Refcount table too large"));
    }
    let mut raw = vec![0u8; bytes as usize];
    sync_io::read_at(&**file, header.refcount_table_offset, &mut raw)?;
    let reftable: Vec<u64> = words::be_words(&raw).collect();
    let file_len = file.length()?;
    let unit = (file.mem_alignment() as u64).max(512);
    Ok(alloc::Allocator::new(
        reftable,
        header.refcount_table_offset,
        file_len,
        geo.cluster_size(),
        unit,
        header.l1_table_offset,
        header.refcount_order,
    ))
}

/// The image's snapshot table. One that cannot be read costs only the
/// listing on a read-only node (a warning); a writable node refuses to
/// open, as it would otherwise write a table without those snapshots.
fn read_snapshots(
    file: &Root,
    h: &Header,
    read_only: bool,
) -> Result<snapshots::SnapTable, BlockError> {
    if h.nb_snapshots == 0 {
        return Ok(snapshots::SnapTable::default());
    }
    let fail = |what: String| {
        if read_only {
            log::warn!("{what}");
            Ok(snapshots::SnapTable::default())
        } else {
            Err(BlockError::invalid(what))
        }
    };
    let mut len = 64 << 10;
    loop {
        let mut buf = vec![0u8; len];
        if let Err(e) = sync_io::read_at(&**file, h.snapshots_offset, &mut buf) {
            return fail(format!("reading the snapshot table: {e}"));
        }
        match parse_snapshot_table(&buf, h.nb_snapshots) {
            Ok(list) => {
                let len = snapshot_table_len(&list) as u64;
                return Ok(snapshots::SnapTable {
                    list,
                    offset: h.snapshots_offset,
                    len,
                });
            }
            Err(FormatError::Truncated { needed, .. })
                if needed > len && needed <= MAX_TABLE_LEN =>
            {
                len = needed;
            }
            Err(e) => return fail(format!("the snapshot table: {e}")),
        }
    }
}

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn io(&self) -> Root {
        self.io.clone()
    }

    fn child(&self, role: ChildRole) -> Option<&Child> {
        match role {
            ChildRole::File => Some(&self.io.file),
            ChildRole::Backing => Some(&self.io.backing),
            ChildRole::Test => None,
        }
    }

    fn filename(&self) -> String {
        self.file_filename.clone()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn child_perm(&self, role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        match role {
            // A backing node is only read, and others (a commit job) may
            // write it.
            ChildRole::Backing => (Perm::CONSISTENT_READ, Perm::ALL),
            ChildRole::File | ChildRole::Test => {
                super::default_child_perm(self.kind(), self.read_only, perm, shared)
            }
        }
    }

    fn internal_snapshots(&self) -> Option<&dyn super::InternalSnapshots> {
        Some(self)
    }

    fn close(&self) -> Result<(), BlockError> {
        if self.read_only || self.io.alloc.is_none() {
            return Ok(());
        }
        let io = self.io.clone();
        let r = sync_io::run_task(async move {
            let Some(a) = io.alloc.as_ref() else {
                return 0;
            };
            match alloc::return_unused(&io, a).await {
                Ok(()) => 0,
                Err(e) => e,
            }
        })?;
        if r < 0 {
            log::warn!(
                "qcow2 node '{}': giving back unused clusters: {}",
                self.io.name,
                std::io::Error::from_raw_os_error(-r)
            );
        }
        crate::block::io::BlockIo::flush(&*self.io)
    }

    fn change_backing_file(
        &self,
        name: &str,
        format: &str,
        write: HeaderWriter<'_>,
    ) -> Result<(), i32> {
        self.rewrite_backing(name, format, write)
    }

    fn describe_image(&self, info: &mut crate::qapi::ImageInfo) {
        let h = &*self.header.lock().unwrap_or_else(PoisonError::into_inner);
        info.cluster_size = Some(h.cluster_size() as i64);
        info.dirty_flag = Some(h.is_dirty());
        if let Some(b) = BackingInfo::from_header(h) {
            info.backing_filename = Some(b.name);
            info.backing_filename_format = b.format;
        }
        if let Some(full) = &*self
            .backing_filename
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            info.full_backing_filename = Some(full.clone());
        }
        let table = self.io.snapshots();
        if !table.list.is_empty() {
            info.snapshots = Some(table.list.iter().map(snapshots::info).collect());
        }
        drop(table);
        info.format_specific = Some(crate::qapi::ImageInfoSpecific::Qcow2(
            crate::qapi::ImageInfoSpecificQCow2 {
                compat: if h.version == 2 { "0.10" } else { "1.1" }.to_string(),
                lazy_refcounts: (h.version >= 3).then(|| h.has_lazy_refcounts()),
                corrupt: (h.version >= 3).then(|| h.is_corrupt() || self.io.guard.is_broken()),
                extended_l2: (h.version >= 3).then(|| h.has_extended_l2()),
                refcount_bits: i64::from(h.refcount_bits()),
                compression_type: match h.compression_type {
                    CompressionType::Zlib => crate::qapi::Qcow2CompressionType::Zlib,
                    CompressionType::Zstd => crate::qapi::Qcow2CompressionType::Zstd,
                },
            },
        ));
    }
}
