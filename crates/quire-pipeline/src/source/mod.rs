//! Where a task's input comes from: the [`Fetch`] trait and its local implementation (the
//! S3 one in [`s3`]). May import `error` only.

pub mod s3;

use crate::error::TaskFailure;
use quire_core::SourceRef;
use quire_store::archive::ReadSeek;
use quire_store::ReadStats;
use std::path::PathBuf;
use std::sync::Arc;

/// Makes an input object available as a local file for the renderer.
#[async_trait::async_trait]
pub trait Fetch: Send + Sync {
    /// The local path of `src` (a download for remote objects), and what to
    /// keep alive while it is used.
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure>;

    /// The first `len` bytes of `src` by a ranged read (to tell an archive from the rest),
    /// `None` when this fetcher reads `src` from a local path (the default).
    async fn head(&self, _src: &SourceRef, _len: u64) -> Result<Option<Vec<u8>>, TaskFailure> {
        Ok(None)
    }

    /// `src` read by ranged requests instead of downloaded (for archives: a task reads only
    /// what its range needs), `None` when this fetcher has no such reader for it (the
    /// default: local paths are read where they are).
    async fn open_ranged(&self, _src: &SourceRef) -> Result<Option<RangedInput>, TaskFailure> {
        Ok(None)
    }

    /// Whether a download of `src` is kept for this worker's later tasks, so that the tasks
    /// of one object pay for one download (the default: nothing is downloaded).
    fn keeps(&self, _src: &SourceRef) -> bool {
        false
    }
}

/// A fetched input: its path, and the temporary file behind it if any.
pub struct Fetched {
    pub path: PathBuf,
    pub _keep: Option<Box<dyn Send + Sync>>,
    /// Bytes this call downloaded from the store: 0 for a local path or a download
    /// already cached.
    pub downloaded: u64,
}

/// An input object read by ranged requests.
pub struct RangedInput {
    pub reader: Box<dyn ReadSeek>,
    /// The object's size.
    pub size: u64,
    /// The reader's requests, bytes and first error (check it after reading: the archive
    /// reader takes a failed read for a damaged archive).
    pub stats: Arc<ReadStats>,
}

/// Local inputs are read where they are.
pub struct LocalFetch;

#[async_trait::async_trait]
impl Fetch for LocalFetch {
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
        Ok(Fetched { path: PathBuf::from(&src.uri), _keep: None, downloaded: 0 })
    }
}
