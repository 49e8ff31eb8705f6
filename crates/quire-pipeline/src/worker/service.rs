//! A distributed worker process as one library type: task slots over the JetStream queue,
//! the result stores and fetcher it needs, its dead-letter forwarder and queue gauges, and a
//! graceful stop. `quire worker` parses flags, loads the model and starts it.

use crate::metrics::Metrics;
use crate::progress::Progress;
use crate::source::s3::{scratch_dir, S3Fetch};
use quire_store::S3Access;
use crate::stage::process::ProcessContext;
use crate::worker::observe::TaskObserver;
use crate::worker::stores::StoreCache;
use crate::worker::{Admit, Worker};
use quire_queue::jetstream::JetStreamQueue;
use quire_queue::progress::JobProgress;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What a worker process runs with; [`WorkerService::run`] starts it.
pub struct WorkerService {
    pub queue: JetStreamQueue,
    /// How the inputs and outputs on S3 are reached.
    pub access: S3Access,
    /// Downloads kept for the later tasks of the same object, in bytes.
    pub doc_cache_bytes: u64,
    pub ctx: ProcessContext,
    /// Which tasks this worker takes (e.g. only those of its model).
    pub admit: Admit,
    pub metrics: Arc<Metrics>,
    /// Tasks run at once.
    pub slots: usize,
    /// After a stop, how long running tasks may take before they are handed back.
    pub grace: Duration,
}

impl WorkerService {
    /// Runs the task slots until `stop` completes (a signal) or a slot fails, then lets running
    /// tasks finish for up to [`grace`](Self::grace) and hands the rest back.
    pub async fn run(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        let WorkerService { queue, access, doc_cache_bytes, ctx, admit, metrics, slots, grace } = self;
        metrics.set_max_deliver(queue.options().queue.max_deliver);
        metrics.ready.set(1);
        let mut stores = StoreCache::new(access.clone());
        stores.jobs = Some(JobProgress::open(queue.client(), queue.options().replicas).await?);
        let stores = Arc::new(stores);
        let mut fetch = S3Fetch::new(access.client().await, scratch_dir(), doc_cache_bytes);
        fetch.retry = access.retry;
        let fetch = Arc::new(fetch);
        let progress = Arc::new(Progress::default());
        let (abort_tx, abort_rx) = watch::channel(false);
        let mut loops = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        for _ in 0..slots.max(1) {
            let w = Worker {
                queue: Arc::new(queue.clone()),
                stores: stores.clone(),
                fetch: fetch.clone(),
                ctx: ctx.clone(),
                progress: progress.clone(),
                admit: Some(admit.clone()),
                observer: Some(metrics.clone() as Arc<dyn TaskObserver>),
                abort: Some(abort_rx.clone()),
                gate: gate.clone(),
            };
            loops.spawn(async move { w.run().await });
        }
        let fq = queue.clone();
        let forwarder = tokio::spawn(async move {
            if let Err(e) = fq.forward_dead_letters().await {
                tracing::warn!("dead-letter forwarder stopped: {e}");
            }
        });
        let mq = queue.clone();
        let m2 = metrics.clone();
        let gauge = tokio::spawn(async move {
            loop {
                for job in m2.jobs() {
                    if let Ok(n) = mq.pending(&job).await {
                        m2.queue_pending.with_label_values(&[job.as_str()]).set(n as i64);
                    }
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let mut failed = None;
        tokio::select! {
            _ = stop => tracing::info!("stopping: finishing running tasks (up to {grace:?})"),
            Some(r) = loops.join_next() => failed = Some(r),
        }
        metrics.ready.set(0);
        queue.stop();
        let drain = async {
            while let Some(r) = loops.join_next().await {
                if let Ok(Err(e)) = r {
                    tracing::warn!("worker loop: {e:#}");
                }
            }
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!("grace period over: handing unfinished tasks back");
            abort_tx.send_replace(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while loops.join_next().await.is_some() {}
            })
            .await;
        }
        forwarder.abort();
        gauge.abort();
        match failed {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("worker loop panicked: {e}")),
            _ => Ok(()),
        }
    }
}
