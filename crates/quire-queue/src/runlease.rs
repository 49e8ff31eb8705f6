//! One coordinator per standing job at a time: a lease on the job in the JetStream
//! key-value bucket `quire-runs`.
//!
//! A coordinator takes the lease before it plans a run and holds it until the run is closed
//! (its manifests written). The lease is a key created only when absent (compare-and-swap),
//! renewed by an update that names the revision the holder last wrote, every third of the
//! lease time; the bucket's age limit is the lease time, so the key of a holder that died
//! disappears by itself. A second coordinator of the same job (a retried Pod, a Job created by
//! hand from the CronJob the same night) waits until the lease is free, then plans: runs
//! skip finished work, so the second one of the same run finds the night's work done (or
//! carries on with what the first left) and closes the run again, instead of racing it.

use crate::renew_every;
use crate::jetstream::{stream_replicas, subject_token};
use crate::QueueError;
use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const BUCKET: &str = "quire-runs";

/// Who holds a job's lease (the key's value).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub job: String,
    pub run: String,
    /// Host name (the Pod's name on Kubernetes) and process id.
    pub host: String,
    pub pid: u32,
    /// RFC 3339, when this holder took the lease.
    pub since: String,
}

impl Holder {
    /// This process as the holder; `since` is the time it takes the lease (RFC 3339).
    pub fn here(job: &str, run: &str, since: String) -> Holder {
        Holder {
            job: job.to_string(),
            run: run.to_string(),
            host: std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .unwrap_or_else(|| "unknown host".into()),
            pid: std::process::id(),
            since,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} of job {} (coordinator {} pid {}, since {})",
            self.run, self.job, self.host, self.pid, self.since
        )
    }
}

fn backend(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(format!("{what}: {e}"))
}

/// The `quire-runs` bucket.
#[derive(Clone)]
pub struct RunLeases {
    kv: kv::Store,
    lease: Duration,
}

/// A held lease: renewed in the background until [`RunLease::release`] (or the drop of the
/// lease, which stops renewing and lets it expire).
pub struct RunLease {
    kv: kv::Store,
    key: String,
    renewer: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
    revision: Arc<std::sync::Mutex<u64>>,
}

impl RunLeases {
    /// Opens the bucket, creating it when missing with `lease` as its age limit (an existing
    /// bucket keeps its own, which then is the lease time).
    pub async fn open(
        client: &async_nats::Client,
        replicas: Option<usize>,
        lease: Duration,
    ) -> Result<Self, QueueError> {
        let js = jetstream::new(client.clone());
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: BUCKET.into(),
                    description: "which coordinator runs each standing job now".into(),
                    history: 1,
                    max_age: lease,
                    num_replicas: stream_replicas(&js, &format!("KV_{BUCKET}"), replicas).await,
                    ..Default::default()
                })
                .await
                .map_err(|e| backend("creating the quire-runs bucket", e))?,
        };
        let mut stream = js
            .get_stream(format!("KV_{BUCKET}"))
            .await
            .map_err(|e| backend("opening the quire-runs bucket", e))?;
        let age = stream
            .info()
            .await
            .map_err(|e| backend("reading the quire-runs bucket", e))?
            .config
            .max_age;
        let lease = if age.is_zero() { lease } else { age };
        Ok(RunLeases { kv, lease })
    }

    /// The lease time in force (the bucket's age limit).
    pub fn lease_time(&self) -> Duration {
        self.lease
    }

    /// Who holds the lease of `job` now, if anyone.
    pub async fn holder(&self, job: &str) -> Result<Option<Holder>, QueueError> {
        let v = self
            .kv
            .get(subject_token(job))
            .await
            .map_err(|e| backend("reading the run lease", e))?;
        Ok(v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Takes the lease of `holder.job` if it is free: `Ok(Err(current))` names the holder
    /// when it is not.
    pub async fn try_acquire(
        &self,
        holder: &Holder,
    ) -> Result<Result<RunLease, Option<Holder>>, QueueError> {
        let key = subject_token(&holder.job);
        let body = serde_json::to_vec(holder).map_err(|e| backend("encoding the run lease", e))?;
        match self.kv.create(&key, body.clone().into()).await {
            Ok(rev) => Ok(Ok(self.hold(key, body, rev))),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Ok(Err(self.holder(&holder.job).await?))
            }
            Err(e) => Err(backend("taking the run lease", e)),
        }
    }

    /// Takes the lease of `holder.job`, waiting while another coordinator holds it;
    /// `waiting` is called with the current holder each time it is found taken.
    pub async fn acquire(
        &self,
        holder: &Holder,
        mut waiting: impl FnMut(Option<&Holder>),
    ) -> Result<RunLease, QueueError> {
        let poll = renew_every(self.lease).min(Duration::from_secs(5));
        loop {
            match self.try_acquire(holder).await? {
                Ok(lease) => return Ok(lease),
                Err(current) => waiting(current.as_ref()),
            }
            tokio::time::sleep(poll).await;
        }
    }

    fn hold(&self, key: String, body: Vec<u8>, rev: u64) -> RunLease {
        let lost = Arc::new(AtomicBool::new(false));
        let revision = Arc::new(std::sync::Mutex::new(rev));
        let (kv, every, k, l, r) = (
            self.kv.clone(),
            renew_every(self.lease),
            key.clone(),
            lost.clone(),
            revision.clone(),
        );
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let last = *r.lock().unwrap_or_else(|p| p.into_inner());
                match kv.update(&k, body.clone().into(), last).await {
                    Ok(next) => *r.lock().unwrap_or_else(|p| p.into_inner()) = next,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        tracing::error!("the run lease was taken by another coordinator (this one missed its renewals)");
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    // A broker outage: try again at the next renewal (the lease may lapse).
                    Err(e) => tracing::warn!("renewing the run lease: {e}"),
                }
            }
        });
        RunLease {
            kv: self.kv.clone(),
            key,
            renewer,
            lost,
            revision,
        }
    }
}

impl RunLease {
    /// Whether another coordinator took the lease after this one failed to renew it.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives the lease up (the next coordinator need not wait for it to expire).
    pub async fn release(self) -> Result<(), QueueError> {
        self.renewer.abort();
        if self.lost() {
            return Ok(());
        }
        let rev = *self.revision.lock().unwrap_or_else(|p| p.into_inner());
        self.kv
            .delete_expect_revision(&self.key, Some(rev))
            .await
            .map_err(|e| backend("giving up the run lease", e))
    }
}

impl Drop for RunLease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}
