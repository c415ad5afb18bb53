//! Header extensions: the typed records that follow the header fields in
//! the first cluster, each kept with its exact bytes so that a header can
//! be written back as it was read.

use super::bytes::{align8, be32, be64, slice};
use super::error::FormatError;

/// Type word of the extension that ends the list.
pub const EXT_END: u32 = 0;
/// Type words of the extensions the specification defines.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAME_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
pub const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// What an extension is, by its type word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtensionKind {
    /// The backing file's format name (a string).
    BackingFormat,
    /// Names for feature bits.
    FeatureNameTable,
    /// Where the persistent dirty bitmaps' directory is.
    Bitmaps,
    /// Where the LUKS header is.
    FullDiskEncryption,
    /// The external data file's name (a string).
    ExternalDataFile,
    /// A type this code does not know; kept as it is.
    Unknown(u32),
}

impl ExtensionKind {
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            EXT_BACKING_FORMAT => ExtensionKind::BackingFormat,
            EXT_FEATURE_NAME_TABLE => ExtensionKind::FeatureNameTable,
            EXT_BITMAPS => ExtensionKind::Bitmaps,
            EXT_FULL_DISK_ENCRYPTION => ExtensionKind::FullDiskEncryption,
            EXT_EXTERNAL_DATA_FILE => ExtensionKind::ExternalDataFile,
            other => ExtensionKind::Unknown(other),
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            ExtensionKind::BackingFormat => EXT_BACKING_FORMAT,
            ExtensionKind::FeatureNameTable => EXT_FEATURE_NAME_TABLE,
            ExtensionKind::Bitmaps => EXT_BITMAPS,
            ExtensionKind::FullDiskEncryption => EXT_FULL_DISK_ENCRYPTION,
            ExtensionKind::ExternalDataFile => EXT_EXTERNAL_DATA_FILE,
            ExtensionKind::Unknown(raw) => raw,
        }
    }
}

/// One header extension: its type, its data, and the bytes that pad it
/// to a multiple of 8 (kept because the specification does not require
/// them to be zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderExtension {
    pub kind: ExtensionKind,
    pub data: Vec<u8>,
    padding: Vec<u8>,
}

impl HeaderExtension {
    /// A new extension, zero padded.
    pub fn new(kind: ExtensionKind, data: Vec<u8>) -> Self {
        let padding = vec![0; align8(data.len()) - data.len()];
        HeaderExtension {
            kind,
            data,
            padding,
        }
    }

    /// The padding bytes after the data, as read (or zeros).
    pub fn padding(&self) -> &[u8] {
        &self.padding
    }

    /// Bytes the extension takes: type, length, data and padding.
    pub fn encoded_len(&self) -> usize {
        8 + self.data.len() + self.padding.len()
    }
}

/// The bitmaps extension's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub reserved: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// Length of the bitmaps extension's data.
pub(super) const BITMAPS_EXT_LEN: usize = 24;
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

impl BitmapsExtension {
    pub(super) fn parse(data: &[u8]) -> Result<Self, FormatError> {
        if data.len() != BITMAPS_EXT_LEN {
            return Err(FormatError::BitmapsExtensionLength);
        }
        let what = "bitmaps extension";
        Ok(BitmapsExtension {
            nb_bitmaps: be32(data, 0, what)?,
            reserved: be32(data, 4, what)?,
            directory_size: be64(data, 8, what)?,
            directory_offset: be64(data, 16, what)?,
        })
    }

    /// The checks QEMU makes on an extension it is going to use.
    pub(super) fn validate(&self, cluster_size: u64) -> Result<(), FormatError> {
        if self.reserved != 0 {
            return Err(FormatError::BitmapsReserved);
        }
        if self.nb_bitmaps > MAX_BITMAPS {
            return Err(FormatError::TooManyBitmaps(self.nb_bitmaps));
        }
        if self.nb_bitmaps == 0 {
            return Err(FormatError::NoBitmaps);
        }
        if self.directory_offset % cluster_size != 0 {
            return Err(FormatError::BitmapDirectoryOffset);
        }
        if self.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(FormatError::BitmapDirectoryTooLarge(self.directory_size));
        }
        Ok(())
    }
}

/// The full disk encryption extension: where the LUKS header is kept and
/// how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncryptionHeader {
    pub offset: u64,
    pub length: u64,
}

pub(super) const ENCRYPTION_EXT_LEN: usize = 16;

impl EncryptionHeader {
    pub(super) fn parse(data: &[u8], cluster_size: u64) -> Result<Self, FormatError> {
        if data.len() != ENCRYPTION_EXT_LEN {
            return Err(FormatError::CryptoHeaderSize(
                u32::try_from(data.len()).unwrap_or(u32::MAX),
            ));
        }
        let what = "full disk encryption extension";
        let header = EncryptionHeader {
            offset: be64(data, 0, what)?,
            length: be64(data, 8, what)?,
        };
        if header.offset % cluster_size != 0 {
            return Err(FormatError::CryptoHeaderOffset {
                offset: header.offset,
                cluster_size,
            });
        }
        Ok(header)
    }
}

/// Backing format names must be shorter than this.
pub(super) const BACKING_FORMAT_LIMIT: usize = 16;

/// The extensions between `start` and `end` (where the backing file name
/// starts, or the end of the first cluster), up to the end marker if
/// there is one. Only the framing is checked here.
pub(super) fn walk(
    buf: &[u8],
    start: usize,
    end: usize,
) -> Result<Vec<HeaderExtension>, FormatError> {
    let what = "qcow2 header extension area";
    let mut extensions = Vec::new();
    let mut offset = start;
    while offset < end {
        if end - offset < 8 {
            return Err(FormatError::ExtensionTooLarge);
        }
        let kind = be32(buf, offset, what)?;
        let len = be32(buf, offset + 4, what)?;
        offset += 8;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > end - offset {
            return Err(FormatError::ExtensionTooLarge);
        }
        if kind == EXT_END {
            break;
        }
        let data = slice(buf, offset, len, what)?.to_vec();
        offset += len;
        // The padding of the last extension may be cut short by the end
        // of the area; only what lies inside it belongs to the header.
        let pad = (align8(len) - len).min(end - offset);
        let padding = slice(buf, offset, pad, what)?.to_vec();
        offset += pad;
        let kind = ExtensionKind::from_raw(kind);
        if let ExtensionKind::Unknown(raw) = kind {
            log::debug!("qcow2: keeping unknown header extension {raw:#010x} ({len} bytes)");
        }
        extensions.push(HeaderExtension {
            kind,
            data,
            padding,
        });
    }
    Ok(extensions)
}
