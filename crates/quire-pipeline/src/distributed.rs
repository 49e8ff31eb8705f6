//! Distributed mode: a coordinator plans a job onto the JetStream work queue,
//! workers anywhere pull tasks, and the output store (S3 or a shared folder)
//! is the system of record.
//!
//! What lives where:
//! - every task carries the job's settings, the output location included
//!   ([`JobSettings::out`]), so a worker needs nothing but the queue;
//! - `JOB/job.json` ([`JobFile`]: settings, inputs, start time, counts) and
//!   `JOB/plan.jsonl` (one [`PlanLine`] per task, in plan order) are written
//!   under the output by the coordinator; `quire status` and the finish step
//!   read them from there;
//! - `JOB/results/TASK_ID.jsonl` marks a task done; dead letters live in the
//!   `QUIRE_DEAD` stream.

use crate::finish::{finish_job, parse_jsonl, JobOutcome, PlannedTask};
use crate::plan::Planner;
use crate::process::TaskFailure;
use crate::worker::{Fetch, Fetched, ResultStores};
use anyhow::Context as _;
use quire_core::{job_prefix, results_key, DeadLetter, JobSettings, Manifest, SourceRef, TaskSpec};
use quire_queue::jetstream::{JetStreamOptions, JetStreamQueue};
use quire_queue::{Published, QueueOptions, TaskQueue};
use quire_store::inputs::{list_local, ListWarning, Listed};
use quire_store::local::LocalStore;
use quire_store::s3::{self, S3Options, S3Store};
use quire_store::BlobStore;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How to reach S3 beyond the standard AWS environment.
#[derive(Debug, Clone, Default)]
pub struct S3Access {
    /// Endpoint of an S3-compatible service (else `AWS_ENDPOINT_URL` or AWS).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (most S3-compatible services need it).
    pub path_style: bool,
}

impl S3Access {
    pub fn options(&self, uri: &str) -> Result<S3Options, quire_store::StoreError> {
        let mut o = S3Options::from_uri(uri)?;
        o.endpoint_url = self.endpoint.clone();
        o.region = self.region.clone();
        o.force_path_style = self.path_style;
        Ok(o)
    }

    /// A client for any bucket.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let mut o = S3Options::new("", "");
        o.endpoint_url = self.endpoint.clone();
        o.region = self.region.clone();
        o.force_path_style = self.path_style;
        s3::client(&o).await
    }
}

pub fn is_s3(uri: &str) -> bool {
    uri.starts_with("s3://")
}

/// Opens the output store named by `uri`: `s3://bucket/prefix` (the bucket
/// is checked) or a folder.
pub async fn open_store(uri: &str, access: &S3Access) -> anyhow::Result<Arc<dyn BlobStore>> {
    if is_s3(uri) {
        let store = S3Store::new(access.options(uri)?)
            .await
            .with_context(|| format!("opening {uri}"))?;
        Ok(Arc::new(store))
    } else {
        Ok(Arc::new(LocalStore::new(uri)))
    }
}

/// Local paths are read in place; `s3://` objects are streamed to a
/// temporary file in `dir` (deleted when the task is done).
pub struct S3Fetch {
    pub client: aws_sdk_s3::Client,
    pub dir: PathBuf,
}

#[async_trait::async_trait]
impl Fetch for S3Fetch {
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
        if !is_s3(&src.uri) {
            return Ok(Fetched {
                path: PathBuf::from(&src.uri),
                _keep: None,
            });
        }
        let f = s3::fetch_to_file(&self.client, src, &self.dir)
            .await
            .map_err(|e| TaskFailure(format!("fetching {}: {e}", src.uri)))?;
        Ok(Fetched {
            path: f.path().to_path_buf(),
            _keep: Some(Box::new(f)),
        })
    }
}

/// Output stores by the `out` URI each task carries, opened once each.
pub struct StoreCache {
    pub access: S3Access,
    stores: tokio::sync::Mutex<HashMap<String, Arc<dyn BlobStore>>>,
}

impl StoreCache {
    pub fn new(access: S3Access) -> Self {
        StoreCache {
            access,
            stores: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl ResultStores for StoreCache {
    async fn store_for(&self, task: &TaskSpec) -> Result<Arc<dyn BlobStore>, TaskFailure> {
        let out = task.settings.out.as_deref().ok_or_else(|| {
            TaskFailure(
                "the task names no output location (published by an older coordinator?)".into(),
            )
        })?;
        let mut map = self.stores.lock().await;
        if let Some(s) = map.get(out) {
            return Ok(s.clone());
        }
        let s = open_store(out, &self.access)
            .await
            .map_err(|e| TaskFailure(format!("{e:#}")))?;
        map.insert(out.to_string(), s.clone());
        Ok(s)
    }
}

/// One planned task in `JOB/plan.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanLine {
    pub task_id: String,
    pub uri: String,
    pub rel: String,
    pub first: u32,
    pub last: u32,
}

impl PlanLine {
    pub fn units(&self) -> u64 {
        u64::from(self.last + 1 - self.first)
    }

    fn planned(&self) -> PlannedTask {
        PlannedTask {
            task_id: self.task_id.clone(),
            uri: self.uri.clone(),
            rel: self.rel.clone(),
            first: self.first,
            last: self.last,
        }
    }
}

/// `JOB/job.json`: what the coordinator submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub settings: JobSettings,
    pub inputs: Vec<String>,
    /// Unix seconds of the (latest) submission.
    pub submitted_at: f64,
    pub tasks: u64,
    pub units: u64,
    pub published: u64,
    pub skipped: u64,
    pub duplicates: u64,
}

pub fn plan_key(job: &str) -> String {
    format!("{}plan.jsonl", job_prefix(job))
}

pub fn job_file_key(job: &str) -> String {
    format!("{}job.json", job_prefix(job))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub async fn read_plan(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<Vec<PlanLine>>> {
    let Some(bytes) = store.get(&plan_key(job)).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        out.push(serde_json::from_slice(line).context("malformed plan.jsonl")?);
    }
    Ok(Some(out))
}

pub async fn read_job_file(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<JobFile>> {
    let Some(bytes) = store.get(&job_file_key(job)).await? else {
        return Ok(None);
    };
    Ok(Some(
        serde_json::from_slice(&bytes).context("malformed job.json")?,
    ))
}

/// Ids of the tasks of `job` with stored results.
pub async fn results_present(store: &dyn BlobStore, job: &str) -> anyhow::Result<HashSet<String>> {
    let prefix = format!("{}results/", job_prefix(job));
    Ok(store
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|k| {
            k.strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".jsonl"))
                .map(str::to_string)
        })
        .collect())
}

pub struct CoordinatorOptions {
    pub nats: JetStreamOptions,
    pub inputs: Vec<String>,
    /// `settings.out` names the output (a folder or `s3://`).
    pub settings: JobSettings,
    pub access: S3Access,
    /// Publish tasks whose results already exist.
    pub force: bool,
    /// Where S3 inputs are downloaded to be probed.
    pub scratch: PathBuf,
    pub pdf: quire_render::PdfRenderer,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Submitted {
    pub documents: u64,
    pub tasks: u64,
    pub units: u64,
    pub published: u64,
    pub skipped: u64,
    pub duplicates: u64,
    /// Pages and frames of the skipped tasks.
    pub skipped_units: u64,
    #[serde(skip)]
    pub warnings: Vec<ListWarning>,
}

/// Lists the inputs, plans them, publishes the tasks that have no results
/// yet and writes `JOB/plan.jsonl` and `JOB/job.json`.
pub async fn submit(
    o: &CoordinatorOptions,
    queue: &JetStreamQueue,
    store: &dyn BlobStore,
) -> anyhow::Result<(Submitted, Vec<PlanLine>)> {
    let job = o.settings.job.clone();
    let planner = Planner::new(o.settings.clone());
    let limits = o.settings.limits;
    let s3_client = o.access.client().await;
    let done = if o.force {
        HashSet::new()
    } else {
        results_present(store, &job).await?
    };
    let mut sub = Submitted::default();
    let mut plan = Vec::new();
    for input in &o.inputs {
        let (tx, mut rx) = mpsc::channel(256);
        let lister = if is_s3(input) {
            let (c, u) = (s3_client.clone(), input.clone());
            tokio::spawn(async move { s3::list_s3(&c, &u, 1000, tx).await })
        } else {
            let root = input.clone();
            tokio::spawn(async move {
                let _ = tokio::task::spawn_blocking(move || list_local(&root, tx)).await;
            })
        };
        while let Some(item) = rx.recv().await {
            let src = match item {
                Listed::Object(src) => src,
                Listed::Warning(w) => {
                    tracing::warn!("{}: {}", w.path, w.message);
                    sub.warnings.push(w);
                    continue;
                }
            };
            sub.documents += 1;
            // S3 objects are downloaded to be probed (the probe reads the
            // PDF's page tree; a ranged read would do for most files).
            let fetched = if is_s3(&src.uri) {
                match s3::fetch_to_file(&s3_client, &src, &o.scratch).await {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!("{}: {e}", src.uri);
                        sub.warnings.push(ListWarning {
                            path: src.uri.clone(),
                            message: e.to_string(),
                        });
                        sub.documents -= 1;
                        continue;
                    }
                }
            } else {
                None
            };
            let path = fetched
                .as_ref()
                .map(|f| f.path().to_path_buf())
                .unwrap_or_else(|| PathBuf::from(&src.uri));
            let pdf = o.pdf.clone();
            let probe =
                tokio::task::spawn_blocking(move || quire_render::probe(&path, &limits, &pdf))
                    .await?;
            drop(fetched);
            for task in planner.plan(&src, &probe) {
                sub.tasks += 1;
                sub.units += u64::from(task.units());
                plan.push(PlanLine {
                    task_id: task.task_id.clone(),
                    uri: src.uri.clone(),
                    rel: src.rel.clone(),
                    first: task.first,
                    last: task.last,
                });
                if done.contains(&task.task_id) {
                    sub.skipped += 1;
                    sub.skipped_units += u64::from(task.units());
                    continue;
                }
                match queue.publish(&task).await? {
                    Published::New => sub.published += 1,
                    Published::Duplicate => sub.duplicates += 1,
                }
            }
        }
        lister.await?;
    }
    let mut body = Vec::new();
    for p in &plan {
        serde_json::to_writer(&mut body, p)?;
        body.push(b'\n');
    }
    store.put(&plan_key(&job), body).await?;
    let jf = JobFile {
        settings: o.settings.clone(),
        inputs: o.inputs.clone(),
        submitted_at: unix_now(),
        tasks: sub.tasks,
        units: sub.units,
        published: sub.published,
        skipped: sub.skipped,
        duplicates: sub.duplicates,
    };
    store
        .put(&job_file_key(&job), serde_json::to_vec_pretty(&jf)?)
        .await?;
    Ok((sub, plan))
}

/// Where a job stands, from the output store (and the queue when given).
#[derive(Debug, Default, Clone, Serialize)]
pub struct JobStatus {
    pub job: String,
    pub tasks: u64,
    pub done: u64,
    pub dead_lettered: u64,
    pub pending: u64,
    pub units: u64,
    pub pages_ok: u64,
    pub pages_failed: u64,
    /// Tasks still in the work stream (queued, leased or backing off), when the queue was asked.
    pub queued: Option<u64>,
    pub elapsed_seconds: f64,
    pub pages_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub finished: bool,
}

/// Counts a job's tasks; `pages` reads every result file to count pages.
pub async fn job_status(
    store: &dyn BlobStore,
    job: &str,
    queue: Option<&JetStreamQueue>,
    pages: bool,
) -> anyhow::Result<Option<JobStatus>> {
    let Some(plan) = read_plan(store, job).await? else {
        return Ok(None);
    };
    let jf = read_job_file(store, job).await?;
    let present = results_present(store, job).await?;
    let dead: HashSet<String> = match queue {
        Some(q) => q
            .dead_letters(job)
            .await?
            .into_iter()
            .map(|d| d.task_id)
            .collect(),
        None => HashSet::new(),
    };
    let mut st = JobStatus {
        job: job.to_string(),
        tasks: plan.len() as u64,
        ..Default::default()
    };
    let mut units_done = 0;
    for p in &plan {
        st.units += p.units();
        if present.contains(&p.task_id) {
            st.done += 1;
            units_done += p.units();
            if pages {
                if let Some(bytes) = store.get(&results_key(job, &p.task_id)).await? {
                    for r in parse_jsonl(&bytes)? {
                        if r.error.is_some() {
                            st.pages_failed += 1;
                        } else {
                            st.pages_ok += 1;
                        }
                    }
                }
            }
        } else if dead.contains(&p.task_id) {
            st.dead_lettered += 1;
        } else {
            st.pending += 1;
        }
    }
    if let Some(q) = queue {
        st.queued = Some(q.pending(job).await?);
    }
    st.finished = st.pending == 0;
    if let Some(jf) = jf {
        st.elapsed_seconds = (unix_now() - jf.submitted_at).max(0.0);
        // Units done by this submission: what was done minus what was
        // skipped as already done (approximately: skipped tasks' units are
        // not recorded, so use the task share).
        let skipped_units = if jf.tasks > 0 {
            jf.units * jf.skipped / jf.tasks
        } else {
            0
        };
        let new_units = units_done.saturating_sub(skipped_units);
        if st.elapsed_seconds > 0.0 {
            st.pages_per_second = new_units as f64 / st.elapsed_seconds;
        }
        let remaining = st.units.saturating_sub(units_done);
        if remaining == 0 {
            st.eta_seconds = Some(0.0);
        } else if st.pages_per_second > 0.0 {
            st.eta_seconds = Some(remaining as f64 / st.pages_per_second);
        }
    }
    Ok(Some(st))
}

/// Waits until every planned task has results or is dead-lettered, then
/// writes the Markdown and the manifest. Dead letters of expired leases are
/// forwarded meanwhile.
pub async fn wait_and_finish(
    o: &CoordinatorOptions,
    queue: &JetStreamQueue,
    store: &dyn BlobStore,
    plan: &[PlanLine],
    sub: &Submitted,
    started_at: SystemTime,
    poll: Duration,
) -> anyhow::Result<Manifest> {
    let job = &o.settings.job;
    let q = queue.clone();
    let forwarder = tokio::spawn(async move { q.forward_dead_letters().await });
    let mut last_log = std::time::Instant::now();
    let dead: Vec<DeadLetter> = loop {
        let present = results_present(store, job).await?;
        let dead = queue.dead_letters(job).await?;
        let dead_ids: HashSet<&str> = dead.iter().map(|d| d.task_id.as_str()).collect();
        let open = plan
            .iter()
            .filter(|p| !present.contains(&p.task_id) && !dead_ids.contains(p.task_id.as_str()))
            .count();
        if open == 0 {
            break dead;
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = std::time::Instant::now();
            tracing::info!("{job}: {open} of {} tasks still open", plan.len());
        }
        tokio::time::sleep(poll).await;
    };
    forwarder.abort();
    let planned: Vec<PlannedTask> = plan.iter().map(PlanLine::planned).collect();
    let manifest = finish_job(
        store,
        JobOutcome {
            settings: &o.settings,
            inputs: &o.inputs,
            plan: &planned,
            dead: &dead,
            tasks_skipped: sub.skipped,
            started_at,
            pages_this_run: sub.units.saturating_sub(sub.skipped_units),
            gpu_seconds: 0.0,
        },
    )
    .await?;
    Ok(manifest)
}

/// Connects to the queue with the given delivery rules.
pub async fn connect_queue(url: &str, queue: QueueOptions) -> anyhow::Result<JetStreamQueue> {
    let mut o = JetStreamOptions::new(url);
    o.queue = queue;
    JetStreamQueue::connect(o)
        .await
        .with_context(|| format!("connecting to NATS JetStream at {url}"))
}

/// A folder for temporary downloads.
pub fn scratch_dir() -> PathBuf {
    std::env::temp_dir()
}

/// Downloads an `s3://` model prefix into `cache` (files already there with
/// the right size are kept) and returns the local folder.
pub async fn fetch_model(spec: &str, access: &S3Access, cache: &Path) -> anyhow::Result<PathBuf> {
    let (bucket, prefix) = s3::parse_s3_uri(spec)?;
    let dir = cache.join(bucket).join(prefix.trim_matches('/'));
    let client = access.client().await;
    let n = s3::download_prefix(&client, spec, &dir)
        .await
        .with_context(|| format!("downloading the model {spec}"))?;
    tracing::info!("model {spec}: {n} files downloaded to {}", dir.display());
    Ok(dir)
}
