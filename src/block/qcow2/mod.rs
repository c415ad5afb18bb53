//! qcow2: QEMU's copy-on-write image format.
//!
//! [`format`](mod@format) is the on-disk format and nothing else: parsing and
//! encoding of the header and its extensions, L1/L2/refcount entries,
//! refcount blocks, the snapshot table, and decompression of compressed
//! clusters, all on byte slices. It does no I/O; the qcow2 driver reads
//! the bytes, hands them over, and writes back what the encoders give.
//! The layout follows QEMU's `docs/interop/qcow2.txt`; where QEMU refuses
//! an image when it opens it, [`format::Header::parse`] refuses it too,
//! with QEMU's message.
//!
//! # Tests
//!
//! Unit tests use hand-made headers and entries; `tests` checks the
//! parser against images made by `qemu-img` and written by `qemu-io`
//! (skipped when `qemu-img` is not installed). `fuzz_tests` feeds every
//! parser arbitrary and mutated input with proptest: nothing may panic,
//! and whatever parses encodes back to the same bytes. It runs 256 cases
//! per property by default; for a longer run:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test qcow2
//! ```

// Everything the driver (still to be written) will use is public
// through `format`, so no dead-code allowance is needed here.

mod bytes;
mod compress;
mod entries;
mod error;
mod extensions;
mod features;
pub mod format;
mod header;
mod layout;
mod refcount;
mod snapshot;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod unit_tests;
