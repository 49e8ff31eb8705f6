//! Inputs on S3: the fetcher that downloads or range-reads objects
//! (with its download cache), the listing task and the model download.

use crate::error::{FailureKind, TaskFailure};
use crate::source::Fetch;
use crate::source::Fetched;
use crate::source::RangedInput;
use anyhow::Context as _;
use quire_core::SourceRef;
use quire_store::inputs::{list_local, Listed};
use quire_store::s3;
use quire_store::{Retry};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;
use quire_store::{is_s3, S3Access};

/// Local paths are read in place; `s3://` objects are streamed to a
/// temporary file in `dir`. The most recent downloads are kept while they
/// fit `cache_bytes`, so the page-range tasks of one document that land on
/// the same worker download it once; a file is deleted when it is evicted
/// and no running task uses it any more.
///
/// Archives on S3 are not downloaded: [`Fetch::open_ranged`] reads them by
/// ranged GETs ([`s3::RangedReader`]), so a zip task fetches the central
/// directory and its own members, a tar task the shard up to its range's end
/// (a download already in the cache is used instead).
pub struct S3Fetch {
    pub client: aws_sdk_s3::Client,
    pub dir: PathBuf,
    pub cache_bytes: u64,
    /// Transient download faults are retried this long before the task fails.
    pub retry: Retry,
    /// Most recent first: (uri and version, size, file). Paths, not open files: a worker
    /// captioning loose images keeps thousands of small downloads, more than its open-file
    /// limit (seen: "Too many open files" after ~1,000 images of a 100,000-image prefix).
    cache: std::sync::Mutex<std::collections::VecDeque<(String, u64, Arc<tempfile::TempPath>)>>,
}

impl S3Fetch {
    pub fn new(client: aws_sdk_s3::Client, dir: PathBuf, cache_bytes: u64) -> Self {
        S3Fetch { client, dir, cache_bytes, retry: Retry::default(), cache: Default::default() }
    }

    fn cached(&self, key: &str) -> Option<Arc<tempfile::TempPath>> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let i = c.iter().position(|(k, ..)| k == key)?;
        let e = c.remove(i)?;
        let f = e.2.clone();
        c.push_front(e);
        Some(f)
    }

    fn cache_key(src: &SourceRef) -> String {
        format!("{}\n{}", src.uri, src.version)
    }

    /// Whether `src` is to be read by ranged requests: an `s3://` object not downloaded already.
    fn ranged(&self, src: &SourceRef) -> bool {
        is_s3(&src.uri) && self.cached(&Self::cache_key(src)).is_none()
    }

    fn remember(&self, key: String, size: u64, f: Arc<tempfile::TempPath>) {
        if size > self.cache_bytes {
            return;
        }
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|(k, ..)| *k != key);
        c.push_front((key, size, f));
        let mut total = 0;
        c.retain(|(_, n, _)| {
            total += n;
            total <= self.cache_bytes
        });
        c.truncate(MAX_CACHED_DOWNLOADS);
    }
}

#[async_trait::async_trait]
impl Fetch for S3Fetch {
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
        if !is_s3(&src.uri) {
            return Ok(Fetched { path: PathBuf::from(&src.uri), _keep: None, downloaded: 0 });
        }
        let key = Self::cache_key(src);
        let mut downloaded = 0;
        let f = match self.cached(&key) {
            Some(f) => f,
            None => {
                let f = self
                    .retry
                    .run(&format!("fetching {}", src.uri), || s3::fetch_to_file(&self.client, src, &self.dir))
                    .await
                    .map_err(|e| TaskFailure::caused(FailureKind::Input, format_args!("fetching {}", src.uri), e))?;
                downloaded = f.as_file().metadata().map(|m| m.len()).unwrap_or(src.size);
                // Closed here; the path (deleted with its last holder) is what is kept.
                let f = Arc::new(f.into_temp_path());
                self.remember(key, src.size, f.clone());
                f
            }
        };
        Ok(Fetched { path: f.to_path_buf(), _keep: Some(Box::new(f)), downloaded })
    }

    async fn head(&self, src: &SourceRef, len: u64) -> Result<Option<Vec<u8>>, TaskFailure> {
        if !self.ranged(src) {
            return Ok(None);
        }
        self.retry
            .run(&format!("reading the head of {}", src.uri), || s3::read_range(&self.client, src, 0, len))
            .await
            .map(Some)
            .map_err(|e| TaskFailure::caused(FailureKind::Input, format_args!("reading the head of {}", src.uri), e))
    }

    fn keeps(&self, src: &SourceRef) -> bool {
        is_s3(&src.uri) && src.size > 0 && src.size <= self.cache_bytes
    }

    async fn open_ranged(&self, src: &SourceRef) -> Result<Option<RangedInput>, TaskFailure> {
        if !self.ranged(src) {
            return Ok(None);
        }
        let r = s3::RangedReader::open(self.client.clone(), src, self.retry)
            .await
            .map_err(|e| TaskFailure::caused(FailureKind::Input, format_args!("opening {}", src.uri), e))?;
        Ok(Some(RangedInput { size: r.len(), stats: r.stats(), reader: Box::new(r) }))
    }
}

/// Downloads kept at most, whatever their bytes: tiny images would otherwise fill a
/// folder with hundreds of thousands of files.
const MAX_CACHED_DOWNLOADS: usize = 4096;

/// Lists `input` (an `s3://` prefix with `s3`, else a file or folder) into `tx`, streamed, in
/// a task of its own: what `quire run` and the coordinator plan from.
pub fn spawn_listing(input: &str, s3: Option<&aws_sdk_s3::Client>, tx: mpsc::Sender<Listed>) -> tokio::task::JoinHandle<()> {
    let input = input.to_string();
    match s3 {
        Some(c) if is_s3(&input) => {
            let c = c.clone();
            tokio::spawn(async move { s3::list_s3(&c, &input, 1000, tx).await })
        }
        _ => tokio::spawn(async move {
            let _ = tokio::task::spawn_blocking(move || list_local(&input, tx)).await;
        }),
    }
}

/// A folder for temporary downloads.
pub fn scratch_dir() -> PathBuf {
    std::env::temp_dir()
}

/// Downloads an `s3://` model prefix into `cache` (files already there with
/// the right size are kept) and returns the local folder.
pub async fn fetch_model(spec: &str, access: &S3Access, cache: &Path) -> anyhow::Result<PathBuf> {
    let (bucket, prefix) = s3::parse_s3_uri(spec)?;
    let dir = cache.join(bucket).join(prefix.trim_matches('/'));
    let client = access.client().await;
    let n = s3::download_prefix(&client, spec, &dir)
        .await
        .with_context(|| format!("downloading the model {spec}"))?;
    tracing::info!("model {spec}: {n} files downloaded to {}", dir.display());
    Ok(dir)
}
