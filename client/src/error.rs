//! The client's typed error: a [`ErrorKind`] to match on, the daemon's stable code when it sent one, and a message.

use crate::proto::{ErrorCode, WireError};

/// What kind of failure an [`Error`] is. Match on this (and on [`Error::code`] for daemon errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connect or the hello failed.
    Connect,
    /// The connection closed (or broke) before the reply arrived. The request may or may not have taken effect.
    Closed,
    /// The daemon answered with an error reply; [`Error::code`] says which.
    Server,
    /// The daemon's reply could not be understood.
    Protocol,
    /// A request could not be encoded.
    Encode,
}

/// An error from the client or the daemon.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    code: Option<ErrorCode>,
    wire_code: Option<String>,
    message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, code: None, wire_code: None, message: message.into() }
    }

    pub(crate) fn closed() -> Self {
        Error::new(ErrorKind::Closed, "connection to the daemon closed")
    }

    pub(crate) fn from_wire(wire: WireError) -> Self {
        let code = ErrorCode::parse(&wire.code);
        Error {
            kind: ErrorKind::Server,
            code,
            message: format!("{}: {}", wire.code, wire.message),
            wire_code: Some(wire.code),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The daemon's error code, for [`ErrorKind::Server`] errors with a code this crate knows.
    pub fn code(&self) -> Option<ErrorCode> {
        self.code
    }

    /// The daemon's error code as sent, including codes newer than this crate.
    pub fn wire_code(&self) -> Option<&str> {
        self.wire_code.as_deref()
    }

    /// True for a daemon error with this code.
    pub fn is(&self, code: ErrorCode) -> bool {
        self.code == Some(code)
    }
}

impl From<rmp_serde::encode::Error> for Error {
    fn from(e: rmp_serde::encode::Error) -> Self {
        Error::new(ErrorKind::Encode, format!("cannot encode request: {e}"))
    }
}
