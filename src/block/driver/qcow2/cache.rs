//! The L2 table cache: tables read from the image, by their offset in the
//! file, shared by every thread that serves the node.
//!
//! A table is kept as its raw 64-bit words (two per entry with extended
//! L2 entries), decoded when looked up. The least recently used table
//! goes when the cache is full. Lookups take the cache's mutex for a few
//! loads; no I/O happens under it. Tables are write-through: a word is
//! changed in memory only after the image has it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A cached table's words.
pub type Words = Arc<[AtomicU64]>;

pub struct L2Cache {
    tables: HashMap<u64, Entry>,
    capacity: usize,
    clock: u64,
    /// The clock at the last cleaning pass (`cache-clean-interval`).
    cleaned_at: u64,
}

struct Entry {
    words: Words,
    used: u64,
}

impl L2Cache {
    /// A cache of at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            tables: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
            cleaned_at: 0,
        }
    }

    /// Word `i` of the table at `offset`, if the table is cached.
    pub fn word(&mut self, offset: u64, i: usize) -> Option<u64> {
        self.clock += 1;
        let e = self.tables.get_mut(&offset)?;
        e.used = self.clock;
        e.words.get(i).map(|w| w.load(Ordering::Acquire))
    }

    /// The table at `offset`, if cached (to change words of it).
    pub fn table(&mut self, offset: u64) -> Option<Words> {
        self.clock += 1;
        let e = self.tables.get_mut(&offset)?;
        e.used = self.clock;
        Some(e.words.clone())
    }

    /// Words `i` and `i + 1` (an extended entry and its bitmap).
    pub fn pair(&mut self, offset: u64, i: usize) -> Option<(u64, u64)> {
        self.clock += 1;
        let e = self.tables.get_mut(&offset)?;
        e.used = self.clock;
        Some((
            e.words.get(i)?.load(Ordering::Acquire),
            e.words.get(i + 1)?.load(Ordering::Acquire),
        ))
    }

    /// Adds a table read from the image.
    pub fn insert(&mut self, offset: u64, words: Words) {
        self.clock += 1;
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            if let Some(&oldest) = self
                .tables
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k)
            {
                self.tables.remove(&oldest);
            }
        }
        self.tables.insert(
            offset,
            Entry {
                words,
                used: self.clock,
            },
        );
    }

    /// Drops the tables not used since the last pass (QEMU's
    /// `cache-clean-interval`), except those a request holds right now;
    /// returns how many went.
    pub fn clean_unused(&mut self) -> usize {
        let before = self.tables.len();
        let mark = self.cleaned_at;
        self.tables
            .retain(|_, e| e.used > mark || Arc::strong_count(&e.words) > 1);
        self.cleaned_at = self.clock;
        before - self.tables.len()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &[u64]) -> Words {
        v.iter().map(|&w| AtomicU64::new(w)).collect()
    }

    #[test]
    fn the_least_recently_used_table_goes_first() {
        let mut c = L2Cache::new(2);
        c.insert(1, words(&[10, 11]));
        c.insert(2, words(&[20, 21]));
        assert_eq!(c.word(1, 1), Some(11));
        c.insert(3, words(&[30]));
        assert_eq!(c.word(2, 0), None);
        assert_eq!(c.word(1, 0), Some(10));
        assert_eq!(c.pair(1, 0), Some((10, 11)));
        assert_eq!(c.word(3, 0), Some(30));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_cleaning_pass_drops_the_tables_unused_since_the_last_one() {
        // Arrange: two tables read since the cache was made.
        let mut c = L2Cache::new(4);
        c.insert(1, words(&[10]));
        c.insert(2, words(&[20]));
        // Act / Assert: both count as used for the first pass; then only
        // the one used in between survives the next, and none the third.
        assert_eq!(c.clean_unused(), 0);
        assert_eq!(c.word(1, 0), Some(10));
        assert_eq!(c.clean_unused(), 1);
        assert_eq!(c.word(2, 0), None);
        let held = c.table(1);
        assert_eq!(c.clean_unused(), 0);
        assert_eq!(c.clean_unused(), 0);
        drop(held);
        assert_eq!(c.clean_unused(), 1);
        assert_eq!(c.word(1, 0), None);
        assert_eq!(c.len(), 0);
    }
}
