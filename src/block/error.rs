//! Errors of the block layer, each with the QMP class it answers with.

use super::file_lock::LockError;
use crate::error::QmpError;
use crate::qapi::QapiErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A request that makes no sense for the node or its options.
    #[error("{0}")]
    Invalid(String),
    #[error("Failed to find node with node-name='{0}'")]
    NoSuchNode(String),
    #[error("Cannot find device='{device}' nor node-name='{node}'")]
    NoSuchDeviceOrNode { device: String, node: String },
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    #[error("Invalid node-name: '{0}'")]
    BadNodeName(String),
    #[error("Could not open '{path}': {reason}")]
    Open { path: String, reason: String },
    #[error("Block driver '{0}' is not available in vubd")]
    DriverNotBuilt(String),
    #[error("Node {0} is in use")]
    NodeInUse(String),
    #[error("Block device {0} is in use")]
    DeviceInUse(String),
    #[error("Node {0} is not owned by the monitor")]
    NotMonitorOwned(String),
    #[error("Permission conflict on node '{node}': permissions '{perms}' are both required by {wanted_by} and unshared by {unshared_by}.")]
    PermConflict {
        node: String,
        perms: String,
        wanted_by: String,
        unshared_by: String,
    },
    #[error("Block node is read-only")]
    ReadOnly,
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A lock on an image file could not be had; `path` is the image's
    /// file name as given, for the hint.
    #[error("{source}")]
    ImageLock { source: LockError, path: String },
    /// An I/O error on an operation (flush, truncate, stat).
    #[error("{op} failed: {reason}")]
    Io { op: &'static str, reason: String },
}

impl BlockError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        BlockError::Invalid(msg.into())
    }

    pub fn io(op: &'static str, err: &std::io::Error) -> Self {
        BlockError::Io {
            op,
            reason: strerror(err),
        }
    }

    pub fn open(path: &str, err: &std::io::Error) -> Self {
        BlockError::Open {
            path: path.to_string(),
            reason: strerror(err),
        }
    }

    /// A further line of advice for a person reading the error, as QEMU
    /// appends to some errors (it prints it after the message on the
    /// command line, and never sends it over QMP).
    pub fn hint(&self) -> Option<String> {
        match self {
            BlockError::ImageLock { source, path } => source.hint(path),
            _ => None,
        }
    }

    pub fn class(&self) -> QapiErrorClass {
        // QEMU 10 answers GenericError for every block-layer failure that
        // reaches these commands, unknown nodes included.
        let _ = self;
        QapiErrorClass::GenericError
    }
}

/// The system's words for an I/O error, without Rust's "(os error N)".
pub fn strerror(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl From<BlockError> for QmpError {
    fn from(e: BlockError) -> Self {
        QmpError {
            hint: e.hint(),
            ..QmpError::with_class(e.class(), e.to_string())
        }
    }
}
