//! `quire run`: list, plan, work and finish in one process, with the
//! in-process queue and a local output folder.

use crate::finish::{finish_job, JobOutcome, PlannedTask};
use crate::plan::Planner;
use crate::process::ProcessContext;
use crate::progress::Progress;
use crate::worker::{LocalFetch, OneStore, Worker};
use quire_core::{results_key, JobSettings, Manifest};
use quire_queue::memory::MemoryQueue;
use quire_queue::{QueueOptions, TaskQueue};
use quire_store::inputs::{list_local, ListWarning, Listed};
use quire_store::local::LocalStore;
use quire_store::BlobStore;
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
}

pub struct RunSummary {
    pub manifest: Manifest,
    pub warnings: Vec<ListWarning>,
    /// Where the manifest was written.
    pub manifest_path: String,
}

/// Runs a whole job. Progress is reported through `progress` while it runs.
pub async fn run_embedded(opts: RunOptions, progress: Arc<Progress>) -> anyhow::Result<RunSummary> {
    let started_at = SystemTime::now();
    let store: Arc<dyn BlobStore> = Arc::new(LocalStore::new(&opts.out));
    let queue = MemoryQueue::new(opts.queue);
    let heartbeat = (opts.queue.ack_wait / 3).max(Duration::from_millis(10));
    let mut workers = Vec::new();
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
            abort: None,
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
        while let Some(item) = rx.recv().await {
            let src = match item {
                Listed::Object(src) => src,
                Listed::Warning(w) => {
                    tracing::warn!("{}: {}", w.path, w.message);
                    warnings.push(w);
                    continue;
                }
            };
            Progress::add(&progress.objects_listed, 1);
            let pdf = opts.ctx.pdf.clone();
            let path = PathBuf::from(&src.uri);
            let probe = tokio::task::spawn_blocking(move || quire_render::probe(&path, &limits, &pdf)).await?;
            for task in planner.plan(&src, &probe) {
                let units = u64::from(task.units());
                Progress::add(&progress.tasks_planned, 1);
                Progress::add(&progress.pages_planned, units);
                plan.push(PlannedTask {
                    task_id: task.task_id.clone(),
                    uri: src.uri.clone(),
                    rel: src.rel.clone(),
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
        lister.await?;
    }
    progress.planning_done.store(true, std::sync::atomic::Ordering::Relaxed);
    queue.close();
    for w in workers {
        w.await??;
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
            gpu_seconds: 0.0,
        },
    )
    .await?;
    let manifest_path = store.locate(&quire_core::manifest_key(&opts.settings.job));
    Ok(RunSummary { manifest, warnings, manifest_path })
}
