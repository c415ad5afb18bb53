//! Inflight I/O tracking (INFLIGHT_SHMFD): a memory area vubd shares with
//! the frontend, in which it marks every request it took from a ring until
//! the request is returned. The frontend keeps the area across a vubd
//! restart (or a reconnection) and gives it back; vubd then finishes the
//! requests that were marked instead of losing them.
//!
//! The layout is the split-ring one described by the vhost-user spec: per
//! queue a 16-byte header (features u64, version u16, desc_num u16,
//! last_batch_head u16, used_idx u16) and one 16-byte state per descriptor
//! (inflight u8, padding 5, next u16, counter u64).
//!
//! Returning a request is ordered so that a crash at any point can be
//! repaired: note the head in `last_batch_head`, put it in the used ring,
//! clear its mark, then record the used index. If the recorded used index
//! differs from the ring's when the area comes back, the head noted last
//! was returned but not cleared.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

const HEADER: usize = 16;
const DESC: usize = 16;
/// Queue regions start on this alignment.
const ALIGN: usize = 64;
const VERSION: u16 = 1;

/// The bytes one queue of `queue_size` descriptors takes.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// A shared mapping of the whole area.
pub struct InflightArea {
    ptr: *mut u8,
    len: usize,
    pub num_queues: u16,
    pub queue_size: u16,
    /// The file, kept to hand back on GET_INFLIGHT_FD.
    pub file: File,
}

// SAFETY: the mapping is plain shared memory; each queue's region is only
// accessed by the thread that owns the queue (see InflightQueue).
unsafe impl Send for InflightArea {}
// SAFETY: as above; the area itself is never written through `&self`
// except via per-queue views owned by one thread each.
unsafe impl Sync for InflightArea {}

impl InflightArea {
    /// Creates a zeroed area for a new frontend (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> std::io::Result<Arc<Self>> {
        let len = queue_region_size(queue_size) * usize::from(num_queues);
        let name = c"vubd-inflight";
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor is new and ours.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        Self::map(file, len, 0, num_queues, queue_size)
    }

    /// Maps an area a frontend gives back (SET_INFLIGHT_FD).
    pub fn map(
        file: File,
        len: usize,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> std::io::Result<Arc<Self>> {
        let need = queue_region_size(queue_size) * usize::from(num_queues);
        if len < need || need == 0 {
            return Err(std::io::Error::other(
                "inflight area too small for its queues",
            ));
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::other("inflight offset too large"))?;
        // SAFETY: mapping `len` bytes of a file we own, shared, at a place
        // the kernel chooses; failure is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(InflightArea {
            ptr: ptr.cast(),
            len,
            num_queues,
            queue_size,
            file,
        }))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The view of queue `index`, for the thread that will own it.
    pub fn queue(self: &Arc<Self>, index: u16, ring_size: u16) -> Option<InflightQueue> {
        if index >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        let offset = queue_region_size(self.queue_size) * usize::from(index);
        Some(InflightQueue {
            area: self.clone(),
            offset,
            ring_size,
            counter: 0,
        })
    }
}

impl Drop for InflightArea {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One queue's region, owned by the I/O thread of that queue.
pub struct InflightQueue {
    area: Arc<InflightArea>,
    offset: usize,
    ring_size: u16,
    counter: u64,
}

impl InflightQueue {
    fn at(&self, off: usize) -> *mut u8 {
        // SAFETY: every caller passes an offset inside this queue's region
        // (header fields, or a descriptor index below ring_size), which
        // lies inside the mapping (checked in InflightArea::queue).
        unsafe { self.area.ptr.add(self.offset + off) }
    }

    fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: see `at`; a byte-array read has no alignment needs.
        let bytes = unsafe { std::ptr::read_volatile(self.at(off).cast::<[u8; 2]>()) };
        u16::from_le_bytes(bytes)
    }

    fn write_u16(&self, off: usize, v: u16) {
        // SAFETY: see `at`.
        unsafe { std::ptr::write_volatile(self.at(off).cast::<[u8; 2]>(), v.to_le_bytes()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: see `at`.
        let bytes = unsafe { std::ptr::read_volatile(self.at(off).cast::<[u8; 8]>()) };
        u64::from_le_bytes(bytes)
    }

    fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: see `at`.
        unsafe { std::ptr::write_volatile(self.at(off).cast::<[u8; 8]>(), v.to_le_bytes()) }
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    fn flag(&self, head: u16) -> bool {
        // SAFETY: see `at`.
        unsafe { std::ptr::read_volatile(self.at(Self::desc(head))) != 0 }
    }

    fn set_flag(&self, head: u16, on: bool) {
        // SAFETY: see `at`.
        unsafe { std::ptr::write_volatile(self.at(Self::desc(head)), u8::from(on)) }
    }

    /// Prepares the region for a ring whose used index is `used_idx`. A
    /// fresh region is initialised (None: the frontend's base stands); a
    /// region that comes back is repaired as described in the module
    /// documentation, and the heads to resubmit are returned oldest first
    /// (the next avail index is then the used index plus their number).
    pub fn recover(&mut self, used_idx: u16) -> Option<Vec<u16>> {
        let desc_num = self.read_u16(10);
        if desc_num == 0 || self.read_u16(8) != VERSION || desc_num != self.ring_size {
            // New (or foreign) region: start clean.
            self.write_u64(0, 0);
            self.write_u16(8, VERSION);
            self.write_u16(10, self.ring_size);
            self.write_u16(12, 0);
            self.write_u16(14, used_idx);
            for head in 0..self.ring_size {
                self.set_flag(head, false);
                self.write_u64(Self::desc(head) + 8, 0);
            }
            return None;
        }
        if self.read_u16(14) != used_idx {
            let last = self.read_u16(12);
            if last < self.ring_size {
                self.set_flag(last, false);
            }
            self.write_u16(14, used_idx);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.ring_size)
            .filter(|&h| self.flag(h))
            .map(|h| (self.read_u64(Self::desc(h) + 8), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map(|(c, _)| c + 1).unwrap_or(0);
        Some(heads.into_iter().map(|(_, h)| h).collect())
    }

    /// A request was taken from the ring.
    pub fn taken(&mut self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        self.write_u64(Self::desc(head) + 8, self.counter);
        self.counter += 1;
        self.set_flag(head, true);
    }

    /// About to put `head` in the used ring.
    pub fn returning(&self, head: u16) {
        self.write_u16(12, head);
    }

    /// `head` is in the used ring and the ring's used index is `used_idx`.
    pub fn returned(&self, head: u16, used_idx: u16) {
        if head < self.ring_size {
            self.set_flag(head, false);
        }
        self.write_u16(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_and_are_resubmitted_oldest_first() {
        let area = InflightArea::create(2, 8).unwrap();
        let mut q = area.queue(1, 8).unwrap();
        assert_eq!(q.recover(0), None);
        q.taken(5);
        q.taken(2);
        q.taken(7);
        q.returning(2);
        q.returned(2, 1);
        // A new view of the same memory, as after a restart.
        let mut again = area.queue(1, 8).unwrap();
        assert_eq!(again.recover(1), Some(vec![5, 7]));
    }

    #[test]
    fn a_return_cut_short_is_repaired() {
        let area = InflightArea::create(1, 4).unwrap();
        let mut q = area.queue(0, 4).unwrap();
        q.recover(0);
        q.taken(1);
        q.taken(3);
        // Crash after the used ring was updated (index 1) but before the
        // mark was cleared.
        q.returning(3);
        let mut again = area.queue(0, 4).unwrap();
        assert_eq!(again.recover(1), Some(vec![1]));
    }

    #[test]
    fn queue_outside_the_area_is_refused() {
        let area = InflightArea::create(1, 4).unwrap();
        assert!(area.queue(1, 4).is_none());
        assert!(area.queue(0, 8).is_none());
    }
}
