//! Tables on disk as big-endian 64-bit words: reading them, and laying
//! out the part of a table that one metadata write covers.

/// The big-endian words of `bytes` (a trailing partial word is ignored).
pub fn be_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_be_bytes(w)
    })
}

/// Fills `buf`, the bytes of the file from offset `at`, with the words of
/// the table that starts at file offset `table`: table word `i` is
/// `word(i)`. Bytes before the table are left as they are.
pub fn put_table_words(buf: &mut [u8], at: u64, table: u64, word: impl Fn(usize) -> u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let byte = at + i as u64 * 8;
        if let Some(off) = byte.checked_sub(table) {
            chunk.copy_from_slice(&word((off / 8) as usize).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_laid_out_from_the_table_start_and_read_back() {
        let mut buf = vec![0xeeu8; 32];
        put_table_words(&mut buf, 96, 112, |i| 10 + i as u64);
        assert_eq!(&buf[..16], &[0xee; 16]);
        let words: Vec<u64> = be_words(&buf[16..]).collect();
        assert_eq!(words, vec![10, 11]);
    }
}
