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

use crate::finish::{finish_outputs, parse_jsonl, JobOutcome, PagesThisRun, PlannedTask};
use crate::plan::{ImageGroups, Planner};
use crate::runs::{begin_run, close_run, object_task, unfinished_runs, CloseRun, JobState, RunBook, RunOutcome};
use crate::split::{document_task, split_key, splits_prefix, Split};
use crate::process::TaskFailure;
use crate::worker::{Fetch, Fetched, RangedInput, ResultStores, Vetting};
use anyhow::Context as _;
use quire_core::{
    job_prefix, results_key, superseded_prefix, DeadLetter, JobSettings, Manifest, ObjectStatus, ObjectTask, SourceRef, TaskSpec, UnitKind,
};
use quire_queue::jetstream::{JetStreamOptions, JetStreamQueue, TaskEvents};
use quire_queue::progress::{JobMeta, JobProgress};
use quire_queue::TaskEvent;
use quire_queue::QueueOptions;
use quire_store::inputs::{list_local, ListWarning, Listed};
use quire_store::local::LocalStore;
use quire_store::s3::{self, S3Options, S3Store};
use quire_store::{BlobStore, Retry, RetryingStore};
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
    /// How long transient faults of the output store and of input downloads are ridden out
    /// (with backoff) before an operation fails: a store's bad minutes must not dead-letter
    /// tasks or end a waiting coordinator.
    pub retry: Retry,
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
/// Every operation of the store retries transient faults for `access.retry`.
pub async fn open_store(uri: &str, access: &S3Access) -> anyhow::Result<Arc<dyn BlobStore>> {
    let retry = access.retry;
    if is_s3(uri) {
        let opts = access.options(uri)?;
        let client = s3::client(&opts).await;
        let store = S3Store::from_client(client, &opts);
        retry
            .run(&format!("opening {uri}"), || store.check_bucket())
            .await
            .with_context(|| format!("opening {uri}"))?;
        Ok(Arc::new(RetryingStore { inner: store, retry }))
    } else {
        Ok(Arc::new(RetryingStore { inner: LocalStore::new(uri), retry }))
    }
}

/// Local paths are read in place; `s3://` objects are streamed to a
/// temporary file in `dir`. The most recent downloads are kept while they
/// fit `cache_bytes`, so the page-range tasks of one document that land on
/// the same worker download it once; a file is deleted when it is evicted
/// and no running task uses it any more.
///
/// Archives on S3 are not downloaded: [`Fetch::open_ranged`] reads them by
/// ranged GETs ([`s3::RangedReader`]), so a zip task fetches the central
/// directory and its own members, a tar task the shard up to its range's end
/// (a download already in the cache is used instead).
pub struct S3Fetch {
    pub client: aws_sdk_s3::Client,
    pub dir: PathBuf,
    pub cache_bytes: u64,
    /// Transient download faults are retried this long before the task fails.
    pub retry: Retry,
    /// Most recent first: (uri and version, size, file). Paths, not open files: a worker
    /// captioning loose images keeps thousands of small downloads, more than its open-file
    /// limit (seen: "Too many open files" after ~1,000 images of a 100,000-image prefix).
    cache: std::sync::Mutex<std::collections::VecDeque<(String, u64, Arc<tempfile::TempPath>)>>,
}

impl S3Fetch {
    pub fn new(client: aws_sdk_s3::Client, dir: PathBuf, cache_bytes: u64) -> Self {
        S3Fetch { client, dir, cache_bytes, retry: Retry::default(), cache: Default::default() }
    }

    fn cached(&self, key: &str) -> Option<Arc<tempfile::TempPath>> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let i = c.iter().position(|(k, ..)| k == key)?;
        let e = c.remove(i)?;
        let f = e.2.clone();
        c.push_front(e);
        Some(f)
    }

    fn cache_key(src: &SourceRef) -> String {
        format!("{}\n{}", src.uri, src.version)
    }

    /// Whether `src` is to be read by ranged requests: an `s3://` object not downloaded already.
    fn ranged(&self, src: &SourceRef) -> bool {
        is_s3(&src.uri) && self.cached(&Self::cache_key(src)).is_none()
    }

    fn remember(&self, key: String, size: u64, f: Arc<tempfile::TempPath>) {
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
        c.truncate(MAX_CACHED_DOWNLOADS);
    }
}

#[async_trait::async_trait]
impl Fetch for S3Fetch {
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
        if !is_s3(&src.uri) {
            return Ok(Fetched { path: PathBuf::from(&src.uri), _keep: None, downloaded: 0 });
        }
        let key = Self::cache_key(src);
        let mut downloaded = 0;
        let f = match self.cached(&key) {
            Some(f) => f,
            None => {
                let f = self
                    .retry
                    .run(&format!("fetching {}", src.uri), || s3::fetch_to_file(&self.client, src, &self.dir))
                    .await
                    .map_err(|e| TaskFailure(format!("fetching {}: {e}", src.uri)))?;
                downloaded = f.as_file().metadata().map(|m| m.len()).unwrap_or(src.size);
                // Closed here; the path (deleted with its last holder) is what is kept.
                let f = Arc::new(f.into_temp_path());
                self.remember(key, src.size, f.clone());
                f
            }
        };
        Ok(Fetched { path: f.to_path_buf(), _keep: Some(Box::new(f)), downloaded })
    }

    async fn head(&self, src: &SourceRef, len: u64) -> Result<Option<Vec<u8>>, TaskFailure> {
        if !self.ranged(src) {
            return Ok(None);
        }
        self.retry
            .run(&format!("reading the head of {}", src.uri), || s3::read_range(&self.client, src, 0, len))
            .await
            .map(Some)
            .map_err(|e| TaskFailure(format!("reading the head of {}: {e}", src.uri)))
    }

    fn keeps(&self, src: &SourceRef) -> bool {
        is_s3(&src.uri) && src.size > 0 && src.size <= self.cache_bytes
    }

    async fn open_ranged(&self, src: &SourceRef) -> Result<Option<RangedInput>, TaskFailure> {
        if !self.ranged(src) {
            return Ok(None);
        }
        let r = s3::RangedReader::open(self.client.clone(), src, self.retry)
            .await
            .map_err(|e| TaskFailure(format!("opening {}: {e}", src.uri)))?;
        Ok(Some(RangedInput { size: r.len(), stats: r.stats(), reader: Box::new(r) }))
    }
}

/// Downloads kept at most, whatever their bytes: tiny images would otherwise fill a
/// folder with hundreds of thousands of files.
const MAX_CACHED_DOWNLOADS: usize = 4096;

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

/// Whether `uri` names `input` itself or something below it, without `..` climbing out. A
/// brace pattern (`shard-{000..009}.tar`) admits what lies below the text before its brace.
pub fn lies_under(uri: &str, input: &str) -> bool {
    if uri.split(['/', '\\']).any(|part| part == "..") || uri.contains('\0') {
        return false;
    }
    if uri == input {
        return true;
    }
    let root = match input.find('{') {
        Some(i) => &input[..i],
        None => input,
    };
    if root.is_empty() {
        return false;
    }
    if root != input || root.ends_with('/') {
        return uri.starts_with(root);
    }
    uri.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

/// Why a task from the queue must not be run, if it must not: its job is not registered by a
/// coordinator, or its input or output is not the job's. Anyone who can publish to the task
/// subjects could otherwise make workers read and write wherever their credentials reach.
pub fn vet_task(task: &TaskSpec, meta: Option<&JobMeta>) -> Result<(), String> {
    let job = &task.settings.job;
    task.check()?;
    let Some(meta) = meta else {
        return Err(format!("job {job:?} is not registered by a coordinator (no entry in the quire-jobs bucket)"));
    };
    if task.settings.out != meta.settings.out {
        return Err(format!(
            "the task's output {:?} is not its job's output {:?}",
            task.settings.out.as_deref().unwrap_or(""),
            meta.settings.out.as_deref().unwrap_or("")
        ));
    }
    for uri in std::iter::once(&task.source.uri).chain(task.members.iter().map(|m| &m.uri)) {
        if !meta.inputs.iter().any(|i| lies_under(uri, i)) {
            return Err(format!("the task's input {uri:?} is not below any of its job's inputs {:?}", meta.inputs));
        }
    }
    Ok(())
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

    async fn vet(&self, task: &TaskSpec) -> Vetting {
        if let Err(why) = task.check() {
            return Vetting::Reject(why);
        }
        let Some(jobs) = &self.jobs else { return Vetting::Run };
        let job = &task.settings.job;
        let mut known = self.registered.lock().await;
        let fits = |m: &JobMeta| vet_task(task, Some(m)).is_ok();
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
        match vet_task(task, known.get(job)) {
            Ok(()) => Vetting::Run,
            Err(why) => Vetting::Reject(why),
        }
    }
}

/// One planned document in `JOB/plan/NNNNNN.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanLine {
    /// The whole-document task's id (or the image group's).
    pub task_id: String,
    pub uri: String,
    pub rel: String,
    /// [`UnitKind::Images`] for a group of loose images (`uri` and `rel` name the input root
    /// they were listed from); absent for a whole document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<UnitKind>,
    /// Images in the group.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub units: u32,
    /// The document's tasks when the job manifest knew them (an unchanged object of an
    /// earlier run): no split needs to be read for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<ObjectTask>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Whether a listed object is taken for a loose image by its name (distributed planning
/// opens nothing; the worker still decodes by the bytes, and a member that is no image gets
/// an error record).
pub fn looks_like_image(uri: &str) -> bool {
    let name = uri.rsplit('/').next().unwrap_or(uri);
    name.rsplit_once('.').is_some_and(|(_, ext)| quire_store::archive::is_image_ext(&ext.to_ascii_lowercase()))
}

/// `JOB/job.json`: what the coordinator submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub settings: JobSettings,
    pub inputs: Vec<String>,
    /// Unix seconds of the (latest) submission.
    pub submitted_at: f64,
    pub documents: u64,
    /// The run (`--run`) of the latest submission.
    #[serde(default)]
    pub run: String,
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

/// Tasks published at once before waiting for the server's acks.
const PUBLISH_WINDOW: usize = 512;

/// Lists `input` (an `s3://` prefix with `s3`, else a file or folder) into `tx`, streamed, in
/// a task of its own: what `quire run` and the coordinator plan from.
pub fn spawn_listing(input: &str, s3: Option<&aws_sdk_s3::Client>, tx: mpsc::Sender<Listed>) -> tokio::task::JoinHandle<()> {
    let input = input.to_string();
    match s3 {
        Some(c) if is_s3(&input) => {
            let c = c.clone();
            tokio::spawn(async move { s3::list_s3(&c, &input, 1000, tx).await })
        }
        _ => tokio::spawn(async move {
            let _ = tokio::task::spawn_blocking(move || list_local(&input, tx)).await;
        }),
    }
}

/// What an object is taken for by its name, until a worker opens it.
fn kind_by_name(uri: &str) -> &'static str {
    let name = uri.rsplit('/').next().unwrap_or(uri).to_ascii_lowercase();
    if looks_like_image(uri) {
        "image"
    } else if name
        .rsplit_once('.')
        .is_some_and(|(_, ext)| quire_store::archive::is_archive_ext(ext))
    {
        "archive"
    } else {
        "pdf"
    }
}

/// The task that redoes one failed task of an unchanged object (`--retry-failed`).
fn retry_task(
    settings: &JobSettings,
    fingerprint: &str,
    src: &SourceRef,
    t: &ObjectTask,
    unit_count: u32,
    submission: &str,
) -> TaskSpec {
    let mut task = document_task(settings, fingerprint, src);
    if t.unit != UnitKind::Document {
        task.task_id = t.task_id.clone();
        task.unit = t.unit;
        task.first = t.first;
        task.last = t.last;
        task.unit_count = unit_count;
    }
    task.submission = Some(submission.to_string());
    task
}

/// Lists the inputs and publishes the run's work without opening any object (workers do:
/// see [`crate::split`]); writes the plan parts and `JOB/job.json`.
///
/// A run plans against the job manifest ([`JobState`]): an unchanged object whose tasks all
/// have results is skipped without a look at the store; new and changed objects get one
/// whole-document task each; loose images are grouped by name, and a group whose task has
/// results is skipped. The store's results and splits are listed only when the manifest
/// cannot say (no manifest, other settings, or an earlier run that never closed).
///
/// Memory grows with the job's objects (the manifest and this run's book of them) and the
/// set of finished task ids (16 bytes each) when the store is listed.
pub async fn submit(o: &CoordinatorOptions, queue: &JetStreamQueue, store: &dyn BlobStore) -> anyhow::Result<(Submitted, RunPlan)> {
    // An input that could not be listed at all (the store is down, the prefix refused) is not
    // an empty input: the submission is made again (its tasks are dropped by the queue as
    // duplicates of this run's) until the store's retry budget is spent.
    let mut outage = Outage::new(o.access.retry);
    loop {
        match submit_once(o, queue, store).await {
            Err(e) if e.downcast_ref::<Unlisted>().is_some() => outage.wait(&format!("{}: listing the inputs", o.settings.job), e).await?,
            other => return other,
        }
    }
}

/// An input of which nothing could be listed, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("could not list {input}: {why}")]
pub struct Unlisted {
    pub input: String,
    pub why: String,
}

async fn submit_once(o: &CoordinatorOptions, queue: &JetStreamQueue, store: &dyn BlobStore) -> anyhow::Result<(Submitted, RunPlan)> {
    let job = o.settings.job.clone();
    let started_at = SystemTime::now();
    let planner = Planner::new(o.settings.clone());
    let s3_client = if o.inputs.iter().any(|i| is_s3(i)) {
        Some(o.access.client().await)
    } else {
        None
    };
    let state = JobState::load(store, &job, &o.settings).await?;
    let unfinished = unfinished_runs(store, &job).await?;
    // The manifest knows every task of the closed runs; results from a run that never closed
    // (or of a job with no usable manifest) are found in the store.
    let look_in_store = !o.force && !(state.knows_objects() && unfinished.is_empty());
    if !unfinished.is_empty() {
        tracing::info!(
            "{job}: run(s) {} did not close; looking for their results in the store",
            unfinished.join(", ")
        );
    }
    begin_run(store, &job, &o.run, started_at).await?;
    let (done, split) = if look_in_store {
        (
            results_present(store, &job).await?,
            splits_present(store, &job).await?,
        )
    } else {
        (IdSet::default(), IdSet::default())
    };
    // Workers look for stored page-range results only where some may exist.
    let check_stored = !o.force && (!done.is_empty() || !split.is_empty());
    // A forced submission (and a retry of failed tasks) redoes tasks the queue may have seen
    // within its duplicate window: its own tag keeps them from being dropped.
    let tag = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    // Every run tags its tasks with its name: two coordinators of one run publish the same
    // messages (the second one's are dropped as duplicates), while a task an earlier run
    // published under other settings, superseded since and published again within the
    // queue's duplicate window, is not taken for one.
    let submission = Some(if o.force { format!("force-{tag}") } else { format!("run-{}", o.run) });
    let retry_tag = format!("retry-{tag}");
    let mut sub = Submitted {
        run: o.run.clone(),
        ..Default::default()
    };
    let mut book = RunBook::default();
    let mut queued = HashSet::new();
    let mut plan = PlanWriter {
        store,
        job: job.clone(),
        part: 0,
        buf: Vec::new(),
        lines: 0,
    };
    let mut publisher = queue.publisher(PUBLISH_WINDOW);
    for input in &o.inputs {
        let (tx, mut rx) = mpsc::channel(1024);
        let lister = spawn_listing(input, s3_client.as_ref(), tx);
        let mut groups = ImageGroups::new(planner.settings.images_per_task);
        let (listed_before, warned_before) = (sub.documents, sub.warnings.len());
        loop {
            let item = rx.recv().await;
            // (task, the tasks the job manifest knows for it, whether it is a retry)
            let tasks: Vec<(TaskSpec, Vec<ObjectTask>, bool)> = match item {
                None => {
                    let Some(last) = groups.flush(&planner) else {
                        break;
                    };
                    vec![(last, Vec::new(), false)]
                }
                Some(Listed::Warning(w)) => {
                    tracing::warn!("{}: {}", w.path, w.message);
                    book.unlisted(&w.path);
                    sub.warnings.push(w);
                    continue;
                }
                Some(Listed::Object(src)) => {
                    sub.documents += 1;
                    let found = state.classify(&src, &o.run);
                    if looks_like_image(&src.uri) {
                        book.add(&state, &o.run, &src, "image", found);
                        groups
                            .push(&planner, input, src)
                            .into_iter()
                            .map(|t| (t, Vec::new(), false))
                            .collect()
                    } else {
                        match state.unchanged(&src) {
                            // Finished before: its tasks stand as they are (a retry redoes the failed ones).
                            Some(p)
                                if !o.force
                                    && p.status != ObjectStatus::Incomplete
                                    && p.kind != "image" =>
                            {
                                book.add(&state, &o.run, &src, &p.kind, found);
                                book.set_tasks(&src.uri, p.tasks.clone());
                                let doc =
                                    document_task(&planner.settings, &planner.fingerprint, &src);
                                if p.status == ObjectStatus::Failed {
                                    // Its failed tasks run again with --retry-failed (their results moved
                                    // aside first, so that the wait sees the new ones), and whenever their
                                    // results are gone (a retry stopped between the two).
                                    let units = p.tasks.iter().map(|t| t.last).max().unwrap_or(0);
                                    let mut out = vec![(doc, p.tasks.clone(), false)];
                                    for t in p.tasks.iter().filter(|t| t.failed > 0) {
                                        let key = results_key(&job, &t.task_id);
                                        let present = store.exists(&key).await?;
                                        if o.retry_failed && present {
                                            store.rename(&key, &format!("{}results/{}.jsonl", superseded_prefix(&job, &o.run), t.task_id)).await?;
                                        }
                                        if o.retry_failed || !present {
                                            let task = retry_task(&planner.settings, &planner.fingerprint, &src, t, units, &retry_tag);
                                            out.push((task, Vec::new(), true));
                                        }
                                    }
                                    out
                                } else {
                                    vec![(doc, p.tasks.clone(), false)]
                                }
                            }
                            _ => {
                                book.add(
                                    &state,
                                    &o.run,
                                    &src,
                                    state
                                        .unchanged(&src)
                                        .map_or(kind_by_name(&src.uri), |p| p.kind.as_str()),
                                    found,
                                );
                                let mut doc =
                                    document_task(&planner.settings, &planner.fingerprint, &src);
                                // An unfinished object of an earlier run: some of its parts may have results.
                                doc.check_stored = check_stored || state.unchanged(&src).is_some();
                                vec![(doc, Vec::new(), false)]
                            }
                        }
                    }
                }
            };
            for (mut doc, known, retry) in tasks {
                if !o.force {
                    state.attach_reuse(&mut doc);
                }
                if retry {
                    queued.insert(doc.task_id.clone());
                    publisher.send(&doc).await?;
                    continue;
                }
                if doc.unit == UnitKind::Images {
                    let p = PlannedTask {
                        task_id: doc.task_id.clone(),
                        uri: doc.source.uri.clone(),
                        rel: doc.source.rel.clone(),
                        first: doc.first,
                        last: doc.last,
                        unit: doc.unit,
                    };
                    for m in &doc.members {
                        book.set_tasks(&m.uri, vec![object_task(&p)]);
                    }
                }
                doc.check_stored = doc.check_stored || check_stored;
                doc.submission = submission.clone();
                let (unit, units) = if doc.unit == UnitKind::Images {
                    (Some(UnitKind::Images), doc.last)
                } else {
                    (None, 0)
                };
                let finished = !known.is_empty();
                plan.push(&PlanLine {
                    task_id: doc.task_id.clone(),
                    uri: doc.source.uri.clone(),
                    rel: doc.source.rel.clone(),
                    unit,
                    units,
                    tasks: known,
                })
                .await?;
                // A group the job manifest knows done, unless its error records are retried.
                let prior = if doc.unit == UnitKind::Images && !o.force {
                    state.done(&doc.task_id)
                } else {
                    None
                };
                let retry_group = o.retry_failed && prior.is_some_and(|failed| failed > 0);
                if !retry_group && (finished || prior.is_some() || done.contains(&doc.task_id)) {
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
if retry_group {
                    // Past the queue's duplicate window for the id, and its earlier results moved
                    // aside so that the wait sees the new ones.
                    doc.submission = Some(retry_tag.clone());
                    let key = results_key(&job, &doc.task_id);
                    if store.exists(&key).await? {
                        store.rename(&key, &format!("{}results/{}.jsonl", superseded_prefix(&job, &o.run), doc.task_id)).await?;
                    }
                }
                queued.insert(doc.task_id.clone());
                publisher.send(&doc).await?;
            }
        }
        lister.await?;
        if sub.documents == listed_before && sub.warnings.len() > warned_before {
            let why = sub.warnings[warned_before..].iter().map(|w| format!("{}: {}", w.path, w.message)).collect::<Vec<_>>().join("; ");
            return Err(Unlisted { input: input.clone(), why }.into());
        }
    }
    // Objects of the job below a path whose listing failed: kept as they were.
    for t in book.carry_unlisted(&state) {
        let task = crate::runs::object_task(&t);
        plan.push(&PlanLine { task_id: t.task_id.clone(), uri: t.uri.clone(), rel: t.rel.clone(), unit: None, units: 0, tasks: vec![task] })
            .await?;
        sub.skipped += 1;
    }
    plan.flush().await?;
    let acks = publisher.finish().await?;
    sub.published = acks.new;
    sub.done_before = done;
    sub.duplicates = acks.duplicates;
    (sub.objects_new, sub.objects_changed, sub.objects_unchanged) = book.counts();
    let jf = JobFile {
        settings: o.settings.clone(),
        inputs: o.inputs.clone(),
        submitted_at: unix_now(),
        documents: sub.documents,
        run: o.run.clone(),
        plan_parts: plan.part,
        published: sub.published,
        skipped: sub.skipped,
        duplicates: sub.duplicates,
    };
    store
        .put(&job_file_key(&job), serde_json::to_vec_pretty(&jf)?)
        .await?;
    if let Some(m) = &o.run_metrics {
        m.objects.with_label_values(&["new"]).set(sub.objects_new as i64);
        m.objects.with_label_values(&["changed"]).set(sub.objects_changed as i64);
        m.objects.with_label_values(&["unchanged"]).set(sub.objects_unchanged as i64);
    }
    sub.planning_seconds = started_at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    sub.by_manifest = !look_in_store;
    Ok((sub, RunPlan { state, book, queued }))
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
        for d in self.docs.iter().filter(|d| d.tasks.is_empty()) {
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
            if !d.tasks.is_empty() {
                return (d, d.tasks.iter().map(crate::runs::planned).collect());
            }
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
                        unit: sp.unit.unwrap_or(UnitKind::Pdf),
                    })
                    .collect(),
                None if d.unit == Some(UnitKind::Images) => vec![PlannedTask {
                    task_id: d.task_id.clone(),
                    uri: d.uri.clone(),
                    rel: d.rel.clone(),
                    first: 1,
                    last: d.units,
                    unit: UnitKind::Images,
                }],
                None => vec![PlannedTask {
                    task_id: d.task_id.clone(),
                    uri: d.uri.clone(),
                    rel: d.rel.clone(),
                    first: 1,
                    last: 0,
                    unit: UnitKind::Document,
                }],
            };
            (d, tasks)
        })
    }

    /// Dead letters for the parts [`Ledger::states`] counts as given up because their
    /// document's task was, so that the manifest lists every task without results.
    pub fn implied_dead(&self, states: &[(PlannedTask, TaskState)], dead: &[DeadLetter]) -> Vec<DeadLetter> {
        let by_id: HashMap<&str, &DeadLetter> = dead.iter().map(|d| (d.task_id.as_str(), d)).collect();
        let given_up: HashSet<&str> =
            states.iter().filter(|(_, s)| *s == TaskState::Dead).map(|(t, _)| t.task_id.as_str()).collect();
        let mut out = Vec::new();
        for (d, tasks) in self.tasks() {
            let Some(doc) = by_id.get(d.task_id.as_str()) else { continue };
            for t in tasks.iter().filter(|t| given_up.contains(t.task_id.as_str()) && !by_id.contains_key(t.task_id.as_str())) {
                out.push(DeadLetter {
                    task_id: t.task_id.clone(),
                    source: d.uri.clone(),
                    first: t.first,
                    last: t.last,
                    deliveries: 0,
                    reason: format!("never ran: its document's task was given up on ({})", doc.reason),
                });
            }
        }
        out
    }

    /// The state of every task. A split document whose own task was given up on may have
    /// left parts unpublished (it died between storing the split and publishing); such
    /// parts count as given up too, but only once `queue_idle` (the queue holds no task of
    /// the job): until then they may still be queued or running.
    pub fn states(&self, present: &IdSet, dead: &IdSet, queue_idle: bool) -> Vec<(PlannedTask, TaskState)> {
        let mut out = Vec::new();
        for (d, tasks) in self.tasks() {
            let doc_dead = queue_idle && dead.contains(&d.task_id);
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
    /// Set when the output store could not be read (an outage): the counts above then come
    /// from the queue alone, or are unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Input objects of the job as its last finished run left it (from its manifest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    /// The job's finished runs, oldest first (from its manifest).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<quire_core::RunEntry>,
}

impl JobStatus {
    /// The status of a job known only by its manifest (one made by `quire run`, or a
    /// distributed job whose plan is gone): everything settled as the manifest says.
    pub fn from_manifest(m: &Manifest) -> JobStatus {
        let c = &m.counts;
        JobStatus {
            job: m.job.clone(),
            documents: c.documents,
            tasks: c.tasks,
            done: c.tasks_done,
            dead_lettered: c.tasks_dead_lettered,
            pending: c.tasks.saturating_sub(c.tasks_done + c.tasks_dead_lettered),
            pages_ok: c.pages_ok,
            pages_failed: c.pages_failed,
            elapsed_seconds: m.throughput.wall_seconds,
            pages_per_second: m.throughput.pages_per_second,
            finished: true,
            objects: (!m.objects.is_empty() || c.objects > 0).then_some(c.objects),
            runs: m.runs.clone(),
            ..Default::default()
        }
    }
}

/// The job manifest under `job`, if there is one that reads.
async fn read_manifest(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<Manifest>> {
    Ok(store.get(&quire_core::manifest_key(job)).await?.and_then(|b| serde_json::from_slice(&b).ok()))
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
        // No plan of a coordinator: a job of `quire run`, known by its manifest.
        return Ok(read_manifest(store, job).await?.map(|m| JobStatus::from_manifest(&m)));
    };
    ledger.refresh_splits(store).await?;
    let present = results_present(store, job).await?;
    let (dead, _) = dead_ids(queue, job).await?;
    let mut st = JobStatus { job: job.to_string(), documents: ledger.docs.len() as u64, ..Default::default() };
    st.unopened = ledger.docs.iter().filter(|d| !ledger.splits.contains_key(&d.task_id) && !present.contains(&d.task_id)).count() as u64;
    let queued = match queue {
        Some(q) => Some(q.pending(job).await?),
        None => None,
    };
    for (t, state) in ledger.states(&present, &dead, queued == Some(0)) {
        st.tasks += 1;
        match state {
            TaskState::Done => {
                st.done += 1;
                if pages {
                    if let Some(bytes) = store.get(&results_key(job, &t.task_id)).await? {
                        for r in parse_jsonl(&bytes)? {
                            if r.failed() {
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
    st.queued = queued;
    st.finished = st.pending == 0;
    if let Some(m) = read_manifest(store, job).await? {
        st.runs = m.runs;
        st.objects = (m.counts.objects > 0).then_some(m.counts.objects);
    }
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
#[allow(clippy::too_many_arguments)]
pub async fn wait_and_finish(
    o: &CoordinatorOptions,
    queue: &JetStreamQueue,
    store: &dyn BlobStore,
    sub: &Submitted,
    plan: RunPlan,
    started_at: SystemTime,
    poll: Duration,
    mut events: Option<TaskEvents>,
) -> anyhow::Result<RunOutcome> {
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
        // A store or broker outage is waited out (the store retries its own operations;
        // this also covers the queue), for as long as the store's retry budget.
        let mut outage = Outage::new(o.access.retry);
        let (present, dead_set, dead, pending) = loop {
            let look = async {
                ledger.refresh_splits(store).await?;
                let present = results_present(store, job).await?;
                let (dead_set, dead) = dead_ids(Some(queue), job).await?;
                let pending = queue.pending(job).await?;
                anyhow::Ok((present, dead_set, dead, pending))
            };
            match look.await {
                Ok(v) => break v,
                Err(e) => outage.wait(&format!("{job}: looking at the job's output and dead letters"), e).await?,
            }
        };
        let states = ledger.states(&present, &dead_set, pending == 0);
        if let Some(m) = &o.run_metrics {
            let n = |want: TaskState| states.iter().filter(|(_, s)| *s == want).count() as u64;
            m.looked(n(TaskState::Open), n(TaskState::Done), n(TaskState::Dead), pending);
        }
        let mut open: HashSet<String> =
            states.iter().filter(|(_, s)| *s == TaskState::Open).map(|(t, _)| t.task_id.clone()).collect();
        if open.is_empty() {
            let mut dead = dead;
            dead.extend(ledger.implied_dead(&states, &dead));
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
    // This run's work: the tasks it queued, and the parts of the documents it queued.
    let RunPlan {
        state,
        mut book,
        queued,
    } = plan;
    let mut this_run: HashSet<String> = HashSet::new();
    for (d, tasks) in ledger.tasks() {
        let doc_queued = queued.contains(&d.task_id);
        this_run.extend(
            tasks
                .iter()
                .filter(|t| doc_queued || queued.contains(&t.task_id))
                .map(|t| t.task_id.clone()),
        );
        if d.unit == Some(UnitKind::Images) || !d.tasks.is_empty() {
            continue;
        }
        // A document opened by a worker this run: what it turned out to be, and its tasks.
        match tasks.first().map(|t| t.unit) {
            Some(UnitKind::Archive) => book.set_kind(&d.uri, "archive"),
            Some(UnitKind::Pdf) => book.set_kind(&d.uri, "pdf"),
            Some(UnitKind::Image) => book.set_kind(&d.uri, "image"),
            Some(UnitKind::Unreadable) => book.set_kind(&d.uri, "unreadable"),
            _ => {}
        }
        book.set_tasks(&d.uri, tasks.iter().map(object_task).collect());
    }
    let before = |id: &str| !this_run.contains(id);
    let fresh = |id: &str| this_run.contains(id);
    tracing::debug!("{job}: every task settled; writing Markdown and the manifests");
    let t0 = std::time::Instant::now();
    let mut outage = Outage::new(o.access.retry);
    let outcome = loop {
        let finished = async {
            let report = finish_outputs(
                store,
                JobOutcome {
                    settings: &o.settings,
                    inputs: &o.inputs,
                    plan: &planned,
                    dead: &dead,
                    tasks_skipped: sub.skipped,
                    started_at,
                    pages_this_run: PagesThisRun::DoneBefore(&before),
                    price_per_hour: o.price_per_hour,
                    known_records: Some(&kept),
                    fresh: Some(&fresh),
                },
            )
            .await?;
            close_run(
                store,
                &state,
                book.clone(),
                report,
                CloseRun {
                    run: &o.run,
                    prune: o.prune,
                    started_at,
                    plan: &planned,
                    published: &this_run,
                    tasks_skipped: sub.skipped,
                    dead: &dead,
                    price_per_hour: o.price_per_hour,
                },
            )
            .await
        }
        .await;
        // Every file of the finish is written whole under a fixed key, and a superseded file
        // is moved once, so doing it again is safe.
        match finished {
            Ok(m) => break m,
            Err(e) => {
                outage
                    .wait(&format!("{job}: writing the Markdown and the manifests"), e)
                    .await?
            }
        }
    };
    tracing::debug!("{job}: finished in {:.3}s", t0.elapsed().as_secs_f64());
    Ok(outcome)
}

/// Backoff for a step that failed as a whole (the store retries single operations itself):
/// waits from 0.5 s doubling to 15 s, until `retry.budget` has passed since the first failure.
struct Outage {
    retry: Retry,
    since: Option<std::time::Instant>,
    wait: Duration,
}

impl Outage {
    fn new(retry: Retry) -> Self {
        Outage { retry, since: None, wait: retry.first_wait }
    }

    /// Waits before the next try, or gives `e` back once the budget is spent.
    async fn wait(&mut self, what: &str, e: anyhow::Error) -> anyhow::Result<()> {
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

/// The most bytes of records `--wait` keeps from task events for the
/// finish; beyond that the finish reads them from the store.
pub const KEEP_RECORDS_MAX: usize = 512 << 20;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn task(job: &str, uri: &str, out: &str) -> TaskSpec {
        let mut settings = JobSettings::new(job);
        settings.out = Some(out.into());
        TaskSpec {
            task_id: "0".repeat(32),
            settings,
            source: SourceRef { uri: uri.into(), rel: String::new(), size: 1, version: String::new() },
            unit: quire_core::UnitKind::Document,
            first: 1,
            last: 1,
            unit_count: 0,
            check_stored: false,
            submission: None,
            members: Vec::new(),
            resume: None,
            reuse: Default::default(),
        }
    }

    fn meta(inputs: &[&str], out: &str) -> JobMeta {
        let mut settings = JobSettings::new("j");
        settings.out = Some(out.into());
        JobMeta { settings, documents: 1, planning_done: true, inputs: inputs.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn parts_of_a_given_up_document_count_as_given_up_only_once_the_queue_is_idle() {
        let job = JobFile {
            settings: JobSettings::new("j"),
            inputs: vec![],
            submitted_at: 0.0,
            documents: 1,
            run: "r".into(),
            plan_parts: 1,
            published: 1,
            skipped: 0,
            duplicates: 0,
        };
        let id = |n: u32| format!("{n:032x}");
        let doc = PlanLine { task_id: id(100), uri: "s3://b/in/a.pdf".into(), rel: "a.pdf".into(), unit: None, units: 0, tasks: Vec::new() };
        let parts = (1..=3).map(|p| crate::split::Part { task_id: id(p), first: p, last: p }).collect();
        let split = Split { document_task_id: id(100), uri: doc.uri.clone(), unit_count: 3, parts, unit: None };
        let ledger = Ledger { job, docs: vec![doc], splits: HashMap::from([(id(100), split)]) };
        let mut present = IdSet::default();
        present.insert(&id(1));
        let mut dead_set = IdSet::default();
        dead_set.insert(&id(100));
        let dead = vec![DeadLetter { task_id: id(100), source: "s3://b/in/a.pdf".into(), first: 0, last: 0, deliveries: 5, reason: "lease expired".into() }];
        // Parts 2 and 3 may still be queued or running: the job is not over.
        let busy = ledger.states(&present, &dead_set, false);
        assert_eq!(busy.iter().map(|(_, s)| *s).collect::<Vec<_>>(), vec![TaskState::Done, TaskState::Open, TaskState::Open]);
        // Nothing of the job is queued any more: they will never run, and the manifest says so.
        let idle = ledger.states(&present, &dead_set, true);
        assert_eq!(idle.iter().map(|(_, s)| *s).collect::<Vec<_>>(), vec![TaskState::Done, TaskState::Dead, TaskState::Dead]);
        let implied = ledger.implied_dead(&idle, &dead);
        assert_eq!(implied.iter().map(|d| (d.task_id.as_str(), d.first)).collect::<Vec<_>>(), vec![(id(2).as_str(), 2), (id(3).as_str(), 3)]);
        assert!(implied[0].reason.contains("lease expired"), "{:?}", implied[0]);
    }

    #[test]
    fn inputs_admit_what_lies_below_them_and_nothing_else() {
        assert!(lies_under("s3://b/in/a.pdf", "s3://b/in"));
        assert!(lies_under("s3://b/in/a.pdf", "s3://b/in/"));
        assert!(lies_under("scans/x/y.pdf", "scans"));
        assert!(lies_under("one.pdf", "one.pdf"));
        assert!(lies_under("s3://b/laion/000003.tar", "s3://b/laion/{000000..000009}.tar"));
        assert!(!lies_under("s3://b/inside/a.pdf", "s3://b/in"), "a sibling prefix is not below");
        assert!(!lies_under("s3://b/in/../secret/a.pdf", "s3://b/in"));
        assert!(!lies_under("scans/../../etc/passwd", "scans"));
        assert!(!lies_under("s3://other/in/a.pdf", "s3://b/in"));
        assert!(!lies_under("anything", "{a,b}"), "a pattern with nothing before its brace admits nothing");
    }

    #[test]
    fn forged_tasks_are_told_apart_from_the_jobs_own() {
        let m = meta(&["s3://b/in"], "s3://b/out");
        assert_eq!(vet_task(&task("j", "s3://b/in/a.pdf", "s3://b/out"), Some(&m)), Ok(()));
        let e = vet_task(&task("j", "s3://b/in/a.pdf", "s3://evil/out"), Some(&m)).unwrap_err();
        assert!(e.contains("output") && e.contains("s3://evil/out"), "{e}");
        let e = vet_task(&task("j", "s3://b/private/key.pem", "s3://b/out"), Some(&m)).unwrap_err();
        assert!(e.contains("input") && e.contains("private/key.pem"), "{e}");
        let mut group = task("j", "s3://b/in", "s3://b/out");
        group.members = vec![SourceRef { uri: "s3://b/in/x.png".into(), rel: String::new(), size: 1, version: String::new() }];
        assert_eq!(vet_task(&group, Some(&m)), Ok(()));
        group.members.push(SourceRef { uri: "s3://b/other/y.png".into(), rel: String::new(), size: 1, version: String::new() });
        let e = vet_task(&group, Some(&m)).unwrap_err();
        assert!(e.contains("other/y.png"), "a group's every image is checked: {e}");
        let e = vet_task(&task("nobody", "s3://b/in/a.pdf", "s3://b/out"), None).unwrap_err();
        assert!(e.contains("not registered"), "{e}");
    }
}
