//! Image file locking that interoperates with QEMU's `file-posix` driver.
//!
//! QEMU advertises the block permissions a process holds on an image by
//! taking shared (read) byte-range locks on the image file itself, using
//! open-file-description ("OFD") locks so that the locks belong to one
//! `open()` rather than to the whole process:
//!
//! * byte `100 + i` is locked while the process *uses* permission bit `i`;
//! * byte `200 + i` is locked while the process *does not share* permission
//!   bit `i` with other users.
//!
//! (`i` is the bit position from [`Perm::index`]: 0 consistent read, 1 write,
//! 2 write unchanged, 3 resize.) Bytes below 100 are left to libvirt.
//!
//! Before taking a permission, a process probes with `F_OFD_GETLK` and a
//! write-lock request, which reports any lock held by a *different* open file
//! description: wanting permission `p` conflicts with someone holding byte
//! `200 + p`, and refusing to share `p` conflicts with someone holding byte
//! `100 + p`. Locks held through the probing descriptor itself are never
//! reported, so a process can re-check its own state.
//!
//! Using exactly these bytes and semantics lets vubd and QEMU processes
//! (qemu-system, qemu-storage-daemon, qemu-img, qemu-io) see each other.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

use super::perm::Perm;

/// Offset of the byte for permission bit 0 in the "used" range.
pub const LOCK_PERM_BASE: u64 = 100;
/// Offset of the byte for permission bit 0 in the "not shared" range.
pub const LOCK_SHARED_BASE: u64 = 200;

/// Which of the two lock bytes of a permission an operation concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockByte {
    /// The byte at [`LOCK_PERM_BASE`] + bit: "this user holds the permission".
    Used,
    /// The byte at [`LOCK_SHARED_BASE`] + bit: "this user does not share the
    /// permission".
    Unshared,
}

impl LockByte {
    /// The base offset of this byte range.
    pub const fn base(self) -> u64 {
        match self {
            LockByte::Used => LOCK_PERM_BASE,
            LockByte::Unshared => LOCK_SHARED_BASE,
        }
    }

    /// File offset of this byte for a single permission, or `None` if `perm`
    /// is not exactly one permission.
    pub const fn offset(self, perm: Perm) -> Option<u64> {
        match perm.index() {
            Some(i) => Some(self.base() + i as u64),
            None => None,
        }
    }
}

impl fmt::Display for LockByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockByte::Used => "use",
            LockByte::Unshared => "share",
        })
    }
}

/// Errors from image locking.
///
/// The messages follow QEMU's wording so that users (and tools that grep
/// logs) see the same text whichever program reports the conflict. QEMU omits
/// the system error text when the error is `EAGAIN`/`EACCES` (the usual
/// "somebody else holds it" case) and appends it otherwise; so do we.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Another open file description holds a lock byte that conflicts with
    /// what we asked for. With [`LockByte::Unshared`] someone refuses to
    /// share a permission we want; with [`LockByte::Used`] someone uses a
    /// permission we refuse to share.
    #[error("Failed to get {}\"{perm}\" lock", shared_word(.byte))]
    Conflict {
        /// The single permission concerned.
        perm: Perm,
        /// Which of its bytes was found locked by someone else.
        byte: LockByte,
    },
    /// The `F_OFD_GETLK` probe itself failed.
    #[error(
        "Failed to get {}\"{perm}\" lock{}",
        shared_word(.byte),
        errno_suffix(.errno, true)
    )]
    Probe {
        /// The single permission concerned.
        perm: Perm,
        /// Which of its bytes was being probed.
        byte: LockByte,
        /// The `errno` reported by `fcntl`.
        errno: i32,
    },
    /// Taking the shared lock on one byte failed.
    #[error("Failed to lock byte {}{}", byte_offset(.byte, .perm), errno_suffix(.errno, true))]
    Lock {
        /// The single permission concerned.
        perm: Perm,
        /// Which of its bytes could not be locked.
        byte: LockByte,
        /// The `errno` reported by `fcntl`.
        errno: i32,
    },
    /// Releasing the lock on one byte failed.
    #[error("Failed to unlock byte {}{}", byte_offset(.byte, .perm), errno_suffix(.errno, false))]
    Unlock {
        /// The single permission concerned.
        perm: Perm,
        /// Which of its bytes could not be unlocked.
        byte: LockByte,
        /// The `errno` reported by `fcntl`.
        errno: i32,
    },
    /// `locking=on` was requested but the host lacks OFD locks.
    #[error("File lock requested but OFD locking syscall is unavailable")]
    Unsupported,
}

fn shared_word(byte: &LockByte) -> &'static str {
    match byte {
        LockByte::Used => "shared ",
        LockByte::Unshared => "",
    }
}

fn byte_offset(byte: &LockByte, perm: &Perm) -> String {
    match byte.offset(*perm) {
        Some(off) => off.to_string(),
        None => format!("{}+?", byte.base()),
    }
}

/// ": <system error text>" for `errno`, or nothing when `elide_busy` is set
/// and the error just means "locked by somebody else".
fn errno_suffix(errno: &i32, elide_busy: bool) -> String {
    if elide_busy && (*errno == libc::EAGAIN || *errno == libc::EACCES) {
        return String::new();
    }
    format!(": {}", strerror(*errno))
}

/// The C library's description of `errno`, without Rust's "(os error N)".
fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    }
}

impl LockError {
    /// The permission the error concerns, if any.
    pub fn perm(&self) -> Option<Perm> {
        match self {
            LockError::Conflict { perm, .. }
            | LockError::Probe { perm, .. }
            | LockError::Lock { perm, .. }
            | LockError::Unlock { perm, .. } => Some(*perm),
            LockError::Unsupported => None,
        }
    }

    /// Which lock byte of the permission the error concerns, if any.
    pub fn byte(&self) -> Option<LockByte> {
        match self {
            LockError::Conflict { byte, .. }
            | LockError::Probe { byte, .. }
            | LockError::Lock { byte, .. }
            | LockError::Unlock { byte, .. } => Some(*byte),
            LockError::Unsupported => None,
        }
    }

    /// The system error number, if the error came from a failed syscall.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LockError::Probe { errno, .. }
            | LockError::Lock { errno, .. }
            | LockError::Unlock { errno, .. } => Some(*errno),
            LockError::Conflict { .. } | LockError::Unsupported => None,
        }
    }

    /// Whether the error means another user holds a conflicting lock.
    pub fn is_conflict(&self) -> bool {
        matches!(self, LockError::Conflict { .. })
    }

    /// QEMU's follow-up line for errors found while checking other users'
    /// locks: `Is another process using the image [PATH]?`. `None` for
    /// errors where that question would not help.
    pub fn hint(&self, path: impl AsRef<Path>) -> Option<String> {
        match self {
            LockError::Conflict { .. } | LockError::Probe { .. } => Some(format!(
                "Is another process using the image [{}]?",
                path.as_ref().display()
            )),
            _ => None,
        }
    }
}

/// The lock bytes held (or to be held) through one open file description,
/// as two permission sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LockedBytes {
    /// Permissions whose "used" byte is locked.
    pub used: Perm,
    /// Permissions whose "not shared" byte is locked.
    pub unshared: Perm,
}

impl LockedBytes {
    /// No bytes.
    pub const NONE: LockedBytes = LockedBytes {
        used: Perm::NONE,
        unshared: Perm::NONE,
    };

    /// The bytes a user with permissions `perm` sharing `shared` holds.
    pub const fn for_perms(perm: Perm, shared: Perm) -> LockedBytes {
        LockedBytes {
            used: perm,
            unshared: shared.complement(),
        }
    }

    /// Byte-wise union.
    pub const fn union(self, other: LockedBytes) -> LockedBytes {
        LockedBytes {
            used: self.used.union(other.used),
            unshared: self.unshared.union(other.unshared),
        }
    }

    fn get(&self, byte: LockByte) -> Perm {
        match byte {
            LockByte::Used => self.used,
            LockByte::Unshared => self.unshared,
        }
    }

    fn get_mut(&mut self, byte: LockByte) -> &mut Perm {
        match byte {
            LockByte::Used => &mut self.used,
            LockByte::Unshared => &mut self.unshared,
        }
    }
}

/// Builds a one-byte `flock` request at `offset`.
fn one_byte_flock(offset: u64, l_type: libc::c_int) -> libc::flock {
    // SAFETY: `libc::flock` is a C struct made only of integer fields, for
    // which the all-zero bit pattern is a valid value. Zero is also what OFD
    // requests need in `l_pid`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // The lock type and whence constants are tiny; the casts only adapt them
    // to the field widths the C struct uses.
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = 1;
    fl
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `F_OFD_SETLK` on one byte with the given lock type (`F_RDLCK`/`F_UNLCK`),
/// retrying on `EINTR`. Returns the `errno` on failure.
fn ofd_setlk(fd: BorrowedFd<'_>, offset: u64, l_type: libc::c_int) -> Result<(), i32> {
    let fl = one_byte_flock(offset, l_type);
    loop {
        // SAFETY: `fd` is an open descriptor borrowed for the duration of the
        // call, and `fl` is a fully initialised `flock` that outlives the
        // call; `F_OFD_SETLK` only reads the structure.
        let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if ret != -1 {
            return Ok(());
        }
        let errno = last_errno();
        if errno != libc::EINTR {
            return Err(errno);
        }
    }
}

/// `F_OFD_GETLK` with a write-lock probe on one byte: `Ok(true)` if another
/// open file description holds a lock on it.
fn ofd_byte_taken(fd: BorrowedFd<'_>, offset: u64) -> Result<bool, i32> {
    let mut fl = one_byte_flock(offset, libc::F_WRLCK);
    loop {
        // SAFETY: `fd` is an open descriptor borrowed for the duration of the
        // call, and `fl` is a fully initialised, exclusively borrowed `flock`
        // that outlives the call; `F_OFD_GETLK` reads it and writes the
        // result back into the same structure.
        let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if ret != -1 {
            return Ok(libc::c_int::from(fl.l_type) != libc::F_UNLCK);
        }
        let errno = last_errno();
        if errno != libc::EINTR {
            return Err(errno);
        }
    }
}

/// Brings the bytes locked through `fd` from `held` towards `want`, one byte
/// at a time in QEMU's order ("used" bytes in bit order, then "not shared"
/// bytes): bytes in `want` but not in `held` are locked, and, if `release`
/// is set, bytes in `held` but not in `want` are unlocked. `held` is updated
/// after every successful step, so on error it still describes reality; the
/// first error stops the walk.
fn sync_bytes(
    fd: BorrowedFd<'_>,
    held: &mut LockedBytes,
    want: LockedBytes,
    release: bool,
) -> Result<(), LockError> {
    for byte in [LockByte::Used, LockByte::Unshared] {
        for perm in Perm::ALL.iter() {
            let Some(offset) = byte.offset(perm) else {
                continue;
            };
            let wanted = want.get(byte).contains(perm);
            let have = held.get(byte).contains(perm);
            if wanted && !have {
                ofd_setlk(fd, offset, libc::F_RDLCK).map_err(|errno| LockError::Lock {
                    perm,
                    byte,
                    errno,
                })?;
                *held.get_mut(byte) |= perm;
            } else if release && have && !wanted {
                ofd_setlk(fd, offset, libc::F_UNLCK).map_err(|errno| LockError::Unlock {
                    perm,
                    byte,
                    errno,
                })?;
                *held.get_mut(byte) -= perm;
            }
        }
    }
    Ok(())
}

/// Makes the lock bytes of `fd` say "uses `perm`, shares `shared`".
///
/// Takes a shared lock on the "used" byte of every permission in `perm` and
/// on the "not shared" byte of every permission outside `shared`, and
/// releases every other byte of both ranges. Bytes are visited one at a time
/// and the first failure is returned; bytes already processed stay as they
/// were set. This does not check for conflicts: call [`check_lock`] after
/// taking the locks (the order QEMU uses, so that two processes racing for
/// the same image cannot both succeed). For transactional permission
/// changes use [`PermLock`].
pub fn apply_lock(fd: impl AsFd, perm: Perm, shared: Perm) -> Result<(), LockError> {
    let want = LockedBytes::for_perms(perm, shared);
    // Without a record of what is held, treat every wanted byte as missing
    // and every other byte as held, so that all of them get (re)applied.
    let mut held = LockedBytes {
        used: !want.used,
        unshared: !want.unshared,
    };
    sync_bytes(fd.as_fd(), &mut held, want, true)
}

/// Checks whether a user of `fd` may use `perm` while sharing only `shared`,
/// given the locks other open file descriptions hold on the image.
///
/// For each permission in `perm`, fails if someone else holds its "not
/// shared" byte; then for each permission outside `shared`, fails if someone
/// else holds its "used" byte. Locks held through `fd` itself are ignored.
pub fn check_lock(fd: impl AsFd, perm: Perm, shared: Perm) -> Result<(), LockError> {
    let fd = fd.as_fd();
    for (byte, set) in [
        (LockByte::Unshared, perm),
        (LockByte::Used, shared.complement()),
    ] {
        for p in set.iter() {
            let Some(offset) = byte.offset(p) else {
                continue;
            };
            match ofd_byte_taken(fd, offset) {
                Ok(false) => {}
                Ok(true) => return Err(LockError::Conflict { perm: p, byte }),
                Err(errno) if errno == libc::EAGAIN || errno == libc::EACCES => {
                    return Err(LockError::Conflict { perm: p, byte })
                }
                Err(errno) => {
                    return Err(LockError::Probe {
                        perm: p,
                        byte,
                        errno,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Releases every permission lock byte held through `fd`.
pub fn unlock_all(fd: impl AsFd) -> Result<(), LockError> {
    let mut held = LockedBytes {
        used: Perm::ALL,
        unshared: Perm::ALL,
    };
    sync_bytes(fd.as_fd(), &mut held, LockedBytes::NONE, true)
}

/// Tracks the permission locks of one image descriptor and changes them the
/// way QEMU's `file-posix` driver does, as a prepare/commit/abort
/// transaction:
///
/// * [`prepare`](Self::prepare) takes the locks for the union of the old and
///   new state (never dropping anything yet), then checks the new state
///   against other users; on failure it returns to the old state.
///   A change that only drops permissions or shares more needs no check.
/// * [`commit`](Self::commit) moves to exactly the new state, releasing the
///   bytes that are no longer needed.
/// * [`abort`](Self::abort) returns to the old state.
///
/// A fresh tracker holds nothing (uses no permission and shares all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermLock {
    perm: Perm,
    shared: Perm,
    held: LockedBytes,
}

impl Default for PermLock {
    fn default() -> Self {
        Self::new()
    }
}

impl PermLock {
    /// A tracker for a descriptor on which nothing is locked yet.
    pub const fn new() -> PermLock {
        PermLock {
            perm: Perm::NONE,
            shared: Perm::ALL,
            held: LockedBytes::NONE,
        }
    }

    /// The committed permissions.
    pub fn perm(&self) -> Perm {
        self.perm
    }

    /// The committed shared permissions.
    pub fn shared(&self) -> Perm {
        self.shared
    }

    /// The bytes currently locked through the descriptor.
    pub fn locked(&self) -> LockedBytes {
        self.held
    }

    /// First phase of a permission change; see the type documentation.
    pub fn prepare(
        &mut self,
        fd: impl AsFd,
        new_perm: Perm,
        new_shared: Perm,
    ) -> Result<(), LockError> {
        let fd = fd.as_fd();
        if self.perm.contains(new_perm) && new_shared.contains(self.shared) {
            // Only dropping permissions or sharing more: cannot conflict.
            return Ok(());
        }
        let both = LockedBytes::for_perms(self.perm, self.shared)
            .union(LockedBytes::for_perms(new_perm, new_shared));
        let result = sync_bytes(fd, &mut self.held, both, false)
            .and_then(|()| check_lock(fd, new_perm, new_shared));
        if result.is_err() {
            self.abort(fd);
        }
        result
    }

    /// Second phase of a successful change: keep exactly the locks for
    /// `new_perm`/`new_shared`. Release failures are only logged, as there is
    /// nothing useful a caller could do about them.
    pub fn commit(&mut self, fd: impl AsFd, new_perm: Perm, new_shared: Perm) {
        let want = LockedBytes::for_perms(new_perm, new_shared);
        if let Err(e) = sync_bytes(fd.as_fd(), &mut self.held, want, true) {
            log::warn!("{e}");
        }
        self.perm = new_perm;
        self.shared = new_shared;
    }

    /// Abandons a prepared change and returns to the committed locks.
    pub fn abort(&mut self, fd: impl AsFd) {
        let want = LockedBytes::for_perms(self.perm, self.shared);
        if let Err(e) = sync_bytes(fd.as_fd(), &mut self.held, want, true) {
            log::warn!("{e}");
        }
    }

    /// [`prepare`](Self::prepare) followed by [`commit`](Self::commit).
    pub fn update(
        &mut self,
        fd: impl AsFd,
        new_perm: Perm,
        new_shared: Perm,
    ) -> Result<(), LockError> {
        let fd = fd.as_fd();
        self.prepare(fd, new_perm, new_shared)?;
        self.commit(fd, new_perm, new_shared);
        Ok(())
    }

    /// Releases everything and resets to "no permissions, share all".
    pub fn release(&mut self, fd: impl AsFd) -> Result<(), LockError> {
        sync_bytes(fd.as_fd(), &mut self.held, LockedBytes::NONE, true)?;
        self.perm = Perm::NONE;
        self.shared = Perm::ALL;
        Ok(())
    }
}

/// Whether the host supports open-file-description locks.
///
/// Probed once per process, like QEMU does: an `F_OFD_GETLK` request on
/// `/dev/null` either works or fails (typically with `EINVAL` on kernels
/// older than 3.15).
pub fn ofd_locks_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| match File::open("/dev/null") {
        Ok(f) => ofd_byte_taken(f.as_fd(), 0).is_ok(),
        Err(_) => false,
    })
}

/// The `locking` option of a file node (QAPI `OnOffAuto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LockingMode {
    /// Lock the image; fail if OFD locks are unavailable.
    On,
    /// Never lock.
    Off,
    /// Lock if OFD locks are available, otherwise silently do not lock.
    #[default]
    Auto,
}

impl LockingMode {
    /// The option value as written in QAPI ("on", "off", "auto").
    pub const fn as_str(self) -> &'static str {
        match self {
            LockingMode::On => "on",
            LockingMode::Off => "off",
            LockingMode::Auto => "auto",
        }
    }

    /// Whether image locks should be used under this mode on this host.
    pub fn resolve(self) -> Result<bool, LockError> {
        match self {
            LockingMode::Off => Ok(false),
            LockingMode::Auto => Ok(ofd_locks_supported()),
            LockingMode::On => {
                if ofd_locks_supported() {
                    Ok(true)
                } else {
                    Err(LockError::Unsupported)
                }
            }
        }
    }
}

impl fmt::Display for LockingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown `locking` option value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid locking mode '{0}', expected one of: on, off, auto")]
pub struct ParseLockingModeError(pub String);

impl FromStr for LockingMode {
    type Err = ParseLockingModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(LockingMode::On),
            "off" => Ok(LockingMode::Off),
            "auto" => Ok(LockingMode::Auto),
            other => Err(ParseLockingModeError(other.to_string())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "file_lock_tests.rs"]
mod tests;
