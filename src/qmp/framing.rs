//! Splitting the bytes a QMP client sends into JSON messages.
//!
//! Clients may put several messages on a line or spread one over several
//! lines, so messages are delimited by the JSON structure itself: a
//! message ends when its outermost brace or bracket closes, and a
//! top-level scalar ends at white space. Strings and their escapes are
//! tracked, so brackets inside them do not count.
//!
//! Like QEMU's lexer, the splitter also knows which bytes can never be
//! part of a message: a raw control character inside a string, or a byte
//! outside a string that no JSON token starts with. Such a byte ends the
//! message being read with an error naming the stray text, and reading
//! starts afresh with the next byte, so no input can leave the connection
//! out of step. QEMU's extensions are accepted: strings in single quotes
//! and the `\'` escape (rewritten here into standard JSON for the parser).
//! Oversized or overly nested input is cut off with an error and the rest
//! of its line dropped.

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
    /// Bytes that cannot be part of JSON, as text.
    Stray(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    Double,
    Single,
}

#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    /// Inside a string opened by this quote.
    string: Option<Quote>,
    escaped: bool,
    /// Where the current string starts in `buf`.
    string_start: usize,
    /// A top-level token that is not an object or array.
    in_scalar: bool,
    /// Dropping input until the end of the line after an error.
    skipping: bool,
}

/// Bytes that start no JSON token and may not stand outside a string.
fn stray_outside_string(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b' ' | b'\t' | b'\r' | b'\n')) || b >= 0x7f
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
        if let Some(quote) = self.string {
            self.string_byte(quote, b, out);
            return;
        }
        if self.in_scalar && self.depth == 0 {
            if !(b.is_ascii_whitespace() || b == b'{' || b == b'[') {
                self.token_byte(b, out);
                return;
            }
            self.emit(out);
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
                    self.token_byte(b, out);
                }
            }
            return;
        }
        match b {
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    self.fail(Frame::TooDeep, out);
                } else {
                    self.keep(b, out);
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                self.keep(b, out);
                if self.depth == 0 && !self.skipping {
                    self.emit(out);
                }
            }
            _ => self.token_byte(b, out),
        }
    }

    /// A byte outside strings that is not a bracket.
    fn token_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        match b {
            b'"' | b'\'' => {
                self.string = Some(if b == b'"' {
                    Quote::Double
                } else {
                    Quote::Single
                });
                self.string_start = self.buf.len();
                self.keep(b'"', out);
            }
            _ if stray_outside_string(b) => {
                self.stray(vec![b], out);
            }
            _ => self.keep(b, out),
        }
    }

    fn string_byte(&mut self, quote: Quote, b: u8, out: &mut Vec<Frame>) {
        if self.escaped {
            self.escaped = false;
            if b == b'\'' {
                // QEMU's \' escape: the quote itself, which needs none in
                // standard JSON.
                self.buf.pop();
                self.keep(b, out);
                return;
            }
        } else if b == b'\\' {
            self.escaped = true;
        } else if b < 0x20 {
            let mut text = self.buf.split_off(self.string_start);
            if quote == Quote::Single {
                text[0] = b'\'';
            }
            text.push(b);
            self.stray(text, out);
            return;
        } else if (b == b'"' && quote == Quote::Double) || (b == b'\'' && quote == Quote::Single) {
            self.string = None;
            self.keep(b'"', out);
            return;
        } else if b == b'"' {
            self.keep(b'\\', out);
        }
        self.keep(b, out);
    }

    fn keep(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.skipping {
            return;
        }
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

    /// Drops the message being read and reads on from the next byte.
    fn stray(&mut self, text: Vec<u8>, out: &mut Vec<Frame>) {
        out.push(Frame::Stray(String::from_utf8_lossy(&text).into_owned()));
        self.buf.clear();
        self.reset();
    }

    /// Drops the message being read and the rest of its line.
    fn fail(&mut self, why: Frame, out: &mut Vec<Frame>) {
        out.push(why);
        self.buf = Vec::new();
        self.reset();
        self.skipping = true;
    }

    fn reset(&mut self) {
        self.depth = 0;
        self.string = None;
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

    #[test]
    fn raw_newline_in_a_string_is_an_error_and_reading_goes_on() {
        assert_eq!(
            split(&["{\"execute\": \"qu\n", "{\"execute\":\"x\"}\n"]),
            ["Stray(\"\\\"qu\\n\")", "{\"execute\":\"x\"}"]
        );
    }

    #[test]
    fn stray_bytes_outside_strings_end_the_message() {
        assert_eq!(
            split(&["{\"a\":\u{1}1}{}"]),
            ["Stray(\"\\u{1}\")", "1}", "{}"]
        );
    }

    #[test]
    fn non_ascii_outside_strings_is_stray_but_inside_is_kept() {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.push(b"\xff{\"a\":\"\xc3\xa9\"}", &mut out);
        assert_eq!(
            out,
            [
                Frame::Stray("\u{fffd}".into()),
                Frame::Message(b"{\"a\":\"\xc3\xa9\"}".to_vec())
            ]
        );
    }

    #[test]
    fn single_quoted_strings_become_standard_json() {
        assert_eq!(
            split(&[r#"{'execute': 'say "hi" it\'s'}"#]),
            [r#"{"execute": "say \"hi\" it's"}"#]
        );
    }

    #[test]
    fn top_level_string_with_spaces_is_one_scalar() {
        assert_eq!(split(&["\"a b\" {}"]), ["\"a b\"", "{}"]);
    }

    #[test]
    fn message_after_too_large_input_on_the_next_line_is_read() {
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_MESSAGE));
        assert_eq!(split(&[&big, "\n{}"]), ["TooLarge", "{}"]);
    }
}
