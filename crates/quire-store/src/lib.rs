//! Where quire reads inputs from and writes results to.
//!
//! [`BlobStore`] is the small key/value interface results, Markdown and
//! manifests are written through. Writes are idempotent by key: the same key
//! always receives the same bytes for the same task, so a retried upload
//! needs no conditional PUT. [`local::LocalStore`] keeps keys as files under
//! a folder, written to a temporary file and renamed into place.
//!
//! [`archive`] reads tar and zip inputs member by member (WebDataset samples), from a
//! local file or any `Read + Seek` source, such as [`s3::RangedReader`] (ranged GETs of one
//! object, counted in a [`ReadStats`]).
//!
//! [`inputs`] lists input objects lazily (a folder walk streams through a
//! channel; millions of files never sit in memory).
//!
//! [`Retry`] and [`RetryingStore`] (in `retry.rs`) ride out transient store faults.
//!
//! This file holds the shared vocabulary ([`StoreError`], [`ReadStats`], [`BlobStore`]) and
//! imports none of its modules except to re-export them.

pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "s3")]
mod resolve;
mod retry;
mod source;

#[cfg(feature = "s3")]
pub use resolve::{is_s3, open_store, S3Access};
pub use retry::{Retry, RetryingStore};
pub use source::{archive, inputs};

use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, thiserror::Error)]
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
            K::StorageFull | K::QuotaExceeded | K::ReadOnlyFilesystem | K::FileTooLarge => {
                StoreError::Permanent(format!("{e} (free some space or choose another --out)"))
            }
            _ => StoreError::Transient(e.to_string()),
        }
    }
}

/// What a reader of a remote object fetched: requests sent (retries included) and bytes
/// received, and the first error it met. Readers behind `std::io::Read` can only hand an
/// archive reader an `io::Error`, which it may take for a damaged archive; whoever made the
/// reader checks [`ReadStats::failure`] after the walk, so a store fault fails the task
/// (to be retried) instead of becoming a `truncated` record.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    failure: Mutex<Option<StoreError>>,
}

impl ReadStats {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Keeps `e` unless an earlier error was kept.
    pub fn fail(&self, e: StoreError) {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    }

    /// The first error the reader met, if any.
    pub fn failure(&self) -> Option<StoreError> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
    /// Removes `key`; a key that is not there is no error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Moves the object at `from` to `to`, replacing what `to` held; nothing when `from` is
    /// absent. The default copies, then deletes (an object store has no rename): a crash in
    /// between leaves both, and doing the move again finishes it.
    async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        if let Some(bytes) = self.get(from).await? {
            self.put(to, bytes).await?;
            self.delete(from).await?;
        }
        Ok(())
    }
    /// Where the key lives, for people (a path or an `s3://` URI).
    fn locate(&self, key: &str) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_not_worth_retrying() {
        let e = StoreError::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(!e.is_transient());
        assert!(e.to_string().contains("free some space"), "{e}");
    }
}
