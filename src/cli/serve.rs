//! The everyday short form:
//!
//! ```text
//! vubd serve IMAGE --socket PATH [--format raw|qcow2] [--readonly]
//!           [--num-queues N] [--monitor-socket PATH]
//!           [--pidfile PATH] [--daemonize]
//! ```
//!
//! It is rewritten into the long options a user would type for the same
//! set-up, and those go through the very same parsing:
//!
//! ```text
//! --blockdev driver=file,node-name=disk0-file,filename=IMAGE[,read-only=on]
//! --blockdev driver=FORMAT,node-name=disk0,file=disk0-file[,read-only=on]
//! --export type=vhost-user-blk,id=disk0,node-name=disk0,addr.type=unix,
//!          addr.path=PATH,writable=on|off[,num-queues=N]
//! --chardev socket,id=monitor0,path=MPATH,server=on,wait=off
//! --monitor chardev=monitor0
//! ```
//!
//! The format is `raw` unless `--format` says otherwise, and it is never
//! guessed into anything else.  But without `--format` the image's header
//! is checked first: a file that says it is qcow2, vmdk, luks and so on is
//! refused rather than handed to the guest as a raw disk, whose first
//! write would wreck it.  `--format raw` serves such a file's bytes on
//! purpose.
//!
//! Messages about the definitions above start with `serve IMAGE` (or
//! `serve --monitor-socket MPATH` for the monitor), the part of the
//! command line they stem from.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::args::{build, CliError, CliItem, Command, Definition, Opt, Token};
use crate::block::driver::is_built;
use crate::block::error::strerror;
use crate::block::probe::probe_path;
use crate::qapi::BlockdevDriver;

/// Node name of the protocol (`file`) node the short form creates.
pub const SERVE_FILE_NODE: &str = "disk0-file";
/// Node name of the format node the short form exports.
pub const SERVE_FORMAT_NODE: &str = "disk0";
/// Export id the short form uses.
pub const SERVE_EXPORT_ID: &str = "disk0";
/// Chardev id of the short form's QMP monitor socket.
pub const SERVE_MONITOR_CHARDEV: &str = "monitor0";

/// What is wrong with a `serve` command line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ServeError {
    /// An option `serve` does not have.
    #[error("unrecognized option '{0}'")]
    UnrecognizedOption(String),
    /// An option needing a value came last.
    #[error("option '{0}' requires an argument")]
    MissingArgument(&'static str),
    /// `--flag=value` for an option without value.
    #[error("option '{0}' doesn't allow an argument")]
    UnexpectedValue(&'static str),
    /// An option given twice.
    #[error("option '{0}' given more than once")]
    Repeated(&'static str),
    /// An empty value where a path or name is needed.
    #[error("option '{0}' needs a non-empty value")]
    Empty(&'static str),
    /// No IMAGE.
    #[error("missing IMAGE argument")]
    MissingImage,
    /// A second positional argument.
    #[error("unexpected argument '{0}'")]
    UnexpectedArgument(String),
    /// No `--socket`.
    #[error("option '--socket PATH' is required")]
    MissingSocket,
    /// A `--format` other than raw or qcow2.
    #[error("unsupported format '{0}' (expected {list})", list = SERVE_FORMATS.join(" or "))]
    BadFormat(String),
    /// A `--num-queues` that is not an integer from 1 to 65535.
    #[error("--num-queues expects an integer from 1 to 65535, got '{0}'")]
    BadNumQueues(String),
}

/// The formats `--format` accepts.
const SERVE_FORMATS: &[&str] = &["raw", "qcow2"];

/// Why `serve IMAGE` without `--format` refuses the image.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatGuessError {
    /// The header names a format vubd can serve.
    #[error(
        "the file looks like a {0} image; pass --format {0} to serve the disk it holds, \
         or --format raw to export its bytes as they are"
    )]
    Servable(&'static str),
    /// The header names a format vubd cannot read.
    #[error(
        "the file looks like a {0} image, which vubd cannot read yet; pass --format raw \
         to export its bytes as they are"
    )]
    Unservable(&'static str),
    /// The header could not be read.
    #[error("Could not read the image to check its format: {0}")]
    Unreadable(String),
}

/// Checks that the image `serve` is about to serve as raw, without being
/// told its format, does not say it is in another format.
///
/// # Errors
///
/// A [`FormatGuessError`] naming the format found, and the flag to pass.
pub fn check_unformatted(image: &Path) -> Result<(), FormatGuessError> {
    match probe_path(image) {
        Ok(None) => Ok(()),
        Ok(Some(driver)) => Err(refusal(driver)),
        Err(e) => Err(FormatGuessError::Unreadable(strerror(&e))),
    }
}

/// The refusal for an image whose header says `driver`.
fn refusal(driver: BlockdevDriver) -> FormatGuessError {
    let name = driver.as_str();
    if is_built(driver) && SERVE_FORMATS.contains(&name) {
        FormatGuessError::Servable(name)
    } else {
        FormatGuessError::Unservable(name)
    }
}

/// The options of the short form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServeOpt {
    Socket,
    Format,
    Readonly,
    NumQueues,
    MonitorSocket,
    Pidfile,
    Daemonize,
    Help,
}

/// (name, option, takes a value).
const SERVE_OPTIONS: &[(&str, ServeOpt, bool)] = &[
    ("--socket", ServeOpt::Socket, true),
    ("--format", ServeOpt::Format, true),
    ("--readonly", ServeOpt::Readonly, false),
    ("--num-queues", ServeOpt::NumQueues, true),
    ("--monitor-socket", ServeOpt::MonitorSocket, true),
    ("--pidfile", ServeOpt::Pidfile, true),
    ("--daemonize", ServeOpt::Daemonize, false),
    ("--help", ServeOpt::Help, false),
];

/// The short form's settings.
#[derive(Debug, Default)]
struct Serve {
    image: Option<String>,
    socket: Option<String>,
    format: Option<String>,
    readonly: bool,
    num_queues: Option<u16>,
    monitor_socket: Option<String>,
    pidfile: Option<String>,
    daemonize: bool,
}

/// Parses the arguments after `serve`.
pub(crate) fn parse_serve(args: &[String]) -> Result<Command, CliError> {
    let serve = match collect(args) {
        Ok(None) => return Ok(Command::ServeHelp),
        Ok(Some(serve)) => serve,
        Err(e) => return Err(CliError::Serve(e)),
    };
    let check = serve.format.is_none().then(|| Definition {
        item: CliItem::RefuseFormatted(PathBuf::from(serve.image.clone().unwrap_or_default())),
        origin: image_origin(&serve),
    });
    let mut inv = build(to_tokens(serve))?;
    if let Some(check) = check {
        // Between the file node and the raw node: a missing file is
        // reported by the file node as usual, and nothing is served
        // before the check.
        inv.items.insert(1.min(inv.items.len()), check);
    }
    Ok(Command::Run(inv))
}

/// `serve IMAGE`, as messages about the image's nodes and export start.
fn image_origin(serve: &Serve) -> String {
    format!("serve {}", serve.image.as_deref().unwrap_or_default())
}

/// Reads the short form's options; `None` means help was asked for.
fn collect(args: &[String]) -> Result<Option<Serve>, ServeError> {
    let mut serve = Serve::default();
    let mut rest = args.iter();
    let mut positional: Vec<String> = Vec::new();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            positional.extend(rest.by_ref().cloned());
            break;
        }
        if arg == "-h" {
            return Ok(None);
        }
        if !arg.starts_with('-') || arg == "-" {
            positional.push(arg.clone());
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (arg.as_str(), None),
        };
        let Some(&(long, opt, takes_value)) = SERVE_OPTIONS.iter().find(|(n, _, _)| *n == name)
        else {
            return Err(ServeError::UnrecognizedOption(arg.clone()));
        };
        let value = match (takes_value, inline) {
            (true, Some(v)) => v.to_string(),
            (true, None) => rest
                .next()
                .cloned()
                .ok_or(ServeError::MissingArgument(long))?,
            (false, Some(_)) => return Err(ServeError::UnexpectedValue(long)),
            (false, None) => String::new(),
        };
        if takes_value && value.is_empty() {
            return Err(ServeError::Empty(long));
        }
        let slot = match opt {
            ServeOpt::Help => return Ok(None),
            ServeOpt::Readonly => {
                serve.readonly = true;
                continue;
            }
            ServeOpt::Daemonize => {
                serve.daemonize = true;
                continue;
            }
            ServeOpt::NumQueues => {
                let n = value
                    .parse::<u16>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| ServeError::BadNumQueues(value.clone()))?;
                if serve.num_queues.replace(n).is_some() {
                    return Err(ServeError::Repeated(long));
                }
                continue;
            }
            ServeOpt::Format => {
                if value != "raw" && value != "qcow2" {
                    return Err(ServeError::BadFormat(value));
                }
                &mut serve.format
            }
            ServeOpt::Socket => &mut serve.socket,
            ServeOpt::MonitorSocket => &mut serve.monitor_socket,
            ServeOpt::Pidfile => &mut serve.pidfile,
        };
        if slot.replace(value).is_some() {
            return Err(ServeError::Repeated(long));
        }
    }

    let mut positional = positional.into_iter();
    let image = positional.next().ok_or(ServeError::MissingImage)?;
    if image.is_empty() {
        return Err(ServeError::MissingImage);
    }
    if let Some(extra) = positional.next() {
        return Err(ServeError::UnexpectedArgument(extra));
    }
    if serve.socket.is_none() {
        return Err(ServeError::MissingSocket);
    }
    serve.image = Some(image);
    Ok(Some(serve))
}

/// Doubles commas so a value survives both option syntaxes.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The long-form options equivalent to `serve`.
fn to_tokens(serve: Serve) -> Vec<Token> {
    let read_only = if serve.readonly { ",read-only=on" } else { "" };
    let image = escape(serve.image.as_deref().unwrap_or_default());
    let socket = escape(serve.socket.as_deref().unwrap_or_default());
    let format = serve.format.as_deref().unwrap_or("raw");
    let writable = if serve.readonly { "off" } else { "on" };

    let queues = serve
        .num_queues
        .map(|n| format!(",num-queues={n}"))
        .unwrap_or_default();
    let export = format!(
        "type=vhost-user-blk,id={SERVE_EXPORT_ID},node-name={SERVE_FORMAT_NODE},\
         addr.type=unix,addr.path={socket},writable={writable}{queues}"
    );
    let origin = image_origin(&serve);
    let token = |opt: Opt, value: String, origin: &str| Token::Option {
        opt,
        value,
        origin: origin.to_string(),
    };
    let mut tokens = vec![
        token(
            Opt::Blockdev,
            format!("driver=file,node-name={SERVE_FILE_NODE},filename={image}{read_only}"),
            &origin,
        ),
        token(
            Opt::Blockdev,
            format!(
                "driver={format},node-name={SERVE_FORMAT_NODE},file={SERVE_FILE_NODE}{read_only}"
            ),
            &origin,
        ),
        token(Opt::Export, export, &origin),
    ];
    if let Some(path) = serve.monitor_socket {
        let origin = format!("serve --monitor-socket {path}");
        tokens.push(token(
            Opt::Chardev,
            format!(
                "socket,id={SERVE_MONITOR_CHARDEV},path={},server=on,wait=off",
                escape(&path)
            ),
            &origin,
        ));
        tokens.push(token(
            Opt::Monitor,
            format!("chardev={SERVE_MONITOR_CHARDEV}"),
            &origin,
        ));
    }
    if let Some(path) = serve.pidfile {
        let origin = format!("serve --pidfile {path}");
        tokens.push(token(Opt::Pidfile, path, &origin));
    }
    if serve.daemonize {
        tokens.push(token(Opt::Daemonize, String::new(), "serve --daemonize"));
    }
    tokens
}

#[cfg(test)]
#[path = "serve_tests.rs"]
mod tests;
