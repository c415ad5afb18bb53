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
    /// `@feature: text` entries of the `Features:` section. The section
    /// stays in the body as well, so generated documentation shows it.
    pub features: Vec<(String, String)>,
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
    // `Features:` starts a list of features that lasts until a line that
    // is neither blank, nor an `@feature:` entry, nor its continuation.
    let mut in_member = false;
    let mut in_features = false;
    for line in lines {
        let trimmed = line.trim();
        if trimmed == "Features:" {
            in_features = true;
            in_member = false;
            doc.body.push(trimmed.to_string());
            continue;
        }
        if in_features {
            if let Some((name, text)) = entry(trimmed) {
                doc.features
                    .push((name.to_string(), text.trim().to_string()));
                doc.body.push(line.trim_end().to_string());
                continue;
            }
            if trimmed.is_empty() {
                continue;
            }
            if line.starts_with(' ') {
                if let Some((_, text)) = doc.features.last_mut() {
                    text.push(' ');
                    text.push_str(trimmed);
                    doc.body.push(line.trim_end().to_string());
                    continue;
                }
            }
            in_features = false;
        }
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

/// `@name: text` split into name and text.
fn entry(line: &str) -> Option<(&str, &str)> {
    let (name, text) = line.strip_prefix('@')?.split_once(':')?;
    (!name.is_empty() && !name.contains(' ')).then_some((name, text))
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
    fn features_section_is_parsed_and_kept_in_the_body() {
        let (doc, _) = parse(&raw(&[
            "@old-cmd:",
            "Does a thing the old way.",
            "@arg: what to do it to",
            "Features:",
            "@deprecated: use new-cmd,",
            "    which does it better",
            "Since: 2.0",
        ]))
        .unwrap();
        assert_eq!(doc.member("arg"), Some("what to do it to"));
        assert_eq!(
            doc.features,
            [(
                "deprecated".to_string(),
                "use new-cmd, which does it better".to_string()
            )]
        );
        assert_eq!(
            doc.body,
            [
                "Does a thing the old way.",
                "Features:",
                "@deprecated: use new-cmd,",
                "    which does it better",
                "Since: 2.0"
            ]
        );
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
