//! Render's errors are [`quire_core::InputError`]s, their kinds from [`quire_core::ErrorKind`]
//! (the one list); here the helper that turns a failed read of an input into one.

use quire_core::{ErrorKind, InputError};

pub(crate) fn io_error(path: &std::path::Path, what: &str, e: std::io::Error) -> InputError {
    let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ErrorKind::Truncated
    } else {
        ErrorKind::Io
    };
    InputError::new(kind, format!("{what} {}: {e}", path.display()))
}
