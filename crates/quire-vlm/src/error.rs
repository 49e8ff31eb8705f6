//! The crate's error type, [`Error`]: what went wrong, by where (checkpoint folder, its
//! `config.json`, tokenizer, image processing, tensor computation, files, the caller's
//! settings), each message saying what to change where it can.
//!
//! Messages carry their causes (`loading model.connector: cannot find tensor ...`), so
//! `{}` shows the whole story and [`std::error::Error::source`] is not used for it; callers
//! on `anyhow` take it with `?`.

use std::path::PathBuf;

/// What went wrong in quire-vlm.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The checkpoint folder or hub id cannot be used: a missing or unreadable file, weights
    /// that are not where the family keeps them, a model quire does not run. Point quire at a
    /// complete Hugging Face checkpoint folder of a supported family.
    #[error("{0}")]
    Checkpoint(String),
    /// A `config.json` value of the wrong type (the message names its key) or a setting quire
    /// does not support; fix the key or use a checkpoint with a supported configuration.
    #[error("{0}")]
    Config(String),
    /// The tokenizer could not be loaded or could not encode or decode.
    #[error("{0}")]
    Tokenizer(String),
    /// An image or prompt the processor cannot handle (too small an image, a prompt with the
    /// wrong number of `<image>` tokens, a chat template that does not render).
    #[error("{0}")]
    Processor(String),
    /// A setting or call the caller can change: an unknown dtype, device or loop option, a
    /// request prepared for another model family, a call out of order.
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed in candle (out of device memory, a weight of the wrong
    /// shape in the checkpoint).
    #[error("{0}")]
    Candle(candle_core::Error),
    /// A file could not be read.
    #[error("reading {}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// Any of the above, with what quire was doing when it happened.
    #[error("{context}: {inner}")]
    Context { context: String, inner: Box<Error> },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// quire-vlm's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what quire was doing to an error, like `anyhow::Context`.
pub(crate) trait Context<T> {
    fn context(self, context: &str) -> Result<T>;
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: &str) -> Result<T> {
        self.with_context(|| context.to_string())
    }

    fn with_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Context { context: context(), inner: Box::new(e.into()) })
    }
}

/// `return Err(Error::Kind(format!(...)))`: `bail!(Config, "rope type {t:?} is not supported")`.
macro_rules! bail {
    ($kind:ident, $($fmt:tt)*) => {
        return Err($crate::Error::$kind(format!($($fmt)*)))
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_shows_its_cause_and_anyhow_takes_the_error() {
        let e: Result<()> = Err(Error::Config("text_config: num_attention_heads is 0".into()));
        let e = e.context("loading model.text_model").unwrap_err();
        assert_eq!(e.to_string(), "loading model.text_model: text_config: num_attention_heads is 0");
        let any: anyhow::Error = e.into();
        assert_eq!(format!("{any:#}"), "loading model.text_model: text_config: num_attention_heads is 0");
    }
}
