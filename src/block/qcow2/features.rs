//! The three feature bitmaps of a version 3 header, and the names an
//! image's feature name table gives its bits.

/// Incompatible feature bits: an image with a bit set that is not known
/// here must not be opened.
pub mod incompatible {
    /// Refcounts may be out of date (lazy refcounts were in use); they
    /// must be rebuilt from the L1/L2 tables before the image is written.
    pub const DIRTY: u64 = 1 << 0;
    /// Some metadata is known to be inconsistent; the image must not be
    /// written except to repair it.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file, at the guest offsets.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// `compression_type` names a method other than zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits wide and carry a subcluster bitmap.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every incompatible bit this code understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits: unknown ones may be ignored.
pub mod compatible {
    /// Refcount updates may be postponed, with the image marked dirty.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
    /// Every compatible bit this code understands.
    pub const KNOWN: u64 = LAZY_REFCOUNTS;
}

/// Autoclear feature bits: a writer that does not know a bit must clear
/// it before it changes the image.
pub mod autoclear {
    /// The bitmaps extension is consistent with the image.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image on its own.
    pub const RAW_EXTERNAL_DATA: u64 = 1 << 1;
    /// Every autoclear bit this code understands.
    pub const KNOWN: u64 = BITMAPS | RAW_EXTERNAL_DATA;
}

/// Which of the three bitmaps a feature name table entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
    /// A type byte the specification does not define.
    Other(u8),
}

impl FeatureKind {
    fn from_raw(raw: u8) -> Self {
        match raw {
            0 => FeatureKind::Incompatible,
            1 => FeatureKind::Compatible,
            2 => FeatureKind::Autoclear,
            other => FeatureKind::Other(other),
        }
    }
}

/// One entry of a feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    pub kind: FeatureKind,
    /// Bit number within the bitmap (0 to 63 when valid).
    pub bit: u8,
    /// The name, without its zero padding (at most 46 bytes).
    pub name: Vec<u8>,
}

/// Size of one feature name table entry.
pub(super) const FEATURE_ENTRY_LEN: usize = 48;
const FEATURE_NAME_LEN: usize = 46;

/// The entries of a feature name table extension's data. A tail shorter
/// than one entry is ignored.
pub(super) fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_ENTRY_LEN)
        .map(|entry| {
            let (head, name) = entry.split_at(2);
            let name = name.get(..FEATURE_NAME_LEN).unwrap_or(name);
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            FeatureName {
                kind: FeatureKind::from_raw(head.first().copied().unwrap_or(0)),
                bit: head.get(1).copied().unwrap_or(0),
                name: name.get(..end).unwrap_or_default().to_vec(),
            }
        })
        .collect()
}

/// The text after "Unsupported qcow2 feature(s): " for the incompatible
/// bits in `mask`: the names the table gives them (read up to its first
/// unnamed entry, as QEMU does), then the bits left unnamed in hex.
pub(super) fn describe_unsupported(table: &[FeatureName], mut mask: u64) -> String {
    let mut parts = Vec::new();
    for entry in table.iter().take_while(|e| !e.name.is_empty()) {
        if entry.kind != FeatureKind::Incompatible || entry.bit >= 64 {
            continue;
        }
        let bit = 1u64 << entry.bit;
        if mask & bit != 0 {
            parts.push(String::from_utf8_lossy(&entry.name).into_owned());
            mask &= !bit;
        }
    }
    if mask != 0 {
        parts.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    parts.join(", ")
}
