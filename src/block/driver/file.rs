//! The `file` and `host_device` protocol drivers: an image in a regular
//! file or a block device, locked as QEMU locks it.

use super::inline_write::{InlineWrites, Outcome};
use super::{Driver, DriverKind, NodeFlags};
use crate::block::drain::Root;
use crate::block::error::BlockError;
use crate::block::file_lock::{LockingMode, PermLock};
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::block::perm::Perm;
use crate::io::{IoContext, Op};
use crate::qapi::{BlockdevAioOptions, BlockdevOptionsFile, OnOffAuto};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::{Arc, Mutex, PoisonError};

/// The data face: the open file.
pub struct FileIo {
    file: File,
    path: String,
    no_flush: bool,
    block_device: bool,
    /// A regular file: a read past its end comes back short, and the rest
    /// of the buffers is zeroed here (see `submit`).
    regular: bool,
    /// discard=unmap: discard requests punch holes (otherwise ignored).
    unmap: bool,
    /// With O_DIRECT, the alignment buffers need; 1 otherwise.
    align: usize,
    /// The file system's block or the device's physical sector (see
    /// [`preferred_alignment`]).
    preferred: u32,
    /// Buffered writes to a regular file are tried on the submitting
    /// thread first (see [`super::inline_write`]).
    inline_writes: Option<Arc<InlineWrites>>,
    /// A size the regular file has at least (its size at open or at the
    /// last resize or size query): a read that ends within it cannot come
    /// back short, so it needs no fill and goes the direct way.
    known_len: std::sync::atomic::AtomicU64,
}

impl BlockIo for FileIo {
    fn length(&self) -> Result<u64, BlockError> {
        if self.block_device {
            (&self.file)
                .seek(SeekFrom::End(0))
                .map_err(|e| BlockError::io("Getting the device size", &e))
        } else {
            let len = self
                .file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| BlockError::io("Getting the file size", &e))?;
            self.known_len
                .fetch_max(len, std::sync::atomic::Ordering::Relaxed);
            Ok(len)
        }
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn mem_alignment(&self) -> usize {
        self.align
    }

    fn preferred_alignment(&self) -> u32 {
        self.preferred
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.block_device {
            let current = self.length()?;
            if size > current {
                return Err(BlockError::invalid("Cannot grow device files"));
            }
            return Ok(());
        }
        // Lowered before a shrink and raised after a growth, so it never
        // claims more than the file has.
        let known = &self.known_len;
        known.fetch_min(size, std::sync::atomic::Ordering::Relaxed);
        self.file.set_len(size).map_err(|e| {
            BlockError::invalid(format!(
                "Failed to resize file '{}': {}",
                self.path,
                crate::block::error::strerror(&e)
            ))
        })?;
        known.fetch_max(size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.no_flush {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| BlockError::io("Flush", &e))
    }

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let fd = self.file.as_raw_fd();
        let (iov, iovcnt) = req.iov();
        let op = match req.kind() {
            IoKind::Read => {
                // A regular file ends somewhere, and a read that reaches
                // past the end transfers only what is there: the read is a
                // fill, which zeroes the rest and completes with the full
                // length, so no node above sees a short read. (Requests
                // normally stay inside the file; this is for one that
                // shrank under a reader, or a device above that rounds
                // its size up.)
                let end = req.offset().saturating_add(req.len());
                let tag = if self.regular
                    && end > self.known_len.load(std::sync::atomic::Ordering::Relaxed)
                {
                    // SAFETY: the request's buffers are writable and stay
                    // valid until its completion has been reaped
                    // (IoRequest's contract), which the fill's completion
                    // precedes.
                    unsafe { ctx.start_fill(req.tag(), iov, iovcnt, req.len()) }
                } else {
                    req.tag()
                };
                let op = Op::Readv {
                    fd,
                    offset: req.offset(),
                    iov,
                    iovcnt,
                    // `align` is 1 exactly when the file is not opened
                    // O_DIRECT.
                    cached: self.align == 1,
                };
                // SAFETY: as for every operation below.
                unsafe { ctx.push(op, tag) };
                return;
            }
            IoKind::Write => {
                if let Some(w) = &self.inline_writes {
                    // SAFETY: the request's buffers stay valid until its
                    // completion has been reaped from this context
                    // (IoRequest's contract).
                    let done = unsafe { w.write(ctx.mailbox(), fd, req) };
                    match done {
                        Outcome::Done(result) => return ctx.complete_now(req.tag(), result),
                        Outcome::HandedOver => return,
                        Outcome::ToEngine => {}
                    }
                }
                Op::Writev {
                    fd,
                    offset: req.offset(),
                    iov,
                    iovcnt,
                }
            }
            IoKind::Flush if self.no_flush => return ctx.complete_now(req.tag(), 0),
            IoKind::Flush => Op::Flush { fd },
            IoKind::Discard if !self.unmap => return ctx.complete_now(req.tag(), 0),
            IoKind::Discard | IoKind::WriteZeroes { unmap: true } if self.unmap => Op::Fallocate {
                fd,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset: req.offset(),
                len: req.len(),
            },
            IoKind::Discard | IoKind::WriteZeroes { .. } => Op::Fallocate {
                fd,
                mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset: req.offset(),
                len: req.len(),
            },
        };
        // SAFETY: the iovecs and buffers of a read or write are valid until
        // completion (IoRequest's contract); the descriptor lives as long as
        // this node, which its users hold until their requests finished.
        unsafe { ctx.push(op, req.tag()) };
    }
}

struct LockState {
    tracker: PermLock,
    /// The change being prepared, if any.
    pending: Option<(Perm, Perm)>,
}

/// The control face.
pub struct FileDriver {
    io: Arc<FileIo>,
    name: &'static str,
    read_only: bool,
    locking: bool,
    lock: Mutex<LockState>,
}

impl FileDriver {
    pub fn open(
        opts: &BlockdevOptionsFile,
        flags: &NodeFlags,
        host_device: bool,
    ) -> Result<Self, BlockError> {
        let path = opts.filename.clone();
        let aio = opts.aio.unwrap_or(BlockdevAioOptions::Threads);
        if aio == BlockdevAioOptions::Native && !flags.cache_direct {
            return Err(BlockError::invalid(
                "aio=native was specified, but it requires cache.direct=on, which was not specified.",
            ));
        }
        let locking = match opts.locking.unwrap_or(OnOffAuto::Auto) {
            OnOffAuto::On => LockingMode::On,
            OnOffAuto::Off => LockingMode::Off,
            OnOffAuto::Auto => LockingMode::Auto,
        }
        .resolve()?;
        let (file, read_only) = open_file(&path, flags)?;
        let align = if flags.cache_direct {
            direct_alignment(&file)
        } else {
            1
        };
        let meta = file.metadata().map_err(|e| BlockError::open(&path, &e))?;
        let block_device = meta.file_type().is_block_device();
        if host_device && !(block_device || meta.file_type().is_char_device()) {
            return Err(BlockError::invalid(format!(
                "'host_device' driver requires '{path}' to be either a character or block device"
            )));
        }
        if meta.is_dir() {
            return Err(BlockError::invalid(format!("'{path}' is a directory")));
        }
        let preferred = preferred_alignment(&file, block_device, align);
        Ok(FileDriver {
            io: Arc::new(FileIo {
                file,
                path,
                no_flush: flags.cache_no_flush,
                block_device,
                regular: meta.file_type().is_file(),
                known_len: std::sync::atomic::AtomicU64::new(if meta.file_type().is_file() {
                    meta.len()
                } else {
                    0
                }),
                unmap: flags.discard == crate::qapi::BlockdevDiscardOptions::Unmap,
                align,
                preferred,
                inline_writes: (!flags.cache_direct && meta.file_type().is_file())
                    .then(InlineWrites::new),
            }),
            name: if host_device { "host_device" } else { "file" },
            read_only,
            locking,
            lock: Mutex::new(LockState {
                tracker: PermLock::new(),
                pending: None,
            }),
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, LockState> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The granularity writes to this file are best done in: a block
/// device's physical sector size, or the block size of the file system
/// holding a file (a smaller write through the page cache may have to
/// read the rest of the block first). Never below the O_DIRECT alignment;
/// 512 when nothing sensible can be found.
fn preferred_alignment(file: &File, block_device: bool, align: usize) -> u32 {
    use std::os::fd::AsRawFd;
    /// `_IO(0x12, 123)`: a block device's physical sector size.
    const BLKPBSZGET: libc::c_ulong = 0x127b;
    let probed: Option<u64> = if block_device {
        let mut size: libc::c_uint = 0;
        // SAFETY: BLKPBSZGET writes one unsigned int to the pointer given.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKPBSZGET, &mut size) };
        (rc == 0).then_some(u64::from(size))
    } else {
        // SAFETY: an all-zero statfs is a valid value to be overwritten.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs fills the struct it is given.
        let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
        (rc == 0).then(|| u64::try_from(st.f_bsize).unwrap_or(0))
    };
    let probed = probed
        .filter(|v| v.is_power_of_two() && (512..=65536).contains(v))
        .unwrap_or(512) as u32;
    probed.max(u32::try_from(align).unwrap_or(512))
}

/// The smallest alignment O_DIRECT reads accept on this file: tried with
/// reads of growing size into a page-aligned buffer, as QEMU probes it.
fn direct_alignment(file: &File) -> usize {
    use std::os::unix::fs::FileExt;
    for align in [512usize, 1024, 2048, 4096] {
        let Some(mut buf) = crate::io::aligned::AlignedBuf::new(align, 4096) else {
            break;
        };
        match file.read_at(buf.as_mut_slice(), 0) {
            Ok(_) => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            // Another error (an empty file reads fine): assume the
            // common case.
            Err(_) => return 4096,
        }
    }
    4096
}

/// Opens read-write unless told otherwise; with auto-read-only, falls back
/// to read-only when writing is refused.
fn open_file(path: &str, flags: &NodeFlags) -> Result<(File, bool), BlockError> {
    let open = |write: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(write);
        if flags.cache_direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    if flags.read_only {
        return open(false)
            .map(|f| (f, true))
            .map_err(|e| BlockError::open(path, &e));
    }
    match open(true) {
        Ok(f) => Ok((f, false)),
        Err(e)
            if flags.auto_read_only
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EROFS | libc::EPERM)
                ) =>
        {
            open(false)
                .map(|f| (f, true))
                .map_err(|e| BlockError::open(path, &e))
        }
        Err(e) => Err(BlockError::open(path, &e)),
    }
}

impl Driver for FileDriver {
    fn name(&self) -> &'static str {
        self.name
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn io(&self) -> Root {
        self.io.clone()
    }

    fn filename(&self) -> String {
        self.io.path.clone()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn prepare_perm(&self, perm: Perm, shared: Perm) -> Result<(), BlockError> {
        if !self.locking {
            return Ok(());
        }
        let mut st = self.lock_state();
        // A read-only file descriptor never needs the write bytes taken.
        let perm = if self.read_only {
            perm - (Perm::WRITE | Perm::RESIZE)
        } else {
            perm
        };
        st.tracker
            .prepare(&self.io.file, perm, shared)
            .map_err(|source| BlockError::ImageLock {
                source,
                path: self.io.path.clone(),
            })?;
        st.pending = Some((perm, shared));
        Ok(())
    }

    fn commit_perm(&self, _perm: Perm, _shared: Perm) {
        if !self.locking {
            return;
        }
        let mut st = self.lock_state();
        if let Some((perm, shared)) = st.pending.take() {
            st.tracker.commit(&self.io.file, perm, shared);
        }
    }

    fn abort_perm(&self) {
        if !self.locking {
            return;
        }
        let mut st = self.lock_state();
        if st.pending.take().is_some() {
            st.tracker.abort(&self.io.file);
        }
    }

    fn describe_image(&self, info: &mut crate::qapi::ImageInfo) {
        info.dirty_flag = Some(false);
        info.format_specific = Some(crate::qapi::ImageInfoSpecific::File(
            crate::qapi::ImageInfoSpecificFile {
                extent_size_hint: None,
            },
        ));
    }

    fn stats_specific(&self) -> Option<crate::qapi::BlockStatsSpecific> {
        use crate::qapi::{BlockStatsSpecific, BlockStatsSpecificBranch, BlockStatsSpecificFile};
        let counters = BlockStatsSpecificFile {
            discard_nb_ok: 0,
            discard_nb_failed: 0,
            discard_bytes_ok: 0,
        };
        Some(BlockStatsSpecific {
            u: if self.name == "host_device" {
                BlockStatsSpecificBranch::HostDevice(counters)
            } else {
                BlockStatsSpecificBranch::File(counters)
            },
        })
    }

    fn close(&self) -> Result<(), BlockError> {
        let flushed = if self.read_only {
            Ok(())
        } else {
            self.io.flush()
        };
        if self.locking {
            let mut st = self.lock_state();
            if let Err(e) = st.tracker.release(&self.io.file) {
                log::warn!("releasing the locks of '{}': {e}", self.io.path);
            }
        }
        flushed
    }
}
