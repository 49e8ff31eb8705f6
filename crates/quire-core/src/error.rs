//! Error kinds, one list for every crate: [`ErrorKind`] (the `error.kind` of records, the
//! kinds render and archive errors carry), and [`InputError`], the error about one input file
//! (or one page of it) that quire-render and quire-store's archive reader return.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Declares [`ErrorKind`] with each variant's stable name written once: serde's name, and
/// [`ErrorKind::as_str`] and [`ErrorKind::ALL`], all come from the one list.
macro_rules! error_kinds {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $str:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $str)] $variant,)*
        }

        impl $name {
            /// Every kind, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The stable snake_case name, as serde writes it in records and manifests.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $str,)*
                }
            }
        }
    };
}

error_kinds! {
    /// Why a page or file produced no text. Stable strings, part of the output contract: names
    /// are only ever added. Records carry every kind but [`BadRange`](ErrorKind::BadRange) and
    /// [`PdfiumMissing`](ErrorKind::PdfiumMissing), which are quire's own trouble and are
    /// recorded as [`Internal`](ErrorKind::Internal) (see [`ErrorKind::recorded`]).
    pub enum ErrorKind {
        /// Not a PDF or a supported image format (decided by magic bytes), or a feature of the
        /// file (e.g. a TIFF colour model) that is not supported.
        Unsupported = "unsupported",
        /// The file is damaged: it claims a format but cannot be parsed.
        Corrupt = "corrupt",
        /// The file ends early (a PDF without its trailer, an image whose data stops short).
        Truncated = "truncated",
        /// The PDF needs a password.
        Encrypted = "encrypted",
        /// Zero bytes, or a document without pages.
        Empty = "empty",
        /// Larger than `max_file_bytes`.
        TooLarge = "too_large",
        /// More pages (or TIFF frames) than `max_pages`.
        TooManyPages = "too_many_pages",
        /// More pixels than `max_pixels` (an image, or a page as it would be rendered).
        TooManyPixels = "too_many_pixels",
        /// Rendering the page (or opening the document) took longer than the page time limit;
        /// the render process was stopped and replaced.
        Timeout = "timeout",
        /// The file could not be read.
        Io = "io",
        /// The page has no usable text layer and no model was given.
        NeedsModel = "needs_model",
        /// The model failed on this input.
        Model = "model",
        /// Anything else inside quire.
        Internal = "internal",
        /// The model's output repeated itself until quire stopped it (`--on-loop`): the record
        /// keeps the text up to one period of the repetition. A flag, not a failure: see
        /// [`Record::failed`](crate::Record::failed).
        Loop = "loop",
        /// A page/frame range outside the document (a planner/caller bug, not a bad input).
        /// Never in a record: recorded as `internal`.
        BadRange = "bad_range",
        /// libpdfium could not be found or loaded. Never in a record: transient (the task is
        /// retried), and recorded as `internal` should it get that far.
        PdfiumMissing = "pdfium_missing",
    }
}

impl ErrorKind {
    /// The kind a record says for this one: [`BadRange`](ErrorKind::BadRange) and
    /// [`PdfiumMissing`](ErrorKind::PdfiumMissing) become [`Internal`](ErrorKind::Internal),
    /// every other kind is itself.
    pub const fn recorded(self) -> ErrorKind {
        match self {
            ErrorKind::BadRange | ErrorKind::PdfiumMissing => ErrorKind::Internal,
            k => k,
        }
    }

    /// Whether retrying the same input could succeed (only I/O trouble and a missing pdfium;
    /// a corrupt file stays corrupt). Decides between retrying the task and a final error
    /// record.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Io | ErrorKind::PdfiumMissing)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error about one input (or one page of it) from probing, rendering, decoding or reading
/// an archive: a kind the pipeline can count and route on, and a message a person can act on.
/// Shown as `kind: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{kind}: {message}")]
pub struct InputError {
    pub kind: ErrorKind,
    pub message: String,
}

impl InputError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        InputError { kind, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are the record schema's: serde and `as_str` agree, and none was renamed.
    #[test]
    fn names_are_serdes_and_stable() {
        for &k in ErrorKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::Value::from(k.as_str()));
            assert_eq!(serde_json::from_value::<ErrorKind>(k.as_str().into()).unwrap(), k);
            assert_eq!(k.to_string(), k.as_str());
        }
        let names: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "unsupported", "corrupt", "truncated", "encrypted", "empty", "too_large", "too_many_pages", "too_many_pixels", "timeout",
                "io", "needs_model", "model", "internal", "loop", "bad_range", "pdfium_missing",
            ]
        );
    }

    #[test]
    fn records_say_internal_for_quires_own_trouble() {
        for &k in ErrorKind::ALL {
            let r = k.recorded();
            match k {
                ErrorKind::BadRange | ErrorKind::PdfiumMissing => assert_eq!(r, ErrorKind::Internal),
                _ => assert_eq!(r, k),
            }
        }
        let info = crate::ErrorInfo::from(InputError::new(ErrorKind::BadRange, "page 5 of 4"));
        assert_eq!(info, crate::ErrorInfo { kind: ErrorKind::Internal, message: "page 5 of 4".into() });
        assert!(ErrorKind::Io.is_transient() && ErrorKind::PdfiumMissing.is_transient() && !ErrorKind::Corrupt.is_transient());
    }

    #[test]
    fn input_error_shows_kind_and_message() {
        let e = InputError::new(ErrorKind::TooManyPages, "9 pages, limit 3");
        assert_eq!(e.to_string(), "too_many_pages: 9 pages, limit 3");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"kind":"too_many_pages","message":"9 pages, limit 3"}"#);
        assert_eq!(serde_json::from_str::<InputError>(&json).unwrap(), e);
    }
}
