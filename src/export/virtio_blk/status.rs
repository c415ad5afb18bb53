//! Request status codes and completion helpers.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use super::error::RequestError;

/// The request succeeded.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Device or driver error (malformed requests included).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// The device does not support the request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Asks the CPU to fetch, for writing, the cache line holding a request's
/// status byte. The driver reads that line when a request completes, so
/// it is usually in the driver's CPU's cache; fetching it while the I/O
/// runs keeps that transfer out of the time between the data being ready
/// and the used ring telling the driver so. Only a hint: an address
/// outside guest memory is ignored, and nothing is read or written.
pub fn prefetch_status<M: GuestMemoryBackend + ?Sized>(mem: &M, status_addr: GuestAddress) {
    if let Ok(p) = mem.get_host_address(status_addr) {
        crate::export::cache_hint::prefetch_write(p);
    }
}

/// Writes the status byte of a request into guest memory.
///
/// Fails (with [`RequestError::StatusWrite`], which carries no status of its
/// own) when the byte is not in guest memory any more; the caller then
/// returns the chain with used length 0.
pub fn write_status<M: GuestMemory + ?Sized>(
    mem: &M,
    status_addr: GuestAddress,
    status: u8,
) -> Result<(), RequestError> {
    mem.write_slice(&[status], status_addr)
        .map_err(|_| RequestError::StatusWrite {
            addr: status_addr.0,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_blk as vb;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn status_codes_agree_with_virtio_bindings() {
        assert_eq!(u32::from(VIRTIO_BLK_S_OK), vb::VIRTIO_BLK_S_OK);
        assert_eq!(u32::from(VIRTIO_BLK_S_IOERR), vb::VIRTIO_BLK_S_IOERR);
        assert_eq!(u32::from(VIRTIO_BLK_S_UNSUPP), vb::VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn write_status_stores_the_byte() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        write_status(&mem, GuestAddress(0x10), VIRTIO_BLK_S_UNSUPP).unwrap();
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0x10)).unwrap();
        assert_eq!(b[0], 2);
    }

    #[test]
    fn write_status_outside_guest_memory_fails() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = write_status(&mem, GuestAddress(0x1000), VIRTIO_BLK_S_OK).unwrap_err();
        assert_eq!(err, RequestError::StatusWrite { addr: 0x1000 });
        assert!(!err.has_status());
    }
}
