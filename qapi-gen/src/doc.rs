//! Documentation blocks: which definition they describe, their text, and
//! the text of each member.

use crate::error::{Error, Pos};
use crate::syntax::RawDoc;

/// A parsed documentation block.
#[derive(Debug, Clone, Default)]
pub struct Doc {
    /// The name after the leading `@`.
    pub symbol: String,
    /// Free text of the definition, including sections such as `Since:`.
    pub body: Vec<String>,
    /// `@member: text` entries, in the order written.
    pub members: Vec<(String, String)>,
}

impl Doc {
    pub fn member(&self, name: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|(m, _)| m == name)
            .map(|(_, t)| t.as_str())
    }
}

/// Parses a raw block. The first line must be `@Symbol:` (the colon may be
/// left out, as older schemas did).
pub fn parse(raw: &RawDoc) -> Result<(Doc, Pos), Error> {
    let mut lines = raw.lines.iter();
    let first = lines.next().map(|l| l.trim()).unwrap_or("");
    let Some(symbol) = first.strip_prefix('@') else {
        return Err(Error::new(
            raw.pos.clone(),
            "documentation block must start with '@Name:'",
        ));
    };
    let symbol = symbol.trim_end_matches(':').trim().to_string();
    let mut doc = Doc {
        symbol,
        ..Doc::default()
    };
    // Text goes to the last member while it is being described, and to the
    // body once a blank line or a section heading ends the member list.
    let mut in_member = false;
    for line in lines {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix('@') {
            if let Some((name, text)) = rest.split_once(':') {
                if !name.is_empty() && !name.contains(' ') {
                    doc.members
                        .push((name.to_string(), text.trim().to_string()));
                    in_member = true;
                    continue;
                }
            }
        }
        if trimmed.is_empty() {
            in_member = false;
            if doc.body.last().is_some_and(|l| !l.is_empty()) {
                doc.body.push(String::new());
            }
            continue;
        }
        if in_member && line.starts_with(' ') {
            if let Some((_, text)) = doc.members.last_mut() {
                text.push(' ');
                text.push_str(trimmed);
            }
            continue;
        }
        in_member = false;
        doc.body.push(line.trim_end().to_string());
    }
    while doc.body.last().is_some_and(|l| l.is_empty()) {
        doc.body.pop();
    }
    Ok((doc, raw.pos.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn raw(lines: &[&str]) -> RawDoc {
        RawDoc {
            pos: Pos {
                file: Rc::from("t.json"),
                line: 1,
            },
            lines: lines.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn splits_body_members_and_continuations() {
        let (doc, _) = parse(&raw(&[
            "@Thing:",
            "",
            "What a thing is.",
            "",
            "@size: how big it is,",
            "        in bytes",
            "@name: what it is called",
            "",
            "Since: 1.0",
        ]))
        .unwrap();
        assert_eq!(doc.symbol, "Thing");
        assert_eq!(doc.body, ["What a thing is.", "", "Since: 1.0"]);
        assert_eq!(doc.member("size"), Some("how big it is, in bytes"));
        assert_eq!(doc.member("name"), Some("what it is called"));
    }

    #[test]
    fn block_without_symbol_is_an_error() {
        let err = parse(&raw(&["Just text"])).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("t.json:1: documentation block must start with '@Name:'")
        );
    }
}
