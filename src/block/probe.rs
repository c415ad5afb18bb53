//! Recognising image formats by their on-disk signatures.
//!
//! vubd never picks a format from what a file contains: a format is what
//! the user names.  This module only answers the opposite question, asked
//! where the user named no format at all (`vubd serve IMAGE` without
//! `--format`): does the file say it is something other than a plain
//! disk?  Serving a qcow2 or vmdk file's bytes as a writable raw disk lets
//! the guest's first write destroy the image, so such a file is refused
//! rather than guessed into either format.
//!
//! The signatures are the ones the formats' specifications define and
//! QEMU's probes look for:
//!
//! | format | where | what |
//! |---|---|---|
//! | qcow2, qcow | 0 | `QFI\xfb`, then a big-endian version: 1 is qcow, 2 and later qcow2 |
//! | luks | 0 | `LUKS\xba\xbe`, then a big-endian version of 1 or 2 |
//! | vmdk | 0 | `KDMV` (sparse extent) or `COWD` (ESX extent), or a text descriptor |
//! | vhdx | 0 | `vhdxfile` |
//! | vdi | 64 | the little-endian word `0xbeda107f` |
//! | vpc | 0, or the last 512 bytes | `conectix` (a dynamic disk's footer copy, or a fixed disk's footer) |
//! | qed | 0 | `QED\0` |
//!
//! A text descriptor of vmdk starts, after comment lines (`#`) and blank
//! lines, with `version=1`, `version=2` or `version=3`; the usual first
//! line `# Disk DescriptorFile` counts on its own.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use crate::qapi::BlockdevDriver;

/// How much of the start of an image the probes look at.
pub const HEADER_LEN: usize = 512;
/// How much of the end of an image the probes look at (a VHD footer).
pub const FOOTER_LEN: usize = 512;

const QCOW_MAGIC: &[u8] = b"QFI\xfb";
const LUKS_MAGIC: &[u8] = b"LUKS\xba\xbe";
const VMDK4_MAGIC: &[u8] = b"KDMV";
const VMDK3_MAGIC: &[u8] = b"COWD";
const VMDK_DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";
const VHDX_MAGIC: &[u8] = b"vhdxfile";
const VDI_SIGNATURE_OFFSET: usize = 64;
const VDI_SIGNATURE: u32 = 0xbeda_107f;
const VPC_COOKIE: &[u8] = b"conectix";
const QED_MAGIC: &[u8] = b"QED\0";

/// The format whose signature `header` (the first bytes of an image, up to
/// [`HEADER_LEN`]) or `footer` (its last bytes, up to [`FOOTER_LEN`]; empty
/// if unknown) carries, or `None` for data that names no format.
#[must_use]
pub fn probe(header: &[u8], footer: &[u8]) -> Option<BlockdevDriver> {
    if let Some(version) = be32_after(header, QCOW_MAGIC) {
        match version {
            1 => return Some(BlockdevDriver::Qcow),
            v if v >= 2 => return Some(BlockdevDriver::Qcow2),
            // Version 0 belongs to neither; look at the other signatures.
            _ => {}
        }
    }
    if let Some(version) = be16_after(header, LUKS_MAGIC) {
        if version == 1 || version == 2 {
            return Some(BlockdevDriver::Luks);
        }
    }
    if header.starts_with(VMDK4_MAGIC)
        || header.starts_with(VMDK3_MAGIC)
        || is_vmdk_descriptor(header)
    {
        return Some(BlockdevDriver::Vmdk);
    }
    if header.starts_with(VHDX_MAGIC) {
        return Some(BlockdevDriver::Vhdx);
    }
    if le32_at(header, VDI_SIGNATURE_OFFSET) == Some(VDI_SIGNATURE) {
        return Some(BlockdevDriver::Vdi);
    }
    if header.starts_with(VPC_COOKIE) || footer.starts_with(VPC_COOKIE) {
        return Some(BlockdevDriver::Vpc);
    }
    if header.starts_with(QED_MAGIC) {
        return Some(BlockdevDriver::Qed);
    }
    None
}

/// Reads the start and end of the image at `path` and runs [`probe`].
///
/// Only regular files and block devices are read; anything else (a FIFO,
/// a character device) could block or be consumed by reading, so it is
/// reported as naming no format.
///
/// # Errors
///
/// The I/O error of opening, seeking or reading.
pub fn probe_path(path: &Path) -> io::Result<Option<BlockdevDriver>> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path)?.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Ok(None);
    }
    let mut file = File::open(path)?;
    let header = read_up_to(&mut file, HEADER_LEN)?;
    // A block device's length is only known by seeking to its end.
    let len = file.seek(SeekFrom::End(0))?;
    let footer = if len >= (HEADER_LEN + FOOTER_LEN) as u64 {
        file.seek(SeekFrom::Start(len - FOOTER_LEN as u64))?;
        read_up_to(&mut file, FOOTER_LEN)?
    } else {
        // A file this small has no room for a footer apart from its
        // header; a dynamic VHD's copy at the start is checked anyway.
        Vec::new()
    };
    Ok(probe(&header, &footer))
}

/// Reads until `len` bytes or the end of the file.
fn read_up_to(file: &mut File, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    file.take(len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The big-endian 32-bit word right after `magic`, if `buf` starts with it.
fn be32_after(buf: &[u8], magic: &[u8]) -> Option<u32> {
    let rest = buf.strip_prefix(magic)?;
    let word: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(word))
}

/// The big-endian 16-bit word right after `magic`, if `buf` starts with it.
fn be16_after(buf: &[u8], magic: &[u8]) -> Option<u16> {
    let rest = buf.strip_prefix(magic)?;
    let word: [u8; 2] = rest.get(..2)?.try_into().ok()?;
    Some(u16::from_be_bytes(word))
}

/// The little-endian 32-bit word at `offset`, if `buf` reaches that far.
fn le32_at(buf: &[u8], offset: usize) -> Option<u32> {
    let word: [u8; 4] = buf.get(offset..offset.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(word))
}

/// Whether `buf` begins like a vmdk text descriptor: its first line is
/// `# Disk DescriptorFile`, or its first line that is neither a comment
/// nor blank (leading spaces aside) is `version=` 1, 2 or 3 ending the
/// line.
fn is_vmdk_descriptor(buf: &[u8]) -> bool {
    if buf.starts_with(VMDK_DESCRIPTOR) {
        return true;
    }
    // Only lines wholly inside the buffer are judged: the last one may
    // have been cut short.
    let complete = buf.iter().filter(|&&b| b == b'\n').count();
    for line in buf.split(|&b| b == b'\n').take(complete) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let start = line.iter().position(|&b| b != b' ').unwrap_or(line.len());
        let line = &line[start..];
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        return matches!(line, b"version=1" | b"version=2" | b"version=3");
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A zeroed header of `HEADER_LEN` bytes with `bytes` written at `at`.
    fn header_with(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[at..at + bytes.len()].copy_from_slice(bytes);
        h
    }

    fn qcow_header(version: u32) -> Vec<u8> {
        let mut h = header_with(0, QCOW_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h
    }

    #[test]
    fn zeros_and_text_name_no_format() {
        assert_eq!(probe(&[0; HEADER_LEN], &[0; FOOTER_LEN]), None);
        assert_eq!(probe(b"", b""), None);
        assert_eq!(probe(b"hello, world\n", b""), None);
        // An MBR boot sector is a plain disk.
        let mut mbr = vec![0u8; HEADER_LEN];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(probe(&mbr, b""), None);
    }

    #[test]
    fn qcow_versions() {
        assert_eq!(probe(&qcow_header(1), b""), Some(BlockdevDriver::Qcow));
        assert_eq!(probe(&qcow_header(2), b""), Some(BlockdevDriver::Qcow2));
        assert_eq!(probe(&qcow_header(3), b""), Some(BlockdevDriver::Qcow2));
        assert_eq!(probe(&qcow_header(0), b""), None);
        // The magic without room for a version says nothing.
        assert_eq!(probe(QCOW_MAGIC, b""), None);
        assert_eq!(probe(b"QFI\xfa\0\0\0\x03", b""), None);
    }

    #[test]
    fn luks_versions() {
        let mut h = header_with(0, LUKS_MAGIC);
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(probe(&h, b""), Some(BlockdevDriver::Luks));
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(probe(&h, b""), Some(BlockdevDriver::Luks));
        h[6..8].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(probe(&h, b""), None);
        assert_eq!(probe(b"LUKS\xba\xbe", b""), None);
    }

    #[test]
    fn vmdk_binary_and_text() {
        assert_eq!(
            probe(&header_with(0, b"KDMV\x01\0\0\0"), b""),
            Some(BlockdevDriver::Vmdk)
        );
        assert_eq!(
            probe(&header_with(0, b"COWD\x01\0\0\0"), b""),
            Some(BlockdevDriver::Vmdk)
        );
        let descriptor = b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n";
        assert_eq!(probe(descriptor, b""), Some(BlockdevDriver::Vmdk));
        // Without the usual first line: comments, blank lines and
        // indentation before the version line.
        for text in [
            &b"version=2\n"[..],
            b"# made by hand\n\n   version=3\r\nCID=1\n",
            b"\n#\n version=1\n",
        ] {
            assert_eq!(
                probe(text, b""),
                Some(BlockdevDriver::Vmdk),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        for text in [
            &b"version=4\n"[..],
            b"version=1",
            b"version=12\n",
            b"CID=1\nversion=1\n",
            b"# just a comment\n",
        ] {
            assert_eq!(probe(text, b""), None, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn vhdx_vdi_qed() {
        assert_eq!(
            probe(&header_with(0, VHDX_MAGIC), b""),
            Some(BlockdevDriver::Vhdx)
        );
        assert_eq!(
            probe(&header_with(64, &VDI_SIGNATURE.to_le_bytes()), b""),
            Some(BlockdevDriver::Vdi)
        );
        // The signature anywhere else, or big-endian, is not vdi.
        assert_eq!(
            probe(&header_with(60, &VDI_SIGNATURE.to_le_bytes()), b""),
            None
        );
        assert_eq!(
            probe(&header_with(64, &VDI_SIGNATURE.to_be_bytes()), b""),
            None
        );
        assert_eq!(
            probe(&header_with(0, b"QED\0\0\0\x01\0"), b""),
            Some(BlockdevDriver::Qed)
        );
        assert_eq!(probe(&header_with(0, b"QED1"), b""), None);
    }

    #[test]
    fn vpc_header_copy_or_footer() {
        assert_eq!(
            probe(&header_with(0, VPC_COOKIE), b""),
            Some(BlockdevDriver::Vpc)
        );
        let mut footer = vec![0u8; FOOTER_LEN];
        footer[..8].copy_from_slice(VPC_COOKIE);
        assert_eq!(probe(&[0; HEADER_LEN], &footer), Some(BlockdevDriver::Vpc));
        // The cookie must open the footer.
        footer.rotate_right(1);
        assert_eq!(probe(&[0; HEADER_LEN], &footer), None);
    }

    #[test]
    fn short_buffers_do_not_panic() {
        for len in 0..=80 {
            let h = header_with(64, &VDI_SIGNATURE.to_le_bytes());
            let _ = probe(&h[..len], &h[..len.min(8)]);
        }
    }

    #[test]
    fn probe_path_reads_header_and_footer() {
        let dir = std::env::temp_dir().join(format!("vubd-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fixed.vhd");
        // A fixed VHD: data, then the footer in the last 512 bytes.
        let mut image = vec![0u8; 4096];
        image[4096 - 512..4096 - 504].copy_from_slice(VPC_COOKIE);
        std::fs::write(&path, &image).unwrap();
        assert_eq!(probe_path(&path).unwrap(), Some(BlockdevDriver::Vpc));
        std::fs::write(&path, &qcow_header(3)[..100]).unwrap();
        assert_eq!(probe_path(&path).unwrap(), Some(BlockdevDriver::Qcow2));
        std::fs::write(&path, b"").unwrap();
        assert_eq!(probe_path(&path).unwrap(), None);
        assert!(probe_path(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
