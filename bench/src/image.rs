//! Image files for the raw and qcow2 configurations (filled with data,
//! converted, or made new by qemu-img), and putting the page cache into the
//! same state before every backend's runs.
//!
//! Reading a file whose cached pages were created by writes is measurably
//! slower (≈40% for 128k reads) than reading one whose pages came in through
//! reads, so after filling an image we flush it, drop the page cache and
//! read the image back once; this is repeated before each daemon session.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::stats::XorShift64;

const CHUNK: usize = 1 << 20;

/// Writes `size` bytes of non-zero pseudo-random data to `path` (replacing
/// it) and fsyncs it. No block of the result is all zeroes, so neither the
/// kernel nor a format driver can shortcut it.
pub fn create_filled(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut rng = XorShift64::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&(rng.next_u64() | 1).to_le_bytes());
        }
        let n = left.min(CHUNK as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// Runs `qemu-img ARGS`; its error output becomes the error.
fn qemu_img(qemu_img: &Path, args: &[&OsStr]) -> io::Result<()> {
    let out = Command::new(qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "qemu-img {} failed ({}): {}",
            args.first().map_or("".into(), |a| a.to_string_lossy()),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Converts a raw image to a fully allocated qcow2 image with qemu-img.
pub fn convert_to_qcow2(qemu_img_path: &Path, raw: &Path, qcow2: &Path) -> io::Result<()> {
    let _ = fs::remove_file(qcow2);
    let mut args: Vec<&OsStr> = ["convert", "-f", "raw", "-O", "qcow2"]
        .map(OsStr::new)
        .to_vec();
    args.extend([raw.as_os_str(), qcow2.as_os_str()]);
    qemu_img(qemu_img_path, &args)?;
    File::open(qcow2)?.sync_all()
}

/// The `qemu-img create` arguments for a new qcow2 image of `size` bytes,
/// with `-o OPTIONS` when given.
fn create_args<'a>(path: &'a Path, size: &'a str, options: Option<&'a str>) -> Vec<&'a OsStr> {
    let mut args: Vec<&OsStr> = ["create", "-q", "-f", "qcow2"].map(OsStr::new).to_vec();
    if let Some(o) = options {
        args.extend([OsStr::new("-o"), OsStr::new(o)]);
    }
    args.extend([path.as_os_str(), OsStr::new(size)]);
    args
}

/// Makes a new qcow2 image of `size` bytes with qemu-img (replacing the
/// file), with `preallocation=metadata` when `metadata` is set, and fsyncs
/// it. Without preallocation nothing but the header and the first tables
/// is written: every cluster is unallocated.
pub fn create_qcow2(
    qemu_img_path: &Path,
    path: &Path,
    size: u64,
    metadata: bool,
) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let size = size.to_string();
    let args = create_args(path, &size, metadata.then_some("preallocation=metadata"));
    qemu_img(qemu_img_path, &args)?;
    File::open(path)?.sync_all()
}

/// Flushes everything and drops clean page-cache pages. Needs root.
pub fn drop_caches() -> io::Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n")
}

/// Whether this process may drop the page cache.
pub fn can_drop_caches() -> bool {
    OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .is_ok()
}

/// Reads the whole file sequentially so its cached pages come from reads.
///
/// With `small_pages` readahead is turned off for the read
/// (`POSIX_FADV_RANDOM`), so the page cache holds the file in 4 KiB pages.
/// Otherwise readahead fills it with large folios where the file system
/// has them (ext4 since Linux 6.16), and a 4 KiB buffered write into such
/// a folio walks all of its blocks: several times the CPU of a write into
/// a single page, for every daemon alike.
pub fn read_back(path: &Path, small_pages: bool) -> io::Result<u64> {
    let mut f = File::open(path)?;
    if small_pages {
        use std::os::fd::AsRawFd;
        // SAFETY: advice on a descriptor this function owns; no memory is
        // passed.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Puts an image and the page cache into the state every session starts
/// from: data on disk, then (if allowed) caches dropped, then the image read
/// once. Returns whether the cache was dropped.
pub fn settle(path: &Path, drop: bool, small_pages: bool) -> io::Result<bool> {
    File::open(path)?.sync_all()?;
    let dropped = if drop {
        match drop_caches() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("bench: cannot drop the page cache: {e}");
                false
            }
        }
    } else {
        false
    };
    read_back(path, small_pages)?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_image_has_no_zero_block() {
        let dir = std::env::temp_dir().join(format!("vubd-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.img");
        create_filled(&p, 3 * 4096 + 512, 1).unwrap();
        let data = fs::read(&p).unwrap();
        assert_eq!(data.len(), 3 * 4096 + 512);
        assert!(data.chunks(512).all(|c| c.iter().any(|&b| b != 0)));
        assert_eq!(read_back(&p, false).unwrap(), data.len() as u64);
        assert_eq!(read_back(&p, true).unwrap(), data.len() as u64);
        assert!(!settle(&p, false, false).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn qemu_img_create_arguments() {
        let p = Path::new("/var/tmp/x.qcow2");
        let a = create_args(p, "1073741824", Some("preallocation=metadata"));
        assert_eq!(
            a,
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "/var/tmp/x.qcow2",
                "1073741824"
            ]
        );
        let a = create_args(p, "4096", None);
        assert_eq!(
            a,
            ["create", "-q", "-f", "qcow2", "/var/tmp/x.qcow2", "4096"]
        );
    }
}
