//! QEMU's "keyval" option syntax (`key=value,key.sub=value,...`), turned
//! into a JSON tree.
//!
//! The rules follow QEMU's `util/keyval.c`:
//!
//! * An option string is a comma-separated list of `key=value` pairs; a
//!   trailing comma is allowed and `,,` inside a value stands for one comma.
//! * A key is a dot-separated path.  Its first fragment, and every fragment
//!   that does not start with a digit, must be a QAPI name (a letter, then
//!   letters, digits, `-` or `_`; optionally behind a `__RFQDN_` prefix).
//!   Fragments after the first may instead be decimal list indexes.
//!   Fragments are at most 127 characters long.
//! * Every key names a leaf; leaves are always JSON strings.  Inner nodes
//!   are objects, or arrays when all their members are indexes.  The set of
//!   indexes of an array must be `0..n` without gaps.
//! * The same leaf given twice: the last value wins.  A path used both as a
//!   leaf and as an inner node, or an inner node holding both indexes and
//!   names, is an error.
//! * With an implied key, the *first* element may be a bare value without
//!   `=`; it is then taken as the implied key's value, verbatim, up to the
//!   first `,` (no `,,` escaping there).  Later bare elements are errors.
//! * A bare `help` or `?` element asks for help, which the command line of
//!   vubd does not offer: it is reported as an error after the whole string
//!   parsed cleanly.

use serde_json::{Map, Value};
use thiserror::Error;

/// The longest key fragment QEMU accepts.
const MAX_FRAGMENT_LEN: usize = 127;

/// Largest list index QEMU distinguishes; larger ones are clamped to it.
const MAX_INDEX: usize = i32::MAX as usize;

/// Why an option string was rejected.  Messages are QEMU's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyvalError {
    /// A key is empty, or a fragment of it is neither a QAPI name nor an
    /// index (the whole key is given).
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// An element other than an implied first one has no `=`.
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    /// A one-fragment key longer than 127 characters.
    #[error("Parameter '{0}' is too long")]
    KeyTooLong(String),
    /// A fragment of a dotted key longer than 127 characters.
    #[error("Parameter fragment '{0}' is too long")]
    FragmentTooLong(String),
    /// The path is used both as a value and as an object, or holds both list
    /// indexes and member names.  The field is the path, without `.*`.
    #[error("Parameters '{0}.*' used inconsistently")]
    UsedInconsistently(String),
    /// A list lacks an index below its largest one (the missing key).
    #[error("Parameter '{0}' missing")]
    MissingIndex(String),
    /// `help` or `?` was given.
    #[error("Help is not available for this option")]
    HelpNotAvailable,
    /// The JSON form does not parse (the parser's own description).
    #[error("JSON parse error, {0}")]
    Json(String),
    /// The JSON form parsed, but not to an object.
    #[error("JSON parse error, expected an object")]
    JsonNotObject,
}

/// An option argument, remembering which syntax it came in.
///
/// JSON values carry their own types and are checked strictly against the
/// schema; keyval values are all strings and are converted leniently
/// (`on`/`off`, numbers written as strings, ...).  Either way the value is
/// a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    /// Given as a JSON object (the argument started with `{`).
    Json(Value),
    /// Given in keyval syntax; every leaf is a string.
    Keyval(Value),
}

impl OptionValue {
    /// The parsed object.
    #[must_use]
    pub fn value(&self) -> &Value {
        match self {
            OptionValue::Json(v) | OptionValue::Keyval(v) => v,
        }
    }

    /// The parsed object, by value.
    #[must_use]
    pub fn into_value(self) -> Value {
        match self {
            OptionValue::Json(v) | OptionValue::Keyval(v) => v,
        }
    }

    /// Whether the argument was JSON (typed strictly later on).
    #[must_use]
    pub fn is_json(&self) -> bool {
        matches!(self, OptionValue::Json(_))
    }
}

/// Parses an option argument that may be JSON or keyval, as QEMU's
/// `--blockdev`, `--export`, `--monitor` and `--object` do: an argument
/// whose first non-blank character is `{` is JSON and must be an object;
/// anything else is keyval with `implied_key`.
///
/// # Errors
///
/// [`KeyvalError::Json`] or [`KeyvalError::JsonNotObject`] for bad JSON,
/// or any error of [`parse_keyval`].
pub fn parse_option(input: &str, implied_key: Option<&str>) -> Result<OptionValue, KeyvalError> {
    if input.trim_start().starts_with('{') {
        let value: Value =
            serde_json::from_str(input).map_err(|e| KeyvalError::Json(e.to_string()))?;
        if value.is_object() {
            Ok(OptionValue::Json(value))
        } else {
            Err(KeyvalError::JsonNotObject)
        }
    } else {
        parse_keyval(input, implied_key).map(OptionValue::Keyval)
    }
}

/// Parses a keyval string into a JSON object (see the module docs).
///
/// `implied_key`, when given, is the key of a bare first element, e.g.
/// `driver` makes `file,filename=a.img` mean `driver=file,filename=a.img`.
///
/// # Errors
///
/// A [`KeyvalError`] naming the offending key, worded as QEMU words it.
pub fn parse_keyval(input: &str, implied_key: Option<&str>) -> Result<Value, KeyvalError> {
    let mut root = Map::new();
    let mut implied = implied_key;
    let mut help = false;
    let mut rest = input;
    while !rest.is_empty() {
        rest = parse_element(&mut root, rest, implied.take(), &mut help)?;
    }
    if help {
        return Err(KeyvalError::HelpNotAvailable);
    }
    listify(root, "")
}

/// Parses one element at the start of `params` into `root` and returns the
/// text after it (and after its terminating comma).
fn parse_element<'a>(
    root: &mut Map<String, Value>,
    params: &'a str,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<&'a str, KeyvalError> {
    let key_len = params.find(['=', ',']).unwrap_or(params.len());
    let (key, after_key) = params.split_at(key_len);

    if !key.is_empty() && !after_key.starts_with('=') {
        if key == "help" || key == "?" {
            *help = true;
            return Ok(skip_comma(after_key));
        }
        if let Some(implied) = implied_key {
            root.insert(implied.to_string(), Value::String(key.to_string()));
            return Ok(skip_comma(after_key));
        }
    }

    // Walk the fragments.  As in QEMU, a fragment is checked before the
    // object for the fragment in front of it is created; `node` is the
    // object that fragment lives in.
    let mut node = root;
    let mut pos = 0;
    let mut parent: Option<(&str, usize)> = None;
    let leaf = loop {
        let rest = key.get(pos..).unwrap_or("");
        let len = if parent.is_some() && rest.starts_with(|c: char| c.is_ascii_digit()) {
            rest.bytes().take_while(u8::is_ascii_digit).count()
        } else {
            qapi_name_len(rest)
        };
        if len == 0 || rest.as_bytes().get(len).is_some_and(|&b| b != b'.') {
            return Err(KeyvalError::InvalidParameter(key.to_string()));
        }
        let fragment = rest.get(..len).unwrap_or("");
        if len > MAX_FRAGMENT_LEN {
            let whole = parent.is_none() && len == key.len();
            return Err(if whole {
                KeyvalError::KeyTooLong(fragment.to_string())
            } else {
                KeyvalError::FragmentTooLong(fragment.to_string())
            });
        }
        if let Some((name, name_end)) = parent.take() {
            node = descend(node, name, key.get(..name_end).unwrap_or(key))?;
        }
        let end = pos + len;
        if end >= key.len() {
            break fragment;
        }
        // A dot follows: `fragment` is an inner node.
        parent = Some((fragment, end));
        pos = end + 1;
    };

    let Some(value_text) = after_key.strip_prefix('=') else {
        return Err(KeyvalError::ExpectedEquals(key.to_string()));
    };
    let (value, rest) = read_value(value_text);
    match node.get_mut(leaf) {
        Some(Value::Object(_)) => return Err(KeyvalError::UsedInconsistently(key.to_string())),
        Some(slot) => *slot = Value::String(value),
        None => {
            node.insert(leaf.to_string(), Value::String(value));
        }
    }
    Ok(rest)
}

/// Returns the object stored under `name` in `node`, creating it when
/// absent.  `path` names the member in the error when it holds a string.
fn descend<'m>(
    node: &'m mut Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<&'m mut Map<String, Value>, KeyvalError> {
    match node
        .entry(name.to_string())
        .or_insert_with(|| Value::Object(Map::new()))
    {
        Value::Object(map) => Ok(map),
        _ => Err(KeyvalError::UsedInconsistently(path.to_string())),
    }
}

/// Drops one leading comma, if there is one.
fn skip_comma(s: &str) -> &str {
    s.strip_prefix(',').unwrap_or(s)
}

/// Reads a value up to the first lone comma, turning `,,` into `,`.
/// Returns the value and the text after the terminating comma.
pub(crate) fn read_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    loop {
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, "");
            }
            Some(comma) => {
                let (before, from_comma) = rest.split_at(comma);
                value.push_str(before);
                match from_comma.strip_prefix(",,") {
                    Some(after) => {
                        value.push(',');
                        rest = after;
                    }
                    None => return (value, from_comma.get(1..).unwrap_or("")),
                }
            }
        }
    }
}

/// Length of the QAPI name at the start of `s`, or 0 when `s` does not
/// start with one.  A name is an optional downstream prefix `__RFQDN_`
/// (RFQDN made of letters, digits, `-` and `.`), then a letter, then
/// letters, digits, `-` and `_`.
pub(crate) fn qapi_name_len(s: &str) -> usize {
    let b = s.as_bytes();
    let mut p = 0;
    if b.first() == Some(&b'_') {
        if b.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while b
            .get(p)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        {
            p += 1;
        }
        if b.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !b.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while b
        .get(p)
        .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        p += 1;
    }
    p
}

/// The list index a digits-only key stands for, clamped as QEMU does.
fn index_of(key: &str) -> usize {
    key.bytes()
        .fold(0usize, |acc, d| {
            acc.saturating_mul(10)
                .saturating_add(usize::from(d.wrapping_sub(b'0')))
        })
        .min(MAX_INDEX)
}

/// Turns, bottom-up, every object whose members are all indexes into an
/// array.  `prefix` is the dotted path of `map` including a trailing dot
/// (empty for the root), used in messages.
fn listify(map: Map<String, Value>, prefix: &str) -> Result<Value, KeyvalError> {
    let mut has_index = false;
    let mut has_name = false;
    let mut members = Vec::with_capacity(map.len());
    for (key, value) in map {
        if key.starts_with(|c: char| c.is_ascii_digit()) {
            has_index = true;
        } else {
            has_name = true;
        }
        let value = match value {
            Value::Object(inner) => listify(inner, &format!("{prefix}{key}."))?,
            other => other,
        };
        members.push((key, value));
    }

    if has_index && has_name {
        let path = prefix.strip_suffix('.').unwrap_or(prefix);
        return Err(KeyvalError::UsedInconsistently(path.to_string()));
    }
    if !has_index {
        return Ok(Value::Object(members.into_iter().collect()));
    }

    // An index at or beyond the member count means some smaller index is
    // missing; it is dropped here and the gap is reported below.
    let count = members.len();
    let mut slots: Vec<Option<Value>> = vec![None; count];
    let mut highest = 0;
    for (key, value) in members {
        let index = index_of(&key);
        highest = highest.max(index);
        if let Some(slot) = slots.get_mut(index) {
            *slot = Some(value);
        }
    }
    let len = count.min(highest.saturating_add(1));
    let mut list = Vec::with_capacity(len);
    for (index, slot) in slots.into_iter().take(len).enumerate() {
        match slot {
            Some(value) => list.push(value),
            None => return Err(KeyvalError::MissingIndex(format!("{prefix}{index}"))),
        }
    }
    Ok(Value::Array(list))
}

#[cfg(test)]
#[path = "keyval_tests.rs"]
mod tests;
