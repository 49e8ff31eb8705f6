//! `quire run`: list, plan, work and finish in one process, with the
//! in-process queue and a local output folder.

use crate::finish::{finish_job, JobOutcome, PlannedTask};
use crate::plan::{examine, Examined, ImageGroups, Planner};
use crate::process::ProcessContext;
use crate::progress::Progress;
use crate::worker::{LocalFetch, OneStore, Worker};
use quire_core::{results_key, JobSettings, Manifest};
use quire_queue::memory::MemoryQueue;
use quire_queue::{QueueOptions, TaskQueue};
use quire_store::inputs::{list_local, ListWarning, Listed};
use quire_store::local::LocalStore;
use quire_store::{BlobStore, StoreError};
use tokio::sync::watch;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

pub struct RunOptions {
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub settings: JobSettings,
    /// Tasks worked on at the same time.
    pub workers: usize,
    /// Redo tasks whose results already exist.
    pub force: bool,
    pub queue: QueueOptions,
    pub ctx: ProcessContext,
    /// `--price-per-hour`, for the cost in the manifest.
    pub price_per_hour: Option<f64>,
}

pub struct RunSummary {
    pub manifest: Manifest,
    pub warnings: Vec<ListWarning>,
    /// Where the manifest was written.
    pub manifest_path: String,
}

/// The output folder, stopping the run when it refuses a write for good (a full disk, a
/// read-only file system, no permission): every other task would fail the same way, so the
/// run ends at once with the reason instead of retrying and dead-lettering every task.
struct OutputGuard {
    inner: LocalStore,
    stop: watch::Sender<bool>,
    failure: std::sync::Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl BlobStore for OutputGuard {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let r = self.inner.put(key, data).await;
        if let Err(e @ StoreError::Permanent(_)) = &r {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            f.get_or_insert_with(|| format!("writing {}: {e}", self.inner.locate(key)));
            self.stop.send_replace(true);
        }
        r
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }

    fn locate(&self, key: &str) -> String {
        self.inner.locate(key)
    }
}

impl OutputGuard {
    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Runs a whole job. Progress is reported through `progress` while it runs.
pub async fn run_embedded(opts: RunOptions, progress: Arc<Progress>) -> anyhow::Result<RunSummary> {
    let started_at = SystemTime::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let guard = Arc::new(OutputGuard { inner: LocalStore::new(&opts.out), stop: stop_tx, failure: Default::default() });
    let store: Arc<dyn BlobStore> = guard.clone();
    let queue = MemoryQueue::new(opts.queue);
    let heartbeat = (opts.queue.ack_wait / 3).max(Duration::from_millis(10));
    let mut workers = Vec::new();
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    for _ in 0..opts.workers.max(1) {
        let w = Worker {
            queue: Arc::new(queue.clone()),
            stores: Arc::new(OneStore(store.clone())),
            fetch: Arc::new(LocalFetch),
            ctx: opts.ctx.clone(),
            progress: progress.clone(),
            heartbeat,
            admit: None,
            observer: None,
            abort: Some(stop_rx.clone()),
            gate: gate.clone(),
        };
        workers.push(tokio::spawn(async move { w.run().await }));
    }

    let planner = Planner::new(opts.settings.clone());
    let limits = opts.settings.limits;
    let mut plan: Vec<PlannedTask> = Vec::new();
    let mut warnings = Vec::new();
    let mut skipped = 0u64;
    for input in &opts.inputs {
        let (tx, mut rx) = mpsc::channel(256);
        let root = input.clone();
        let lister = tokio::task::spawn_blocking(move || list_local(&root, tx));
        // Loose images are grouped per input, in listing order.
        let mut groups = ImageGroups::new(opts.settings.images_per_task);
        loop {
            if guard.failure().is_some() {
                break;
            }
            let item = rx.recv().await;
            let tasks = match item {
                None => {
                    let Some(last) = groups.flush(&planner) else { break };
                    vec![last]
                }
                Some(Listed::Warning(w)) => {
                    tracing::warn!("{}: {}", w.path, w.message);
                    warnings.push(w);
                    continue;
                }
                Some(Listed::Object(src)) => {
                    Progress::add(&progress.objects_listed, 1);
                    let pdf = opts.ctx.pdf.clone();
                    let path = PathBuf::from(&src.uri);
                    match tokio::task::spawn_blocking(move || examine(&path, &limits, &pdf)).await? {
                        Examined::Object(Ok(p)) if p.kind.is_image() => groups.push(&planner, input, src).into_iter().collect(),
                        Examined::Object(probe) => planner.plan(&src, &probe),
                        Examined::Archive(scan) => planner.plan_archive(&src, &scan),
                    }
                }
            };
            for task in tasks {
                let units = u64::from(task.units());
                Progress::add(&progress.tasks_planned, 1);
                Progress::add(&progress.pages_planned, units);
                plan.push(PlannedTask {
                    task_id: task.task_id.clone(),
                    uri: task.source.uri.clone(),
                    rel: task.source.rel.clone(),
                    first: task.first,
                    last: task.last,
                    unit: task.unit,
                });
                if !opts.force && store.exists(&results_key(&task.settings.job, &task.task_id)).await? {
                    skipped += 1;
                    Progress::add(&progress.tasks_skipped, 1);
                    Progress::add(&progress.pages_skipped, units);
                    continue;
                }
                queue.publish(&task).await?;
            }
        }
        // A stopped run leaves the rest of the listing unread: let the lister end.
        drop(rx);
        lister.await?;
    }
    progress.planning_done.store(true, std::sync::atomic::Ordering::Relaxed);
    queue.close();
    for w in workers {
        w.await??;
    }
    if let Some(why) = guard.failure() {
        anyhow::bail!("{why}; the job stopped, and running the same command again resumes it");
    }
    let dead = queue.dead_letters();
    let pages_this_run = Progress::get(&progress.pages_ok) + Progress::get(&progress.pages_failed);
    let manifest = finish_job(
        store.as_ref(),
        JobOutcome {
            settings: &opts.settings,
            inputs: &opts.inputs,
            plan: &plan,
            dead: &dead,
            tasks_skipped: skipped,
            started_at,
            pages_this_run: crate::finish::PagesThisRun::Counted(pages_this_run),
            known_records: None,
            price_per_hour: opts.price_per_hour,
        },
    )
    .await?;
    let manifest_path = store.locate(&quire_core::manifest_key(&opts.settings.job));
    Ok(RunSummary { manifest, warnings, manifest_path })
}
