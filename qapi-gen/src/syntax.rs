//! Reading QAPI schema text: a JSON-like language with single-quoted
//! strings, `#` comments and `##` documentation blocks.
//!
//! The reader keeps the order of dictionary keys (member order is part of
//! the API) and the line of every value, so later checks can point at the
//! exact place of a mistake.

use crate::error::{Error, Pos};
use std::rc::Rc;

/// One value of the schema language.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Bool(bool),
    List(Vec<Spanned>),
    Dict(Vec<(String, Spanned)>),
}

/// A value together with the place it starts at.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned {
    pub pos: Pos,
    pub value: Value,
}

impl Spanned {
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Str(_) => "a string",
            Value::Bool(_) => "a boolean",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dictionary",
        }
    }
}

/// A top-level expression and the documentation block right before it.
#[derive(Debug, Clone)]
pub struct TopLevel {
    pub expr: Spanned,
    pub doc: Option<RawDoc>,
}

/// The lines of a `##` documentation block, without their leading `#`.
#[derive(Debug, Clone)]
pub struct RawDoc {
    pub pos: Pos,
    pub lines: Vec<String>,
}

struct Reader<'a> {
    file: Rc<str>,
    text: &'a [u8],
    at: usize,
    line: u32,
    /// The documentation block seen since the last expression, if any.
    pending_doc: Option<RawDoc>,
    /// Set when something other than blank lines came after `pending_doc`.
    doc_detached: bool,
}

/// Splits a schema file into its top-level expressions.
pub fn parse_file(file: &str, text: &str) -> Result<Vec<TopLevel>, Error> {
    let mut r = Reader {
        file: Rc::from(file),
        text: text.as_bytes(),
        at: 0,
        line: 1,
        pending_doc: None,
        doc_detached: false,
    };
    let mut out = Vec::new();
    loop {
        r.skip_space_and_comments()?;
        if r.at >= r.text.len() {
            if let Some(doc) = r.pending_doc.take() {
                return Err(Error::new(
                    doc.pos,
                    "documentation block is not followed by a definition",
                ));
            }
            return Ok(out);
        }
        let doc = if r.doc_detached {
            None
        } else {
            r.pending_doc.take()
        };
        r.pending_doc = None;
        let expr = r.value()?;
        if !matches!(expr.value, Value::Dict(_)) {
            let found = expr.kind();
            return Err(Error::new(
                expr.pos,
                format!("a top-level expression must be a dictionary, found {found}"),
            ));
        }
        out.push(TopLevel { expr, doc });
    }
}

impl Reader<'_> {
    fn pos(&self) -> Pos {
        Pos {
            file: self.file.clone(),
            line: self.line,
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::new(self.pos(), msg)
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn rest_of_line(&mut self) -> String {
        let start = self.at;
        while let Some(c) = self.peek() {
            if c == b'\n' {
                break;
            }
            self.at += 1;
        }
        String::from_utf8_lossy(&self.text[start..self.at]).into_owned()
    }

    fn at_line_start(&self) -> bool {
        self.at == 0 || self.text.get(self.at - 1) == Some(&b'\n')
    }

    fn skip_space_and_comments(&mut self) -> Result<(), Error> {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' | b'\n' => {
                    self.bump();
                }
                b'#' => {
                    let line_start = self.at_line_start();
                    let pos = self.pos();
                    let text = self.rest_of_line();
                    if line_start && text.trim_end() == "##" {
                        self.read_doc_block(pos)?;
                    } else if self.pending_doc.is_some() {
                        // A plain comment between a doc block and its
                        // definition separates the two.
                        self.doc_detached = true;
                    }
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn read_doc_block(&mut self, pos: Pos) -> Result<(), Error> {
        let mut lines = Vec::new();
        loop {
            if self.bump().is_none() {
                return Err(Error::new(pos, "documentation block is not closed by '##'"));
            }
            if self.peek() != Some(b'#') {
                return Err(self.err("documentation block is not closed by '##'"));
            }
            let text = self.rest_of_line();
            if text.trim_end() == "##" {
                break;
            }
            let body = text.strip_prefix('#').unwrap_or(&text);
            let body = body.strip_prefix(' ').unwrap_or(body);
            lines.push(body.trim_end().to_string());
        }
        self.pending_doc = Some(RawDoc { pos, lines });
        self.doc_detached = false;
        Ok(())
    }

    fn value(&mut self) -> Result<Spanned, Error> {
        self.skip_space_and_comments()?;
        let pos = self.pos();
        let value = match self.peek() {
            Some(b'{') => self.dict()?,
            Some(b'[') => self.list()?,
            Some(b'\'') => Value::Str(self.string()?),
            Some(c) if c.is_ascii_alphabetic() => self.word()?,
            Some(c) => return Err(self.err(format!("unexpected character '{}'", c as char))),
            None => return Err(self.err("unexpected end of file")),
        };
        Ok(Spanned { pos, value })
    }

    fn word(&mut self) -> Result<Value, Error> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric()) {
            self.at += 1;
        }
        match &self.text[start..self.at] {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            w => Err(self.err(format!(
                "unexpected word '{}' (only 'true' and 'false' are allowed)",
                String::from_utf8_lossy(w)
            ))),
        }
    }

    fn string(&mut self) -> Result<String, Error> {
        let start = self.pos();
        self.bump(); // opening quote
        let mut bytes = Vec::new();
        loop {
            match self.bump() {
                None | Some(b'\n') => return Err(Error::new(start, "string is not terminated")),
                Some(b'\'') => break,
                Some(b'\\') => match self.bump() {
                    Some(c @ (b'\\' | b'\'' | b'/' | b'"')) => bytes.push(c),
                    _ => return Err(self.err("unknown escape sequence in string")),
                },
                Some(c) => bytes.push(c),
            }
        }
        String::from_utf8(bytes).map_err(|_| self.err("string is not valid UTF-8"))
    }

    fn expect_separator(&mut self, close: u8, what: &str) -> Result<bool, Error> {
        self.skip_space_and_comments()?;
        match self.bump() {
            Some(b',') => Ok(false),
            Some(c) if c == close => Ok(true),
            _ => Err(self.err(format!("expected ',' or '{}' in {}", close as char, what))),
        }
    }

    fn list(&mut self) -> Result<Value, Error> {
        self.bump();
        let mut items = Vec::new();
        self.skip_space_and_comments()?;
        if self.peek() == Some(b']') {
            self.bump();
            return Ok(Value::List(items));
        }
        loop {
            items.push(self.value()?);
            if self.expect_separator(b']', "list")? {
                return Ok(Value::List(items));
            }
        }
    }

    fn dict(&mut self) -> Result<Value, Error> {
        self.bump();
        let mut entries: Vec<(String, Spanned)> = Vec::new();
        self.skip_space_and_comments()?;
        if self.peek() == Some(b'}') {
            self.bump();
            return Ok(Value::Dict(entries));
        }
        loop {
            self.skip_space_and_comments()?;
            if self.peek() != Some(b'\'') {
                return Err(self.err("expected a string key in dictionary"));
            }
            let key_line = self.pos();
            let key = self.string()?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(Error::new(key_line, format!("duplicate key '{key}'")));
            }
            self.skip_space_and_comments()?;
            if self.bump() != Some(b':') {
                return Err(self.err(format!("expected ':' after key '{key}'")));
            }
            let value = self.value()?;
            entries.push((key, value));
            if self.expect_separator(b'}', "dictionary")? {
                return Ok(Value::Dict(entries));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_key_order_and_lines() {
        let exprs = parse_file(
            "t.json",
            "\n{ 'struct': 'S',\n  'data': { 'b': 'int', 'a': 'str' } }\n",
        )
        .unwrap();
        assert_eq!(exprs.len(), 1);
        assert_eq!(exprs[0].expr.pos.line, 2);
        let Value::Dict(d) = &exprs[0].expr.value else {
            panic!("not a dict")
        };
        let Value::Dict(members) = &d[1].1.value else {
            panic!("data not a dict")
        };
        let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(members[0].1.pos.line, 3);
    }

    #[test]
    fn attaches_doc_block_to_following_definition() {
        let text = "##\n# @E:\n#\n# Words.\n##\n{ 'enum': 'E', 'data': [] }\n";
        let exprs = parse_file("t.json", text).unwrap();
        let doc = exprs[0].doc.as_ref().map(|d| d.lines.clone());
        assert_eq!(doc, Some(vec!["@E:".into(), "".into(), "Words.".into()]));
    }

    #[test]
    fn unterminated_string_is_reported_with_line() {
        let err = parse_file("t.json", "{ 'enum': 'E',\n 'data': ['a }\n")
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("t.json:2: string is not terminated"));
    }

    #[test]
    fn duplicate_key_is_reported() {
        let err = parse_file("t.json", "{ 'enum': 'E', 'enum': 'F' }")
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("t.json:1: duplicate key 'enum'"));
    }
}
