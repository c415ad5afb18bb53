//! The command line as a whole, compatible with qemu-storage-daemon's.
//!
//! Like qemu-storage-daemon (which uses `getopt_long`), long options take
//! their argument as `--opt VAL` or `--opt=VAL` and may be shortened to any
//! unambiguous prefix; `-h`, `-V` and `-T` are the short options; `--`
//! ends the options.  Parsing runs in two passes, as in qsd: the first
//! finds the options and stops at the first `-h`/`-V` or malformed option;
//! the second parses the option arguments in command-line order, so a bad
//! `--blockdev` after `-h` still prints help.
//!
//! Every definition keeps the option as the user typed it (`--blockdev
//! driver=...`, `--export={...}`, `--block ...`), and every error about it
//! starts with that text, as qsd's do: with several `--blockdev`s the
//! message shows which one failed.
//!
//! A first argument of `serve` selects the short form (see `serve.rs`);
//! a first argument of `help` asks for the usage text.

use std::path::PathBuf;

use thiserror::Error;

use super::chardev::{parse_chardev, ChardevError, ChardevSpec};
use super::keyval::{parse_option, KeyvalError, OptionValue};
use super::monitor::{parse_monitor, MonitorError, MonitorSpec};
use super::serve::{parse_serve, ServeError};

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the daemon.
    Run(Invocation),
    /// Print the usage text (`-h`, `--help`, `vubd help`) and exit
    /// successfully.
    Help,
    /// Print the usage text of `serve` (`vubd serve --help`, `vubd help
    /// serve`) and exit successfully.
    ServeHelp,
    /// Print the version (`-V`, `--version`) and exit successfully.
    Version,
}

/// Everything the daemon is to set up, in command-line order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Invocation {
    /// The definitions, in the order given; each may refer to earlier ones.
    pub items: Vec<Definition>,
    /// `--pidfile`: where to write the pid once start-up is complete.
    pub pidfile: Option<PathBuf>,
    /// `--daemonize`: fork, and let the parent exit once start-up is done.
    pub daemonize: bool,
    /// Notes for the user (ignored options, deprecated spellings); the
    /// caller prints them, e.g. as `vubd: warning: ...`.
    pub warnings: Vec<String>,
}

/// One definition and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    /// What to set up.
    pub item: CliItem,
    /// The option as typed (`--blockdev driver=null-co,node-name=n0`), or
    /// for the `serve` short form the part of it the definition stems from
    /// (`serve disk.img`).  Messages about the definition start with it.
    pub origin: String,
}

/// One definition from the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum CliItem {
    /// `--blockdev` (QAPI `BlockdevOptions`; implied key `driver`).
    Blockdev(OptionValue),
    /// `--export` (QAPI `BlockExportOptions`; implied key `type`).
    Export(OptionValue),
    /// `--object` (QAPI `ObjectOptions`; implied key `qom-type`).
    Object(OptionValue),
    /// `--chardev` (a Unix socket).
    Chardev(ChardevSpec),
    /// `--monitor` (QMP on an earlier chardev).
    Monitor(MonitorSpec),
    /// `serve IMAGE` without `--format`: the image is served as raw, so it
    /// is refused if its header says it is in another format (see
    /// [`crate::block::probe`]).  Comes right after the image's file node.
    RefuseFormatted(PathBuf),
}

/// A command-line error.  Its message is one line naming the offending
/// option or argument; the caller prints it and exits with status 1.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CliError {
    /// A long option nobody knows (the argument as given).
    #[error("unrecognized option '{0}'")]
    UnrecognizedOption(String),
    /// A long-option prefix matching several options.
    #[error("option '{given}' is ambiguous; possibilities: {candidates}")]
    AmbiguousOption {
        /// The argument as given.
        given: String,
        /// The matching options, quoted.
        candidates: String,
    },
    /// A short option nobody knows.
    #[error("invalid option -- '{0}'")]
    InvalidShortOption(char),
    /// A long option needing an argument came last.
    #[error("option '{0}' requires an argument")]
    MissingArgument(&'static str),
    /// A short option needing an argument came last.
    #[error("option requires an argument -- '{0}'")]
    MissingShortArgument(char),
    /// `--flag=value` for an option without argument.
    #[error("option '{0}' doesn't allow an argument")]
    UnexpectedValue(&'static str),
    /// A positional argument (the daemon takes none).
    #[error("unexpected argument '{0}'")]
    UnexpectedArgument(String),
    /// A `--blockdev`, `--export` or `--object` argument does not parse.
    #[error("{origin}: {error}")]
    Option {
        /// The option as typed, e.g. `--blockdev driver=file,=x`.
        origin: String,
        /// What is wrong with its argument.
        error: KeyvalError,
    },
    /// A `--chardev` argument is wrong or unsupported.
    #[error("{origin}: {error}")]
    Chardev {
        /// The option as typed.
        origin: String,
        /// What is wrong with it.
        error: ChardevError,
    },
    /// Two chardevs with one id.
    #[error("{origin}: Chardev '{id}' already exists")]
    DuplicateChardev {
        /// The second `--chardev` as typed.
        origin: String,
        /// The id both have.
        id: String,
    },
    /// A `--monitor` argument is wrong or unsupported.
    #[error("{origin}: {error}")]
    Monitor {
        /// The option as typed.
        origin: String,
        /// What is wrong with it.
        error: MonitorError,
    },
    /// `--nbd-server`, which qsd has and vubd does not.
    #[error("{0}: not supported; vubd serves only vhost-user-blk exports")]
    NbdServer(String),
    /// `--pidfile ''`.
    #[error("--pidfile: the path must not be empty")]
    EmptyPidfile,
    /// The `serve` short form is wrong.
    #[error("serve: {0}")]
    Serve(ServeError),
    /// `vubd help TOPIC` with a topic there is no help on.
    #[error("help: no help on '{0}' (try 'vubd help' or 'vubd help serve')")]
    HelpTopic(String),
}

/// The options of the long form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opt {
    Blockdev,
    Chardev,
    Daemonize,
    Export,
    Help,
    Monitor,
    NbdServer,
    Object,
    Pidfile,
    Trace,
    Version,
}

/// (name, option, takes an argument), as qsd's `long_options`.
const LONG_OPTIONS: &[(&str, Opt, bool)] = &[
    ("--blockdev", Opt::Blockdev, true),
    ("--chardev", Opt::Chardev, true),
    ("--daemonize", Opt::Daemonize, false),
    ("--export", Opt::Export, true),
    ("--help", Opt::Help, false),
    ("--monitor", Opt::Monitor, true),
    ("--nbd-server", Opt::NbdServer, true),
    ("--object", Opt::Object, true),
    ("--pidfile", Opt::Pidfile, true),
    ("--trace", Opt::Trace, true),
    ("--version", Opt::Version, false),
];

/// One command-line element after the first pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token {
    /// An option with its argument (empty for flags), and the text it was
    /// given as, for messages.
    Option {
        opt: Opt,
        value: String,
        origin: String,
    },
    /// A non-option argument.
    Positional(String),
}

/// Outcome of the first pass.
enum Scan {
    Help,
    Version,
    Tokens(Vec<Token>),
}

/// Parses the command line, without the program name.
///
/// # Errors
///
/// A [`CliError`] whose message is one line naming the offending option
/// or argument.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let args: Vec<String> = args.into_iter().collect();
    let rest = args.get(1..).unwrap_or(&[]);
    match args.first().map(String::as_str) {
        Some("serve") => return parse_serve(rest),
        Some("help") => return help_topic(rest),
        _ => {}
    }
    match scan(&args)? {
        Scan::Help => Ok(Command::Help),
        Scan::Version => Ok(Command::Version),
        Scan::Tokens(tokens) => build(tokens).map(Command::Run),
    }
}

/// `vubd help [TOPIC]`.
fn help_topic(args: &[String]) -> Result<Command, CliError> {
    match args {
        [] => Ok(Command::Help),
        [topic] if topic == "serve" => Ok(Command::ServeHelp),
        [topic, ..] => Err(CliError::HelpTopic(topic.clone())),
    }
}

/// The first pass: splits options from their arguments, getopt style.
fn scan(args: &[String]) -> Result<Scan, CliError> {
    let mut tokens = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            tokens.extend(rest.by_ref().cloned().map(Token::Positional));
            break;
        }
        if arg.starts_with("--") {
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (arg.as_str(), None),
            };
            let (long, opt, takes_arg) = lookup_long(name, arg)?;
            let (value, origin) = match (takes_arg, inline) {
                (true, Some(value)) => (value.to_string(), arg.clone()),
                (true, None) => {
                    let value = rest.next().ok_or(CliError::MissingArgument(long))?;
                    (value.clone(), format!("{arg} {value}"))
                }
                (false, Some(_)) => return Err(CliError::UnexpectedValue(long)),
                (false, None) => (String::new(), arg.clone()),
            };
            match opt {
                Opt::Help => return Ok(Scan::Help),
                Opt::Version => return Ok(Scan::Version),
                _ => tokens.push(Token::Option { opt, value, origin }),
            }
        } else if let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) {
            // Every short option ends the cluster: -h and -V stop parsing,
            // and -T takes the rest of it (or the next argument) as its
            // value.  So only the first letter needs looking at.
            let mut letters = cluster.chars();
            match letters.next() {
                Some('h') => return Ok(Scan::Help),
                Some('V') => return Ok(Scan::Version),
                Some('T') => {
                    let attached = letters.as_str();
                    let (value, origin) = if attached.is_empty() {
                        let value = rest.next().ok_or(CliError::MissingShortArgument('T'))?;
                        (value.clone(), format!("{arg} {value}"))
                    } else {
                        (attached.to_string(), arg.clone())
                    };
                    tokens.push(Token::Option {
                        opt: Opt::Trace,
                        value,
                        origin,
                    });
                }
                other => return Err(CliError::InvalidShortOption(other.unwrap_or('-'))),
            }
        } else {
            tokens.push(Token::Positional(arg.clone()));
        }
    }
    Ok(Scan::Tokens(tokens))
}

/// Finds a long option by its `--name` or an unambiguous prefix of it
/// (`arg` is the whole argument, for messages).
fn lookup_long(name: &str, arg: &str) -> Result<(&'static str, Opt, bool), CliError> {
    if let Some(&found) = LONG_OPTIONS.iter().find(|(n, _, _)| *n == name) {
        return Ok(found);
    }
    let matches: Vec<_> = LONG_OPTIONS
        .iter()
        .filter(|(n, _, _)| name.len() > 2 && n.starts_with(name))
        .collect();
    match matches.as_slice() {
        [] => Err(CliError::UnrecognizedOption(arg.to_string())),
        [&found] => Ok(found),
        many => Err(CliError::AmbiguousOption {
            given: name.to_string(),
            candidates: many
                .iter()
                .map(|(n, _, _)| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(" "),
        }),
    }
}

/// The second pass: parses every option argument, in order.
pub(crate) fn build(tokens: Vec<Token>) -> Result<Invocation, CliError> {
    let mut inv = Invocation::default();
    let mut chardevs: Vec<ChardevSpec> = Vec::new();
    let mut monitored: Vec<String> = Vec::new();
    for token in tokens {
        let (opt, value, origin) = match token {
            Token::Positional(arg) => return Err(CliError::UnexpectedArgument(arg)),
            Token::Option { opt, value, origin } => (opt, value, origin),
        };
        let keyval = |implied: &str| {
            parse_option(&value, Some(implied)).map_err(|error| CliError::Option {
                origin: origin.clone(),
                error,
            })
        };
        let item = match opt {
            Opt::Blockdev => CliItem::Blockdev(keyval("driver")?),
            Opt::Export => CliItem::Export(keyval("type")?),
            Opt::Object => CliItem::Object(keyval("qom-type")?),
            Opt::Chardev => {
                let parsed = match parse_chardev(&value) {
                    Ok(parsed) => parsed,
                    Err(error) => return Err(CliError::Chardev { origin, error }),
                };
                if chardevs.iter().any(|c| c.id == parsed.spec.id) {
                    return Err(CliError::DuplicateChardev {
                        origin,
                        id: parsed.spec.id,
                    });
                }
                inv.warnings.extend(
                    parsed
                        .warnings
                        .into_iter()
                        .map(|w| format!("{origin}: {w}")),
                );
                chardevs.push(parsed.spec.clone());
                CliItem::Chardev(parsed.spec)
            }
            Opt::Monitor => {
                let spec = match parse_monitor(&value, &chardevs, &monitored) {
                    Ok(spec) => spec,
                    Err(error) => return Err(CliError::Monitor { origin, error }),
                };
                monitored.push(spec.chardev.clone());
                CliItem::Monitor(spec)
            }
            Opt::NbdServer => return Err(CliError::NbdServer(origin)),
            Opt::Pidfile if value.is_empty() => return Err(CliError::EmptyPidfile),
            Opt::Pidfile => {
                inv.pidfile = Some(PathBuf::from(value));
                continue;
            }
            Opt::Daemonize => {
                inv.daemonize = true;
                continue;
            }
            Opt::Trace => {
                inv.warnings
                    .push(format!("{origin}: ignored, vubd has no trace events"));
                continue;
            }
            // The first pass returns before these reach here.
            Opt::Help | Opt::Version => continue,
        };
        inv.items.push(Definition { item, origin });
    }
    Ok(inv)
}

#[cfg(test)]
#[path = "args_tests.rs"]
mod tests;
