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

pub mod archive;
pub mod inputs;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;

use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// How long transient store faults are retried before an operation gives up.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Longest time from the first failure of an operation to giving up on it.
    pub budget: Duration,
    /// First wait; each later wait doubles, up to `max_wait`.
    pub first_wait: Duration,
    pub max_wait: Duration,
}

impl Default for Retry {
    /// Rides out an object store's bad minutes: up to 15 minutes, waits from 0.5 s to 15 s.
    fn default() -> Self {
        Retry { budget: Duration::from_secs(900), first_wait: Duration::from_millis(500), max_wait: Duration::from_secs(15) }
    }
}

impl Retry {
    /// No retries at all.
    pub fn none() -> Self {
        Retry { budget: Duration::ZERO, ..Retry::default() }
    }

    /// Runs `op` until it succeeds, fails permanently, or transient failures have lasted
    /// `budget`; waits grow from `first_wait` to `max_wait` with ±25% jitter so a fleet of
    /// workers does not hammer a recovering store in step. `what` names the operation in logs.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut first_failure: Option<Instant> = None;
        let mut wait = self.first_wait;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match op().await {
                Ok(v) => {
                    if let Some(t) = first_failure {
                        tracing::info!("{what}: the store answered again after {:.1}s", t.elapsed().as_secs_f64());
                    }
                    return Ok(v);
                }
                Err(StoreError::Transient(msg)) => {
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    if since.elapsed() + wait > self.budget {
                        return Err(StoreError::Transient(format!(
                            "{msg} (still failing after {attempt} attempts in {:.0}s)",
                            since.elapsed().as_secs_f64()
                        )));
                    }
                    tracing::warn!("{what}: {msg}; attempt {attempt}, retrying in {:.1}s", wait.as_secs_f64());
                    tokio::time::sleep(jitter(wait)).await;
                    wait = (wait * 2).min(self.max_wait);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A [`BlobStore`] whose every operation rides out transient faults of the store behind it
/// (see [`Retry`]); permanent faults pass through at once.
pub struct RetryingStore<S> {
    pub inner: S,
    pub retry: Retry,
}

#[async_trait]
impl<S: BlobStore> BlobStore for RetryingStore<S> {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let what = format!("writing {}", self.inner.locate(key));
        self.retry.run(&what, || self.inner.put(key, data.clone())).await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let what = format!("reading {}", self.inner.locate(key));
        self.retry.run(&what, || self.inner.get(key)).await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let what = format!("looking for {}", self.inner.locate(key));
        self.retry.run(&what, || self.inner.exists(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let what = format!("listing {}", self.inner.locate(prefix));
        self.retry.run(&what, || self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let what = format!("deleting {}", self.inner.locate(key));
        self.retry.run(&what, || self.inner.delete(key)).await
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let what = format!("moving {} to {}", self.inner.locate(from), self.inner.locate(to));
        self.retry.run(&what, || self.inner.rename(from, to)).await
    }

    fn locate(&self, key: &str) -> String {
        self.inner.locate(key)
    }
}

/// `d` scaled by a factor in [0.75, 1.25), from the clock's low bits (no RNG needed).
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    d.mul_f64(0.75 + (nanos % 1000) as f64 / 2000.0)
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
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(budget_ms: u64) -> Retry {
        Retry { budget: Duration::from_millis(budget_ms), first_wait: Duration::from_millis(5), max_wait: Duration::from_millis(20) }
    }

    #[tokio::test]
    async fn transient_faults_are_retried_until_the_store_answers() {
        let calls = AtomicU32::new(0);
        let r = quick(5_000)
            .run("put", || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0..=3 => Err(StoreError::Transient("connection refused".into())),
                    _ => Ok(7),
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn permanent_faults_are_not_retried_and_the_budget_ends_transient_ones() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = quick(5_000)
            .run("get", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::Permanent("access denied".into()))
            })
            .await;
        assert!(matches!(r, Err(StoreError::Permanent(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let t = Instant::now();
        let r: Result<(), _> = quick(100).run("get", || async { Err(StoreError::Transient("timeout".into())) }).await;
        let Err(StoreError::Transient(m)) = r else { panic!("expected a transient error") };
        assert!(m.contains("still failing"), "{m}");
        assert!(t.elapsed() < Duration::from_secs(2), "gave up late: {:?}", t.elapsed());
    }

    #[test]
    fn a_full_disk_is_not_worth_retrying() {
        let e = StoreError::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(!e.is_transient());
        assert!(e.to_string().contains("free some space"), "{e}");
    }
}
