//! `quire run`: list, plan, work and finish in one process, with the
//! in-process queue. Inputs and the output are local folders or `s3://` prefixes, reached
//! through the same store, listing and download code as the distributed mode's.

use crate::sink::finish::finish_outputs;
use crate::sink::finish::JobOutcome;
use crate::stage::plan::PlannedTask;
use crate::coordinator::runs::begin_run;
use crate::coordinator::runs::close_run;
use crate::coordinator::runs::object_task;
use crate::coordinator::runs::planned;
use crate::coordinator::runs::CloseRun;
use crate::coordinator::runs::JobState;
use crate::coordinator::runs::RunBook;
use crate::stage::plan::examine;
use crate::stage::plan::Examined;
use crate::stage::plan::ImageGroups;
use crate::stage::plan::Planner;
use crate::stage::process::ProcessContext;
use crate::progress::Progress;
use quire_store::is_s3;
use quire_store::open_store;
use crate::source::s3::scratch_dir;
use crate::source::s3::spawn_listing;
use crate::source::s3::S3Fetch;
use crate::source::Fetch;
use crate::source::LocalFetch;
use crate::worker::stores::OneStore;
use crate::worker::Worker;
use quire_core::{results_key, JobSettings, Manifest, ObjectStatus, UnitKind};
use std::collections::HashSet;
use quire_queue::memory::MemoryQueue;
use quire_queue::{QueueOptions, TaskQueue};
use quire_store::inputs::{ListWarning, Listed};
use quire_store::{BlobStore, StoreError};
use tokio::sync::watch;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::mpsc;

pub struct RunOptions {
    pub inputs: Vec<String>,
    /// The output: a folder or `s3://bucket/prefix`.
    pub out: String,
    /// How `s3://` inputs and outputs are reached.
    pub access: quire_store::S3Access,
    /// Disk space for downloaded `s3://` inputs kept between planning (which opens new objects)
    /// and work, in bytes.
    pub download_cache_bytes: u64,
    pub settings: JobSettings,
    /// Tasks worked on at the same time.
    pub workers: usize,
    /// Redo tasks whose results already exist.
    pub force: bool,
    /// The run's name (`--run`): runs of the same name are one run.
    pub run: String,
    /// Redo the tasks whose results hold error records (`--retry-failed`).
    pub retry_failed: bool,
    /// Delete superseded files instead of moving them under `JOB/superseded/RUN/`.
    pub prune: bool,
    pub queue: QueueOptions,
    pub ctx: ProcessContext,
    /// `--price-per-hour`, for the cost in the manifest.
    pub price_per_hour: Option<f64>,
}

pub struct RunSummary {
    /// The job as it stands.
    pub manifest: Manifest,
    /// What this run found and did.
    pub run: Manifest,
    /// Where the run manifest was written.
    pub run_manifest_path: String,
    pub warnings: Vec<ListWarning>,
    /// Where the manifest was written.
    pub manifest_path: String,
}

/// The output, stopping the run when it refuses a write for good (a full disk, a read-only
/// file system, no permission, a bucket that refuses the key): every other task would fail
/// the same way, so the run ends at once with the reason instead of retrying and
/// dead-lettering every task.
struct OutputGuard {
    inner: Arc<dyn BlobStore>,
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

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        self.inner.rename(from, to).await
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
    let inner = open_store(&opts.out, &opts.access).await?;
    let guard = Arc::new(OutputGuard { inner, stop: stop_tx, failure: Default::default() });
    let s3_client = if opts.inputs.iter().any(|i| is_s3(i)) { Some(opts.access.client().await) } else { None };
    let fetch: Arc<dyn Fetch> = match &s3_client {
        Some(c) => {
            let mut f = S3Fetch::new(c.clone(), scratch_dir(), opts.download_cache_bytes);
            f.retry = opts.access.retry;
            Arc::new(f)
        }
        None => Arc::new(LocalFetch),
    };
    let store: Arc<dyn BlobStore> = guard.clone();
    let queue = MemoryQueue::new(opts.queue);
    let mut workers = Vec::new();
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    for _ in 0..opts.workers.max(1) {
        let w = Worker {
            queue: Arc::new(queue.clone()),
            stores: Arc::new(OneStore(store.clone())),
            fetch: fetch.clone(),
            ctx: opts.ctx.clone(),
            progress: progress.clone(),
            admit: None,
            observer: None,
            abort: Some(stop_rx.clone()),
            gate: gate.clone(),
        };
        workers.push(tokio::spawn(async move { w.run().await }));
    }

    let planner = Planner::new(opts.settings.clone());
    let limits = opts.settings.limits;
    let job = opts.settings.job.clone();
    let state = JobState::load(store.as_ref(), &job, &opts.settings).await?;
    begin_run(store.as_ref(), &job, &opts.run, started_at).await?;
    let mut book = RunBook::default();
    let mut plan: Vec<PlannedTask> = Vec::new();
    let mut published: HashSet<String> = HashSet::new();
    let mut warnings = Vec::new();
    let mut skipped = 0u64;
    for input in &opts.inputs {
        let (tx, mut rx) = mpsc::channel(256);
        let lister = spawn_listing(input, s3_client.as_ref(), tx);
        // Loose images are grouped per input, by name (see `ImageGroups`).
        let mut groups = ImageGroups::new(opts.settings.images_per_task);
        let (listed_before, warned_before) = (Progress::get(&progress.objects_listed), warnings.len());
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
                    book.unlisted(&w.path);
                    warnings.push(w);
                    continue;
                }
                Some(Listed::Object(src)) => {
                    Progress::add(&progress.objects_listed, 1);
                    let found = state.classify(&src, &opts.run);
                    match state.unchanged(&src) {
                        // Grouped by name: an unchanged image needs no look at its bytes.
                        Some(p) if p.kind == "image" => {
                            book.add(&state, &opts.run, &src, "image", found);
                            groups.push(&planner, input, src).into_iter().collect()
                        }
                        // Finished before (and not to be retried): its tasks stand as they are.
                        Some(p) if !opts.force && (p.status == ObjectStatus::Done || (p.status == ObjectStatus::Failed && !opts.retry_failed)) => {
                            book.add(&state, &opts.run, &src, &p.kind, found);
                            book.set_tasks(&src.uri, p.tasks.clone());
                            for t in &p.tasks {
                                let units = u64::from(t.last.saturating_sub(t.first) + 1);
                                Progress::add(&progress.tasks_planned, 1);
                                Progress::add(&progress.pages_planned, units);
                                Progress::add(&progress.tasks_skipped, 1);
                                Progress::add(&progress.pages_skipped, units);
                                skipped += 1;
                                plan.push(planned(t));
                            }
                            continue;
                        }
                        _ => {
                            let pdf = opts.ctx.pdf.clone();
                            // An `s3://` object is downloaded to be opened; the download stays in
                            // the fetcher's cache for the task's worker.
                            let examined = match fetch.fetch(&src).await {
                                Ok(f) => tokio::task::spawn_blocking(move || {
                                    let e = examine(&f.path, &limits, &pdf);
                                    drop(f);
                                    e
                                })
                                .await?,
                                Err(e) => Examined::Object(Err(quire_core::InputError::new(quire_core::ErrorKind::Io, e.message))),
                            };
                            match examined {
                                Examined::Object(Ok(p)) if p.kind.is_image() => {
                                    book.add(&state, &opts.run, &src, "image", found);
                                    groups.push(&planner, input, src).into_iter().collect()
                                }
                                Examined::Object(probe) => {
                                    book.add(&state, &opts.run, &src, if probe.is_ok() { "pdf" } else { "unreadable" }, found);
                                    planner.plan(&src, &probe)
                                }
                                Examined::Archive(scan) => {
                                    book.add(&state, &opts.run, &src, if scan.is_ok() { "archive" } else { "unreadable" }, found);
                                    planner.plan_archive(&src, &scan)
                                }
                            }
                        }
                    }
                }
            };
            for mut task in tasks {
                if !opts.force {
                    state.attach_reuse(&mut task);
                }
                let units = u64::from(task.units());
                Progress::add(&progress.tasks_planned, 1);
                Progress::add(&progress.pages_planned, units);
                let p = PlannedTask {
                    task_id: task.task_id.clone(),
                    uri: task.source.uri.clone(),
                    rel: task.source.rel.clone(),
                    first: task.first,
                    last: task.last,
                    unit: task.unit,
                };
                if task.unit == UnitKind::Images {
                    for m in &task.members {
                        book.set_tasks(&m.uri, vec![object_task(&p)]);
                    }
                } else {
                    book.push_task(&task.source.uri, object_task(&p));
                }
                plan.push(p);
                let done = state.done(&task.task_id);
                let retry = opts.retry_failed && done.is_some_and(|failed| failed > 0);
                if !opts.force && !retry && (done.is_some() || store.exists(&results_key(&job, &task.task_id)).await?) {
                    skipped += 1;
                    Progress::add(&progress.tasks_skipped, 1);
                    Progress::add(&progress.pages_skipped, units);
                    continue;
                }
                published.insert(task.task_id.clone());
                queue.publish(&task).await?;
            }
        }
        // A stopped run leaves the rest of the listing unread: let the lister end.
        drop(rx);
        lister.await?;
        // Nothing listed and a listing error: the input is unreachable, not empty (a run that
        // went on would count every object of it as removed).
        if guard.failure().is_none() && Progress::get(&progress.objects_listed) == listed_before && warnings.len() > warned_before {
            let why: Vec<String> = warnings[warned_before..].iter().map(|w: &ListWarning| format!("{}: {}", w.path, w.message)).collect();
            anyhow::bail!("could not list {input}: {}", why.join("; "));
        }
    }
    plan.extend(book.carry_unlisted(&state));
    progress.planning_done.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        "planned in {:.3}s: {} objects listed, {} tasks, {} queued, {} already done",
        started_at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
        book.len(),
        plan.len(),
        published.len(),
        skipped
    );
    queue.close();
    for w in workers {
        w.await??;
    }
    if let Some(why) = guard.failure() {
        anyhow::bail!("{why}; the job stopped, and running the same command again resumes it");
    }
    let dead = queue.dead_letters();
    let pages_this_run = Progress::get(&progress.pages_ok) + Progress::get(&progress.pages_failed);
    let report = finish_outputs(
        store.as_ref(),
        JobOutcome {
            settings: &opts.settings,
            inputs: &opts.inputs,
            plan: &plan,
            dead: &dead,
            tasks_skipped: skipped,
            started_at,
            pages_this_run: crate::sink::finish::PagesThisRun::Counted(pages_this_run),
            known_records: None,
            price_per_hour: opts.price_per_hour,
            fresh: Some(&|id: &str| published.contains(id)),
        },
    )
    .await?;
    let closed = close_run(
        store.as_ref(),
        &state,
        book,
        report,
        CloseRun {
            run: &opts.run,
            prune: opts.prune,
            started_at,
            plan: &plan,
            published: &published,
            tasks_skipped: skipped,
            dead: &dead,
            price_per_hour: opts.price_per_hour,
        },
    )
    .await?;
    let manifest_path = store.locate(&quire_core::manifest_key(&job));
    let run_manifest_path = store.locate(&closed.run_manifest_key);
    Ok(RunSummary { manifest: closed.job, run: closed.run, warnings, manifest_path, run_manifest_path })
}
