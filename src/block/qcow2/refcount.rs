//! Reading and writing refcount block entries of any width from 1 to 64
//! bits. Entries of a byte or more are big-endian; narrower ones are
//! packed from the least significant bit of each byte up.

use super::error::FormatError;
use super::layout::MAX_REFCOUNT_ORDER;

/// Where entry `index` lies in a block of `len` bytes with entries
/// `1 << order` bits wide.
fn locate(len: usize, order: u32, index: u64) -> Result<(), FormatError> {
    if order > MAX_REFCOUNT_ORDER {
        return Err(FormatError::RefcountOrderTooLarge);
    }
    let entries = ((len as u64) * 8) >> order;
    if index >= entries {
        return Err(FormatError::RefcountIndex { index, entries });
    }
    Ok(())
}

/// The refcount at `index` in a refcount block.
pub fn get_refcount(block: &[u8], refcount_order: u32, index: u64) -> Result<u64, FormatError> {
    locate(block.len(), refcount_order, index)?;
    let bits = 1u32 << refcount_order;
    if bits < 8 {
        let bit = index * u64::from(bits);
        let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
        let mask = (1u8 << bits) - 1;
        return Ok(u64::from((byte >> (bit % 8)) & mask));
    }
    let width = (bits / 8) as usize;
    let start = index as usize * width;
    let bytes = block.get(start..start + width).unwrap_or_default();
    Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Stores `value` as the refcount at `index` in a refcount block. Fails
/// if the value does not fit the entry width.
pub fn set_refcount(
    block: &mut [u8],
    refcount_order: u32,
    index: u64,
    value: u64,
) -> Result<(), FormatError> {
    locate(block.len(), refcount_order, index)?;
    let bits = 1u32 << refcount_order;
    if bits < 64 && value >> bits != 0 {
        return Err(FormatError::RefcountValue { value, bits });
    }
    if bits < 8 {
        let bit = index * u64::from(bits);
        let shift = (bit % 8) as u32;
        let mask = ((1u8 << bits) - 1) << shift;
        if let Some(byte) = block.get_mut((bit / 8) as usize) {
            *byte = (*byte & !mask) | ((value as u8) << shift);
        }
        return Ok(());
    }
    let width = (bits / 8) as usize;
    let start = index as usize * width;
    if let Some(bytes) = block.get_mut(start..start + width) {
        bytes.copy_from_slice(&value.to_be_bytes()[8 - width..]);
    }
    Ok(())
}
