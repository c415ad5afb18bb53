//! The older `QemuOpts` option syntax, which QEMU (and qemu-storage-daemon)
//! still uses for `--chardev`.
//!
//! It differs from keyval: keys are flat (no nesting), the bare first
//! element (when the option has an implied key) may contain `,,`, a bare
//! later element is a short-form boolean (`server` means `server=on`,
//! `nowait` means `wait=off`; QEMU accepts these with a deprecation
//! warning), `id` is taken out of the list, and a bare `help` or `?`
//! anywhere after the first element asks for help.

use super::keyval::read_value;

/// The elements of one `QemuOpts` string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QemuOpts {
    /// The first `id=` value, as QEMU uses it.
    pub id: Option<String>,
    /// Every other element as (name, value), in order, repeats included
    /// (QEMU reads the last one of a name).
    pub entries: Vec<(String, String)>,
    /// A bare `help` or `?` was seen; parsing stopped there.
    pub help: bool,
    /// Deprecation warnings for short-form booleans.
    pub warnings: Vec<String>,
}

impl QemuOpts {
    /// The last value given for `name`, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits a `QemuOpts` string.  The syntax cannot fail; checking names and
/// values is left to the caller.
pub(crate) fn parse_qemu_opts(input: &str, implied_key: Option<&str>) -> QemuOpts {
    let mut opts = QemuOpts::default();
    let mut implied = implied_key;
    let mut rest = input;
    while !rest.is_empty() {
        let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let (head, after) = rest.split_at(name_len);
        let (name, value) = if let Some(value_text) = after.strip_prefix('=') {
            let (value, next) = read_value(value_text);
            rest = next;
            (head.to_string(), value)
        } else if let Some(key) = implied {
            let (value, next) = read_value(rest);
            rest = next;
            (key.to_string(), value)
        } else {
            rest = after.strip_prefix(',').unwrap_or(after);
            if head == "help" || head == "?" {
                opts.help = true;
                return opts;
            }
            let (name, value) = match head.strip_prefix("no") {
                Some(name) => (name, "off"),
                None => (head, "on"),
            };
            let advice = if name == "delay" {
                // QEMU's advice: "nodelay" is better written "nodelay=on".
                format!("nodelay={}", if value == "off" { "on" } else { "off" })
            } else {
                format!("{name}={value}")
            };
            opts.warnings.push(format!(
                "short-form boolean option '{head}' deprecated; please use {advice} instead"
            ));
            (name.to_string(), value.to_string())
        };
        implied = None;
        if name == "id" {
            opts.id.get_or_insert(value);
        } else {
            opts.entries.push((name, value));
        }
    }
    opts
}

/// QEMU's boolean spellings: `on`/`yes`/`true`/`y` and `off`/`no`/`false`/`n`.
pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// QEMU's rule for a well-formed `id`: a letter, then letters, digits,
/// `-`, `.` or `_`.
pub(crate) fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(o: &QemuOpts) -> Vec<(&str, &str)> {
        o.entries
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn implied_first_element_and_pairs() {
        let o = parse_qemu_opts("socket,id=c0,path=/tmp/s,server=on", Some("backend"));
        assert_eq!(o.id.as_deref(), Some("c0"));
        assert_eq!(
            entries(&o),
            [("backend", "socket"), ("path", "/tmp/s"), ("server", "on")]
        );
        assert!(o.warnings.is_empty());
        assert!(!o.help);
    }

    #[test]
    fn implied_value_may_contain_escaped_commas() {
        let o = parse_qemu_opts("a,,b,x=1", Some("backend"));
        assert_eq!(entries(&o), [("backend", "a,b"), ("x", "1")]);
    }

    #[test]
    fn values_unescape_double_commas() {
        let o = parse_qemu_opts("path=/tmp/a,,b", None);
        assert_eq!(o.get("path"), Some("/tmp/a,b"));
    }

    #[test]
    fn short_form_booleans_warn() {
        let o = parse_qemu_opts("socket,server,nowait", Some("backend"));
        assert_eq!(o.get("server"), Some("on"));
        assert_eq!(o.get("wait"), Some("off"));
        assert_eq!(
            o.warnings,
            [
                "short-form boolean option 'server' deprecated; please use server=on instead",
                "short-form boolean option 'nowait' deprecated; please use wait=off instead",
            ]
        );
    }

    #[test]
    fn short_form_nodelay_advice_matches_qemu() {
        let o = parse_qemu_opts("nodelay", None);
        assert_eq!(o.get("delay"), Some("off"));
        assert!(o.warnings[0].ends_with("please use nodelay=on instead"));
    }

    #[test]
    fn first_id_wins_and_last_value_wins() {
        let o = parse_qemu_opts("id=a,x=1,id=b,x=2", None);
        assert_eq!(o.id.as_deref(), Some("a"));
        assert_eq!(o.get("x"), Some("2"));
    }

    #[test]
    fn bare_help_stops_parsing() {
        let o = parse_qemu_opts("socket,help,id=x", Some("backend"));
        assert!(o.help);
        assert_eq!(o.id, None);
        let o = parse_qemu_opts("?", None);
        assert!(o.help);
    }

    #[test]
    fn bools_and_ids() {
        for t in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(t), Some(true));
        }
        for f in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(f), Some(false));
        }
        assert_eq!(parse_bool("1"), None);
        assert_eq!(parse_bool("ON"), None);
        assert!(id_wellformed("mon0.a-b_c"));
        assert!(!id_wellformed("0mon"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("a b"));
    }
}
