//! Runtime support for the code qapi-gen writes: reading QAPI values out of
//! JSON (from QMP) or keyval strings (from the command line), with error
//! messages worded as QEMU words them.
//!
//! QMP input is typed strictly: an integer member must be a JSON number.
//! Keyval input has only strings at its leaves, and each is converted to
//! the member's type (`on`/`off` for booleans, size suffixes for sizes).

use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;

/// Where the input came from, which decides how scalars are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Json,
    Keyval,
}

#[derive(Debug, Clone, Copy)]
enum Seg<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

/// The place of a value inside the input, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    parent: Option<&'a At<'a>>,
    seg: Seg<'a>,
    syntax: Syntax,
}

impl At<'static> {
    pub fn root(syntax: Syntax) -> Self {
        At {
            parent: None,
            seg: Seg::Root,
            syntax,
        }
    }
}

impl<'a> At<'a> {
    pub fn key(&'a self, key: &'a str) -> At<'a> {
        At {
            parent: Some(self),
            seg: Seg::Key(key),
            syntax: self.syntax,
        }
    }

    pub fn index(&'a self, i: usize) -> At<'a> {
        At {
            parent: Some(self),
            seg: Seg::Index(i),
            syntax: self.syntax,
        }
    }

    pub fn is_keyval(&self) -> bool {
        self.syntax == Syntax::Keyval
    }

    /// The dotted name QEMU uses in messages: `file.filename`, `a[0].b`;
    /// `null` for the whole input.
    pub fn full_name(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut cur = Some(self);
        while let Some(at) = cur {
            match at.seg {
                Seg::Root => {}
                Seg::Key(k) => parts.push(format!(".{k}")),
                Seg::Index(i) => parts.push(format!("[{i}]")),
            }
            cur = at.parent;
        }
        let name: String = parts.into_iter().rev().collect();
        match name.strip_prefix('.') {
            Some(rest) => rest.to_string(),
            None if name.is_empty() => "null".to_string(),
            None => name,
        }
    }
}

/// A value that does not fit the schema. Its class is always
/// GenericError; the text is QEMU's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub desc: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for InputError {}

impl InputError {
    pub fn missing(at: &At<'_>) -> Self {
        Self::new(format!("Parameter '{}' is missing", at.full_name()))
    }

    pub fn unexpected(at: &At<'_>) -> Self {
        Self::new(format!("Parameter '{}' is unexpected", at.full_name()))
    }

    /// The JSON type is wrong: `expected` is QEMU's word for what was
    /// wanted (integer, boolean, string, object, array, number, null) or
    /// the name of an alternate.
    pub fn wrong_type(at: &At<'_>, expected: &str) -> Self {
        Self::new(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            at.full_name()
        ))
    }

    /// The type is right but the value is not acceptable.
    pub fn expects(at: &At<'_>, what: &str) -> Self {
        Self::new(format!("Parameter '{}' expects {what}", at.full_name()))
    }

    pub fn bad_value(at: &At<'_>, value: &str) -> Self {
        Self::new(format!(
            "Parameter '{}' does not accept value '{value}'",
            at.full_name()
        ))
    }

    pub fn internal(what: &str) -> Self {
        Self::new(format!("Internal error: {what}"))
    }

    pub fn new(desc: impl Into<String>) -> Self {
        InputError { desc: desc.into() }
    }
}

pub type Res<T> = Result<T, InputError>;

/// Reading a schema type out of a JSON value.
pub trait FromQapi: Sized {
    fn from_qapi(v: &Value, at: &At<'_>) -> Res<Self>;
}

/// Reads a whole value given on the command line or over QMP.
pub fn read<T: FromQapi>(v: &Value, syntax: Syntax) -> Res<T> {
    T::from_qapi(v, &At::root(syntax))
}

/// The JSON type of a value, for choosing an alternate's branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    String,
    Number,
    Bool,
    Null,
    Object,
    Array,
}

impl Shape {
    pub fn of(v: &Value) -> Self {
        match v {
            Value::String(_) => Shape::String,
            Value::Number(_) => Shape::Number,
            Value::Bool(_) => Shape::Bool,
            Value::Null => Shape::Null,
            Value::Object(_) => Shape::Object,
            Value::Array(_) => Shape::Array,
        }
    }
}

impl FromQapi for String {
    fn from_qapi(v: &Value, at: &At<'_>) -> Res<Self> {
        match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(InputError::wrong_type(at, "string")),
        }
    }
}

impl FromQapi for bool {
    fn from_qapi(v: &Value, at: &At<'_>) -> Res<Self> {
        match (v, at.syntax) {
            (Value::Bool(b), Syntax::Json) => Ok(*b),
            (Value::String(s), Syntax::Keyval) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(true),
                "off" | "no" | "false" | "n" => Ok(false),
                _ => Err(InputError::expects(at, "'on' or 'off'")),
            },
            _ => Err(InputError::wrong_type(at, "boolean")),
        }
    }
}

/// Parses an integer as QEMU's keyval input does: decimal, `0x` hex or
/// leading-zero octal, with an optional sign.
fn parse_keyval_int(s: &str) -> Option<i128> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let magnitude = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i128::from_str_radix(hex, 16).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        i128::from_str_radix(&body[1..], 8).ok()?
    } else {
        body.parse::<i128>().ok()?
    };
    if body.is_empty() || body.starts_with(['+', '-']) {
        return None;
    }
    Some(if neg { -magnitude } else { magnitude })
}

/// Reads any integer as i128, then the caller narrows it.
fn integer(v: &Value, at: &At<'_>) -> Res<i128> {
    match (v, at.syntax) {
        (Value::Number(n), Syntax::Json) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .ok_or_else(|| InputError::expects(at, "integer")),
        (Value::String(s), Syntax::Keyval) => {
            parse_keyval_int(s).ok_or_else(|| InputError::expects(at, "integer"))
        }
        _ => Err(InputError::wrong_type(at, "integer")),
    }
}

macro_rules! integer_type {
    ($t:ty, $name:literal) => {
        impl FromQapi for $t {
            fn from_qapi(v: &Value, at: &At<'_>) -> Res<Self> {
                <$t>::try_from(integer(v, at)?).map_err(|_| InputError::expects(at, $name))
            }
        }
    };
}

integer_type!(i8, "int8_t");
integer_type!(i16, "int16_t");
integer_type!(i32, "int32_t");
integer_type!(i64, "integer");
integer_type!(u8, "uint8_t");
integer_type!(u16, "uint16_t");
integer_type!(u32, "uint32_t");
integer_type!(u64, "uint64_t");

impl FromQapi for f64 {
    fn from_qapi(v: &Value, at: &At<'_>) -> Res<Self> {
        match (v, at.syntax) {
            (Value::Number(n), Syntax::Json) => {
                n.as_f64().ok_or_else(|| InputError::expects(at, "number"))
            }
            (Value::String(s), Syntax::Keyval) => s
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| InputError::expects(at, "number")),
            _ => Err(InputError::wrong_type(at, "number")),
        }
    }
}

impl FromQapi for () {
    fn from_qapi(v: &Value, at: &At<'_>) -> Res<Self> {
        match v {
            Value::Null => Ok(()),
            _ => Err(InputError::wrong_type(at, "null")),
        }
    }
}

impl FromQapi for Value {
    fn from_qapi(v: &Value, _at: &At<'_>) -> Res<Self> {
        Ok(v.clone())
    }
}

/// The `size` type: a byte count. Keyval input may carry a suffix
/// (`k`, `M`, `G`, `T`, `P`, `E`, powers of 1024) and a fraction (`1.5G`).
pub fn size(v: &Value, at: &At<'_>) -> Res<u64> {
    match (v, at.syntax) {
        (Value::Number(n), Syntax::Json) => n
            .as_u64()
            .ok_or_else(|| InputError::expects(at, "uint64_t")),
        (Value::String(s), Syntax::Keyval) => {
            parse_size(s).ok_or_else(|| InputError::expects(at, "size"))
        }
        _ => Err(InputError::wrong_type(at, "integer")),
    }
}

/// Parses a byte count with an optional binary suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    if num.is_empty() || num.starts_with('.') {
        return None;
    }
    if let Ok(whole) = num.parse::<u64>() {
        return whole.checked_mul(1u64 << shift);
    }
    // A fraction is only meaningful with a suffix.
    if shift == 0 {
        return None;
    }
    let f: f64 = num.parse().ok()?;
    let bytes = f * (1u64 << shift) as f64;
    if (0.0..18_446_744_073_709_551_616.0).contains(&bytes) {
        Some(bytes as u64)
    } else {
        None
    }
}

/// A list whose elements are read by `elem`.
pub fn list<T>(v: &Value, at: &At<'_>, elem: impl Fn(&Value, &At<'_>) -> Res<T>) -> Res<Vec<T>> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| elem(item, &at.index(i)))
            .collect(),
        _ => Err(InputError::wrong_type(at, "array")),
    }
}

/// A string that must be one of `names`; returns its index.
pub fn one_of(v: &Value, at: &At<'_>, names: &[&str]) -> Res<usize> {
    match v {
        Value::String(s) => names
            .iter()
            .position(|n| n == s)
            .ok_or_else(|| InputError::bad_value(at, s)),
        _ => Err(InputError::wrong_type(at, "string")),
    }
}

/// A command without arguments accepts only an empty object.
pub fn no_args(args: &Value, at: &At<'_>) -> Res<()> {
    let obj = Obj::new(args, at)?;
    obj.finish()
}

pub fn to_value<T: Serialize>(t: &T) -> Res<Value> {
    serde_json::to_value(t).map_err(|e| InputError::internal(&e.to_string()))
}

/// Reads the members of one JSON object, remembering which were used so
/// that the rest can be reported as unexpected.
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    at: &'a At<'a>,
    used: Vec<&'a str>,
}

impl<'a> Obj<'a> {
    pub fn new(v: &'a Value, at: &'a At<'a>) -> Res<Self> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                at,
                used: Vec::with_capacity(map.len()),
            }),
            _ => Err(InputError::wrong_type(at, "object")),
        }
    }

    pub fn req<T>(&mut self, key: &'a str, read: impl Fn(&Value, &At<'_>) -> Res<T>) -> Res<T> {
        match self.opt(key, read)? {
            Some(v) => Ok(v),
            None => Err(InputError::missing(&self.at.key(key))),
        }
    }

    pub fn opt<T>(
        &mut self,
        key: &'a str,
        read: impl Fn(&Value, &At<'_>) -> Res<T>,
    ) -> Res<Option<T>> {
        match self.map.get(key) {
            Some(v) => {
                self.used.push(key);
                read(v, &self.at.key(key)).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Fails on the first member nobody asked for.
    pub fn finish(self) -> Res<()> {
        match self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(k) => Err(InputError::unexpected(&self.at.key(k))),
            None => Ok(()),
        }
    }
}

/// Implements serde's `Deserialize` through [`FromQapi`], so serde users
/// get the same checks and messages as QMP.
macro_rules! deserialize_via_qapi {
    ($t:ty) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
                $crate::qapi::rt::read::<$t>(&v, $crate::qapi::rt::Syntax::Json)
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use deserialize_via_qapi;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn full_name_joins_keys_and_indexes() {
        let root = At::root(Syntax::Json);
        let a = root.key("a");
        let i = a.index(2);
        let b = i.key("b");
        assert_eq!(b.full_name(), "a[2].b");
        assert_eq!(root.full_name(), "null");
    }

    #[test]
    fn json_integer_rejects_string_with_qemu_words() {
        let root = At::root(Syntax::Json);
        let err = i64::from_qapi(&json!("5"), &root.key("size")).err();
        assert_eq!(
            err.map(|e| e.desc),
            Some("Invalid parameter type for 'size', expected: integer".into())
        );
    }

    #[test]
    fn keyval_integer_accepts_hex_and_rejects_words() {
        let root = At::root(Syntax::Keyval);
        assert_eq!(u16::from_qapi(&json!("0x10"), &root), Ok(16));
        let err = u16::from_qapi(&json!("ten"), &root.key("n")).err();
        assert_eq!(
            err.map(|e| e.desc),
            Some("Parameter 'n' expects integer".into())
        );
    }

    #[test]
    fn narrow_integer_out_of_range_names_c_type() {
        let root = At::root(Syntax::Json);
        let err = u16::from_qapi(&json!(70000), &root.key("q")).err();
        assert_eq!(
            err.map(|e| e.desc),
            Some("Parameter 'q' expects uint16_t".into())
        );
    }

    #[test]
    fn keyval_bool_takes_on_off() {
        let root = At::root(Syntax::Keyval);
        assert_eq!(bool::from_qapi(&json!("on"), &root), Ok(true));
        assert_eq!(bool::from_qapi(&json!("off"), &root), Ok(false));
        let err = bool::from_qapi(&json!("maybe"), &root.key("ro")).err();
        assert_eq!(
            err.map(|e| e.desc),
            Some("Parameter 'ro' expects 'on' or 'off'".into())
        );
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1Q"), None);
    }

    #[test]
    fn object_reports_missing_then_unexpected() {
        let root = At::root(Syntax::Json);
        let v = json!({"b": 1});
        let mut obj = Obj::new(&v, &root).unwrap();
        let err = obj.req("a", i64::from_qapi).err();
        assert_eq!(err.map(|e| e.desc), Some("Parameter 'a' is missing".into()));
        let v = json!({"a": 1, "b": 2});
        let mut obj = Obj::new(&v, &root).unwrap();
        assert_eq!(obj.req("a", i64::from_qapi), Ok(1));
        assert_eq!(
            obj.finish().err().map(|e| e.desc),
            Some("Parameter 'b' is unexpected".into())
        );
    }

    #[test]
    fn one_of_rejects_unknown_value() {
        let root = At::root(Syntax::Json);
        let err = one_of(&json!("x"), &root.key("driver"), &["file", "raw"]).err();
        assert_eq!(
            err.map(|e| e.desc),
            Some("Parameter 'driver' does not accept value 'x'".into())
        );
    }
}
