//! The worker loop: lease a task, fetch its input, process it, store its
//! records, ack. Heartbeats keep long tasks leased; transient failures are
//! nacked with a growing delay and end in the dead-letter path after
//! `max_deliver` deliveries.

use crate::process::{process_task, ProcessContext, TaskFailure};
use crate::progress::Progress;
use quire_core::{results_key, Record, SourceRef};
use quire_queue::{Lease, TaskQueue};
use quire_store::BlobStore;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Makes an input object available as a local file for the renderer.
#[async_trait::async_trait]
pub trait Fetch: Send + Sync {
    /// The local path of `src` (a download for remote objects), and what to
    /// keep alive while it is used.
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure>;
}

/// A fetched input: its path, and the temporary file behind it if any.
pub struct Fetched {
    pub path: PathBuf,
    pub _keep: Option<Box<dyn Send + Sync>>,
}

/// Local inputs are read where they are.
pub struct LocalFetch;

#[async_trait::async_trait]
impl Fetch for LocalFetch {
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
        Ok(Fetched { path: PathBuf::from(&src.uri), _keep: None })
    }
}

pub struct Worker {
    pub queue: Arc<dyn TaskQueue>,
    pub store: Arc<dyn BlobStore>,
    pub fetch: Arc<dyn Fetch>,
    pub ctx: ProcessContext,
    pub progress: Arc<Progress>,
    /// How often a running task's lease is renewed.
    pub heartbeat: Duration,
}

/// Serialises records as JSON lines, in page order.
pub fn to_jsonl(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).expect("records serialise");
        out.push(b'\n');
    }
    out
}

/// Delay before the n-th redelivery: 1 s, 2 s, 4 s … capped at one minute.
pub fn backoff(delivery: u32) -> Duration {
    Duration::from_secs(1u64 << delivery.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl Worker {
    /// Works until the queue says there is nothing more.
    pub async fn run(&self) -> anyhow::Result<()> {
        while let Some(lease) = self.queue.pull().await? {
            self.handle(lease).await;
        }
        Ok(())
    }

    async fn handle(&self, lease: Box<dyn Lease>) {
        let task = lease.task().clone();
        let work = async {
            let input = self.fetch.fetch(&task.source).await?;
            let records = process_task(&task, &input.path, &self.ctx).await?;
            drop(input);
            self.store
                .put(&results_key(&task.settings.job, &task.task_id), to_jsonl(&records))
                .await
                .map_err(|e| TaskFailure(format!("storing results: {e}")))?;
            Ok::<_, TaskFailure>(records)
        };
        tokio::pin!(work);
        let mut beat = tokio::time::interval(self.heartbeat);
        beat.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = beat.tick() => {
                    if let Err(e) = lease.heartbeat().await {
                        tracing::warn!(task = %task.task_id, "heartbeat failed: {e}");
                    }
                }
            }
        };
        let p = &self.progress;
        match result {
            Ok(records) => {
                for r in &records {
                    if r.error.is_some() {
                        Progress::add(&p.pages_failed, 1);
                        tracing::debug!(source = %r.source, page = r.page, "error record: {:?}", r.error);
                    } else {
                        Progress::add(&p.pages_ok, 1);
                    }
                    Progress::add(&p.tokens_in, r.tokens_in);
                    Progress::add(&p.tokens_out, r.tokens_out);
                }
                Progress::add(&p.tasks_done, 1);
                if let Err(e) = lease.ack().await {
                    tracing::warn!(task = %task.task_id, "ack failed (results are stored; a redelivery will redo them): {e}");
                }
            }
            Err(TaskFailure(msg)) => {
                let delivery = lease.delivery();
                tracing::warn!(task = %task.task_id, source = %task.source.uri, delivery, "task failed, will retry: {msg}");
                Progress::add(&p.tasks_retried, 1);
                if let Err(e) = lease.nack(backoff(delivery), &msg).await {
                    tracing::warn!(task = %task.task_id, "nack failed: {e}");
                }
            }
        }
    }
}
