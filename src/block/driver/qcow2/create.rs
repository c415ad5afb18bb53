//! Creating an empty qcow2 image (version 3, 64 KiB clusters, 16-bit
//! refcounts), optionally over a backing file: what blockdev-snapshot-sync
//! makes its overlays with.
//!
//! Layout: the header with the backing format extension and the backing
//! file name in cluster 0, the refcount table in cluster 1, its one
//! refcount block in cluster 2, the L1 table from cluster 3. Every one of
//! those clusters has refcount 1; the rest of the image is unallocated.

use crate::block::error::BlockError;
use crate::block::qcow2::format::{Header, EXT_BACKING_FORMAT, MAGIC};
use std::io::Write;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const REFCOUNT_ORDER: u32 = 4;

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The bytes of a new image of `size` bytes.
pub fn image_bytes(size: u64, backing: Option<(&str, &str)>) -> Result<Vec<u8>, BlockError> {
    let l2_entries = CLUSTER / 8;
    let l1_size = size.div_ceil(CLUSTER * l2_entries);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER).max(1);
    let total = 3 + l1_clusters;
    // One refcount block counts 32768 clusters (2 GiB of metadata).
    if total > CLUSTER * 8 / 16 || l1_size > u64::from(u32::MAX) {
        return Err(BlockError::invalid("Image size too large"));
    }
    let mut img = vec![0u8; (total * CLUSTER) as usize];
    let h = &mut img[..CLUSTER as usize];
    h[..4].copy_from_slice(&MAGIC);
    put32(h, 4, 3);
    put32(h, 20, CLUSTER_BITS);
    put64(h, 24, size);
    put32(h, 36, l1_size as u32);
    put64(h, 40, 3 * CLUSTER);
    put64(h, 48, CLUSTER);
    put32(h, 56, 1);
    put32(h, 96, REFCOUNT_ORDER);
    put32(h, 100, 104);
    let mut at = 104usize;
    if let Some((name, format)) = backing {
        if name.len() > 1023 {
            return Err(BlockError::invalid("Backing file name too long"));
        }
        put32(h, at, EXT_BACKING_FORMAT);
        put32(h, at + 4, format.len() as u32);
        h[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
        at += 8 + format.len().div_ceil(8) * 8;
        // The end of the extensions: type 0, length 0.
        at += 8;
        put64(h, 8, at as u64);
        put32(h, 16, name.len() as u32);
        h[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    // The refcount table's one entry, and the block's counts.
    put64(&mut img, CLUSTER as usize, 2 * CLUSTER);
    for c in 0..total as usize {
        let at = 2 * CLUSTER as usize + c * 2;
        img[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    // What vubd writes, vubd must read.
    Header::parse(&img[..CLUSTER as usize])
        .map_err(|e| BlockError::invalid(format!("new image header: {e}")))?;
    Ok(img)
}

/// Creates (or truncates) `path` as a new image.
pub fn create(path: &str, size: u64, backing: Option<(&str, &str)>) -> Result<(), BlockError> {
    let bytes = image_bytes(size, backing)?;
    let open_err = |e: std::io::Error| BlockError::Open {
        path: path.to_string(),
        reason: crate::block::error::strerror(&e),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(open_err)?;
    f.write_all(&bytes).map_err(open_err)?;
    f.sync_all().map_err(open_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_image_parses_and_names_its_backing_file() {
        let img = image_bytes(10 << 30, Some(("base.raw", "raw"))).unwrap();
        let h = Header::parse(&img[..CLUSTER as usize]).unwrap();
        assert_eq!(h.size, 10 << 30);
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), CLUSTER);
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.raw"[..]));
        assert_eq!(h.backing_format(), Some(&b"raw"[..]));
        // 512 MiB per L2 table of 64 KiB clusters.
        assert_eq!(h.l1_size, 20);
    }

    #[test]
    fn qemu_img_check_finds_a_new_image_clean() {
        let dir = std::env::temp_dir().join(format!("vubd-create-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("new.qcow2");
        let ps = p.to_str().unwrap();
        create(ps, 1 << 30, None).unwrap();
        let Ok(out) = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2", ps])
            .output()
        else {
            println!("qemu-img not installed: skipped");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
