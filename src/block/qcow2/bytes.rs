//! Big-endian reads and writes on byte slices that fail instead of
//! panicking when the slice is too short.

use super::error::FormatError;

/// `N` bytes of `buf` at `at`, or `Truncated` naming `what`.
fn array<const N: usize>(
    buf: &[u8],
    at: usize,
    what: &'static str,
) -> Result<[u8; N], FormatError> {
    let end = at.checked_add(N).ok_or(FormatError::Truncated {
        what,
        needed: usize::MAX,
        available: buf.len(),
    })?;
    buf.get(at..end)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .ok_or(FormatError::Truncated {
            what,
            needed: end,
            available: buf.len(),
        })
}

pub(super) fn be16(buf: &[u8], at: usize, what: &'static str) -> Result<u16, FormatError> {
    array(buf, at, what).map(u16::from_be_bytes)
}

pub(super) fn be32(buf: &[u8], at: usize, what: &'static str) -> Result<u32, FormatError> {
    array(buf, at, what).map(u32::from_be_bytes)
}

pub(super) fn be64(buf: &[u8], at: usize, what: &'static str) -> Result<u64, FormatError> {
    array(buf, at, what).map(u64::from_be_bytes)
}

/// `len` bytes of `buf` at `at`, or `Truncated` naming `what`.
pub(super) fn slice<'a>(
    buf: &'a [u8],
    at: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], FormatError> {
    let end = at.checked_add(len).ok_or(FormatError::Truncated {
        what,
        needed: usize::MAX,
        available: buf.len(),
    })?;
    buf.get(at..end).ok_or(FormatError::Truncated {
        what,
        needed: end,
        available: buf.len(),
    })
}

/// `n` rounded up to a multiple of 8.
pub(super) fn align8(n: usize) -> usize {
    n.div_ceil(8).saturating_mul(8)
}

/// Appends bytes to a fixed buffer, failing with `HeaderDoesNotFit` when
/// it runs out of room.
pub(super) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(super) fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    pub(super) fn put(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        self.put_at(self.pos, bytes)?;
        self.pos += bytes.len();
        Ok(())
    }

    pub(super) fn put_at(&mut self, at: usize, bytes: &[u8]) -> Result<(), FormatError> {
        let available = self.buf.len();
        let end = at
            .checked_add(bytes.len())
            .ok_or(FormatError::HeaderDoesNotFit {
                needed: usize::MAX,
                available,
            })?;
        self.buf
            .get_mut(at..end)
            .ok_or(FormatError::HeaderDoesNotFit {
                needed: end,
                available,
            })?
            .copy_from_slice(bytes);
        Ok(())
    }

    pub(super) fn be32(&mut self, v: u32) -> Result<(), FormatError> {
        self.put(&v.to_be_bytes())
    }

    pub(super) fn be64(&mut self, v: u64) -> Result<(), FormatError> {
        self.put(&v.to_be_bytes())
    }
}
