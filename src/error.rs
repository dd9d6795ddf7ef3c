//! One error type for the whole crate. Each variant knows its HTTP status and
//! the message a client may see; internal causes are kept for the log and the
//! command line and never reach an HTTP client.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// 400: the request is malformed or fails validation; the message names the field.
    BadRequest(String),
    /// 401: no valid token. Every authentication failure is this one value.
    Unauthorized,
    /// 404: with what was not found ("runner not found", "no such endpoint").
    NotFound(&'static str),
    /// 405: with the methods the path does allow, for the `Allow` header.
    MethodNotAllowed(&'static str),
    /// 408: the body did not arrive before the connection's idle timeout.
    RequestTimeout,
    /// 413: the body is over the limit.
    PayloadTooLarge,
    /// 503: the database could not be reached or stayed locked.
    Unavailable(String),
    /// A failure of the command line's own input (unknown token id, bad user name...).
    Invalid(String),
    /// 500: anything else. The cause is logged, not shown.
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::BadRequest(message.into())
    }

    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) | Error::Invalid(_) => 400,
            Error::Unauthorized => 401,
            Error::NotFound(_) => 404,
            Error::MethodNotAllowed(_) => 405,
            Error::RequestTimeout => 408,
            Error::PayloadTooLarge => 413,
            Error::Unavailable(_) => 503,
            Error::Internal(_) => 500,
        }
    }

    /// The text an HTTP client sees.
    pub fn public_message(&self) -> String {
        match self {
            Error::BadRequest(m) | Error::Invalid(m) => m.clone(),
            Error::Unauthorized => "missing or invalid bearer token".into(),
            Error::NotFound(what) => (*what).into(),
            Error::MethodNotAllowed(allow) => format!("method not allowed; allowed: {allow}"),
            Error::RequestTimeout => "the request body did not arrive in time".into(),
            Error::PayloadTooLarge => "request body must be at most 1 MiB".into(),
            Error::Unavailable(_) => "database unavailable, try again".into(),
            Error::Internal(_) => "internal error".into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unavailable(cause) => write!(f, "database unavailable: {cause}"),
            Error::Internal(cause) => write!(f, "{cause}"),
            other => write!(f, "{}", other.public_message()),
        }
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
        match e.sqlite_error_code() {
            Some(DatabaseBusy) | Some(DatabaseLocked) => Error::Unavailable(e.to_string()),
            _ => Error::Internal(format!("database error: {e}")),
        }
    }
}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Error {
        Error::Unavailable(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Internal(e.to_string())
    }
}
