//! `--chardev`: `QemuOpts` syntax with implied key `backend`, as in
//! qemu-storage-daemon.  vubd needs character devices only for QMP
//! monitors, so only `socket` chardevs bound to a Unix socket `path` are
//! accepted.

use std::path::PathBuf;

use thiserror::Error;

use super::qemuopts::{id_wellformed, parse_bool, parse_qemu_opts};

/// A listening-or-connecting Unix socket character device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    /// The chardev's id, referenced by `--monitor chardev=ID`.
    pub id: String,
    /// The Unix socket path.
    pub path: PathBuf,
    /// `server=on`: listen on `path` (QEMU's default is off: connect).
    pub server: bool,
    /// `wait=on`: as a server, block start-up until a client connects
    /// (QEMU's default is on).  Meaningless for a client.
    pub wait: bool,
}

/// Why a `--chardev` argument was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChardevError {
    /// A name QEMU's chardev option list does not know.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A boolean option with a value that is not a QEMU boolean.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsBool(String),
    /// `id` is not letters, digits, `-`, `.`, `_` starting with a letter.
    #[error(
        "Parameter 'id' expects an identifier (letters, digits, '-', '.', '_', \
         starting with a letter)"
    )]
    BadId,
    /// No `id=`.
    #[error("chardev: no id specified")]
    NoId,
    /// No backend (neither a bare first element nor `backend=`).
    #[error("chardev: \"{0}\" missing backend")]
    MissingBackend(String),
    /// A backend QEMU does not have either.
    #[error("'{0}' is not a valid char driver name")]
    UnknownBackend(String),
    /// A QEMU backend other than `socket`.
    #[error("chardev '{id}': backend '{backend}' is not supported; only socket chardevs with a path are supported")]
    UnsupportedBackend {
        /// The chardev id.
        id: String,
        /// The backend asked for.
        backend: String,
    },
    /// A socket without a (non-empty) `path`, e.g. a TCP or fd socket.
    #[error("chardev '{0}': only socket chardevs with a path are supported")]
    NoPath(String),
    /// More than one of `path`, `fd` and `host`.
    #[error("None or one of 'path', 'fd' or 'host' option required.")]
    ConflictingAddress,
    /// A QEMU socket option vubd does not implement (given with a value
    /// other than QEMU's default).
    #[error("chardev '{id}': option '{option}' is not supported")]
    UnsupportedOption {
        /// The chardev id.
        id: String,
        /// The option name.
        option: String,
    },
    /// `wait` given for a client socket.
    #[error("'wait' option is incompatible with socket in client connect mode")]
    WaitInClientMode,
    /// `help` was asked for.
    #[error("help is not available; vubd supports only 'socket' chardevs with 'path'")]
    Help,
}

/// A parsed chardev with the warnings its syntax produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedChardev {
    pub spec: ChardevSpec,
    pub warnings: Vec<String>,
}

/// Names in QEMU's chardev option list (`qemu_chardev_opts`), and whether
/// they are booleans.
const QEMU_CHARDEV_OPTIONS: &[(&str, bool)] = &[
    ("backend", false),
    ("path", false),
    ("input-path", false),
    ("host", false),
    ("port", false),
    ("fd", false),
    ("localaddr", false),
    ("localport", false),
    ("to", false),
    ("ipv4", true),
    ("ipv6", true),
    ("wait", true),
    ("server", true),
    ("delay", true),
    ("nodelay", true),
    ("reconnect", false),
    ("reconnect-ms", false),
    ("telnet", true),
    ("tn3270", true),
    ("tls-creds", false),
    ("tls-authz", false),
    ("websocket", true),
    ("width", false),
    ("height", false),
    ("cols", false),
    ("rows", false),
    ("mux", true),
    ("signal", true),
    ("name", false),
    ("debug", false),
    ("size", false),
    ("chardev", false),
    ("chardevs.0", false),
    ("chardevs.1", false),
    ("chardevs.2", false),
    ("chardevs.3", false),
    ("append", true),
    ("logfile", false),
    ("logappend", true),
    ("mouse", true),
    ("clipboard", true),
    ("tight", true),
    ("abstract", true),
];

/// Boolean socket options vubd accepts as long as they keep QEMU's default.
const HARMLESS_AT_DEFAULT: &[(&str, bool)] = &[
    ("mux", false),
    ("telnet", false),
    ("tn3270", false),
    ("websocket", false),
    ("logappend", false),
    ("tight", true),
    ("abstract", false),
    ("delay", true),
    ("nodelay", false),
];

/// Backends QEMU has (by name or alias); anything else is "not a valid
/// char driver name".
const QEMU_BACKENDS: &[&str] = &[
    "null",
    "socket",
    "udp",
    "msmouse",
    "wctablet",
    "memory",
    "ringbuf",
    "file",
    "stdio",
    "serial",
    "tty",
    "parallel",
    "parport",
    "pipe",
    "pty",
    "console",
    "spicevmc",
    "spiceport",
    "vc",
    "braille",
    "testdev",
    "qemu-vdagent",
    "dbus",
    "hub",
];

/// Parses a `--chardev` argument.
pub(crate) fn parse_chardev(arg: &str) -> Result<ParsedChardev, ChardevError> {
    let opts = parse_qemu_opts(arg, Some("backend"));
    if opts.help || opts.get("backend").is_some_and(|b| b == "help" || b == "?") {
        return Err(ChardevError::Help);
    }
    if opts.id.as_deref().is_some_and(|id| !id_wellformed(id)) {
        return Err(ChardevError::BadId);
    }
    for (name, value) in &opts.entries {
        match QEMU_CHARDEV_OPTIONS.iter().find(|(n, _)| n == name) {
            None => return Err(ChardevError::InvalidParameter(name.clone())),
            Some((_, true)) if parse_bool(value).is_none() => {
                return Err(ChardevError::ExpectsBool(name.clone()))
            }
            Some(_) => {}
        }
    }
    let Some(id) = opts.id.clone() else {
        return Err(ChardevError::NoId);
    };
    let Some(backend) = opts.get("backend") else {
        return Err(ChardevError::MissingBackend(id));
    };
    if backend != "socket" {
        return Err(if QEMU_BACKENDS.contains(&backend) {
            ChardevError::UnsupportedBackend {
                id,
                backend: backend.to_string(),
            }
        } else {
            ChardevError::UnknownBackend(backend.to_string())
        });
    }

    let given = |name: &str| opts.get(name).is_some();
    if ["path", "fd", "host"].iter().filter(|n| given(n)).count() > 1 {
        return Err(ChardevError::ConflictingAddress);
    }
    let path = match opts.get("path") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => return Err(ChardevError::NoPath(id)),
    };

    // Checked values only from here on: a bad boolean was rejected above.
    let flag = |name: &str| opts.get(name).and_then(parse_bool);
    for (name, _) in &opts.entries {
        let supported = matches!(name.as_str(), "backend" | "path" | "server" | "wait")
            || HARMLESS_AT_DEFAULT
                .iter()
                .any(|(n, default)| n == name && flag(n) == Some(*default));
        if !supported {
            return Err(ChardevError::UnsupportedOption {
                id,
                option: name.clone(),
            });
        }
    }

    let server = flag("server").unwrap_or(false);
    let wait = flag("wait");
    if !server && wait.is_some() {
        return Err(ChardevError::WaitInClientMode);
    }
    Ok(ParsedChardev {
        spec: ChardevSpec {
            id,
            path,
            server,
            wait: wait.unwrap_or(true),
        },
        warnings: opts.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arg: &str) -> ChardevSpec {
        parse_chardev(arg).unwrap().spec
    }

    fn err(arg: &str) -> String {
        parse_chardev(arg).unwrap_err().to_string()
    }

    #[test]
    fn server_socket_with_path() {
        assert_eq!(
            spec("socket,id=qmp0,path=/run/vubd.sock,server=on,wait=off"),
            ChardevSpec {
                id: "qmp0".into(),
                path: "/run/vubd.sock".into(),
                server: true,
                wait: false,
            }
        );
    }

    #[test]
    fn defaults_are_client_and_wait() {
        let s = spec("socket,id=c,path=p");
        assert!(!s.server);
        assert!(s.wait);
        let s = spec("socket,id=c,path=p,server=yes");
        assert!(s.server && s.wait);
    }

    #[test]
    fn explicit_backend_key_and_any_order() {
        let s = spec("id=c,path=/x,,y,backend=socket,server=true,wait=no");
        assert_eq!(s.path, PathBuf::from("/x,y"));
        assert!(s.server && !s.wait);
    }

    #[test]
    fn short_form_booleans_are_accepted_with_warnings() {
        let p = parse_chardev("socket,path=p,server,nowait,id=c").unwrap();
        assert!(p.spec.server && !p.spec.wait);
        assert_eq!(p.warnings.len(), 2);
    }

    #[test]
    fn harmless_options_at_default_are_accepted() {
        let s = spec("socket,id=c,path=p,server=on,mux=off,telnet=off,tight=on");
        assert!(s.server);
    }

    #[test]
    fn errors_follow_qemu() {
        assert_eq!(err("socket,path=p"), "chardev: no id specified");
        assert_eq!(err("id=c,path=p"), "chardev: \"c\" missing backend");
        assert_eq!(
            err("socket,id=0c,path=p").split(" (").next().unwrap(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(err("socket,id=c,bogus=1"), "Invalid parameter 'bogus'");
        assert_eq!(
            err("socket,id=c,path=p,server=maybe"),
            "Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(
            err("nosuch,id=c"),
            "'nosuch' is not a valid char driver name"
        );
        assert_eq!(
            err("socket,id=c,path=p,fd=3"),
            "None or one of 'path', 'fd' or 'host' option required."
        );
        assert_eq!(
            err("socket,id=c,path=p,wait=off"),
            "'wait' option is incompatible with socket in client connect mode"
        );
    }

    #[test]
    fn unsupported_backends_and_addresses_name_the_problem() {
        assert_eq!(
            err("stdio,id=c"),
            "chardev 'c': backend 'stdio' is not supported; only socket chardevs with a path are supported"
        );
        assert_eq!(
            err("socket,id=c,host=localhost,port=4444,server=on"),
            "chardev 'c': only socket chardevs with a path are supported"
        );
        assert_eq!(
            err("socket,id=c,fd=3"),
            "chardev 'c': only socket chardevs with a path are supported"
        );
        assert_eq!(
            err("socket,id=c,path="),
            "chardev 'c': only socket chardevs with a path are supported"
        );
        assert_eq!(
            err("socket,id=c,path=p,server=on,telnet=on"),
            "chardev 'c': option 'telnet' is not supported"
        );
        assert_eq!(
            err("socket,id=c,path=p,logfile=/tmp/l"),
            "chardev 'c': option 'logfile' is not supported"
        );
    }

    #[test]
    fn help_is_refused() {
        assert_eq!(parse_chardev("help"), Err(ChardevError::Help));
        assert_eq!(parse_chardev("socket,help"), Err(ChardevError::Help));
    }
}
