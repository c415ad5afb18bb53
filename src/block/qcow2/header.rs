//! The qcow2 header: its fields, the checks QEMU makes before it opens an
//! image, and an encoder that writes the first cluster back.

use super::bytes::{be32, be64, slice, Writer};
use super::error::{FormatError, Table};
use super::extensions::{
    self, BitmapsExtension, EncryptionHeader, ExtensionKind, HeaderExtension, BACKING_FORMAT_LIMIT,
};
use super::features::{
    autoclear, compatible, describe_unsupported, incompatible, parse_feature_table, FeatureName,
};
use super::layout::{Geometry, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of a version 2 header (it has no `header_length` field).
pub const V2_HEADER_LENGTH: u32 = 72;
/// Smallest `header_length` of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Where `compression_type` sits when `header_length` reaches past it.
const COMPRESSION_TYPE_OFFSET: usize = 104;
/// Longest backing file name the specification allows.
pub const MAX_BACKING_FILE_NAME: usize = 1023;

/// QEMU's limits on the tables the header points to.
const MAX_L1_TABLE_BYTES: u64 = 32 << 20;
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u64 = 65536;
const SNAPSHOT_ENTRY_MIN_LEN: u64 = 40;

const WHAT: &str = "qcow2 header";

/// How guest data is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptMethod {
    None = 0,
    /// The old AES-CBC scheme, which QEMU only reads with its tools.
    Aes = 1,
    /// LUKS, with its header found through the full disk encryption
    /// extension.
    Luks = 2,
}

impl CryptMethod {
    fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(CryptMethod::None),
            1 => Some(CryptMethod::Aes),
            2 => Some(CryptMethod::Luks),
            _ => None,
        }
    }
}

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), the default.
    Zlib = 0,
    Zstd = 1,
}

impl CompressionType {
    fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// A parsed qcow2 header, with its extensions and backing file name.
///
/// The fields are the header's own; for version 2 images the version 3
/// fields hold the values the specification implies (no features,
/// `refcount_order` 4, `header_length` 72). Unknown trailing header
/// fields, extension padding and unknown extensions are kept, so that
/// [`Header::encode`] writes back the bytes [`Header::parse`] read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// Where the backing file name starts (0: no backing file).
    pub backing_file_offset: u64,
    /// Length of the backing file name (meaningless without one).
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: CryptMethod,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    /// See [`incompatible`].
    pub incompatible_features: u64,
    /// See [`compatible`].
    pub compatible_features: u64,
    /// See [`autoclear`].
    pub autoclear_features: u64,
    /// Refcount entries are `1 << refcount_order` bits wide.
    pub refcount_order: u32,
    pub header_length: u32,
    /// zlib unless `header_length` reaches byte 104 and it says otherwise.
    pub compression_type: CompressionType,
    /// The extensions in the order they were found.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, as bytes (it need not be UTF-8).
    pub backing_file: Option<Vec<u8>>,
    /// Bytes 105 up to `header_length`: padding and fields added to the
    /// format after this code was written.
    unknown_fields: Vec<u8>,
}

impl Header {
    /// Parses the start of an image. `buf` should hold the first cluster
    /// (zero-filled past the end of a shorter file, as reads past the end
    /// return zeros); if it is shorter than what the header turns out to
    /// need, the error is [`FormatError::Truncated`] with the length to
    /// read. The checks are QEMU's, in QEMU's order, so the first problem
    /// found is the one QEMU reports. Two are vubd's own: a backing file
    /// name may not start inside the header fields, and a virtual size
    /// above 2^63 - 1 is "Image is too big" (QEMU's arithmetic would
    /// overflow instead). What depends on how the image is opened (the
    /// corrupt bit for writers, AES in system emulators, the dirty bit's
    /// repair) is the driver's to decide.
    pub fn parse(buf: &[u8]) -> Result<Header, FormatError> {
        let magic_len = buf.len().min(4);
        if buf.get(..magic_len) != MAGIC.get(..magic_len) {
            return Err(FormatError::NotQcow2);
        }
        if buf.len() < V2_HEADER_LENGTH as usize {
            return Err(FormatError::Truncated {
                what: WHAT,
                needed: V2_HEADER_LENGTH as usize,
                available: buf.len(),
            });
        }
        let version = be32(buf, 4, WHAT)?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20, WHAT)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::UnsupportedClusterSize(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut header = Header {
            version,
            backing_file_offset: be64(buf, 8, WHAT)?,
            backing_file_size: be32(buf, 16, WHAT)?,
            cluster_bits,
            size: be64(buf, 24, WHAT)?,
            crypt_method: CryptMethod::None,
            l1_size: be32(buf, 36, WHAT)?,
            l1_table_offset: be64(buf, 40, WHAT)?,
            refcount_table_offset: be64(buf, 48, WHAT)?,
            refcount_table_clusters: be32(buf, 56, WHAT)?,
            nb_snapshots: be32(buf, 60, WHAT)?,
            snapshots_offset: be64(buf, 64, WHAT)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            extensions: Vec::new(),
            backing_file: None,
            unknown_fields: Vec::new(),
        };
        let crypt_method = be32(buf, 32, WHAT)?;

        if version >= 3 {
            header.incompatible_features = be64(buf, 72, WHAT)?;
            header.compatible_features = be64(buf, 80, WHAT)?;
            header.autoclear_features = be64(buf, 88, WHAT)?;
            header.refcount_order = be32(buf, 96, WHAT)?;
            header.header_length = be32(buf, 100, WHAT)?;
            if header.header_length < V3_MIN_HEADER_LENGTH {
                return Err(FormatError::HeaderTooShort);
            }
        }
        if u64::from(header.header_length) > cluster_size {
            return Err(FormatError::HeaderExceedsCluster);
        }
        let header_length = header.header_length as usize;
        let raw_compression = if header_length > COMPRESSION_TYPE_OFFSET {
            let fields = slice(buf, 0, header_length, WHAT)?;
            header.unknown_fields = fields
                .get(COMPRESSION_TYPE_OFFSET + 1..)
                .unwrap_or_default()
                .to_vec();
            fields.get(COMPRESSION_TYPE_OFFSET).copied().unwrap_or(0)
        } else {
            0
        };

        if header.backing_file_offset > cluster_size
            || (header.backing_file_offset != 0
                && header.backing_file_offset < u64::from(header.header_length))
        {
            return Err(FormatError::InvalidBackingFileOffset);
        }
        let extensions_end = if header.backing_file_offset != 0 {
            header.backing_file_offset
        } else {
            cluster_size
        } as usize;

        header.compression_type = match CompressionType::from_raw(raw_compression) {
            Some(kind) => kind,
            None => return Err(FormatError::UnknownCompressionType(raw_compression)),
        };
        let compression_bit = header.incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        match (header.compression_type, compression_bit) {
            (CompressionType::Zlib, true) => return Err(FormatError::CompressionBitSet),
            (CompressionType::Zstd, false) => return Err(FormatError::CompressionBitClear),
            _ => {}
        }

        let walked = extensions::walk(buf, header_length, extensions_end);
        let unknown = header.incompatible_features & !incompatible::KNOWN;
        if unknown != 0 {
            // Name the bits with the image's own feature table if it can
            // be read; errors in the extensions are not the news here.
            let table = walked
                .as_ref()
                .ok()
                .and_then(|exts| {
                    exts.iter()
                        .find(|e| e.kind == ExtensionKind::FeatureNameTable)
                        .map(|e| parse_feature_table(&e.data))
                })
                .unwrap_or_default();
            return Err(FormatError::UnsupportedFeatures(describe_unsupported(
                &table, unknown,
            )));
        }

        // Subcluster size and refcount width.
        let geometry = header.geometry()?;

        if header.refcount_table_clusters == 0 {
            return Err(FormatError::NoRefcountTable);
        }
        check_table(
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            cluster_size,
            MAX_REFCOUNT_TABLE_BYTES,
            cluster_size,
            Table::Refcount,
        )?;
        check_table(
            header.snapshots_offset,
            u64::from(header.nb_snapshots),
            SNAPSHOT_ENTRY_MIN_LEN,
            SNAPSHOT_ENTRY_MIN_LEN * MAX_SNAPSHOTS,
            cluster_size,
            Table::Snapshot,
        )?;
        check_table(
            header.l1_table_offset,
            u64::from(header.l1_size),
            8,
            MAX_L1_TABLE_BYTES,
            cluster_size,
            Table::ActiveL1,
        )?;
        if header.size > i64::MAX as u64 {
            return Err(FormatError::ImageTooBig);
        }
        let l1_needed = geometry.l1_entries_for(header.size);
        if l1_needed > i32::MAX as u64 {
            return Err(FormatError::ImageTooBig);
        }
        if u64::from(header.l1_size) < l1_needed {
            return Err(FormatError::L1TableTooSmall);
        }
        header.crypt_method = match CryptMethod::from_raw(crypt_method) {
            Some(method) => method,
            None => return Err(FormatError::UnsupportedEncryption(crypt_method)),
        };

        header.extensions = walked?;
        header.check_extensions()?;

        if header.autoclear_features & autoclear::RAW_EXTERNAL_DATA != 0
            && !header.has_external_data_file()
        {
            return Err(FormatError::DataFileRawWithoutDataFile);
        }
        if header.crypt_method == CryptMethod::Luks && header.encryption_header().is_none() {
            return Err(FormatError::MissingCryptoHeader(crypt_method));
        }

        if header.backing_file_offset != 0 {
            let len = header.backing_file_size as usize;
            let room = (cluster_size - header.backing_file_offset) as usize;
            if len > MAX_BACKING_FILE_NAME.min(room) {
                return Err(FormatError::BackingFileNameTooLong);
            }
            let name = slice(buf, header.backing_file_offset as usize, len, WHAT)?;
            header.backing_file = Some(name.to_vec());
        }
        Ok(header)
    }

    /// The checks QEMU makes on the extensions it reads.
    fn check_extensions(&self) -> Result<(), FormatError> {
        let cluster_size = self.cluster_size();
        for ext in &self.extensions {
            match ext.kind {
                ExtensionKind::BackingFormat if ext.data.len() >= BACKING_FORMAT_LIMIT => {
                    return Err(FormatError::BackingFormatTooLong(
                        u32::try_from(ext.data.len()).unwrap_or(u32::MAX),
                    ));
                }
                ExtensionKind::FullDiskEncryption => {
                    if self.crypt_method != CryptMethod::Luks {
                        return Err(FormatError::UnexpectedCryptoHeader);
                    }
                    EncryptionHeader::parse(&ext.data, cluster_size)?;
                }
                ExtensionKind::Bitmaps => {
                    let bitmaps = BitmapsExtension::parse(&ext.data)?;
                    // Without the autoclear bit the bitmaps are stale and
                    // QEMU ignores what the extension says.
                    if self.autoclear_features & autoclear::BITMAPS != 0 {
                        bitmaps.validate(cluster_size)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The sizes that follow from the header.
    pub fn geometry(&self) -> Result<Geometry, FormatError> {
        Geometry::new(
            self.cluster_bits,
            self.refcount_order,
            self.has_extended_l2(),
            self.has_external_data_file(),
        )
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order.min(31)
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompatible::DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompatible::CORRUPT != 0
    }

    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0
    }

    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    pub fn has_lazy_refcounts(&self) -> bool {
        self.compatible_features & compatible::LAZY_REFCOUNTS != 0
    }

    /// The bitmaps extension may be trusted.
    pub fn bitmaps_consistent(&self) -> bool {
        self.autoclear_features & autoclear::BITMAPS != 0
    }

    /// The external data file is a valid raw image by itself.
    pub fn has_raw_external_data(&self) -> bool {
        self.autoclear_features & autoclear::RAW_EXTERNAL_DATA != 0
    }

    /// Autoclear bits a writer must clear before it changes the image.
    pub fn unknown_autoclear_features(&self) -> u64 {
        self.autoclear_features & !autoclear::KNOWN
    }

    /// The data of the last extension of a kind (QEMU lets later ones
    /// override earlier ones).
    fn extension(&self, kind: ExtensionKind) -> Option<&[u8]> {
        self.extensions
            .iter()
            .rev()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// The backing file's format name, if the image records one.
    pub fn backing_format(&self) -> Option<&[u8]> {
        self.extension(ExtensionKind::BackingFormat)
    }

    /// The external data file's name, if the image records one.
    pub fn external_data_file(&self) -> Option<&[u8]> {
        self.extension(ExtensionKind::ExternalDataFile)
    }

    /// The feature name table's entries (empty without one).
    pub fn feature_names(&self) -> Vec<FeatureName> {
        self.extension(ExtensionKind::FeatureNameTable)
            .map(parse_feature_table)
            .unwrap_or_default()
    }

    /// The bitmaps extension, if there is one and the autoclear bit says
    /// it is consistent.
    pub fn bitmaps(&self) -> Option<BitmapsExtension> {
        if !self.bitmaps_consistent() {
            return None;
        }
        self.extension(ExtensionKind::Bitmaps)
            .and_then(|data| BitmapsExtension::parse(data).ok())
    }

    /// Where the LUKS header is, for LUKS images.
    pub fn encryption_header(&self) -> Option<EncryptionHeader> {
        self.extension(ExtensionKind::FullDiskEncryption)
            .and_then(|data| EncryptionHeader::parse(data, self.cluster_size()).ok())
    }

    /// Where the extension area ends: after the header fields, the
    /// extensions and the end marker.
    fn extensions_end(&self) -> usize {
        self.header_length as usize
            + self
                .extensions
                .iter()
                .map(HeaderExtension::encoded_len)
                .sum::<usize>()
            + 8
    }

    /// Sets or removes the backing file name, placing it right after the
    /// extensions' end marker as QEMU does. Call it again after adding
    /// extensions to an image with a backing file.
    pub fn set_backing_file(&mut self, name: Option<&[u8]>) -> Result<(), FormatError> {
        match name {
            None => {
                self.backing_file = None;
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
            Some(name) => {
                if name.len() > MAX_BACKING_FILE_NAME {
                    return Err(FormatError::BackingFileNameTooLong);
                }
                let offset = self.extensions_end();
                let needed = offset + name.len();
                if needed as u64 > self.cluster_size() {
                    return Err(FormatError::HeaderDoesNotFit {
                        needed,
                        available: self.cluster_size() as usize,
                    });
                }
                self.backing_file = Some(name.to_vec());
                self.backing_file_offset = offset as u64;
                self.backing_file_size = name.len() as u32;
            }
        }
        Ok(())
    }

    /// Writes the header, its extensions, the end marker (where there is
    /// room before the backing file name) and the backing file name into
    /// `out`, which should be one cluster; all other bytes of `out` are
    /// zeroed. Returns how many bytes carry something. Fails, leaving
    /// `out` unspecified, if the fields contradict each other or the
    /// result does not fit in the cluster or in `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, FormatError> {
        self.check_encodable()?;
        let cluster_size = self.cluster_size() as usize;
        // The extensions may run up to the backing file name, or to the
        // end of the cluster.
        let limit = match self.backing_file {
            Some(_) => self.backing_file_offset as usize,
            None => cluster_size,
        };
        let needed = self.encoded_len();
        if needed > cluster_size {
            return Err(FormatError::HeaderDoesNotFit {
                needed,
                available: cluster_size,
            });
        }
        if out.len() < needed {
            return Err(FormatError::HeaderDoesNotFit {
                needed,
                available: out.len(),
            });
        }
        out.fill(0);
        let mut w = Writer::new(out);
        w.put(&MAGIC)?;
        w.be32(self.version)?;
        w.be64(self.backing_file_offset)?;
        w.be32(self.backing_file_size)?;
        w.be32(self.cluster_bits)?;
        w.be64(self.size)?;
        w.be32(self.crypt_method as u32)?;
        w.be32(self.l1_size)?;
        w.be64(self.l1_table_offset)?;
        w.be64(self.refcount_table_offset)?;
        w.be32(self.refcount_table_clusters)?;
        w.be32(self.nb_snapshots)?;
        w.be64(self.snapshots_offset)?;
        if self.version >= 3 {
            w.be64(self.incompatible_features)?;
            w.be64(self.compatible_features)?;
            w.be64(self.autoclear_features)?;
            w.be32(self.refcount_order)?;
            w.be32(self.header_length)?;
            if self.header_length as usize > COMPRESSION_TYPE_OFFSET {
                w.put(&[self.compression_type as u8])?;
                w.put(&self.unknown_fields)?;
            }
        }
        for ext in &self.extensions {
            w.be32(ext.kind.raw())?;
            w.be32(u32::try_from(ext.data.len()).map_err(|_| too_big(needed, limit))?)?;
            w.put(&ext.data)?;
            w.put(ext.padding())?;
        }
        let mut end = w.pos();
        if end > limit {
            return Err(too_big(end, limit));
        }
        // A full extension area needs no end marker (and a parsed one
        // had none); otherwise there must be room for it.
        if end < limit {
            if limit - end < 8 {
                return Err(too_big(end + 8, limit));
            }
            w.be64(0)?;
            end += 8;
        }
        if let Some(name) = &self.backing_file {
            w.put_at(limit, name)?;
            end = limit + name.len();
        }
        Ok(end)
    }

    /// Bytes of the first cluster that [`Header::encode`] fills: through
    /// the end of the backing file name, or of the end marker.
    pub fn encoded_len(&self) -> usize {
        match &self.backing_file {
            Some(name) => {
                (self.backing_file_offset as usize).max(self.extensions_end() - 8) + name.len()
            }
            None => self.extensions_end(),
        }
    }

    /// The consistency [`Header::encode`] needs between fields that
    /// describe each other.
    fn check_encodable(&self) -> Result<(), FormatError> {
        let inconsistent = |why| Err(FormatError::InconsistentHeader(why));
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(FormatError::UnsupportedClusterSize(self.cluster_bits));
        }
        match self.version {
            2 => {
                if self.header_length != V2_HEADER_LENGTH
                    || self.incompatible_features != 0
                    || self.compatible_features != 0
                    || self.autoclear_features != 0
                    || self.refcount_order != 4
                    || self.compression_type != CompressionType::Zlib
                    || !self.unknown_fields.is_empty()
                {
                    return inconsistent("a version 2 header has no version 3 fields");
                }
            }
            3 => {
                let len = self.header_length as usize;
                if len < V3_MIN_HEADER_LENGTH as usize {
                    return Err(FormatError::HeaderTooShort);
                }
                if len > COMPRESSION_TYPE_OFFSET {
                    if self.unknown_fields.len() != len - COMPRESSION_TYPE_OFFSET - 1 {
                        return inconsistent("header_length does not match the fields kept");
                    }
                } else if self.compression_type != CompressionType::Zlib {
                    return inconsistent("header_length leaves no room for compression_type");
                }
            }
            v => return Err(FormatError::UnsupportedVersion(v)),
        }
        if self
            .extensions
            .iter()
            .any(|e| e.kind.raw() == extensions::EXT_END)
        {
            return inconsistent("an extension of type 0 would end the list");
        }
        let last = self.extensions.len().saturating_sub(1);
        if self
            .extensions
            .iter()
            .enumerate()
            .any(|(i, e)| i != last && (e.data.len() + e.padding().len()) % 8 != 0)
        {
            return inconsistent("only the last extension may have short padding");
        }
        match &self.backing_file {
            Some(name) => {
                if self.backing_file_offset == 0 || self.backing_file_size as usize != name.len() {
                    return inconsistent(
                        "the backing file name does not match its offset and size",
                    );
                }
                if name.len() > MAX_BACKING_FILE_NAME {
                    return Err(FormatError::BackingFileNameTooLong);
                }
                if self.backing_file_offset < u64::from(self.header_length)
                    || self.backing_file_offset > self.cluster_size()
                {
                    return Err(FormatError::InvalidBackingFileOffset);
                }
            }
            None => {
                if self.backing_file_offset != 0 {
                    return inconsistent("backing_file_offset is set without a backing file name");
                }
            }
        }
        Ok(())
    }
}

fn too_big(needed: usize, available: usize) -> FormatError {
    FormatError::HeaderDoesNotFit { needed, available }
}

/// QEMU's check of a table the header points to: at most `max_bytes`
/// long, starting on a cluster boundary, ending below 2^63.
fn check_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    table: Table,
) -> Result<(), FormatError> {
    if entries > max_bytes / entry_len {
        return Err(FormatError::TableTooLarge(table));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || offset % cluster_size != 0 {
        return Err(FormatError::TableOffsetInvalid(table));
    }
    Ok(())
}
