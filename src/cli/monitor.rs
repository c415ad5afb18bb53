//! `--monitor`: QAPI `MonitorOptions` (`id`, `mode`, `pretty`, `chardev`)
//! in keyval syntax with implied key `chardev`, or as JSON, as in
//! qemu-storage-daemon.  Only QMP (`mode=control`, the default there) is
//! available.

use serde_json::{Map, Value};
use thiserror::Error;

use super::chardev::ChardevSpec;
use super::keyval::{parse_option, KeyvalError};
use super::qemuopts::parse_bool;

/// A QMP monitor on a chardev defined earlier on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorSpec {
    /// The monitor's own id, if given.
    pub id: Option<String>,
    /// The id of the (listening) socket chardev it serves on.
    pub chardev: String,
    /// Pretty-print QMP responses.
    pub pretty: bool,
}

/// Why a `--monitor` argument was rejected.  Messages are QEMU's where it
/// has one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MonitorError {
    /// The argument does not parse.
    #[error("{0}")]
    Syntax(KeyvalError),
    /// A required member is absent.
    #[error("Parameter '{0}' is missing")]
    Missing(&'static str),
    /// A member `MonitorOptions` does not have.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// A member of the wrong JSON type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    WrongType {
        /// The member.
        name: &'static str,
        /// `string` or `boolean`.
        expected: &'static str,
    },
    /// A keyval boolean that is not a QEMU boolean.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsBool(&'static str),
    /// A `mode` that is not a `MonitorMode`.
    #[error("Parameter 'mode' does not accept value '{0}'")]
    BadMode(String),
    /// `mode=readline` (HMP).
    #[error("Only QMP is supported")]
    OnlyQmp,
    /// No earlier `--chardev` has this id.
    #[error("chardev \"{0}\" not found")]
    ChardevNotFound(String),
    /// The chardev connects instead of listening.
    #[error("chardev '{0}' is a client socket; vubd monitors only listen (use server=on)")]
    ClientChardev(String),
    /// Another monitor already uses the chardev.
    #[error("chardev '{0}' is already in use")]
    ChardevInUse(String),
}

/// Parses a `--monitor` argument.  `chardevs` are the chardevs defined so
/// far, `taken` the chardev ids earlier monitors use.
pub(crate) fn parse_monitor(
    arg: &str,
    chardevs: &[ChardevSpec],
    taken: &[String],
) -> Result<MonitorSpec, MonitorError> {
    let option = parse_option(arg, Some("chardev")).map_err(MonitorError::Syntax)?;
    let strict = option.is_json();
    let mut members = match option.into_value() {
        Value::Object(map) => map,
        _ => Map::new(),
    };

    // Members in schema order, as QEMU's visitor checks them.
    let id = take_str(&mut members, "id")?;
    let mode = take_str(&mut members, "mode")?;
    let pretty = take_bool(&mut members, "pretty", strict)?.unwrap_or(false);
    let chardev = take_str(&mut members, "chardev")?.ok_or(MonitorError::Missing("chardev"))?;
    if let Some(name) = members.keys().next() {
        return Err(MonitorError::Unexpected(name.clone()));
    }
    match mode.as_deref() {
        None | Some("control") => {}
        Some("readline") => return Err(MonitorError::OnlyQmp),
        Some(other) => return Err(MonitorError::BadMode(other.to_string())),
    }

    let Some(spec) = chardevs.iter().rev().find(|c| c.id == chardev) else {
        return Err(MonitorError::ChardevNotFound(chardev));
    };
    if !spec.server {
        return Err(MonitorError::ClientChardev(chardev));
    }
    if taken.contains(&chardev) {
        return Err(MonitorError::ChardevInUse(chardev));
    }
    Ok(MonitorSpec {
        id,
        chardev,
        pretty,
    })
}

fn take_str(
    members: &mut Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, MonitorError> {
    match members.remove(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(MonitorError::WrongType {
            name,
            expected: "string",
        }),
    }
}

/// A boolean member: a JSON `true`/`false` when `strict`, else a keyval
/// string such as `on` or `off`.
fn take_bool(
    members: &mut Map<String, Value>,
    name: &'static str,
    strict: bool,
) -> Result<Option<bool>, MonitorError> {
    match (members.remove(name), strict) {
        (None, _) => Ok(None),
        (Some(Value::Bool(b)), true) => Ok(Some(b)),
        (Some(Value::String(s)), false) => parse_bool(&s)
            .map(Some)
            .ok_or(MonitorError::ExpectsBool(name)),
        (Some(_), true) => Err(MonitorError::WrongType {
            name,
            expected: "boolean",
        }),
        (Some(_), false) => Err(MonitorError::WrongType {
            name,
            expected: "string",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chardevs() -> Vec<ChardevSpec> {
        vec![
            ChardevSpec {
                id: "qmp".into(),
                path: "/tmp/qmp.sock".into(),
                server: true,
                wait: false,
            },
            ChardevSpec {
                id: "client".into(),
                path: "/tmp/c.sock".into(),
                server: false,
                wait: true,
            },
        ]
    }

    fn parse(arg: &str) -> Result<MonitorSpec, MonitorError> {
        parse_monitor(arg, &chardevs(), &[])
    }

    fn err(arg: &str) -> String {
        parse(arg).unwrap_err().to_string()
    }

    #[test]
    fn implied_chardev_key() {
        assert_eq!(
            parse("qmp").unwrap(),
            MonitorSpec {
                id: None,
                chardev: "qmp".into(),
                pretty: false,
            }
        );
    }

    #[test]
    fn full_keyval_form() {
        let m = parse("chardev=qmp,mode=control,pretty=on,id=mon0").unwrap();
        assert_eq!(m.id.as_deref(), Some("mon0"));
        assert!(m.pretty);
    }

    #[test]
    fn json_form_is_typed_strictly() {
        let m = parse(r#"{"chardev": "qmp", "pretty": true}"#).unwrap();
        assert!(m.pretty);
        assert_eq!(
            err(r#"{"chardev": "qmp", "pretty": "on"}"#),
            "Invalid parameter type for 'pretty', expected: boolean"
        );
        assert_eq!(
            err(r#"{"chardev": 1}"#),
            "Invalid parameter type for 'chardev', expected: string"
        );
    }

    #[test]
    fn keyval_bool_and_nesting_errors() {
        assert_eq!(
            err("qmp,pretty=maybe"),
            "Parameter 'pretty' expects 'on' or 'off'"
        );
        assert_eq!(
            err("chardev.x=1"),
            "Invalid parameter type for 'chardev', expected: string"
        );
        assert_eq!(err("qmp,pretty"), "Expected '=' after parameter 'pretty'");
    }

    #[test]
    fn missing_and_unexpected_members() {
        assert_eq!(err("pretty=on"), "Parameter 'chardev' is missing");
        assert_eq!(err("qmp,foo=1"), "Parameter 'foo' is unexpected");
    }

    #[test]
    fn only_control_mode() {
        assert_eq!(err("qmp,mode=readline"), "Only QMP is supported");
        assert_eq!(
            err("qmp,mode=x"),
            "Parameter 'mode' does not accept value 'x'"
        );
    }

    #[test]
    fn chardev_must_exist_listen_and_be_free() {
        assert_eq!(err("nope"), "chardev \"nope\" not found");
        assert_eq!(
            err("client"),
            "chardev 'client' is a client socket; vubd monitors only listen (use server=on)"
        );
        let e = parse_monitor("qmp", &chardevs(), &["qmp".to_string()]).unwrap_err();
        assert_eq!(e.to_string(), "chardev 'qmp' is already in use");
    }
}
