//! Tests of the image locks: two opens in one process, and QEMU's tools.

use super::*;
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const RW: Perm = Perm::CONSISTENT_READ.union(Perm::WRITE);
/// What a typical exclusive writer shares: readers and unchanged writes.
const WRITER_SHARES: Perm = Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED);

struct TempImage {
    path: PathBuf,
}

impl TempImage {
    fn new(tag: &str) -> TempImage {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "vubd-lock-{}-{}-{}.img",
            tag,
            std::process::id(),
            n
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0u8; 1 << 16]).unwrap();
        TempImage { path }
    }

    fn open_rw(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }

    fn open_ro(&self) -> File {
        File::open(&self.path).unwrap()
    }

    /// Bytes of this file locked by anyone, from /proc/locks.
    fn locked_bytes(&self) -> Option<BTreeSet<u64>> {
        let ino = std::fs::metadata(&self.path).unwrap().ino();
        let text = std::fs::read_to_string("/proc/locks").ok()?;
        let suffix = format!(":{ino}");
        let mut out = BTreeSet::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "N: OFDLCK ADVISORY READ -1 maj:min:ino start end"
            if fields.len() < 8 || fields[1] != "OFDLCK" {
                continue;
            }
            if !fields[5].ends_with(&suffix) {
                continue;
            }
            let start: u64 = fields[6].parse().unwrap();
            let end: u64 = fields[7].parse().unwrap();
            out.extend(start..=end);
        }
        Some(out)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn on_path(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn byte_offsets_match_qemu() {
    assert_eq!(LockByte::Used.offset(Perm::CONSISTENT_READ), Some(100));
    assert_eq!(LockByte::Used.offset(Perm::WRITE), Some(101));
    assert_eq!(LockByte::Used.offset(Perm::WRITE_UNCHANGED), Some(102));
    assert_eq!(LockByte::Used.offset(Perm::RESIZE), Some(103));
    assert_eq!(LockByte::Unshared.offset(Perm::CONSISTENT_READ), Some(200));
    assert_eq!(LockByte::Unshared.offset(Perm::WRITE), Some(201));
    assert_eq!(LockByte::Unshared.offset(Perm::RESIZE), Some(203));
    assert_eq!(LockByte::Used.offset(RW), None);
}

#[test]
fn error_messages() {
    let e = LockError::Conflict {
        perm: Perm::WRITE,
        byte: LockByte::Unshared,
    };
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    assert_eq!(
        e.hint("/a/b.img").as_deref(),
        Some("Is another process using the image [/a/b.img]?")
    );
    assert!(e.is_conflict());
    assert_eq!(e.perm(), Some(Perm::WRITE));
    assert_eq!(e.byte(), Some(LockByte::Unshared));

    let e = LockError::Conflict {
        perm: Perm::CONSISTENT_READ,
        byte: LockByte::Used,
    };
    assert_eq!(
        e.to_string(),
        "Failed to get shared \"consistent read\" lock"
    );

    let e = LockError::Probe {
        perm: Perm::RESIZE,
        byte: LockByte::Unshared,
        errno: libc::EINVAL,
    };
    assert_eq!(
        e.to_string(),
        "Failed to get \"resize\" lock: Invalid argument"
    );
    assert!(e.hint("x").is_some());

    let e = LockError::Lock {
        perm: Perm::WRITE,
        byte: LockByte::Used,
        errno: libc::EAGAIN,
    };
    assert_eq!(e.to_string(), "Failed to lock byte 101");
    assert_eq!(e.hint("x"), None);
    let e = LockError::Lock {
        perm: Perm::WRITE_UNCHANGED,
        byte: LockByte::Unshared,
        errno: libc::EBADF,
    };
    assert_eq!(
        e.to_string(),
        "Failed to lock byte 202: Bad file descriptor"
    );
    assert_eq!(e.errno(), Some(libc::EBADF));

    let e = LockError::Unlock {
        perm: Perm::CONSISTENT_READ,
        byte: LockByte::Used,
        errno: libc::EAGAIN,
    };
    assert!(e.to_string().starts_with("Failed to unlock byte 100: "));
}

#[test]
fn locking_mode() {
    assert_eq!("on".parse::<LockingMode>().unwrap(), LockingMode::On);
    assert_eq!("off".parse::<LockingMode>().unwrap(), LockingMode::Off);
    assert_eq!("auto".parse::<LockingMode>().unwrap(), LockingMode::Auto);
    assert!("yes".parse::<LockingMode>().is_err());
    assert_eq!(LockingMode::default(), LockingMode::Auto);
    assert_eq!(LockingMode::On.to_string(), "on");
    assert!(!LockingMode::Off.resolve().unwrap());
    // Linux >= 3.15 has OFD locks.
    assert!(ofd_locks_supported());
    assert!(LockingMode::Auto.resolve().unwrap());
    assert!(LockingMode::On.resolve().unwrap());
}

#[test]
fn applies_exactly_qemus_bytes() {
    let img = TempImage::new("bytes");
    let a = img.open_rw();
    apply_lock(&a, RW, WRITER_SHARES).unwrap();
    let Some(bytes) = img.locked_bytes() else {
        println!("/proc/locks unreadable, skipping byte layout check");
        return;
    };
    // used: read 100, write 101; not shared: write 201, resize 203
    assert_eq!(bytes, BTreeSet::from([100, 101, 201, 203]));

    // Dropping write and sharing everything releases 101, 201 and 203.
    apply_lock(&a, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    assert_eq!(img.locked_bytes().unwrap(), BTreeSet::from([100]));

    unlock_all(&a).unwrap();
    assert!(img.locked_bytes().unwrap().is_empty());
}

#[test]
fn exclusive_writer_blocks_second_writer() {
    let img = TempImage::new("excl");
    let a = img.open_rw();
    apply_lock(&a, RW, WRITER_SHARES).unwrap();
    // Our own locks never conflict with ourselves.
    check_lock(&a, RW, WRITER_SHARES).unwrap();

    let b = img.open_rw();
    let err = check_lock(&b, RW, Perm::ALL).unwrap_err();
    assert_eq!(
        err,
        LockError::Conflict {
            perm: Perm::WRITE,
            byte: LockByte::Unshared
        }
    );
    assert_eq!(err.to_string(), "Failed to get \"write\" lock");
    assert_eq!(
        err.hint(&img.path).unwrap(),
        format!(
            "Is another process using the image [{}]?",
            img.path.display()
        )
    );

    // A reader that refuses to share write sees the writer's used byte.
    let err = check_lock(&b, Perm::CONSISTENT_READ, WRITER_SHARES).unwrap_err();
    assert_eq!(err.to_string(), "Failed to get shared \"write\" lock");
    assert_eq!(err.byte(), Some(LockByte::Used));

    // Resize is not shared either.
    let err = check_lock(&b, Perm::RESIZE, Perm::ALL).unwrap_err();
    assert_eq!(err.to_string(), "Failed to get \"resize\" lock");
}

#[test]
fn read_only_sharer_coexists() {
    let img = TempImage::new("ro");
    let a = img.open_rw();
    apply_lock(&a, RW, WRITER_SHARES).unwrap();
    check_lock(&a, RW, WRITER_SHARES).unwrap();

    let c = img.open_ro();
    check_lock(&c, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    apply_lock(&c, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    // The writer still passes its check with the reader present.
    check_lock(&a, RW, WRITER_SHARES).unwrap();
    // Even a read-only opener can probe (write probes need no write access).
    assert!(check_lock(&c, Perm::WRITE, Perm::ALL).is_err());
}

#[test]
fn releasing_lets_second_in() {
    let img = TempImage::new("release");
    let a = img.open_rw();
    let b = img.open_rw();
    apply_lock(&a, RW, WRITER_SHARES).unwrap();
    assert!(check_lock(&b, RW, WRITER_SHARES).is_err());
    unlock_all(&a).unwrap();
    check_lock(&b, RW, WRITER_SHARES).unwrap();
    apply_lock(&b, RW, WRITER_SHARES).unwrap();
    // Now the first one is locked out, until the second is closed.
    assert!(check_lock(&a, RW, WRITER_SHARES).is_err());
    drop(b);
    check_lock(&a, RW, WRITER_SHARES).unwrap();
}

#[test]
fn dropping_write_releases_bytes() {
    let img = TempImage::new("drop");
    let a = img.open_rw();
    let b = img.open_rw();
    apply_lock(&a, RW, WRITER_SHARES).unwrap();
    assert!(check_lock(&b, RW, Perm::ALL).is_err());
    apply_lock(&a, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    check_lock(&b, RW, WRITER_SHARES).unwrap();
    // ...but a still holds the read byte, so b cannot refuse to share it.
    let err = check_lock(&b, RW, Perm::WRITE).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Failed to get shared \"consistent read\" lock"
    );
}

#[test]
fn dup_shares_the_open_file_description() {
    let img = TempImage::new("dup");
    let a = img.open_rw();
    apply_lock(&a, RW, WRITER_SHARES).unwrap();
    let a2 = a.try_clone().unwrap();
    check_lock(&a2, RW, WRITER_SHARES).unwrap();
}

#[test]
fn perm_lock_transactions() {
    let img = TempImage::new("txn");
    let a = img.open_rw();
    let b = img.open_rw();

    let mut la = PermLock::new();
    la.update(&a, RW, WRITER_SHARES).unwrap();
    assert_eq!(la.perm(), RW);
    assert_eq!(la.shared(), WRITER_SHARES);
    assert_eq!(la.locked(), LockedBytes::for_perms(RW, WRITER_SHARES));

    // b starts as a reader sharing everything, then tries to write.
    let mut lb = PermLock::new();
    lb.update(&b, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    let before = lb.locked();
    let err = lb.prepare(&b, RW, WRITER_SHARES).unwrap_err();
    assert_eq!(err.to_string(), "Failed to get \"write\" lock");
    // The failed prepare rolled b back to its committed locks...
    assert_eq!(lb.locked(), before);
    assert_eq!(lb.perm(), Perm::CONSISTENT_READ);
    // ...so a can still tighten its sharing without seeing b's write byte.
    la.prepare(&a, RW, Perm::CONSISTENT_READ).unwrap();
    la.abort(&a);
    assert_eq!(la.locked(), LockedBytes::for_perms(RW, WRITER_SHARES));

    // Dropping permissions needs no check and releases on commit.
    la.prepare(&a, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    assert_eq!(la.locked(), LockedBytes::for_perms(RW, WRITER_SHARES));
    la.commit(&a, Perm::CONSISTENT_READ, Perm::ALL);
    assert_eq!(
        la.locked(),
        LockedBytes::for_perms(Perm::CONSISTENT_READ, Perm::ALL)
    );

    // Now b gets in, and a is the one locked out.
    lb.update(&b, RW, WRITER_SHARES).unwrap();
    let err = la.update(&a, RW, WRITER_SHARES).unwrap_err();
    assert!(err.is_conflict());

    lb.release(&b).unwrap();
    assert_eq!(lb.locked(), LockedBytes::NONE);
    la.update(&a, RW, WRITER_SHARES).unwrap();
}

#[test]
fn interop_qemu_io_holds_lock() {
    if !on_path("qemu-io") {
        println!("qemu-io not found on PATH, skipping QEMU interop test");
        return;
    }
    let img = TempImage::new("qemuio");
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&img.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let ours = img.open_rw();
    let deadline = Instant::now() + Duration::from_secs(20);
    let result = loop {
        match check_lock(&ours, RW, WRITER_SHARES) {
            Err(e) => break Err(e),
            Ok(()) if Instant::now() > deadline => break Ok(()),
            Ok(()) => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("qemu-io exited early: {status}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    println!("our check while qemu-io runs: {result:?}");
    // qemu-io uses consistent read and write and shares everything, so a
    // writer that does not share write trips over qemu-io's write byte.
    let err = result.unwrap_err();
    assert_eq!(
        err,
        LockError::Conflict {
            perm: Perm::WRITE,
            byte: LockByte::Used
        }
    );
    assert_eq!(err.to_string(), "Failed to get shared \"write\" lock");
    // Sharing everything ourselves is fine alongside qemu-io.
    check_lock(&ours, RW, Perm::ALL).unwrap();

    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    check_lock(&ours, RW, WRITER_SHARES).unwrap();
}

/// Runs a QEMU tool and returns (success, stderr).
fn run_tool(prog: &str, args: &[&str], path: &Path, tail: &[&str]) -> (bool, String) {
    let out = Command::new(prog)
        .args(args)
        .arg(path)
        .args(tail)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    println!(
        "`{prog} {} {} {}` -> {}: {stderr}",
        args.join(" "),
        path.display(),
        tail.join(" "),
        out.status
    );
    (out.status.success(), stderr)
}

#[test]
fn interop_qemu_sees_our_lock() {
    if !on_path("qemu-io") {
        println!("qemu-io not found on PATH, skipping QEMU interop test");
        return;
    }
    let img = TempImage::new("qemusees");
    let ours = img.open_rw();
    apply_lock(&ours, RW, WRITER_SHARES).unwrap();
    let hint = format!(
        "Is another process using the image [{}]?",
        img.path.display()
    );

    // A read-write qemu-io wants write, which we do not share.
    let (ok, msg) = run_tool("qemu-io", &["-c", "quit", "-f", "raw"], &img.path, &[]);
    assert!(!ok);
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
    assert!(msg.contains(&hint), "{msg}");

    // Raw readers share write (QEMU only refuses it when a format
    // driver such as qcow2 needs stable metadata), so a read-only
    // qemu-io coexists with our writer.
    let (ok, msg) = run_tool(
        "qemu-io",
        &["-r", "-c", "quit", "-f", "raw"],
        &img.path,
        &[],
    );
    assert!(ok, "{msg}");

    if on_path("qemu-img") {
        // On a raw image `qemu-img info` shares every permission, so it
        // does not conflict with a writer; just report what it said.
        let _ = run_tool("qemu-img", &["info", "-f", "raw"], &img.path, &[]);

        // On a qcow2 image it refuses to share write. Hold the locks a
        // qcow2 writer's file node holds (QEMU adds resize there).
        let q = TempImage::new("qemusees-qcow2");
        let (ok, msg) = run_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2"],
            &q.path,
            &["1M"],
        );
        assert!(ok, "{msg}");
        let qf = q.open_rw();
        apply_lock(&qf, RW | Perm::RESIZE, WRITER_SHARES).unwrap();
        let (ok, msg) = run_tool("qemu-img", &["info"], &q.path, &[]);
        assert!(!ok);
        assert!(msg.contains("Failed to get shared \"write\" lock"), "{msg}");
        assert!(
            msg.contains(&format!(
                "Is another process using the image [{}]?",
                q.path.display()
            )),
            "{msg}"
        );
        // With -U (force share) qemu-img skips locking and succeeds.
        let (ok, msg) = run_tool("qemu-img", &["info", "-U"], &q.path, &[]);
        assert!(ok, "{msg}");
    } else {
        println!("qemu-img not found on PATH, skipping qemu-img part");
    }

    // Once we stop writing, qemu-io gets in.
    apply_lock(&ours, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    let (ok, msg) = run_tool("qemu-io", &["-c", "quit", "-f", "raw"], &img.path, &[]);
    assert!(ok, "{msg}");
}
