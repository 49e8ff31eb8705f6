//! The worker loop: lease a task, fetch its input, process it, store its
//! records, ack. Heartbeats keep long tasks leased; transient failures are
//! nacked with a growing delay and end in the dead-letter path after
//! `max_deliver` deliveries.

use crate::plan::Examined;
use crate::process::{process_archive, process_images, process_task, ArchiveSource, ProcessContext, TaskFailure};
use crate::progress::Progress;
use crate::split::{open_examined, split_key, Opened};
use quire_core::{results_key, Record, SourceRef, TaskSpec, UnitKind};
use quire_queue::{Lease, TaskEvent, TaskQueue};
use quire_store::archive::{self, ArchiveLimits, ReadSeek, ARCHIVE_SNIFF_LEN};
use quire_store::{BlobStore, ReadStats};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Makes an input object available as a local file for the renderer.
#[async_trait::async_trait]
pub trait Fetch: Send + Sync {
    /// The local path of `src` (a download for remote objects), and what to
    /// keep alive while it is used.
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure>;

    /// The first `len` bytes of `src` by a ranged read (to tell an archive from the rest),
    /// `None` when this fetcher reads `src` from a local path (the default).
    async fn head(&self, _src: &SourceRef, _len: u64) -> Result<Option<Vec<u8>>, TaskFailure> {
        Ok(None)
    }

    /// `src` read by ranged requests instead of downloaded (for archives: a task reads only
    /// what its range needs), `None` when this fetcher has no such reader for it (the
    /// default: local paths are read where they are).
    async fn open_ranged(&self, _src: &SourceRef) -> Result<Option<RangedInput>, TaskFailure> {
        Ok(None)
    }

    /// Whether a download of `src` is kept for this worker's later tasks, so that the tasks
    /// of one object pay for one download (the default: nothing is downloaded).
    fn keeps(&self, _src: &SourceRef) -> bool {
        false
    }
}

/// A fetched input: its path, and the temporary file behind it if any.
pub struct Fetched {
    pub path: PathBuf,
    pub _keep: Option<Box<dyn Send + Sync>>,
    /// Bytes this call downloaded from the store: 0 for a local path or a download
    /// already cached.
    pub downloaded: u64,
}

/// An input object read by ranged requests.
pub struct RangedInput {
    pub reader: Box<dyn ReadSeek>,
    /// The object's size.
    pub size: u64,
    /// The reader's requests, bytes and first error (check it after reading: the archive
    /// reader takes a failed read for a damaged archive).
    pub stats: Arc<ReadStats>,
}

/// After a ranged read of `task`'s object: a store fault met while reading fails the task
/// (tried again later); else what was fetched is logged.
fn after_ranged_read(stats: &ReadStats, size: u64, task: &TaskSpec, what: &'static str) -> Result<(), TaskFailure> {
    if let Some(e) = stats.failure() {
        return Err(TaskFailure(format!("reading {}: {e}", task.source.uri)));
    }
    tracing::info!(
        task = %task.task_id,
        source = %task.source.uri,
        requests = stats.requests(),
        fetched_bytes = stats.bytes(),
        object_bytes = size,
        "{what} by ranged reads: {} requests, {} of {} bytes fetched",
        stats.requests(),
        stats.bytes(),
        size
    );
    Ok(())
}

/// A task's input as the worker holds it.
enum Input {
    /// Nothing (an image group: its members are fetched one by one while it runs).
    None,
    /// A local file: the input itself or a download of it.
    Local(Fetched),
    /// An archive read by ranged requests, not downloaded.
    Ranged(RangedInput),
}

/// Opens a task's input: an archive task's, or a whole-document task's whose first bytes
/// say archive, by ranged reads when the fetcher offers them; any other a local file.
///
/// A gzip'd tar is the exception when the fetcher keeps downloads: it cannot be entered in
/// the middle, so every range of it inflates the shard from its start. Downloaded once and
/// kept, the split and the later ranges on this worker read the local copy; by ranged reads,
/// the ranges of one shard would fetch it again and again (about half the shard per task).
async fn open_input(fetch: &dyn Fetch, task: &TaskSpec) -> Result<Input, TaskFailure> {
    let src = &task.source;
    let keeps = fetch.keeps(src);
    let head = match task.unit {
        UnitKind::Images => return Ok(Input::None),
        // A range with a resume point is of a plain tar (the scan found it).
        UnitKind::Archive if !keeps || task.resume.is_some() => None,
        UnitKind::Archive | UnitKind::Document => fetch.head(src, ARCHIVE_SNIFF_LEN as u64).await?,
        _ => None,
    };
    let kind = head.as_deref().and_then(archive::sniff_archive);
    let ranged = match (task.unit, kind) {
        (UnitKind::Archive | UnitKind::Document, Some(archive::ArchiveKind::TarGz)) if keeps => None,
        (UnitKind::Archive, _) | (UnitKind::Document, Some(_)) => fetch.open_ranged(src).await?,
        _ => None,
    };
    Ok(match ranged {
        Some(r) => Input::Ranged(r),
        None => Input::Local(fetch.fetch(src).await?),
    })
}

/// What a whole-document task's object is: an archive read by ranged requests is scanned
/// through them, a local file examined as `quire run` examines it.
async fn examine_input(input: &mut Input, task: &TaskSpec, ctx: &ProcessContext) -> Result<Examined, TaskFailure> {
    let limits = task.settings.limits;
    match std::mem::replace(input, Input::None) {
        Input::Ranged(mut r) => {
            let (reader, scan) = tokio::task::spawn_blocking(move || {
                let scan = archive::scan_reader(&mut r.reader, &ArchiveLimits::from(&limits));
                (r, scan)
            })
            .await
            .map_err(|e| TaskFailure(format!("opening the archive: {e}")))?;
            r = reader;
            after_ranged_read(&r.stats, r.size, task, "archive scanned")?;
            *input = Input::Ranged(r);
            Ok(Examined::Archive(scan))
        }
        Input::Local(f) => {
            let (path, pdf) = (f.path.clone(), ctx.pdf.clone());
            *input = Input::Local(f);
            tokio::task::spawn_blocking(move || crate::plan::examine(&path, &limits, &pdf))
                .await
                .map_err(|e| TaskFailure(format!("opening the document: {e}")))
        }
        Input::None => Err(TaskFailure(format!("{}: a whole-document task without its input", task.source.uri))),
    }
}

/// Local inputs are read where they are.
pub struct LocalFetch;

#[async_trait::async_trait]
impl Fetch for LocalFetch {
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
        Ok(Fetched { path: PathBuf::from(&src.uri), _keep: None, downloaded: 0 })
    }
}

/// A task's view of the worker's [`Fetch`]: what it takes from the store is told to the
/// observer (`TaskObserver::fetched`). Whole downloads when they happen; ranged reads of an
/// object once its reader is dropped, the reader's whole count at once.
struct Counted<'a> {
    inner: &'a dyn Fetch,
    observer: Option<Arc<dyn TaskObserver>>,
}

#[async_trait::async_trait]
impl Fetch for Counted<'_> {
    async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
        let f = self.inner.fetch(src).await?;
        if let (Some(o), true) = (&self.observer, f.downloaded > 0) {
            o.fetched("download", 1, f.downloaded);
        }
        Ok(f)
    }

    async fn head(&self, src: &SourceRef, len: u64) -> Result<Option<Vec<u8>>, TaskFailure> {
        let head = self.inner.head(src, len).await?;
        if let (Some(o), Some(h)) = (&self.observer, &head) {
            o.fetched("ranged", 1, h.len() as u64);
        }
        Ok(head)
    }

    fn keeps(&self, src: &SourceRef) -> bool {
        self.inner.keeps(src)
    }

    async fn open_ranged(&self, src: &SourceRef) -> Result<Option<RangedInput>, TaskFailure> {
        let Some(mut r) = self.inner.open_ranged(src).await? else { return Ok(None) };
        if let Some(o) = &self.observer {
            r.reader = Box::new(ReportedReader { inner: r.reader, stats: r.stats.clone(), observer: o.clone() });
        }
        Ok(Some(r))
    }
}

/// A ranged reader that tells its requests and bytes to the observer when dropped.
struct ReportedReader {
    inner: Box<dyn ReadSeek>,
    stats: Arc<ReadStats>,
    observer: Arc<dyn TaskObserver>,
}

impl std::io::Read for ReportedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Seek for ReportedReader {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl Drop for ReportedReader {
    fn drop(&mut self) {
        self.observer.fetched("ranged", self.stats.requests(), self.stats.bytes());
    }
}

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

/// How a task went, for metrics and progress records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEnd {
    /// Records stored and acked.
    Stored,
    /// Failed this delivery; nacked for a later one.
    Retried,
    /// Not taken (e.g. it needs another model); handed back.
    Refused,
    /// Interrupted by a shutdown; handed back.
    Interrupted,
    /// A whole-document task whose page-range tasks were published.
    Split,
    /// Failed the checks on its origin (see [`ResultStores::vet`]); given up at once.
    Rejected,
}

/// What a finished task produced.
enum Done {
    /// The records, and the kind of units they are (a whole-document task
    /// learns it when it opens the document).
    Records(Vec<Record>, UnitKind),
    /// Page-range tasks published for a document.
    Split,
}

/// Told about each task a worker finishes; all methods default to nothing.
#[async_trait::async_trait]
pub trait TaskObserver: Send + Sync {
    async fn started(&self, _task: &TaskSpec) {}
    /// `records` is empty unless `end` is [`TaskEnd::Stored`].
    async fn ended(&self, _task: &TaskSpec, _end: TaskEnd, _records: &[Record], _elapsed: Duration, _delivery: u32) {}
    /// Seconds spent fetching, processing and storing one task.
    fn stage(&self, _stage: &'static str, _seconds: f64) {}
    /// Input read from the store: `how` is `download` (whole objects) or `ranged` (ranged
    /// reads of archives, and the first bytes read to tell an archive).
    fn fetched(&self, _how: &'static str, _requests: u64, _bytes: u64) {}
}

/// Whether this worker can run a task (`Err` names why not: the task is
/// handed back for another worker).
pub type Admit = Arc<dyn Fn(&TaskSpec) -> Result<(), String> + Send + Sync>;

pub struct Worker {
    pub queue: Arc<dyn TaskQueue>,
    pub stores: Arc<dyn ResultStores>,
    pub fetch: Arc<dyn Fetch>,
    pub ctx: ProcessContext,
    pub progress: Arc<Progress>,
    /// How often a running task's lease is renewed.
    pub heartbeat: Duration,
    pub admit: Option<Admit>,
    pub observer: Option<Arc<dyn TaskObserver>>,
    /// Set to `true` to abandon running tasks (they are nacked at once).
    pub abort: Option<watch::Receiver<bool>>,
    /// Shared by the task slots of one process: a task delivered before runs alone (see
    /// [`Worker::run`]). `Default::default()` for a slot of its own.
    pub gate: Arc<tokio::sync::RwLock<()>>,
}

/// A slot's turn under [`Worker::gate`].
enum Turn<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// Stored results up to this size also travel in the task's `Done` event,
/// so that a coordinator following the job need not read them back.
pub const EVENT_RECORDS_MAX: usize = 256 * 1024;

/// Serialises records as JSON lines, in page order.
pub fn to_jsonl(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).expect("records serialise");
        out.push(b'\n');
    }
    out
}

/// Processes a group of loose images, taking over the records of members that an earlier
/// group of the same job made and that are unchanged since ([`TaskSpec::reuse`]): only the
/// other members are fetched and given to the model. A taken-over record keeps the `task_id`
/// of the task that made it (so a run's counts, device time and cost are its own work only);
/// the results file it now sits in names this task. A member whose earlier records cannot be
/// read (moved, pruned, unreadable) is made again.
pub async fn process_images_reusing(store: &dyn BlobStore, task: &TaskSpec, fetch: &dyn Fetch, ctx: &ProcessContext) -> Result<Vec<Record>, TaskFailure> {
    let members: std::collections::HashSet<&str> = task.members.iter().map(|m| m.uri.as_str()).collect();
    let is_id = |id: &str| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let mut earlier: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for (uri, id) in &task.reuse {
        if members.contains(uri.as_str()) && is_id(id) {
            earlier.insert(id.as_str());
        }
    }
    let mut taken: std::collections::HashMap<String, Vec<Record>> = std::collections::HashMap::new();
    for id in earlier {
        let key = results_key(&task.settings.job, id);
        let Ok(Some(bytes)) = store.get(&key).await else { continue };
        let Ok(records) = crate::finish::parse_jsonl(&bytes) else { continue };
        for r in records {
            if task.reuse.get(&r.source).is_some_and(|want| want == id) && !r.failed() {
                taken.entry(r.source.clone()).or_default().push(r);
            }
        }
    }
    if taken.is_empty() {
        return process_images(task, fetch, ctx).await;
    }
    let rest = TaskSpec { members: task.members.iter().filter(|m| !taken.contains_key(&m.uri)).cloned().collect(), ..task.clone() };
    let mut made: std::collections::HashMap<String, Vec<Record>> = std::collections::HashMap::new();
    if !rest.members.is_empty() {
        for r in process_images(&rest, fetch, ctx).await? {
            made.entry(r.source.clone()).or_default().push(r);
        }
    }
    tracing::info!(task = %task.task_id, reused = taken.len(), made = rest.members.len(), "image group re-formed: records of unchanged images taken over");
    let mut out = Vec::new();
    for m in &task.members {
        if let Some(rs) = taken.remove(&m.uri).or_else(|| made.remove(&m.uri)) {
            out.extend(rs);
        }
    }
    Ok(out)
}

/// Delay before the n-th redelivery: 1 s, 2 s, 4 s … capped at one minute.
pub fn backoff(delivery: u32) -> Duration {
    Duration::from_secs(1u64 << delivery.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl Worker {
    /// Stores the split of a document, then publishes its page-range tasks
    /// that have no results yet (the queue drops ids it already holds).
    /// Results are looked up only where some may exist: the coordinator
    /// found results of the job at submission (`doc.check_stored`), or the
    /// document was split before (a redelivery).
    async fn publish_parts(
        &self,
        store: &Arc<dyn BlobStore>,
        doc: &TaskSpec,
        split: &crate::split::Split,
        parts: &[TaskSpec],
    ) -> Result<(), TaskFailure> {
        let job = &parts[0].settings.job;
        let key = split_key(job, &split.document_task_id);
        let check = doc.check_stored
            || store.exists(&key).await.map_err(|e| TaskFailure(format!("checking for an earlier split: {e}")))?;
        let body = serde_json::to_vec(split).map_err(|e| TaskFailure(format!("encoding the split: {e}")))?;
        store
            .put(&key, body)
            .await
            .map_err(|e| TaskFailure(format!("storing the split: {e}")))?;
        let mut published = Vec::new();
        for part in parts {
            let done = check
                && store
                    .exists(&results_key(job, &part.task_id))
                    .await
                    .map_err(|e| TaskFailure(format!("checking results: {e}")))?;
            if !done {
                self.queue
                    .publish(part)
                    .await
                    .map_err(|e| TaskFailure(format!("publishing page-range tasks: {e}")))?;
                published.push(part.task_id.clone());
            }
        }
        tracing::info!(source = %split.uri, pages = split.unit_count, tasks = parts.len(), published = published.len(), "document split");
        self.queue.announce(job, TaskEvent::Split { task_id: split.document_task_id.clone(), published }).await;
        Ok(())
    }

    /// Works until the queue says there is nothing more, or until `abort`
    /// is set (the running task is handed back, nothing more is pulled).
    pub async fn run(&self) -> anyhow::Result<()> {
        let aborted = || self.abort.as_ref().is_some_and(|a| *a.borrow());
        while !aborted() {
            let Some(lease) = self.queue.pull().await? else { break };
            if aborted() {
                lease.nack(Duration::ZERO, "worker shut down before starting the task").await?;
                break;
            }
            // A task delivered before may be what killed its last worker, and a task that kills
            // its process takes the tasks of the other slots down with it (seen in the fault
            // drill: a page riding along with a poison document used up its deliveries with
            // it). So it runs alone in this process: it waits for the running tasks to end,
            // and nothing else starts here until it ends. Waiting renews the lease.
            let _turn = if lease.delivery() > 1 {
                Turn::Alone(self.renewing(lease.as_ref(), self.gate.write()).await)
            } else {
                Turn::Shared(self.renewing(lease.as_ref(), self.gate.read()).await)
            };
            self.handle(lease).await;
        }
        Ok(())
    }

    /// Awaits `wait` while renewing `lease` as a running task's would be.
    async fn renewing<F: std::future::Future>(&self, lease: &dyn Lease, wait: F) -> F::Output {
        tokio::pin!(wait);
        loop {
            let every = lease.lease_time().map(|t| (t / 3).max(Duration::from_millis(100))).unwrap_or(self.heartbeat);
            tokio::select! {
                out = &mut wait => return out,
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = lease.heartbeat().await {
                        tracing::warn!(task = %lease.task().task_id, "heartbeat while waiting for a turn failed: {e}");
                    }
                }
            }
        }
    }

    async fn handle(&self, lease: Box<dyn Lease>) {
        let task = lease.task().clone();
        let delivery = lease.delivery();
        let t0 = Instant::now();
        if let Some(admit) = &self.admit {
            if let Err(why) = admit(&task) {
                tracing::warn!(task = %task.task_id, "handing the task back: {why}");
                if let Err(e) = lease.nack(backoff(delivery), &why).await {
                    tracing::warn!(task = %task.task_id, "nack failed: {e}");
                }
                if let Some(o) = &self.observer {
                    o.ended(&task, TaskEnd::Refused, &[], t0.elapsed(), delivery).await;
                }
                return;
            }
        }
        match self.stores.vet(&task).await {
            Vetting::Run => {}
            Vetting::HandBack(why) => {
                tracing::warn!(task = %task.task_id, "handing the task back: {why}");
                if let Err(e) = lease.nack(backoff(delivery), &why).await {
                    tracing::warn!(task = %task.task_id, "nack failed: {e}");
                }
                if let Some(o) = &self.observer {
                    o.ended(&task, TaskEnd::Refused, &[], t0.elapsed(), delivery).await;
                }
                return;
            }
            Vetting::Reject(why) => {
                tracing::warn!(task = %task.task_id, job = %task.settings.job, "refusing the task for good: {why}");
                if let Err(e) = lease.term(&why).await {
                    tracing::warn!(task = %task.task_id, "giving up the task failed: {e}");
                }
                if let Some(o) = &self.observer {
                    o.ended(&task, TaskEnd::Rejected, &[], t0.elapsed(), delivery).await;
                }
                return;
            }
        }
        crate::faults::task_started(&task, delivery);
        if let Some(o) = &self.observer {
            o.started(&task).await;
        }
        let observer = self.observer.clone();
        let stage = move |name: &'static str, t: Instant| {
            if let Some(o) = &observer {
                o.stage(name, t.elapsed().as_secs_f64());
            }
        };
        let work = async {
            let t = Instant::now();
            let store = self.stores.store_for(&task).await?;
            // An image group's source is the folder or prefix its members were listed from:
            // the members are fetched one by one while the task runs. An archive on S3 is
            // read by ranged requests, anything else is downloaded.
            let fetch = Counted { inner: self.fetch.as_ref(), observer: self.observer.clone() };
            let mut input = open_input(&fetch, &task).await?;
            stage("fetch", t);
            let t = Instant::now();
            // A job planned without a model never uses this worker's model
            // (its task ids say "no model"; `quire run` would not use one).
            let no_model;
            let ctx = if task.settings.model.is_none() && self.ctx.model.is_some() {
                no_model = ProcessContext { pdf: self.ctx.pdf.clone(), model: None, model_long_side: None };
                &no_model
            } else {
                &self.ctx
            };
            let whole;
            let run = if task.unit == UnitKind::Document {
                let examined = examine_input(&mut input, &task, ctx).await?;
                match open_examined(&task, &examined) {
                    Opened::Whole(t) => {
                        whole = t;
                        &whole
                    }
                    Opened::Split(split, parts) => {
                        drop(input);
                        self.publish_parts(&store, &task, &split, &parts).await?;
                        stage("split", t);
                        return Ok(Done::Split);
                    }
                }
            } else {
                &task
            };
            let mut records = match std::mem::replace(&mut input, Input::None) {
                _ if run.unit == UnitKind::Images => process_images_reusing(store.as_ref(), run, &fetch, ctx).await?,
                Input::Ranged(RangedInput { reader, size, stats }) if run.unit == UnitKind::Archive => {
                    let records = process_archive(run, ArchiveSource::Reader(reader), ctx).await?;
                    after_ranged_read(&stats, size, run, "archive task read")?;
                    records
                }
                Input::Local(f) => {
                    let records = process_task(run, &f.path, ctx).await?;
                    input = Input::Local(f);
                    records
                }
                // An archive that could not be read when opened: its error record is made
                // from a download, like any unreadable object's.
                Input::Ranged(_) | Input::None => {
                    let f = fetch.fetch(&task.source).await?;
                    let records = process_task(run, &f.path, ctx).await?;
                    input = Input::Local(f);
                    records
                }
            };
            crate::faults::records_made(&mut records).await;
            stage("process", t);
            drop(input);
            let t = Instant::now();
            let body = to_jsonl(&records);
            let copy = (body.len() <= EVENT_RECORDS_MAX).then(|| String::from_utf8_lossy(&body).into_owned());
            store
                .put(&results_key(&task.settings.job, &task.task_id), body)
                .await
                .map_err(|e| TaskFailure(format!("storing results: {e}")))?;
            stage("upload", t);
            self.queue.announce(&task.settings.job, TaskEvent::Done { task_id: task.task_id.clone(), records: copy }).await;
            Ok::<_, TaskFailure>(Done::Records(records, run.unit))
        };
        tokio::pin!(work);
        // Renewed every third of the lease in force, which the queue may know better than
        // this worker's settings (a coordinator may have changed it since the worker started).
        // The lease may change while the task runs: the period follows it at every beat.
        let period = |lease: &dyn Lease| lease.lease_time().map(|t| (t / 3).max(Duration::from_millis(100))).unwrap_or(self.heartbeat);
        let mut every = period(lease.as_ref());
        let mut beat = tokio::time::interval(every);
        beat.tick().await;
        let mut abort = self.abort.clone();
        let aborted = async move {
            match abort.as_mut() {
                Some(rx) => {
                    let _ = rx.wait_for(|a| *a).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(aborted);
        let result = loop {
            tokio::select! {
                r = &mut work => break Some(r),
                _ = &mut aborted => break None,
                _ = beat.tick() => {
                    if let Err(e) = lease.heartbeat().await {
                        tracing::warn!(task = %task.task_id, "heartbeat failed: {e}");
                    }
                    if period(lease.as_ref()) != every {
                        every = period(lease.as_ref());
                        beat = tokio::time::interval(every);
                        beat.tick().await;
                    }
                }
            }
        };
        let Some(result) = result else {
            tracing::warn!(task = %task.task_id, "shutting down: handing the unfinished task back");
            if let Err(e) = lease.nack(Duration::ZERO, "worker shut down before finishing the task").await {
                tracing::warn!(task = %task.task_id, "nack failed: {e}");
            }
            if let Some(o) = &self.observer {
                o.ended(&task, TaskEnd::Interrupted, &[], t0.elapsed(), delivery).await;
            }
            return;
        };
        let p = &self.progress;
        match result {
            Ok(Done::Split) => {
                if let Err(e) = lease.ack().await {
                    tracing::warn!(task = %task.task_id, "ack failed (the split is stored; a redelivery will redo it): {e}");
                }
                if let Some(o) = &self.observer {
                    o.ended(&task, TaskEnd::Split, &[], t0.elapsed(), delivery).await;
                }
            }
            Ok(Done::Records(records, unit)) => {
                for r in &records {
                    if r.failed() {
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
                if let Some(o) = &self.observer {
                    let opened = TaskSpec { unit, ..task.clone() };
                    o.ended(&opened, TaskEnd::Stored, &records, t0.elapsed(), delivery).await;
                }
            }
            Err(TaskFailure(msg)) => {
                tracing::warn!(task = %task.task_id, source = %task.source.uri, delivery, "task failed, will retry: {msg}");
                Progress::add(&p.tasks_retried, 1);
                if let Err(e) = lease.nack(backoff(delivery), &msg).await {
                    tracing::warn!(task = %task.task_id, "nack failed: {e}");
                }
                if let Some(o) = &self.observer {
                    o.ended(&task, TaskEnd::Retried, &[], t0.elapsed(), delivery).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_core::{JobSettings, UnitKind};
    use quire_queue::memory::MemoryQueue;
    use quire_queue::QueueOptions;
    use quire_store::local::LocalStore;

    /// A fetch that never finishes (a stuck download), and says when it started.
    struct Stuck(tokio::sync::mpsc::Sender<()>);

    #[async_trait::async_trait]
    impl Fetch for Stuck {
        async fn fetch(&self, _src: &SourceRef) -> Result<Fetched, TaskFailure> {
            let _ = self.0.send(()).await;
            std::future::pending().await
        }
    }

    /// A fetcher over local fixture files that records what it was asked.
    struct Recording {
        keeps: bool,
        calls: std::sync::Mutex<Vec<&'static str>>,
    }

    #[async_trait::async_trait]
    impl Fetch for Recording {
        async fn fetch(&self, src: &SourceRef) -> Result<Fetched, TaskFailure> {
            self.calls.lock().unwrap().push("download");
            Ok(Fetched { path: PathBuf::from(&src.uri), _keep: None, downloaded: src.size })
        }

        async fn head(&self, src: &SourceRef, len: u64) -> Result<Option<Vec<u8>>, TaskFailure> {
            self.calls.lock().unwrap().push("head");
            let bytes = std::fs::read(&src.uri).unwrap();
            Ok(Some(bytes[..(len as usize).min(bytes.len())].to_vec()))
        }

        async fn open_ranged(&self, src: &SourceRef) -> Result<Option<RangedInput>, TaskFailure> {
            self.calls.lock().unwrap().push("ranged");
            let bytes = std::fs::read(&src.uri).unwrap();
            Ok(Some(RangedInput { size: bytes.len() as u64, reader: Box::new(std::io::Cursor::new(bytes)), stats: Arc::default() }))
        }

        fn keeps(&self, _src: &SourceRef) -> bool {
            self.keeps
        }
    }

    #[tokio::test]
    async fn a_gzipped_tar_is_downloaded_to_be_kept_and_other_archives_are_read_by_ranges() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/archives");
        let task = |name: &str, unit: UnitKind, resume: Option<quire_core::ArchiveResume>| {
            let uri = dir.join(name).to_string_lossy().into_owned();
            let size = std::fs::metadata(&uri).unwrap().len();
            let src = SourceRef { uri, rel: name.into(), size, version: "1".into() };
            TaskSpec { unit, first: 2, last: 3, resume, ..crate::split::document_task(&JobSettings::new("j"), "f", &src) }
        };
        let resume = Some(quire_core::ArchiveResume { offset: 1536, duplicates: Vec::new() });
        for (keeps, name, unit, resume, want, local) in [
            // Every range of a .tar.gz inflates it from its start: downloaded once, kept.
            (true, "gz-000000.tar.gz", UnitKind::Archive, None, vec!["head", "download"], true),
            (true, "gz-000000.tar.gz", UnitKind::Document, None, vec!["head", "download"], true),
            // Not kept (too large for the cache): ranged reads, without asking for the head.
            (false, "gz-000000.tar.gz", UnitKind::Archive, None, vec!["ranged"], false),
            // Plain tars and zips are read by ranges; a resume point says plain tar already.
            (true, "shard-000001.tar", UnitKind::Archive, None, vec!["head", "ranged"], false),
            (true, "shard-000001.tar", UnitKind::Archive, resume, vec!["ranged"], false),
            (true, "pictures.zip", UnitKind::Document, None, vec!["head", "ranged"], false),
        ] {
            let fetch = Recording { keeps, calls: Default::default() };
            let input = open_input(&fetch, &task(name, unit, resume)).await.unwrap();
            assert_eq!(*fetch.calls.lock().unwrap(), want, "{name} {unit:?} keeps {keeps}");
            assert_eq!(matches!(input, Input::Local(_)), local, "{name} {unit:?}");
        }
    }

    /// A text-layer worker over `queue` that stops when `abort` says so.
    fn worker(queue: &MemoryQueue, store: Arc<dyn BlobStore>, fetch: Arc<dyn Fetch>, pdf: quire_render::PdfRenderer, abort: watch::Receiver<bool>) -> Worker {
        Worker {
            queue: Arc::new(queue.clone()),
            stores: Arc::new(OneStore(store)),
            fetch,
            ctx: ProcessContext { pdf, model: None, model_long_side: None },
            progress: Arc::new(Progress::default()),
            heartbeat: Duration::from_secs(10),
            admit: None,
            observer: None,
            abort: Some(abort),
            gate: Default::default(),
        }
    }

    /// Runs one worker over `queue` until no task is left, then stops it.
    async fn run_until_drained(queue: &MemoryQueue, store: &Arc<dyn BlobStore>, pdf: quire_render::PdfRenderer) {
        let (abort_tx, abort_rx) = watch::channel(false);
        let w = worker(queue, store.clone(), Arc::new(LocalFetch), pdf, abort_rx);
        let h = tokio::spawn(async move { w.run().await });
        let t0 = Instant::now();
        while queue.outstanding() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "work did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        abort_tx.send_replace(true);
        queue.close();
        h.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn document_tasks_are_split_into_quire_run_tasks_or_run_whole() {
        let Ok(pdf) = quire_render::PdfRenderer::start(1) else {
            panic!("libpdfium is needed: run scripts/setup-pdfium.sh and export QUIRE_PDFIUM");
        };
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/docs");
        let mut s = JobSettings::new("j");
        s.pages_per_task = 2;
        s.engine = quire_core::Engine::TextLayer;
        let fp = quire_core::settings_fingerprint(&s);
        let src = |name: &str| {
            let p = docs.join(name);
            SourceRef { uri: p.to_string_lossy().into(), rel: name.into(), size: std::fs::metadata(&p).unwrap().len(), version: "1".into() }
        };
        let queue = MemoryQueue::new(QueueOptions { ack_wait: Duration::from_secs(60), max_deliver: 3 });
        let big = crate::split::document_task(&s, &fp, &src("born_digital.pdf")); // 3 pages
        let small = crate::split::document_task(&s, &fp, &src("image.png"));
        queue.publish(&big).await.unwrap();
        queue.publish(&small).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(LocalStore::new(dir.path()));
        run_until_drained(&queue, &store, pdf).await;
        // The 3-page PDF: a split record and the two tasks quire run plans.
        let split: crate::split::Split =
            serde_json::from_slice(&store.get(&split_key("j", &big.task_id)).await.unwrap().expect("split stored")).unwrap();
        let planned = crate::plan::plan_tasks(&s, &fp, &big.source, &Ok(quire_render::Probe { kind: quire_render::InputKind::Pdf, unit_count: 3, bytes: 0 }));
        assert_eq!(split.parts.iter().map(|p| p.task_id.clone()).collect::<Vec<_>>(), planned.iter().map(|t| t.task_id.clone()).collect::<Vec<_>>());
        let mut pages = Vec::new();
        for p in &split.parts {
            let body = store.get(&results_key("j", &p.task_id)).await.unwrap().expect("part results");
            for r in crate::finish::parse_jsonl(&body).unwrap() {
                assert_eq!((r.task_id.as_str(), r.page_count), (p.task_id.as_str(), 3));
                pages.push(r.page);
            }
        }
        assert_eq!(pages, vec![1, 2, 3]);
        assert!(!store.exists(&results_key("j", &big.task_id)).await.unwrap());
        // The image fits one task: run whole, results under the document id.
        let body = store.get(&results_key("j", &small.task_id)).await.unwrap().expect("whole results");
        let recs = crate::finish::parse_jsonl(&body).unwrap();
        assert_eq!((recs.len(), recs[0].task_id.as_str()), (1, small.task_id.as_str()));
        assert!(!store.exists(&split_key("j", &small.task_id)).await.unwrap());
    }

    #[tokio::test]
    async fn a_split_skips_page_ranges_with_stored_results_where_some_may_exist() {
        let Ok(pdf) = quire_render::PdfRenderer::start(1) else {
            panic!("libpdfium is needed: run scripts/setup-pdfium.sh and export QUIRE_PDFIUM");
        };
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/docs");
        let p = docs.join("born_digital.pdf"); // 3 pages: tasks 1-2 and 3
        let src = SourceRef { uri: p.to_string_lossy().into(), rel: "born_digital.pdf".into(), size: std::fs::metadata(&p).unwrap().len(), version: "1".into() };
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(LocalStore::new(dir.path()));
        // (job, the coordinator found results at submission, the document was split before)
        for (job, check_stored, split_before) in [("fresh", false, false), ("resumed", true, false), ("redelivered", false, true)] {
            let mut s = JobSettings::new(job);
            s.pages_per_task = 2;
            s.engine = quire_core::Engine::TextLayer;
            let fp = quire_core::settings_fingerprint(&s);
            let mut doc = crate::split::document_task(&s, &fp, &src);
            doc.check_stored = check_stored;
            let parts = crate::plan::plan_tasks(&s, &fp, &src, &Ok(quire_render::Probe { kind: quire_render::InputKind::Pdf, unit_count: 3, bytes: 0 }));
            store.put(&results_key(job, &parts[0].task_id), b"stored earlier\n".to_vec()).await.unwrap();
            if split_before {
                store.put(&split_key(job, &doc.task_id), b"{}".to_vec()).await.unwrap();
            }
            let queue = MemoryQueue::new(QueueOptions { ack_wait: Duration::from_secs(60), max_deliver: 3 });
            queue.publish(&doc).await.unwrap();
            run_until_drained(&queue, &store, pdf.clone()).await;
            let first = store.get(&results_key(job, &parts[0].task_id)).await.unwrap().unwrap();
            let looked = check_stored || split_before;
            assert_eq!(first == b"stored earlier\n", looked, "{job}: pages 1-2 {}", if looked { "kept" } else { "run (a fresh job looks nothing up)" });
            let last = store.get(&results_key(job, &parts[1].task_id)).await.unwrap().expect("page 3 ran");
            assert_eq!(crate::finish::parse_jsonl(&last).unwrap()[0].page, 3, "{job}");
        }
    }

    #[tokio::test]
    async fn abort_hands_the_running_task_back_and_stops_pulling() {
        let Ok(pdf) = quire_render::PdfRenderer::start(1) else {
            panic!("libpdfium is needed: run scripts/setup-pdfium.sh and export QUIRE_PDFIUM");
        };
        let queue = MemoryQueue::new(QueueOptions { ack_wait: Duration::from_secs(60), max_deliver: 3 });
        let src = SourceRef { uri: "x.pdf".into(), rel: "x.pdf".into(), size: 1, version: "1".into() };
        let task = TaskSpec {
            task_id: "t1".into(),
            settings: JobSettings::new("j"),
            source: src,
            unit: UnitKind::Pdf,
            first: 1,
            last: 1,
            unit_count: 1,
            check_stored: false,
            submission: None,
            members: Vec::new(),
            resume: None,
            reuse: Default::default(),
        };
        queue.publish(&task).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (started_tx, mut started) = tokio::sync::mpsc::channel(1);
        let (abort_tx, abort_rx) = watch::channel(false);
        let w = worker(&queue, Arc::new(LocalStore::new(dir.path())), Arc::new(Stuck(started_tx)), pdf, abort_rx);
        let h = tokio::spawn(async move { w.run().await });
        started.recv().await.unwrap();
        abort_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), h).await.expect("worker stopped").unwrap().unwrap();
        // The task is back in the queue at once, for another worker.
        assert!(queue.dead_letters().is_empty());
        let again = tokio::time::timeout(Duration::from_secs(2), queue.pull()).await.unwrap().unwrap().unwrap();
        assert_eq!((again.task().task_id.as_str(), again.delivery()), ("t1", 2));
    }
}
