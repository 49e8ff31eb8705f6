//! Distributed mode: a coordinator plans a job onto the JetStream work queue,
//! workers anywhere pull tasks, and the output store (S3 or a shared folder)
//! is the system of record.
//!
//! What lives where:
//! - every task carries the job's settings, the output location included
//!   ([`JobSettings::out`]), so a worker needs nothing but the queue;
//! - the coordinator lists the inputs and publishes one whole-document task
//!   per object without opening it; the worker that takes it runs it whole
//!   or splits it into page-range tasks (`JOB/splits/ID.json`, see
//!   [`crate::split`]);
//! - `JOB/job.json` ([`JobFile`]: settings, inputs, start time, counts) and
//!   `JOB/plan/NNNNNN.jsonl` (one [`PlanLine`] per document, in plan order)
//!   are written under the output by the coordinator; `quire status` and the
//!   finish step read them from there;
//! - `JOB/results/TASK_ID.jsonl` marks a task done; dead letters live in the
//!   `QUIRE_DEAD` stream.

use crate::finish::{finish_job, parse_jsonl, JobOutcome, PagesThisRun, PlannedTask};
use crate::plan::Planner;
use crate::split::{document_task, split_key, splits_prefix, Split};
use crate::process::TaskFailure;
use crate::worker::{Fetch, Fetched, ResultStores};
use anyhow::Context as _;
use quire_core::{job_prefix, results_key, DeadLetter, JobSettings, Manifest, SourceRef, TaskSpec};
use quire_queue::jetstream::{JetStreamOptions, JetStreamQueue, TaskEvents};
use quire_queue::TaskEvent;
use quire_queue::QueueOptions;
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
/// temporary file in `dir`. The most recent downloads are kept while they
/// fit `cache_bytes`, so the page-range tasks of one document that land on
/// the same worker download it once; a file is deleted when it is evicted
/// and no running task uses it any more.
pub struct S3Fetch {
    pub client: aws_sdk_s3::Client,
    pub dir: PathBuf,
    pub cache_bytes: u64,
    /// Most recent first: (uri and version, size, file).
    cache: std::sync::Mutex<std::collections::VecDeque<(String, u64, Arc<tempfile::NamedTempFile>)>>,
}

impl S3Fetch {
    pub fn new(client: aws_sdk_s3::Client, dir: PathBuf, cache_bytes: u64) -> Self {
        S3Fetch { client, dir, cache_bytes, cache: Default::default() }
    }

    fn cached(&self, key: &str) -> Option<Arc<tempfile::NamedTempFile>> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let i = c.iter().position(|(k, ..)| k == key)?;
        let e = c.remove(i)?;
        let f = e.2.clone();
        c.push_front(e);
        Some(f)
    }

    fn remember(&self, key: String, size: u64, f: Arc<tempfile::NamedTempFile>) {
        if size > self.cache_bytes {
            return;
        }
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|(k, ..)| *k != key);
        c.push_front((key, size, f));
        let mut total = 0;
        c.retain(|(_, n, _)| {
            total += n;
            total <= self.cache_bytes
        });
    }
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
        let key = format!("{}\n{}", src.uri, src.version);
        let f = match self.cached(&key) {
            Some(f) => f,
            None => {
                let f = s3::fetch_to_file(&self.client, src, &self.dir)
                    .await
                    .map_err(|e| TaskFailure(format!("fetching {}: {e}", src.uri)))?;
                let f = Arc::new(f);
                self.remember(key, src.size, f.clone());
                f
            }
        };
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

/// One planned document in `JOB/plan/NNNNNN.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanLine {
    /// The whole-document task's id.
    pub task_id: String,
    pub uri: String,
    pub rel: String,
}

/// `JOB/job.json`: what the coordinator submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub settings: JobSettings,
    pub inputs: Vec<String>,
    /// Unix seconds of the (latest) submission.
    pub submitted_at: f64,
    pub documents: u64,
    /// `JOB/plan/000000.jsonl` … in order; parts beyond are stale.
    pub plan_parts: u32,
    pub published: u64,
    pub skipped: u64,
    pub duplicates: u64,
}

/// Documents per plan part: bounds the coordinator's memory whatever the
/// corpus size.
pub const PLAN_PART_LINES: usize = 10_000;

pub fn plan_part_key(job: &str, part: u32) -> String {
    format!("{}plan/{part:06}.jsonl", job_prefix(job))
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

/// Writes the plan in parts of [`PLAN_PART_LINES`] documents.
struct PlanWriter<'a> {
    store: &'a dyn BlobStore,
    job: String,
    part: u32,
    buf: Vec<u8>,
    lines: usize,
}

impl PlanWriter<'_> {
    async fn push(&mut self, line: &PlanLine) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.buf, line)?;
        self.buf.push(b'\n');
        self.lines += 1;
        if self.lines == PLAN_PART_LINES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.lines > 0 {
            let body = std::mem::take(&mut self.buf);
            self.store.put(&plan_part_key(&self.job, self.part), body).await?;
            self.part += 1;
            self.lines = 0;
        }
        Ok(())
    }
}

/// The planned documents of `job`, in plan order.
pub async fn read_plan(store: &dyn BlobStore, job: &str, jf: &JobFile) -> anyhow::Result<Vec<PlanLine>> {
    let mut out = Vec::with_capacity(jf.documents as usize);
    for part in 0..jf.plan_parts {
        let key = plan_part_key(job, part);
        let bytes = store.get(&key).await?.with_context(|| format!("{key} is missing"))?;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            out.push(serde_json::from_slice(line).with_context(|| format!("malformed {key}"))?);
        }
    }
    Ok(out)
}

pub async fn read_job_file(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<JobFile>> {
    let Some(bytes) = store.get(&job_file_key(job)).await? else {
        return Ok(None);
    };
    Ok(Some(
        serde_json::from_slice(&bytes).context("malformed job.json (written by an older quire? resubmit the job)")?,
    ))
}

/// A set of task ids held as 128-bit numbers (16 bytes each instead of a
/// 32-character string): the coordinator checks every document against it.
#[derive(Debug, Default, Clone)]
pub struct IdSet(HashSet<u128>);

impl IdSet {
    fn bits(id: &str) -> Option<u128> {
        if id.len() == 32 {
            u128::from_str_radix(id, 16).ok()
        } else {
            None
        }
    }

    pub fn insert(&mut self, id: &str) {
        if let Some(b) = Self::bits(id) {
            self.0.insert(b);
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        Self::bits(id).is_some_and(|b| self.0.contains(&b))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Ids named by the keys under `prefix` that end in `suffix`.
async fn ids_under(store: &dyn BlobStore, prefix: &str, suffix: &str) -> anyhow::Result<IdSet> {
    let mut set = IdSet::default();
    for k in store.list(prefix).await? {
        if let Some(id) = k.strip_prefix(prefix).and_then(|r| r.strip_suffix(suffix)) {
            set.insert(id);
        }
    }
    Ok(set)
}

/// Ids of the tasks of `job` with stored results.
pub async fn results_present(store: &dyn BlobStore, job: &str) -> anyhow::Result<IdSet> {
    ids_under(store, &format!("{}results/", job_prefix(job)), ".jsonl").await
}

/// Ids of the documents of `job` that a worker has split.
pub async fn splits_present(store: &dyn BlobStore, job: &str) -> anyhow::Result<IdSet> {
    ids_under(store, &splits_prefix(job), ".json").await
}

pub async fn read_split(store: &dyn BlobStore, job: &str, document_task_id: &str) -> anyhow::Result<Option<Split>> {
    let key = split_key(job, document_task_id);
    match store.get(&key).await? {
        None => Ok(None),
        Some(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("malformed {key}"))?)),
    }
}

pub struct CoordinatorOptions {
    pub inputs: Vec<String>,
    /// `settings.out` names the output (a folder or `s3://`).
    pub settings: JobSettings,
    pub access: S3Access,
    /// Publish tasks whose results already exist.
    pub force: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Submitted {
    pub documents: u64,
    pub published: u64,
    /// Documents whose results (or all of whose page-range results) exist.
    pub skipped: u64,
    /// Documents the queue already held (published within its dedup window).
    pub duplicates: u64,
    #[serde(skip)]
    pub warnings: Vec<ListWarning>,
    /// Tasks with results before this submission.
    #[serde(skip)]
    pub done_before: IdSet,
}

/// Tasks published at once before waiting for the server's acks.
const PUBLISH_WINDOW: usize = 512;

/// Lists the inputs and publishes one whole-document task per object that
/// has no results yet, without opening any of them (workers do: see
/// [`crate::split`]); writes the plan parts and `JOB/job.json`.
///
/// Memory stays flat in the corpus size except for the set of finished
/// task ids (16 bytes each) needed to skip finished work.
pub async fn submit(o: &CoordinatorOptions, queue: &JetStreamQueue, store: &dyn BlobStore) -> anyhow::Result<Submitted> {
    let job = o.settings.job.clone();
    let planner = Planner::new(o.settings.clone());
    let s3_client = if o.inputs.iter().any(|i| is_s3(i)) { Some(o.access.client().await) } else { None };
    let (done, split) = if o.force {
        (IdSet::default(), IdSet::default())
    } else {
        (results_present(store, &job).await?, splits_present(store, &job).await?)
    };
    // Workers look for stored page-range results only where some may exist.
    let check_stored = !o.force && !(done.is_empty() && split.is_empty());
    // A forced submission redoes tasks the queue may have seen within its
    // duplicate window: its own tag keeps them from being dropped.
    let submission = o.force.then(|| format!("force-{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()));
    let mut sub = Submitted::default();
    let mut plan = PlanWriter { store, job: job.clone(), part: 0, buf: Vec::new(), lines: 0 };
    let mut publisher = queue.publisher(PUBLISH_WINDOW);
    for input in &o.inputs {
        let (tx, mut rx) = mpsc::channel(1024);
        let lister = match &s3_client {
            Some(c) if is_s3(input) => {
                let (c, u) = (c.clone(), input.clone());
                tokio::spawn(async move { s3::list_s3(&c, &u, 1000, tx).await })
            }
            _ => {
                let root = input.clone();
                tokio::spawn(async move {
                    let _ = tokio::task::spawn_blocking(move || list_local(&root, tx)).await;
                })
            }
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
            let mut doc = document_task(&planner.settings, &planner.fingerprint, &src);
            doc.check_stored = check_stored;
            doc.submission = submission.clone();
            plan.push(&PlanLine { task_id: doc.task_id.clone(), uri: src.uri.clone(), rel: src.rel.clone() }).await?;
            if done.contains(&doc.task_id) {
                sub.skipped += 1;
                continue;
            }
            if split.contains(&doc.task_id) {
                if let Some(sp) = read_split(store, &job, &doc.task_id).await? {
                    if sp.parts.iter().all(|p| done.contains(&p.task_id)) {
                        sub.skipped += 1;
                        continue;
                    }
                }
            }
            publisher.send(&doc).await?;
        }
        lister.await?;
    }
    plan.flush().await?;
    let acks = publisher.finish().await?;
    sub.published = acks.new;
    sub.done_before = done;
    sub.duplicates = acks.duplicates;
    let jf = JobFile {
        settings: o.settings.clone(),
        inputs: o.inputs.clone(),
        submitted_at: unix_now(),
        documents: sub.documents,
        plan_parts: plan.part,
        published: sub.published,
        skipped: sub.skipped,
        duplicates: sub.duplicates,
    };
    store.put(&job_file_key(&job), serde_json::to_vec_pretty(&jf)?).await?;
    Ok(sub)
}

/// Every task of a job as known now: a document not opened yet is one
/// task; a split document is its page-range tasks.
pub struct Ledger {
    pub job: JobFile,
    pub docs: Vec<PlanLine>,
    splits: HashMap<String, Split>,
}

/// Where one task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Done,
    Dead,
    Open,
}

impl Ledger {
    pub async fn load(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<Ledger>> {
        let Some(jf) = read_job_file(store, job).await? else {
            return Ok(None);
        };
        let docs = read_plan(store, job, &jf).await?;
        Ok(Some(Ledger { job: jf, docs, splits: HashMap::new() }))
    }

    /// Reads the splits that appeared since the last call (a split never
    /// changes once written).
    pub async fn refresh_splits(&mut self, store: &dyn BlobStore) -> anyhow::Result<()> {
        let job = self.job.settings.job.clone();
        let present = splits_present(store, &job).await?;
        if present.len() == self.splits.len() {
            return Ok(());
        }
        for d in &self.docs {
            if present.contains(&d.task_id) && !self.splits.contains_key(&d.task_id) {
                if let Some(sp) = read_split(store, &job, &d.task_id).await? {
                    self.splits.insert(d.task_id.clone(), sp);
                }
            }
        }
        Ok(())
    }

    /// The tasks of each document in plan order: `(document, tasks)`, each
    /// task as a [`PlannedTask`] (an unopened document has pages `1..=0`).
    pub fn tasks(&self) -> impl Iterator<Item = (&PlanLine, Vec<PlannedTask>)> {
        self.docs.iter().map(|d| {
            let tasks = match self.splits.get(&d.task_id) {
                Some(sp) => sp
                    .parts
                    .iter()
                    .map(|p| PlannedTask {
                        task_id: p.task_id.clone(),
                        uri: d.uri.clone(),
                        rel: d.rel.clone(),
                        first: p.first,
                        last: p.last,
                        // A split does not say what its parts are; the finish tells archive
                        // members by their records.
                        unit: quire_core::UnitKind::Document,
                    })
                    .collect(),
                None => vec![PlannedTask {
                    task_id: d.task_id.clone(),
                    uri: d.uri.clone(),
                    rel: d.rel.clone(),
                    first: 1,
                    last: 0,
                    unit: quire_core::UnitKind::Document,
                }],
            };
            (d, tasks)
        })
    }

    /// The state of every task; a split document whose own task was given
    /// up on before all its parts were published counts its open parts as
    /// given up too.
    pub fn states(&self, present: &IdSet, dead: &IdSet) -> Vec<(PlannedTask, TaskState)> {
        let mut out = Vec::new();
        for (d, tasks) in self.tasks() {
            let doc_dead = dead.contains(&d.task_id);
            for t in tasks {
                let st = if present.contains(&t.task_id) {
                    TaskState::Done
                } else if dead.contains(&t.task_id) || doc_dead {
                    TaskState::Dead
                } else {
                    TaskState::Open
                };
                out.push((t, st));
            }
        }
        out
    }
}

/// Where a job stands, from the output store (and the queue when given).
#[derive(Debug, Default, Clone, Serialize)]
pub struct JobStatus {
    pub job: String,
    pub documents: u64,
    /// Tasks known now: unopened documents count as one task each.
    pub tasks: u64,
    pub done: u64,
    pub dead_lettered: u64,
    pub pending: u64,
    /// Documents not opened by a worker yet.
    pub unopened: u64,
    pub pages_ok: u64,
    pub pages_failed: u64,
    /// Tasks still in the work stream (queued, leased or backing off), when the queue was asked.
    pub queued: Option<u64>,
    pub elapsed_seconds: f64,
    /// Pages (and frames) with records per second since the submission; needs `pages`.
    pub pages_per_second: f64,
    /// From the task rate since the submission; an unopened document counts as one task.
    pub eta_seconds: Option<f64>,
    pub finished: bool,
}

async fn dead_ids(queue: Option<&JetStreamQueue>, job: &str) -> anyhow::Result<(IdSet, Vec<DeadLetter>)> {
    let mut set = IdSet::default();
    let dead = match queue {
        Some(q) => q.dead_letters(job).await?,
        None => Vec::new(),
    };
    for d in &dead {
        set.insert(&d.task_id);
    }
    Ok((set, dead))
}

/// Counts a job's tasks; `pages` reads every result file to count pages.
pub async fn job_status(
    store: &dyn BlobStore,
    job: &str,
    queue: Option<&JetStreamQueue>,
    pages: bool,
) -> anyhow::Result<Option<JobStatus>> {
    let Some(mut ledger) = Ledger::load(store, job).await? else {
        return Ok(None);
    };
    ledger.refresh_splits(store).await?;
    let present = results_present(store, job).await?;
    let (dead, _) = dead_ids(queue, job).await?;
    let mut st = JobStatus { job: job.to_string(), documents: ledger.docs.len() as u64, ..Default::default() };
    st.unopened = ledger.docs.iter().filter(|d| !ledger.splits.contains_key(&d.task_id) && !present.contains(&d.task_id)).count() as u64;
    for (t, state) in ledger.states(&present, &dead) {
        st.tasks += 1;
        match state {
            TaskState::Done => {
                st.done += 1;
                if pages {
                    if let Some(bytes) = store.get(&results_key(job, &t.task_id)).await? {
                        for r in parse_jsonl(&bytes)? {
                            if r.error.is_some() {
                                st.pages_failed += 1;
                            } else {
                                st.pages_ok += 1;
                            }
                        }
                    }
                }
            }
            TaskState::Dead => st.dead_lettered += 1,
            TaskState::Open => st.pending += 1,
        }
    }
    if let Some(q) = queue {
        st.queued = Some(q.pending(job).await?);
    }
    st.finished = st.pending == 0;
    st.elapsed_seconds = (unix_now() - ledger.job.submitted_at).max(0.0);
    if st.elapsed_seconds > 0.0 {
        st.pages_per_second = (st.pages_ok + st.pages_failed) as f64 / st.elapsed_seconds;
    }
    // Tasks done since this submission: those done before it were skipped
    // as whole documents, which is what `skipped` counts.
    let new_done = st.done.saturating_sub(ledger.job.skipped);
    if st.pending == 0 {
        st.eta_seconds = Some(0.0);
    } else if new_done > 0 && st.elapsed_seconds > 0.0 {
        st.eta_seconds = Some(st.pending as f64 * st.elapsed_seconds / new_done as f64);
    }
    Ok(Some(st))
}

/// Waits until every task has results or is dead-lettered, then writes the
/// Markdown and the manifest. Dead letters of expired leases are forwarded
/// meanwhile.
///
/// The output store is the record: the wait ends only when a full look
/// there (results, splits, dead letters) finds no open task. `events`
/// (subscribe before [`submit`] so that none is missed) says when a look is
/// worth it: the open tasks of the last look are followed through the
/// events, and the store is looked at again as soon as none is left, or
/// after `poll` in any case (events are best effort).
pub async fn wait_and_finish(
    o: &CoordinatorOptions,
    queue: &JetStreamQueue,
    store: &dyn BlobStore,
    sub: &Submitted,
    started_at: SystemTime,
    poll: Duration,
    mut events: Option<TaskEvents>,
) -> anyhow::Result<Manifest> {
    let job = &o.settings.job;
    let mut ledger = Ledger::load(store, job).await?.context("job.json vanished from the output")?;
    let q = queue.clone();
    let forwarder = tokio::spawn(async move { q.forward_dead_letters().await });
    let mut last_log = std::time::Instant::now();
    let mut looks = 0u64;
    // Records that came with the events (the last copy of each task's),
    // so that the finish need not read them back.
    let (mut kept, mut kept_bytes) = (HashMap::<String, Vec<u8>>::new(), 0usize);
    let (states, dead) = loop {
        looks += 1;
        ledger.refresh_splits(store).await?;
        let present = results_present(store, job).await?;
        let (dead_set, dead) = dead_ids(Some(queue), job).await?;
        let states = ledger.states(&present, &dead_set);
        let mut open: HashSet<String> =
            states.iter().filter(|(_, s)| *s == TaskState::Open).map(|(t, _)| t.task_id.clone()).collect();
        if open.is_empty() {
            break (states, dead);
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = std::time::Instant::now();
            tracing::info!("{job}: {} of {} tasks still open", open.len(), states.len());
        }
        let deadline = tokio::time::Instant::now() + poll;
        let mut settled = HashSet::new();
        while !open.is_empty() {
            let Some(ev) = events.as_mut() else {
                tokio::time::sleep_until(deadline).await;
                break;
            };
            match tokio::time::timeout_at(deadline, ev.next()).await {
                Err(_) => break,
                Ok(None) => {
                    events = None;
                }
                Ok(Some(TaskEvent::Done { task_id, records })) => {
                    // Only the latest copy stands (a redelivered task wrote its results again).
                    if let Some(old) = kept.remove(&task_id) {
                        kept_bytes -= old.len();
                    }
                    if let Some(r) = records.filter(|r| kept_bytes + r.len() <= KEEP_RECORDS_MAX) {
                        kept_bytes += r.len();
                        kept.insert(task_id.clone(), r.into_bytes());
                    }
                    open.remove(&task_id);
                    settled.insert(task_id);
                }
                Ok(Some(TaskEvent::Dead { task_id })) => {
                    open.remove(&task_id);
                    settled.insert(task_id);
                }
                Ok(Some(TaskEvent::Split { task_id, published })) => {
                    if open.remove(&task_id) {
                        open.extend(published.into_iter().filter(|p| !settled.contains(p)));
                    }
                }
            }
        }
    };
    tracing::debug!("{job}: every task settled after {looks} looks at the output");
    forwarder.abort();
    let planned: Vec<PlannedTask> = states.into_iter().map(|(t, _)| t).collect();
    let before = |id: &str| sub.done_before.contains(id);
    tracing::debug!("{job}: every task settled; writing Markdown and the manifest");
    let t0 = std::time::Instant::now();
    let manifest = finish_job(
        store,
        JobOutcome {
            settings: &o.settings,
            inputs: &o.inputs,
            plan: &planned,
            dead: &dead,
            tasks_skipped: sub.skipped,
            started_at,
            pages_this_run: PagesThisRun::DoneBefore(&before),
            gpu_seconds: 0.0,
            known_records: Some(&kept),
        },
    )
    .await?;
    tracing::debug!("{job}: finished in {:.3}s", t0.elapsed().as_secs_f64());
    Ok(manifest)
}

/// The most bytes of records `--wait` keeps from task events for the
/// finish; beyond that the finish reads them from the store.
pub const KEEP_RECORDS_MAX: usize = 512 << 20;

/// Connects to the queue. With `set_rules` (the coordinator) the worker
/// consumer gets `queue`'s delivery rules; otherwise (workers, status) an
/// existing consumer's rules are kept and adopted.
pub async fn connect_queue(
    url: &str,
    auth: quire_queue::jetstream::NatsAuth,
    queue: QueueOptions,
    set_rules: bool,
) -> anyhow::Result<JetStreamQueue> {
    let mut o = JetStreamOptions::new(url);
    o.auth = auth;
    o.queue = queue;
    o.set_delivery_rules = set_rules;
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
