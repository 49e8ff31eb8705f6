//! What a coordinator is told (`CoordinatorOptions`), what its planning returns, its queue
//! connection, and the store-outage budget its planning and waiting share.

use crate::coordinator::runs::JobState;
use crate::coordinator::runs::RunBook;
use anyhow::Context as _;
use quire_core::JobSettings;
use quire_queue::jetstream::{JetStreamOptions, JetStreamQueue};
use quire_queue::QueueOptions;
use quire_store::inputs::ListWarning;
use quire_store::{Retry};
use serde::{Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use crate::coordinator::planfiles::IdSet;
use quire_store::S3Access;

pub struct CoordinatorOptions {
    pub inputs: Vec<String>,
    /// `settings.out` names the output (a folder or `s3://`).
    pub settings: JobSettings,
    pub access: S3Access,
    /// Publish tasks whose results already exist.
    pub force: bool,
    /// `--price-per-hour`, for the cost in the manifest.
    pub price_per_hour: Option<f64>,
    /// The run's name (`--run`): runs of the same name are one run.
    pub run: String,
    /// Redo the tasks of earlier runs whose results hold error records (`--retry-failed`).
    pub retry_failed: bool,
    /// Delete superseded files instead of moving them under `JOB/superseded/RUN/`.
    pub prune: bool,
    /// Where the run's state is exported while the coordinator waits (`--metrics-addr`).
    pub run_metrics: Option<Arc<crate::metrics::RunMetrics>>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Submitted {
    pub run: String,
    pub documents: u64,
    pub published: u64,
    /// Documents whose results (or all of whose page-range results) exist.
    pub skipped: u64,
    /// Documents the queue already held (published within its dedup window).
    pub duplicates: u64,
    /// Listed objects new to the job, changed since its last run, and unchanged.
    pub objects_new: u64,
    pub objects_changed: u64,
    pub objects_unchanged: u64,
    /// Seconds from the start of the submission to its last publish.
    pub planning_seconds: f64,
    /// Whether finished work was known from the job manifest alone (no listing of results).
    #[serde(skip)]
    pub by_manifest: bool,
    #[serde(skip)]
    pub warnings: Vec<ListWarning>,
    /// Tasks with results before this submission.
    #[serde(skip)]
    pub done_before: IdSet,
}

/// What the finish of a run needs from its planning: the job as the earlier runs left it,
/// the objects this run listed, and the tasks it queued.
pub struct RunPlan {
    pub state: JobState,
    pub book: RunBook,
    /// Ids of the tasks this submission published (documents, image groups, and the tasks of
    /// failed pages it retried): a document's page-range tasks are this run's work when its
    /// document task is in here.
    pub queued: HashSet<String>,
}

/// Connects to the queue. With `set_rules` (the coordinator) the worker
/// consumer gets `queue`'s delivery rules; otherwise (workers, status) an
/// existing consumer's rules are kept and adopted. `replicas`: see
/// [`JetStreamOptions::replicas`].
pub async fn connect_queue(
    url: &str,
    auth: quire_queue::jetstream::NatsAuth,
    queue: QueueOptions,
    set_rules: bool,
    replicas: Option<usize>,
) -> anyhow::Result<JetStreamQueue> {
    let mut o = JetStreamOptions::new(url);
    o.auth = auth;
    o.replicas = replicas;
    o.queue = queue;
    o.set_delivery_rules = set_rules;
    JetStreamQueue::connect(o)
        .await
        .with_context(|| format!("connecting to NATS JetStream at {url}"))
}

/// Backoff for a step that failed as a whole (the store retries single operations itself):
/// waits from 0.5 s doubling to 15 s, until `retry.budget` has passed since the first failure.
pub(crate) struct Outage {
    retry: Retry,
    since: Option<std::time::Instant>,
    wait: Duration,
}

impl Outage {
    pub(crate) fn new(retry: Retry) -> Self {
        Outage { retry, since: None, wait: retry.first_wait }
    }

    /// Waits before the next try, or gives `e` back once the budget is spent.
    pub(crate) async fn wait(&mut self, what: &str, e: anyhow::Error) -> anyhow::Result<()> {
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() + self.wait > self.retry.budget {
            return Err(e.context(format!("{what}: still failing after {:.0}s", since.elapsed().as_secs_f64())));
        }
        tracing::warn!("{what}: {e:#}; trying again in {:.1}s", self.wait.as_secs_f64());
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(self.retry.max_wait);
        Ok(())
    }
}
