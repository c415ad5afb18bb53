//! Splitting the bytes a QMP client sends into JSON messages.
//!
//! Clients may put several messages on a line or spread one over several
//! lines, so messages are delimited by the JSON structure itself: a
//! message ends when its outermost brace or bracket closes. A top-level
//! scalar or stray text ends at white space. Strings (and their escapes)
//! are tracked so braces inside them do not count. Oversized or overly
//! nested input is cut off with an error and the rest of its line dropped.

/// The largest message accepted, in bytes.
pub const MAX_MESSAGE: usize = 16 << 20;
/// The deepest nesting accepted.
pub const MAX_DEPTH: usize = 1024;

/// One piece of input: the text of a message, or why it was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Vec<u8>),
    TooLarge,
    TooDeep,
}

#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A top-level token that is not an object or array.
    in_scalar: bool,
    /// Dropping input until the end of the line after an error.
    skipping: bool,
}

impl Splitter {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.skipping {
            if b == b'\n' {
                self.skipping = false;
            }
            return;
        }
        if self.in_scalar {
            if b.is_ascii_whitespace() || b == b'{' || b == b'[' {
                self.emit(out);
                if b.is_ascii_whitespace() {
                    return;
                }
            } else {
                self.keep(b, out);
                return;
            }
        }
        if self.depth == 0 {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'{' | b'[' => {
                    self.depth = 1;
                    self.keep(b, out);
                }
                _ => {
                    self.in_scalar = true;
                    self.keep(b, out);
                }
            }
            return;
        }
        self.keep(b, out);
        if self.skipping {
            return;
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    self.fail(Frame::TooDeep, out);
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            _ => {}
        }
    }

    fn keep(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.buf.len() >= MAX_MESSAGE {
            self.fail(Frame::TooLarge, out);
        } else {
            self.buf.push(b);
        }
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        out.push(Frame::Message(std::mem::take(&mut self.buf)));
        self.reset();
    }

    fn fail(&mut self, why: Frame, out: &mut Vec<Frame>) {
        out.push(why);
        self.buf = Vec::new();
        self.reset();
        self.skipping = true;
    }

    fn reset(&mut self) {
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.in_scalar = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&str]) -> Vec<String> {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c.as_bytes(), &mut out);
        }
        out.into_iter()
            .map(|f| match f {
                Frame::Message(m) => String::from_utf8_lossy(&m).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn two_messages_on_one_line() {
        assert_eq!(
            split(&["{\"a\":1}{\"b\":[2]}\n"]),
            ["{\"a\":1}", "{\"b\":[2]}"]
        );
    }

    #[test]
    fn message_split_across_reads_and_lines() {
        assert_eq!(split(&["{\"a\":", "\n 1", "}"]), ["{\"a\":\n 1}"]);
    }

    #[test]
    fn braces_inside_strings_do_not_count() {
        assert_eq!(split(&[r#"{"a":"}{\"}"}"#]), [r#"{"a":"}{\"}"}"#]);
    }

    #[test]
    fn stray_scalar_is_its_own_message() {
        assert_eq!(split(&["foo {\"a\":1}"]), ["foo", "{\"a\":1}"]);
    }

    #[test]
    fn too_deep_input_is_cut_off_until_end_of_line() {
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert_eq!(split(&[&deep, "]]]\n{}"]), ["TooDeep", "{}"]);
    }
}
