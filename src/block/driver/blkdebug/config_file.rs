//! blkdebug's rules file: sections `[inject-error]` and `[set-state]`,
//! each followed by `key = "value"` lines with the same keys as the
//! options (`event`, `state`, `errno`, `sector`, `once`, `immediately`,
//! `new_state`); `#` starts a comment. Errors use QEMU's words.

use super::rules::{Inject, SetState};
use crate::qapi::BlkdebugEvent;

/// The rules a file holds, in file order.
#[derive(Debug, Default)]
pub struct FileRules {
    pub inject: Vec<Inject>,
    pub set_state: Vec<SetState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Inject,
    SetState,
}

type Pairs = Vec<(String, String)>;

pub fn read(path: &str) -> Result<FileRules, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let e = std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO));
        format!("Could not read blkdebug config file: {}", os_message(&e))
    })?;
    parse(&text)
}

/// The message of an OS error without Rust's " (os error N)" suffix.
fn os_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

pub fn parse(text: &str) -> Result<FileRules, String> {
    let mut out = FileRules::default();
    let mut current: Option<(Section, Pairs)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if let Some(done) = current.take() {
                finish(done, &mut out)?;
            }
            let section = match name.trim() {
                "inject-error" => Section::Inject,
                "set-state" => Section::SetState,
                other => return Err(format!("There is no option group '{other}'")),
            };
            current = Some((section, Vec::new()));
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: parse error", n + 1));
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        match current.as_mut() {
            Some((_, pairs)) => pairs.push((key.trim().to_string(), value.to_string())),
            None => return Err(format!("line {}: no group defined", n + 1)),
        }
    }
    if let Some(done) = current.take() {
        finish(done, &mut out)?;
    }
    Ok(out)
}

fn finish((section, pairs): (Section, Pairs), out: &mut FileRules) -> Result<(), String> {
    let get = |k: &str| pairs.iter().rev().find(|(key, _)| key == k).map(|p| &p.1);
    for (key, _) in &pairs {
        let known: &[&str] = match section {
            Section::Inject => &["event", "state", "errno", "sector", "once", "immediately"],
            Section::SetState => &["event", "state", "new_state"],
        };
        if !known.contains(&key.as_str()) {
            return Err(format!("Invalid parameter '{key}'"));
        }
    }
    let event = match get("event") {
        None => return Err("Parameter 'event' is missing".to_string()),
        Some(name) => event(name)?,
    };
    let number = |k: &str, default: i64| -> Result<i64, String> {
        match get(k) {
            None => Ok(default),
            Some(v) => v
                .parse::<i64>()
                .map_err(|_| format!("Parameter '{k}' expects a number")),
        }
    };
    let flag = |k: &str| -> Result<bool, String> {
        match get(k).map(String::as_str) {
            None | Some("off") | Some("no") | Some("false") => Ok(false),
            Some("on") | Some("yes") | Some("true") => Ok(true),
            Some(_) => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
        }
    };
    match section {
        Section::Inject => out.inject.push(super::inject_rule(
            event,
            number("state", 0)?,
            number("errno", i64::from(libc::EIO))?,
            number("sector", -1)?,
            flag("once")?,
            flag("immediately")?,
        )?),
        Section::SetState => out.set_state.push(SetState {
            event,
            state: number("state", 0)?,
            new_state: match get("new_state") {
                None => return Err("Parameter 'new_state' is missing".to_string()),
                Some(_) => number("new_state", 0)?,
            },
        }),
    }
    Ok(())
}

fn event(name: &str) -> Result<BlkdebugEvent, String> {
    BlkdebugEvent::NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| BlkdebugEvent::ALL.get(i).copied())
        .ok_or_else(|| format!("invalid parameter value: {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_sections_with_defaults() {
        let rules = parse(
            "# a comment\n[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\nsector = \"8\"\nonce = \"on\"\n\n[set-state]\nevent = \"write_aio\"\nstate = \"1\"\nnew_state = \"2\"\n[inject-error]\nevent = \"pwritev\"\n",
        )
        .unwrap();
        assert_eq!(rules.inject.len(), 2);
        assert_eq!(rules.inject[0].errno, 28);
        assert_eq!(rules.inject[0].sector, Some(8));
        assert!(rules.inject[0].once);
        assert_eq!(rules.inject[1].errno, libc::EIO);
        assert_eq!(rules.inject[1].sector, None);
        assert_eq!(rules.set_state[0].new_state, 2);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(
            parse("[inject-error]\nevent = \"nope\"\n").unwrap_err(),
            "invalid parameter value: nope"
        );
        assert_eq!(
            parse("[inject-error]\nevent = \"read_aio\"\nerrno = \"x\"\n").unwrap_err(),
            "Parameter 'errno' expects a number"
        );
        assert!(parse("[set-state]\nevent = \"read_aio\"\n")
            .unwrap_err()
            .contains("new_state"));
        assert!(parse("[bogus]\n").unwrap_err().contains("bogus"));
        assert!(parse("event = \"read_aio\"\n").is_err());
        assert!(read("/nonexistent/blkdebug.conf")
            .unwrap_err()
            .starts_with("Could not read blkdebug config file: No such file or directory"));
    }
}
