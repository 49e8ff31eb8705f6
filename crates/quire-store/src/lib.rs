//! Where quire reads inputs from and writes results to.
//!
//! [`BlobStore`] is the small key/value interface results, Markdown and
//! manifests are written through. Writes are idempotent by key: the same key
//! always receives the same bytes for the same task, so a retried upload
//! needs no conditional PUT. [`local::LocalStore`] keeps keys as files under
//! a folder, written to a temporary file and renamed into place.
//!
//! [`archive`] reads tar and zip inputs member by member (WebDataset samples).
//!
//! [`inputs`] lists input objects lazily (a folder walk streams through a
//! channel; millions of files never sit in memory).

pub mod archive;
pub mod inputs;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: the network, a throttled or restarting store.
    #[error("{0}")]
    Transient(String),
    /// Retrying will not help: bad credentials, missing bucket, bad key.
    #[error("{0}")]
    Permanent(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound | K::PermissionDenied | K::InvalidInput | K::InvalidData => StoreError::Permanent(e.to_string()),
            _ => StoreError::Transient(e.to_string()),
        }
    }
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Write `data` at `key`, replacing what was there, all or nothing.
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError>;
    /// The bytes at `key`, `None` when absent.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// Keys starting with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Where the key lives, for people (a path or an `s3://` URI).
    fn locate(&self, key: &str) -> String;
}
