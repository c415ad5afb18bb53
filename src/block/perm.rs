//! Block node permissions.
//!
//! A parent of a block node takes a set of permissions on it (what the parent
//! will do with the node) and declares a second set that it lets other parents
//! take at the same time (the "shared" permissions). The bit values and the
//! human-readable names are the ones QEMU uses, so that they can be carried
//! over unchanged into file locks (see [`super::file_lock`]) and into error
//! messages that match QEMU's wording.

use std::fmt;
use std::ops::{
    BitAnd, BitAndAssign, BitOr, BitOrAssign, BitXor, BitXorAssign, Not, Sub, SubAssign,
};

/// A set of block permissions, stored with QEMU's bit values.
///
/// Every value of this type only contains known permission bits; the
/// complement operator (`!`) is taken relative to [`Perm::ALL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Perm(u64);

/// Per-bit metadata, ordered by bit position.
///
/// Columns: bit value, name used in QEMU's messages, QAPI `BlockPermission`
/// enum member name.
const TABLE: [(u64, &str, &str); 4] = [
    (0x01, "consistent read", "consistent-read"),
    (0x02, "write", "write"),
    (0x04, "write unchanged", "write-unchanged"),
    (0x08, "resize", "resize"),
];

impl Perm {
    /// The empty set.
    pub const NONE: Perm = Perm(0);
    /// The user sees a complete and self-consistent view of the node's data.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// The user may change the visible contents of the node.
    pub const WRITE: Perm = Perm(0x02);
    /// The user may write, but only data that leaves the visible contents
    /// unchanged. [`Perm::WRITE`] is strictly stronger.
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// The user may change the size of the node.
    pub const RESIZE: Perm = Perm(0x08);
    /// Every permission.
    ///
    /// QEMU once had a fifth bit (0x10, "change children"); it was removed and
    /// is intentionally not part of this set.
    pub const ALL: Perm = Perm(0x0f);

    /// Number of distinct permission bits.
    pub const COUNT: u32 = TABLE.len() as u32;

    /// The raw bit value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Builds a set from raw bits, or `None` if any unknown bit is set.
    pub const fn from_bits(bits: u64) -> Option<Perm> {
        if bits & !Self::ALL.0 == 0 {
            Some(Perm(bits))
        } else {
            None
        }
    }

    /// Builds a set from raw bits, dropping unknown bits.
    pub const fn from_bits_truncate(bits: u64) -> Perm {
        Perm(bits & Self::ALL.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every permission in `other` is also in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` have any permission in common.
    pub const fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    /// Set union.
    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }

    /// Set intersection.
    pub const fn intersection(self, other: Perm) -> Perm {
        Perm(self.0 & other.0)
    }

    /// Permissions in `self` that are not in `other`.
    pub const fn difference(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }

    /// Permissions not in `self` (relative to [`Perm::ALL`]).
    pub const fn complement(self) -> Perm {
        Perm(!self.0 & Self::ALL.0)
    }

    /// Number of permissions in the set.
    pub const fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// Whether this set holds exactly one permission.
    pub const fn is_single(self) -> bool {
        self.0.count_ones() == 1
    }

    /// The bit position of a single permission (0 for consistent read,
    /// 1 for write, ...), or `None` if the set does not hold exactly one.
    ///
    /// This is the offset of the permission's byte from each lock base used
    /// by QEMU's image locking.
    pub const fn index(self) -> Option<u32> {
        if self.is_single() {
            Some(self.0.trailing_zeros())
        } else {
            None
        }
    }

    /// The single permission at bit position `index`, if it exists.
    pub const fn from_index(index: u32) -> Option<Perm> {
        if index < Self::COUNT {
            Some(Perm(1 << index))
        } else {
            None
        }
    }

    /// QEMU's human-readable name of a single permission, as used in its
    /// error messages ("consistent read", "write", "write unchanged",
    /// "resize"). `None` unless the set holds exactly one permission; use the
    /// `Display` implementation for sets.
    pub fn name(self) -> Option<&'static str> {
        let idx = self.index()?;
        TABLE.get(idx as usize).map(|entry| entry.1)
    }

    /// The QAPI `BlockPermission` member name of a single permission
    /// ("consistent-read", "write", "write-unchanged", "resize").
    pub fn qapi_name(self) -> Option<&'static str> {
        let idx = self.index()?;
        TABLE.get(idx as usize).map(|entry| entry.2)
    }

    /// Parses a QAPI `BlockPermission` member name into a single permission.
    pub fn from_qapi_name(name: &str) -> Option<Perm> {
        TABLE
            .iter()
            .find(|entry| entry.2 == name)
            .map(|entry| Perm(entry.0))
    }

    /// Iterates over the single permissions in the set, lowest bit first.
    pub fn iter(self) -> PermIter {
        PermIter { rest: self.0 }
    }
}

/// Iterator over the single-bit members of a [`Perm`], lowest bit first.
#[derive(Clone, Debug)]
pub struct PermIter {
    rest: u64,
}

impl Iterator for PermIter {
    type Item = Perm;

    fn next(&mut self) -> Option<Perm> {
        if self.rest == 0 {
            return None;
        }
        let low = self.rest & self.rest.wrapping_neg();
        self.rest &= !low;
        Some(Perm(low))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.rest.count_ones() as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for PermIter {}

impl IntoIterator for Perm {
    type Item = Perm;
    type IntoIter = PermIter;

    fn into_iter(self) -> PermIter {
        self.iter()
    }
}

impl FromIterator<Perm> for Perm {
    fn from_iter<I: IntoIterator<Item = Perm>>(iter: I) -> Perm {
        iter.into_iter().fold(Perm::NONE, Perm::union)
    }
}

/// Lists the permission names joined by ", " in bit order, e.g.
/// `consistent read, write`; the empty set displays as an empty string.
impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for p in self.iter() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            f.write_str(p.name().unwrap_or("?"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({:#x}: [{}])", self.0, self)
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        self.union(rhs)
    }
}

impl BitOrAssign for Perm {
    fn bitor_assign(&mut self, rhs: Perm) {
        *self = self.union(rhs);
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        self.intersection(rhs)
    }
}

impl BitAndAssign for Perm {
    fn bitand_assign(&mut self, rhs: Perm) {
        *self = self.intersection(rhs);
    }
}

impl BitXor for Perm {
    type Output = Perm;
    fn bitxor(self, rhs: Perm) -> Perm {
        Perm(self.0 ^ rhs.0)
    }
}

impl BitXorAssign for Perm {
    fn bitxor_assign(&mut self, rhs: Perm) {
        self.0 ^= rhs.0;
    }
}

impl Sub for Perm {
    type Output = Perm;
    fn sub(self, rhs: Perm) -> Perm {
        self.difference(rhs)
    }
}

impl SubAssign for Perm {
    fn sub_assign(&mut self, rhs: Perm) {
        *self = self.difference(rhs);
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        self.complement()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bit_values_match_qemu() {
        assert_eq!(Perm::CONSISTENT_READ.bits(), 0x01);
        assert_eq!(Perm::WRITE.bits(), 0x02);
        assert_eq!(Perm::WRITE_UNCHANGED.bits(), 0x04);
        assert_eq!(Perm::RESIZE.bits(), 0x08);
        assert_eq!(Perm::ALL.bits(), 0x0f);
        assert_eq!(Perm::NONE.bits(), 0);
        assert_eq!(
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE,
            Perm::ALL
        );
        assert_eq!(Perm::COUNT, 4);
    }

    #[test]
    fn names() {
        assert_eq!(Perm::CONSISTENT_READ.name(), Some("consistent read"));
        assert_eq!(Perm::WRITE.name(), Some("write"));
        assert_eq!(Perm::WRITE_UNCHANGED.name(), Some("write unchanged"));
        assert_eq!(Perm::RESIZE.name(), Some("resize"));
        assert_eq!(Perm::NONE.name(), None);
        assert_eq!((Perm::WRITE | Perm::RESIZE).name(), None);
        assert_eq!(Perm::WRITE_UNCHANGED.qapi_name(), Some("write-unchanged"));
        assert_eq!(
            Perm::from_qapi_name("consistent-read"),
            Some(Perm::CONSISTENT_READ)
        );
        assert_eq!(Perm::from_qapi_name("graph-mod"), None);
    }

    #[test]
    fn display_joins_names() {
        assert_eq!(Perm::NONE.to_string(), "");
        assert_eq!(Perm::WRITE.to_string(), "write");
        assert_eq!(
            (Perm::RESIZE | Perm::CONSISTENT_READ).to_string(),
            "consistent read, resize"
        );
        assert_eq!(
            Perm::ALL.to_string(),
            "consistent read, write, write unchanged, resize"
        );
        assert_eq!(
            format!("{:?}", Perm::WRITE | Perm::CONSISTENT_READ),
            "Perm(0x3: [consistent read, write])"
        );
    }

    #[test]
    fn set_operations() {
        let rw = Perm::CONSISTENT_READ | Perm::WRITE;
        assert!(rw.contains(Perm::WRITE));
        assert!(rw.contains(Perm::NONE));
        assert!(!rw.contains(Perm::RESIZE));
        assert!(!rw.contains(Perm::WRITE | Perm::RESIZE));
        assert!(rw.intersects(Perm::WRITE | Perm::RESIZE));
        assert!(!rw.intersects(Perm::RESIZE));
        assert_eq!(rw & Perm::WRITE, Perm::WRITE);
        assert_eq!(rw - Perm::WRITE, Perm::CONSISTENT_READ);
        assert_eq!(!rw, Perm::WRITE_UNCHANGED | Perm::RESIZE);
        assert_eq!(!Perm::ALL, Perm::NONE);
        assert_eq!(!Perm::NONE, Perm::ALL);
        assert_eq!(rw ^ Perm::ALL, !rw);
        let mut p = Perm::NONE;
        p |= Perm::RESIZE;
        p |= Perm::WRITE;
        p &= !Perm::RESIZE;
        assert_eq!(p, Perm::WRITE);
        p -= Perm::WRITE;
        assert!(p.is_empty());
        p ^= Perm::ALL;
        assert_eq!(p, Perm::ALL);
        assert_eq!(rw.len(), 2);
    }

    #[test]
    fn from_bits() {
        assert_eq!(
            Perm::from_bits(0x3),
            Some(Perm::CONSISTENT_READ | Perm::WRITE)
        );
        assert_eq!(Perm::from_bits(0x10), None);
        assert_eq!(Perm::from_bits_truncate(0x1f), Perm::ALL);
    }

    #[test]
    fn iter_single_bits() {
        let all: Vec<Perm> = Perm::ALL.iter().collect();
        assert_eq!(
            all,
            vec![
                Perm::CONSISTENT_READ,
                Perm::WRITE,
                Perm::WRITE_UNCHANGED,
                Perm::RESIZE
            ]
        );
        assert_eq!(Perm::NONE.iter().count(), 0);
        assert_eq!((Perm::RESIZE | Perm::WRITE).iter().len(), 2);
        let back: Perm = all.into_iter().collect();
        assert_eq!(back, Perm::ALL);
        for (i, p) in Perm::ALL.into_iter().enumerate() {
            assert!(p.is_single());
            assert_eq!(p.index(), Some(i as u32));
            assert_eq!(Perm::from_index(i as u32), Some(p));
        }
        assert_eq!(Perm::from_index(4), None);
        assert_eq!(Perm::ALL.index(), None);
    }
}
