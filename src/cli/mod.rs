//! vubd's command line, compatible with qemu-storage-daemon's.
//!
//! [`parse_args`] turns the arguments into a [`Command`]: help, version, or
//! an [`Invocation`] listing the definitions (`--blockdev`, `--export`,
//! `--object`, `--chardev`, `--monitor`) in command-line order.  Block
//! devices, exports and objects stay JSON objects ([`OptionValue`]) for the
//! schema-driven layers to type; chardevs and monitors, which vubd supports
//! only in one shape, are checked here.
//!
//! Files: `keyval` (QEMU's key=value syntax), `qemuopts` (the older syntax
//! of `--chardev`), `chardev`, `monitor`, `args` (the whole command line),
//! `serve` (the `vubd serve IMAGE ...` short form), `help` (the usage
//! texts of both).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod args;
mod chardev;
mod help;
mod keyval;
mod monitor;
mod qemuopts;
mod serve;

pub use args::{parse_args, CliError, CliItem, Command, Definition, Invocation};
pub use chardev::{ChardevError, ChardevSpec};
pub use help::{help_text, serve_help_text};
pub use keyval::{parse_keyval, parse_option, KeyvalError, OptionValue};
pub use monitor::{MonitorError, MonitorSpec};
pub use serve::{
    check_unformatted, FormatGuessError, ServeError, SERVE_EXPORT_ID, SERVE_FILE_NODE,
    SERVE_FORMAT_NODE, SERVE_MONITOR_CHARDEV,
};
