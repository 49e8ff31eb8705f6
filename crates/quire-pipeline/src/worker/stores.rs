//! Where a task's records are stored and whether a task from the queue may run at all:
//! one store for `quire run`, a store per output location for distributed workers.

use crate::error::{FailureKind, TaskFailure};
use quire_core::TaskSpec;
use quire_queue::progress::{JobMeta, JobProgress};
use quire_store::BlobStore;
use std::collections::HashMap;
use std::sync::Arc;
use quire_store::S3Access;
use quire_store::open_store;

/// Where a task's records are stored.
#[async_trait::async_trait]
pub trait ResultStores: Send + Sync {
    async fn store_for(&self, task: &TaskSpec) -> Result<Arc<dyn BlobStore>, TaskFailure>;

    /// Whether the task may be run at all, e.g. not a message that names an input or output
    /// its job does not have.
    async fn vet(&self, _task: &TaskSpec) -> Vetting {
        Vetting::Run
    }
}

/// What [`ResultStores::vet`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vetting {
    Run,
    /// Cannot tell now (e.g. the registry is unreachable): handed back for later.
    HandBack(String),
    /// Never to be run: given up at once (a dead letter with this reason).
    Reject(String),
}

/// Every task's records go to the same store (`quire run`).
pub struct OneStore(pub Arc<dyn BlobStore>);

#[async_trait::async_trait]
impl ResultStores for OneStore {
    async fn store_for(&self, _task: &TaskSpec) -> Result<Arc<dyn BlobStore>, TaskFailure> {
        Ok(self.0.clone())
    }
}
/// Output stores by the `out` URI each task carries, opened once each.
pub struct StoreCache {
    pub access: S3Access,
    stores: tokio::sync::Mutex<HashMap<String, Arc<dyn BlobStore>>>,
    /// The coordinators' job registrations (`quire-jobs`): with it, a task is run only when
    /// its job is registered and its input and output lie where the job's do.
    pub jobs: Option<JobProgress>,
    registered: tokio::sync::Mutex<HashMap<String, JobMeta>>,
}

impl StoreCache {
    pub fn new(access: S3Access) -> Self {
        StoreCache {
            access,
            stores: Default::default(),
            jobs: None,
            registered: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl ResultStores for StoreCache {
    async fn store_for(&self, task: &TaskSpec) -> Result<Arc<dyn BlobStore>, TaskFailure> {
        let out = task.settings.out.as_deref().ok_or_else(|| {
            TaskFailure::new(FailureKind::Output, "the task names no output location (published by an older coordinator?)")
        })?;
        let mut map = self.stores.lock().await;
        if let Some(s) = map.get(out) {
            return Ok(s.clone());
        }
        let s = open_store(out, &self.access)
            .await
            .map_err(|e| TaskFailure::new(FailureKind::Output, format!("{e:#}")))?;
        map.insert(out.to_string(), s.clone());
        Ok(s)
    }

    async fn vet(&self, task: &TaskSpec) -> Vetting {
        if let Err(why) = task.check() {
            return Vetting::Reject(why);
        }
        let Some(jobs) = &self.jobs else { return Vetting::Run };
        let job = &task.settings.job;
        let mut known = self.registered.lock().await;
        let fits = |m: &JobMeta| task.vet(Some(m.scope())).is_ok();
        if !known.get(job).is_some_and(fits) {
            // Not seen yet, or registered again since (a new submission may change inputs).
            match jobs.meta(job).await {
                Ok(Some(m)) => {
                    known.insert(job.clone(), m);
                }
                Ok(None) => {
                    known.remove(job);
                }
                // Unknown for now: not a reason to give the task up, nor to run it unchecked.
                Err(e) => return Vetting::HandBack(format!("could not read the job's registration: {e}")),
            }
        }
        match task.vet(known.get(job).map(JobMeta::scope)) {
            Ok(()) => Vetting::Run,
            Err(why) => Vetting::Reject(why),
        }
    }
}
