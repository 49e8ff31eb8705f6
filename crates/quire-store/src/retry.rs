//! Riding out transient store faults: [`Retry`] (how long, how often) and [`RetryingStore`],
//! the [`BlobStore`] decorator that runs every operation of the store behind it through a [`Retry`].
//! Imports: the crate root ([`BlobStore`], [`StoreError`]) only.

use crate::{BlobStore, StoreError};
use async_trait::async_trait;
use std::time::{Duration, Instant};

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
}
