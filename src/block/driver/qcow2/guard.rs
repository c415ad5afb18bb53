//! Guarding a writable image's metadata, as QEMU's `overlap-check` does:
//! before a write goes to the file, the host clusters it covers are looked
//! up among the clusters the image's metadata occupies, and a write that
//! would land on a structure the check mode covers is refused. A hit, or
//! any other damage the driver finds during I/O, is signalled once per
//! node as `BLOCK_IMAGE_CORRUPTED`; on a writable node it is fatal: the
//! corrupt bit goes into the header (written and flushed before the
//! request that found it completes) and the node refuses writes from then
//! on, while reads go on being served.
//!
//! The metadata map is a sorted list of host cluster indices, each with
//! the structures that occupy it (a healthy image has one per cluster).
//! Every protected structure starts on a cluster boundary, so clusters are
//! the right grain: a write is tested by the clusters it touches, which
//! for a guest write is one binary search under a read lock. The map is
//! built at open from the header, the L1 table, the refcount table and the
//! snapshot table, and new L2 tables and refcount blocks are added as they
//! are allocated.

use super::io::Qcow2Io;
use crate::block::drain::Root;
use crate::block::io::{IoKind, IoRequest};
use crate::block::notice::{Corruption, Notice, Sink};
use crate::block::qcow2::format::{
    incompatible, Geometry, Header, Snapshot, OFFSET_MASK, REFTABLE_OFFSET_MASK,
};
use crate::block::sync_io;
use crate::io::task;
use crate::qapi::{Qcow2OverlapCheckMode, Qcow2OverlapChecks};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

/// The metadata structures, one bit each, in QEMU's order.
pub const MAIN_HEADER: u16 = 1 << 0;
pub const ACTIVE_L1: u16 = 1 << 1;
pub const ACTIVE_L2: u16 = 1 << 2;
pub const REFCOUNT_TABLE: u16 = 1 << 3;
pub const REFCOUNT_BLOCK: u16 = 1 << 4;
pub const SNAPSHOT_TABLE: u16 = 1 << 5;
pub const INACTIVE_L1: u16 = 1 << 6;
pub const INACTIVE_L2: u16 = 1 << 7;

/// How the event names each structure (QEMU's wording).
const NAMES: [&str; 8] = [
    "qcow2_header",
    "active L1 table",
    "active L2 table",
    "refcount table",
    "refcount block",
    "snapshot table",
    "inactive L1 table",
    "inactive L2 table",
];

/// The checks that cost nothing but a comparison with what is in memory
/// from the header.
const CONSTANT: u16 = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | INACTIVE_L1;
/// Also the tables the in-memory L1 and refcount tables point at.
const CACHED: u16 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK;
/// Also the snapshots' L2 tables (read at open).
const ALL: u16 = CACHED | INACTIVE_L2;

fn preset(mode: Qcow2OverlapCheckMode) -> u16 {
    match mode {
        Qcow2OverlapCheckMode::None => 0,
        Qcow2OverlapCheckMode::Constant => CONSTANT,
        Qcow2OverlapCheckMode::Cached => CACHED,
        Qcow2OverlapCheckMode::All => ALL,
    }
}

/// The structures the node's `overlap-check` option protects (QEMU's
/// default is `cached`; a member of the structure form overrides its
/// template's bit).
pub fn checks_from(opt: Option<&Qcow2OverlapChecks>) -> u16 {
    match opt {
        None => CACHED,
        Some(Qcow2OverlapChecks::Mode(m)) => preset(*m),
        Some(Qcow2OverlapChecks::Flags(f)) => {
            let mut bits = preset(f.template.unwrap_or(Qcow2OverlapCheckMode::Cached));
            for (flag, bit) in [
                (f.main_header, MAIN_HEADER),
                (f.active_l1, ACTIVE_L1),
                (f.active_l2, ACTIVE_L2),
                (f.refcount_table, REFCOUNT_TABLE),
                (f.refcount_block, REFCOUNT_BLOCK),
                (f.snapshot_table, SNAPSHOT_TABLE),
                (f.inactive_l1, INACTIVE_L1),
                (f.inactive_l2, INACTIVE_L2),
            ] {
                match flag {
                    Some(true) => bits |= bit,
                    Some(false) => bits &= !bit,
                    None => {}
                }
            }
            bits
        }
    }
}

/// Host clusters holding metadata, sorted by cluster index.
#[derive(Default, Debug)]
pub struct MetaMap {
    clusters: Vec<(u64, u16)>,
}

impl MetaMap {
    /// Records that `kind` occupies clusters `[first, first + count)`.
    pub fn add(&mut self, first: u64, count: u64, kind: u16) {
        for c in first..first.saturating_add(count) {
            match self.clusters.binary_search_by_key(&c, |e| e.0) {
                Ok(i) => self.clusters[i].1 |= kind,
                Err(i) => self.clusters.insert(i, (c, kind)),
            }
        }
    }

    /// Records that `kind` no longer occupies clusters
    /// `[first, first + count)` (a structure freed).
    pub fn remove(&mut self, first: u64, count: u64, kind: u16) {
        for c in first..first.saturating_add(count) {
            if let Ok(i) = self.clusters.binary_search_by_key(&c, |e| e.0) {
                self.clusters[i].1 &= !kind;
                if self.clusters[i].1 == 0 {
                    self.clusters.remove(i);
                }
            }
        }
    }

    /// The structures in clusters `[first, last]`, each cluster's apart.
    fn each(&self, first: u64, last: u64) -> impl Iterator<Item = u16> + '_ {
        let start = self.clusters.partition_point(|e| e.0 < first);
        self.clusters[start..]
            .iter()
            .take_while(move |e| e.0 <= last)
            .map(|e| e.1)
    }

    /// The structures a data write to clusters `[first, last]` would
    /// overwrite, among `checks`.
    pub fn data_hit(&self, first: u64, last: u64, checks: u16) -> u16 {
        self.each(first, last).fold(0, |acc, k| acc | (k & checks))
    }

    /// The structures a metadata write to clusters `[first, last]` would
    /// damage, among `checks`: a write to one structure is fine, one whose
    /// clusters hold two different ones (the image's tables overlap) or
    /// that runs from one structure into another is not.
    pub fn meta_hit(&self, first: u64, last: u64, checks: u16) -> u16 {
        let mut seen = 0u16;
        for k in self.each(first, last) {
            let k = k & checks;
            if k.count_ones() > 1 || (seen != 0 && k != 0 && k != seen) {
                return seen | k;
            }
            seen |= k;
        }
        0
    }

    #[cfg(test)]
    fn clusters_held(&self) -> usize {
        self.clusters.len()
    }
}

/// The name of the first structure in `hit`, for the message.
fn name_of(hit: u16) -> &'static str {
    NAMES
        .get(hit.trailing_zeros() as usize)
        .copied()
        .unwrap_or("metadata")
}

/// A node's overlap checks and corruption state.
pub struct Guard {
    checks: u16,
    cluster_bits: u32,
    map: RwLock<MetaMap>,
    /// The node may write (damage found on a read-only node is reported,
    /// not fatal: the image cannot be marked).
    writable: bool,
    /// Fatal corruption was found: writes are refused.
    broken: AtomicBool,
    /// An event was sent.
    signaled: AtomicBool,
    /// The corrupt bit is yet to be written to the header.
    mark_pending: AtomicBool,
    node: String,
    sink: Option<Sink>,
}

impl Guard {
    pub fn new(
        node: &str,
        checks: u16,
        geo: &Geometry,
        map: MetaMap,
        writable: bool,
        sink: Option<Sink>,
    ) -> Guard {
        Guard {
            checks: if writable { checks } else { 0 },
            cluster_bits: geo.cluster_size().trailing_zeros(),
            map: RwLock::new(map),
            writable,
            broken: AtomicBool::new(false),
            signaled: AtomicBool::new(false),
            mark_pending: AtomicBool::new(false),
            node: node.to_string(),
            sink,
        }
    }

    fn clusters(&self, host: u64, len: u64) -> (u64, u64) {
        let last = host.saturating_add(len.max(1) - 1);
        (host >> self.cluster_bits, last >> self.cluster_bits)
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, MetaMap> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a guest data write to `[host, host + len)` may go ahead
    /// without a word (used by the direct path, which leaves anything
    /// else to the task path to refuse and report).
    pub fn data_clear(&self, host: u64, len: u64) -> bool {
        if self.checks == 0 {
            return true;
        }
        let (first, last) = self.clusters(host, len);
        self.map().data_hit(first, last, self.checks) == 0
    }

    /// Checks a guest data write to `[host, host + len)`; a hit is fatal.
    pub fn check_data(&self, host: u64, len: u64) -> Result<(), i32> {
        if self.is_broken() {
            return Err(-libc::EIO);
        }
        if self.checks == 0 {
            return Ok(());
        }
        let (first, last) = self.clusters(host, len);
        let hit = self.map().data_hit(first, last, self.checks);
        self.refuse(hit, host, len)
    }

    /// Checks a metadata write to `[host, host + len)`; a hit is fatal.
    pub fn check_meta(&self, host: u64, len: u64) -> Result<(), i32> {
        if self.is_broken() {
            return Err(-libc::EIO);
        }
        if self.checks == 0 {
            return Ok(());
        }
        let (first, last) = self.clusters(host, len);
        let hit = self.map().meta_hit(first, last, self.checks);
        self.refuse(hit, host, len)
    }

    fn refuse(&self, hit: u16, host: u64, len: u64) -> Result<(), i32> {
        if hit == 0 {
            return Ok(());
        }
        self.signal(
            true,
            &format!(
                "Preventing invalid write on metadata (overlaps with {})",
                name_of(hit)
            ),
            Some((host, len)),
        );
        Err(-libc::EIO)
    }

    /// Records a structure allocated at `[host, host + len)`.
    pub fn register(&self, host: u64, len: u64, kind: u16) {
        if self.checks & kind == 0 {
            return;
        }
        let (first, last) = self.clusters(host, len);
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(first, last - first + 1, kind);
    }

    /// Forgets a structure freed at `[host, host + len)` (its clusters
    /// may hold data next).
    pub fn forget(&self, host: u64, len: u64, kind: u16) {
        let (first, last) = self.clusters(host, len);
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(first, last - first + 1, kind);
    }

    /// Fatal corruption was found: the node refuses writes.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Reports damage: once per node (a fatal report may follow a
    /// non-fatal one), with the event, and on a writable node fatally.
    pub fn signal(&self, fatal: bool, msg: &str, access: Option<(u64, u64)>) {
        let fatal = fatal && self.writable;
        if fatal {
            if self.broken.swap(true, Ordering::AcqRel) {
                return;
            }
            self.mark_pending.store(true, Ordering::Release);
            self.signaled.store(true, Ordering::Release);
            log::error!(
                "qcow2 node '{}': marking the image as corrupt: {msg}; further corruption events will be suppressed",
                self.node
            );
        } else {
            if self.signaled.swap(true, Ordering::AcqRel) {
                log::debug!("qcow2 node '{}': {msg}", self.node);
                return;
            }
            log::error!(
                "qcow2 node '{}': the image is corrupt: {msg}; further non-fatal corruption events will be suppressed",
                self.node
            );
        }
        if let Some(sink) = &self.sink {
            sink(Notice::Corruption(Corruption {
                node: self.node.clone(),
                msg: msg.to_string(),
                access,
                fatal,
            }));
        }
    }

    /// Whether the header still needs its corrupt bit (taken by the one
    /// task that will write it).
    pub fn take_mark(&self) -> bool {
        self.mark_pending.swap(false, Ordering::AcqRel)
    }
}

/// The byte of the header's incompatible features that holds the corrupt
/// bit (the field is a big-endian 64-bit word at offset 72).
const CORRUPT_BYTE: usize = 79;

/// Sets the corrupt bit in the image's header and flushes it.
pub async fn mark_corrupt(io: &Qcow2Io) -> Result<(), i32> {
    let bit = incompatible::CORRUPT as u8;
    let mut buf = super::alloc::meta_buf(io, io.file.get().mem_alignment().max(512))?;
    super::alloc::read_file(io, 0, &mut buf).await?;
    if let Some(b) = buf.as_mut_slice().get_mut(CORRUPT_BYTE) {
        *b |= bit;
    }
    let len = buf.len();
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    }];
    // SAFETY: `buf` and `iov` outlive the awaited write.
    let req = unsafe { IoRequest::new(IoKind::Write, 0, len as u64, iov.as_ptr(), 1, 0) };
    let r = task::submit(io.file.get(), &req).await;
    if r < 0 {
        return Err(r);
    }
    super::alloc::flush_file(io).await
}

/// Runs a request's task, then writes the corrupt bit if the task found
/// the image damaged, before the request completes.
pub async fn marking<F: std::future::Future<Output = i32>>(
    io: std::sync::Arc<Qcow2Io>,
    task: F,
) -> i32 {
    let r = task.await;
    if io.guard.take_mark() {
        if let Err(e) = mark_corrupt(&io).await {
            log::error!(
                "qcow2 node '{}': marking the image as corrupt failed: {}",
                io.name,
                std::io::Error::from_raw_os_error(-e)
            );
        }
    }
    r
}

/// The metadata map of an image opened for writing, with what `checks`
/// needs of it: read from the tables in memory, plus the refcount table
/// and (for inactive L2 tables) the snapshots' L1 tables from the file.
pub fn build_map(
    file: &Root,
    header: &Header,
    geo: &Geometry,
    l1: &[u64],
    snapshots: &[Snapshot],
    checks: u16,
) -> MetaMap {
    let cs = geo.cluster_size();
    let clusters = |bytes: u64| bytes.div_ceil(cs).max(1);
    let mut map = MetaMap::default();
    if checks == 0 {
        return map;
    }
    map.add(0, 1, MAIN_HEADER);
    // The L1 table's clusters, with the room it may grow into (none for
    // an image without a table).
    if header.l1_table_offset != 0 {
        map.add(
            header.l1_table_offset / cs,
            clusters(u64::from(header.l1_size) * 8),
            ACTIVE_L1,
        );
    }
    for &e in l1 {
        let off = e & OFFSET_MASK;
        if off != 0 {
            map.add(off / cs, 1, ACTIVE_L2);
        }
    }
    let reftable_clusters = u64::from(header.refcount_table_clusters);
    map.add(
        header.refcount_table_offset / cs,
        reftable_clusters.max(1),
        REFCOUNT_TABLE,
    );
    if checks & REFCOUNT_BLOCK != 0 && reftable_clusters > 0 {
        let mut raw = vec![0u8; (reftable_clusters * cs) as usize];
        match sync_io::read_at(&**file, header.refcount_table_offset, &mut raw) {
            Ok(()) => {
                for e in super::words::be_words(&raw) {
                    let off = e & REFTABLE_OFFSET_MASK;
                    if off != 0 {
                        map.add(off / cs, 1, REFCOUNT_BLOCK);
                    }
                }
            }
            Err(e) => log::warn!("overlap checks: reading the refcount table: {e}"),
        }
    }
    if header.nb_snapshots > 0 {
        let len = crate::block::qcow2::format::snapshot_table_len(snapshots) as u64;
        map.add(header.snapshots_offset / cs, clusters(len), SNAPSHOT_TABLE);
    }
    for sn in snapshots {
        let bytes = u64::from(sn.l1_size) * 8;
        if bytes == 0 {
            continue;
        }
        map.add(sn.l1_table_offset / cs, clusters(bytes), INACTIVE_L1);
        if checks & INACTIVE_L2 == 0 || bytes > 32 << 20 {
            continue;
        }
        let mut raw = vec![0u8; bytes as usize];
        match sync_io::read_at(&**file, sn.l1_table_offset, &mut raw) {
            Ok(()) => {
                for e in super::words::be_words(&raw) {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        map.add(off / cs, 1, INACTIVE_L2);
                    }
                }
            }
            Err(e) => log::warn!("overlap checks: reading a snapshot's L1 table: {e}"),
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qapi::Qcow2OverlapCheckFlags;

    #[test]
    fn modes_and_flags_pick_the_structures() {
        assert_eq!(checks_from(None), CACHED);
        let none = Qcow2OverlapChecks::Mode(Qcow2OverlapCheckMode::None);
        assert_eq!(checks_from(Some(&none)), 0);
        let flags = Qcow2OverlapChecks::Flags(Qcow2OverlapCheckFlags {
            template: Some(Qcow2OverlapCheckMode::Constant),
            main_header: Some(false),
            active_l2: Some(true),
            ..Default::default()
        });
        assert_eq!(
            checks_from(Some(&flags)),
            (CONSTANT & !MAIN_HEADER) | ACTIVE_L2
        );
    }

    #[test]
    fn data_writes_hit_any_structure_metadata_writes_only_a_second_one() {
        // Arrange: header in cluster 0, refcount table 1, L1 table 3,
        // an L2 table 4 that (damaged) also claims cluster 3.
        let mut m = MetaMap::default();
        m.add(0, 1, MAIN_HEADER);
        m.add(1, 1, REFCOUNT_TABLE);
        m.add(3, 1, ACTIVE_L1);
        m.add(4, 1, ACTIVE_L2);
        m.add(3, 1, ACTIVE_L2);
        // Act / Assert
        assert_eq!(m.data_hit(2, 2, CACHED), 0);
        assert_eq!(m.data_hit(1, 2, CACHED), REFCOUNT_TABLE);
        assert_eq!(m.data_hit(1, 2, CONSTANT & !REFCOUNT_TABLE), 0);
        assert_eq!(name_of(m.data_hit(3, 3, CACHED)), "active L1 table");
        assert_eq!(m.meta_hit(4, 4, CACHED), 0);
        assert_eq!(m.meta_hit(5, 9, CACHED), 0);
        assert_ne!(m.meta_hit(3, 3, CACHED), 0);
        assert_eq!(m.meta_hit(3, 3, CONSTANT), 0);
        assert_ne!(m.meta_hit(0, 1, CACHED), 0);
        assert_eq!(m.clusters_held(), 4);
        m.remove(3, 2, ACTIVE_L2);
        assert_eq!(m.meta_hit(3, 3, CACHED), 0);
        assert_eq!(m.clusters_held(), 3);
    }

    /// What the check costs a write on the direct path; run with
    /// `cargo test --release --lib measure_overlap_check -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_overlap_check() {
        // A 1 TiB image's worth of tables with 64 KiB clusters: 2048 L2
        // tables and 256 refcount blocks spread over the file.
        let mut m = MetaMap::default();
        for i in 0..2304u64 {
            m.add(i * 7919 % 16_000_000, 1, ACTIVE_L2);
        }
        let geo = Geometry::new(16, 4, false, false).unwrap();
        let g = Guard::new("m", CACHED, &geo, m, true, None);
        let n = 2_000_000u64;
        let t = std::time::Instant::now();
        let mut clear = 0u64;
        for i in 0..n {
            clear += u64::from(g.data_clear((i * 104_729 % 16_000_000) << 16, 4096));
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("ns per overlap check: {ns:.1} ({clear} clear)");
    }
}
