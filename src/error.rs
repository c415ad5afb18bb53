//! The error every QMP command answers with: a QEMU error class and a
//! description. Module errors convert into it, each knowing its class.
//! Some carry a hint for people as well, which, as in QEMU, is printed
//! when the error ends a command-line start-up and is not part of a QMP
//! reply.

use crate::qapi::QapiErrorClass;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: QapiErrorClass,
    pub desc: String,
    /// A further line of advice (`Is another process using the image
    /// [PATH]?`); never sent to QMP clients.
    pub hint: Option<String>,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: QapiErrorClass::GenericError,
            desc: desc.into(),
            hint: None,
        }
    }

    pub fn with_class(class: QapiErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
            hint: None,
        }
    }

    pub fn command_not_found(name: &str) -> Self {
        Self::with_class(
            QapiErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }
}

impl From<crate::qapi::rt::InputError> for QmpError {
    fn from(e: crate::qapi::rt::InputError) -> Self {
        QmpError::generic(e.desc)
    }
}

/// The reason of an OS error as QEMU words it: the C library's text,
/// without Rust's "(os error N)".
pub fn os_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}
