//! QMP's JSON as QEMU speaks it: input objects may not repeat a key, and
//! output is spelled the way QEMU's writer spells it (`", "` and `": "`
//! between members, characters outside printable ASCII as `\uXXXX` with
//! upper-case digits, and its pretty layout), so that scripts comparing
//! text see the same bytes from vubd as from QEMU.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::ser::{CharEscape, Formatter};
use serde_json::{Map, Value};
use std::fmt;
use std::io::{self, Write};

/// Parses one message. Errors read like serde's, without the position
/// where QEMU gives none (`duplicate key`).
pub fn parse(text: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let parsed = Strict::deserialize(&mut de).and_then(|v| de.end().map(|()| v.0));
    parsed.map_err(|e| {
        let full = e.to_string();
        let at = format!(" at line {} column {}", e.line(), e.column());
        match full.strip_suffix(&at) {
            Some(msg) if msg == DUPLICATE_KEY => msg.to_string(),
            _ => full,
        }
    })
}

const DUPLICATE_KEY: &str = "duplicate key";

/// A JSON value read with QEMU's rule that an object's keys are unique.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if members.insert(key, v).is_some() {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
        }
        Ok(Value::Object(members))
    }
}

/// Writes `msg` as QEMU would, compact or pretty.
pub fn to_vec(msg: &Value, pretty: bool) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuStyle { pretty, depth: 0 });
    serde::Serialize::serialize(msg, &mut ser).map_err(io::Error::other)?;
    Ok(out)
}

/// serde_json's formatter hooks, spelled QEMU's way.
struct QemuStyle {
    pretty: bool,
    depth: usize,
}

impl QemuStyle {
    fn open<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth += 1;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth -= 1;
        // QEMU's pretty printer breaks the line even when the container
        // is empty.
        if self.pretty {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn member<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(if self.pretty { b"," } else { b", " })?;
        }
        if self.pretty {
            self.newline(w)?;
        }
        Ok(())
    }

    fn newline<W: ?Sized + Write>(&self, w: &mut W) -> io::Result<()> {
        // QEMU's monitor ends every line it writes with CRLF.
        w.write_all(b"\r\n")?;
        for _ in 0..self.depth {
            w.write_all(b"    ")?;
        }
        Ok(())
    }
}

impl Formatter for QemuStyle {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.member(w, first)
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.member(w, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut plain = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() && c != '\x7f' {
                continue;
            }
            w.write_all(&fragment.as_bytes()[plain..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(w, "\\u{:04X}", unit)?;
            }
            plain = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[plain..])
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        let text: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(b) => return write!(w, "\\u{:04X}", b),
        };
        w.write_all(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compact(v: &Value) -> String {
        String::from_utf8(to_vec(v, false).unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn compact_output_has_qemu_separators() {
        let v = json!({"return": {"a": [1, 2, {}], "b": []}, "id": "x"});
        assert_eq!(
            compact(&v),
            r#"{"return": {"a": [1, 2, {}], "b": []}, "id": "x"}"#
        );
    }

    #[test]
    fn non_ascii_and_controls_are_escaped_in_upper_case() {
        let v = json!("caf\u{e9}\u{7f}\u{1f}\u{1f600}\n\"");
        assert_eq!(compact(&v), r#""caf\u00E9\u007F\u001F\uD83D\uDE00\n\"""#);
    }

    #[test]
    fn pretty_output_breaks_empty_containers_like_qemu() {
        let v = json!({"return": {}, "id": [1, []]});
        let text = String::from_utf8(to_vec(&v, true).unwrap_or_default()).unwrap_or_default();
        assert_eq!(
            text,
            "{\n    \"return\": {\n    },\n    \"id\": [\n        1,\n        [\n        ]\n    ]\n}"
                .replace('\n', "\r\n")
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert_eq!(
            parse(br#"{"execute": "x", "arguments": {"a": 1, "a": 2}}"#),
            Err("duplicate key".to_string())
        );
    }

    #[test]
    fn trailing_text_is_an_error() {
        assert!(parse(b"{} x").is_err());
    }

    #[test]
    fn values_round_trip() {
        let text = br#"{"a": [true, null, -3, 18446744073709551615, 0.5, "s"]}"#;
        assert_eq!(
            parse(text),
            Ok(json!({"a": [true, null, -3, 18446744073709551615u64, 0.5, "s"]}))
        );
    }
}
