//! The one error type of this crate: a kind the pipeline can count and route on, and a
//! message a person can act on.

use std::fmt;

/// What went wrong, coarse enough to count in a manifest (`as_str` is the stable name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not a PDF or a supported image (decided from magic bytes), or a feature of the file
    /// (e.g. a TIFF colour model) that is not supported.
    Unsupported,
    /// The file claims a format but cannot be parsed.
    Corrupt,
    /// The file ends early (a PDF without its trailer, an image whose data stops short).
    Truncated,
    /// The PDF needs a password to open.
    Encrypted,
    /// Zero bytes, or a document with zero pages.
    Empty,
    /// More bytes than `Limits::max_file_bytes`.
    TooLarge,
    /// More pages (or TIFF frames) than `Limits::max_pages`.
    TooManyPages,
    /// An image or a rendered page would exceed `Limits::max_pixels`.
    TooManyPixels,
    /// A page/frame range outside the document (a planner/caller bug, not a bad input).
    BadRange,
    /// Reading the file failed.
    Io,
    /// libpdfium could not be found or loaded.
    PdfiumMissing,
    /// pdfium took longer than the page time limit on a page (or opening the document); the
    /// render process was stopped and replaced.
    Timeout,
}

impl ErrorKind {
    /// The stable snake_case name used in records and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Truncated => "truncated",
            ErrorKind::Encrypted => "encrypted",
            ErrorKind::Empty => "empty",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::TooManyPages => "too_many_pages",
            ErrorKind::TooManyPixels => "too_many_pixels",
            ErrorKind::BadRange => "bad_range",
            ErrorKind::Io => "io",
            ErrorKind::PdfiumMissing => "pdfium_missing",
            ErrorKind::Timeout => "timeout",
        }
    }

    /// Whether retrying the same input could succeed (only I/O trouble; a corrupt file stays
    /// corrupt). Useful to decide between nack-with-retry and a final failed record.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Io | ErrorKind::PdfiumMissing)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from probing, rendering or decoding one input (or one page of it).
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{kind}: {message}")]
pub struct RenderError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RenderError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RenderError {
            kind,
            message: message.into(),
        }
    }
}

pub(crate) fn io_error(path: &std::path::Path, what: &str, e: std::io::Error) -> RenderError {
    let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ErrorKind::Truncated
    } else {
        ErrorKind::Io
    };
    RenderError::new(kind, format!("{what} {}: {e}", path.display()))
}
