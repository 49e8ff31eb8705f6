//! The worker loop: lease a task, fetch its input, process it, store its
//! records, ack. Heartbeats keep long tasks leased; transient failures are
//! nacked with a growing delay and end in the dead-letter path after
//! `max_deliver` deliveries.

pub mod input;
pub mod observe;
pub mod service;
pub mod stores;

use crate::stage::process::process_archive;
use crate::stage::process::process_task;
use crate::stage::process::ArchiveSource;
use crate::stage::process::ProcessContext;
use crate::error::{FailureKind, TaskFailure};
use crate::progress::Progress;
use crate::stage::split::open_examined;
use crate::stage::split::split_key;
use crate::stage::split::{whole_split, Opened, Split};
use quire_core::{results_key, ObjectKind, Record, TaskSpec, UnitKind};
use quire_queue::{Lease, TaskEvent, TaskQueue};
use quire_store::BlobStore;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use crate::source::Fetch;
use crate::source::RangedInput;
use crate::sink::jsonl::to_jsonl;
use crate::worker::stores::ResultStores;
use crate::worker::stores::Vetting;
use crate::stage::reuse::process_images_reusing;
use crate::worker::observe::{TaskEnd, TaskObserver};
use crate::worker::input::{after_ranged_read, examine_input, open_input, Counted, Input};

/// What a finished task produced.
enum Done {
    /// The records, and the kind of units they are (a whole-document task
    /// learns it when it opens the document).
    Records(Vec<Record>, UnitKind),
    /// Page-range tasks published for a document.
    Split,
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
    pub admit: Option<Admit>,
    pub observer: Option<Arc<dyn TaskObserver>>,
    /// Set to `true` to abandon running tasks (they are nacked at once).
    pub abort: Option<watch::Receiver<bool>>,
    /// Shared by the task slots of one process: a task delivered before runs alone (see
    /// [`Worker::run`]). `Default::default()` for a slot of its own.
    pub gate: Arc<tokio::sync::RwLock<()>>,
}

/// How [`Worker::settle`] ends a lease.
enum Settle<'a> {
    /// Acked; the text says what a failed ack means.
    Ack(&'static str),
    /// Handed back for a later delivery after the delay, with the reason.
    Nack(Duration, &'a str),
    /// Given up for good, with the reason.
    Term(&'a str),
}

/// A slot's turn under [`Worker::gate`].
enum Turn<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// Stored results up to this size also travel in the task's `Done` event,
/// so that a coordinator following the job need not read them back.
pub const EVENT_RECORDS_MAX: usize = 256 * 1024;

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
        split: &Split,
        parts: &[TaskSpec],
    ) -> Result<(), TaskFailure> {
        let job = &parts[0].settings.job;
        let check = doc.check_stored
            || store.exists(&split_key(job, &split.document_task_id)).await.map_err(|e| TaskFailure::caused(FailureKind::Output, "checking for an earlier split", e))?;
        store_split(store.as_ref(), job, split).await?;
        let mut published = Vec::new();
        for part in parts {
            let done = check
                && store
                    .exists(&results_key(job, &part.task_id))
                    .await
                    .map_err(|e| TaskFailure::caused(FailureKind::Output, "checking results", e))?;
            if !done {
                self.queue
                    .publish(part)
                    .await
                    .map_err(|e| TaskFailure::caused(FailureKind::Queue, "publishing page-range tasks", e))?;
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
            let every = lease.renew_every();
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

    /// Settles `lease` as `how` says (logging a failure to reach the queue: the lease then
    /// lapses and the task comes back) and tells the observer how the task ended; `since` is
    /// when the task was taken and its delivery.
    async fn settle(&self, lease: Box<dyn Lease>, how: Settle<'_>, end: TaskEnd, task: &TaskSpec, records: &[Record], since: (Instant, u32)) {
        let (what, r) = match how {
            Settle::Ack(what) => (what, lease.ack().await),
            Settle::Nack(delay, why) => ("nack failed", lease.nack(delay, why).await),
            Settle::Term(why) => ("giving up the task failed", lease.term(why).await),
        };
        if let Err(e) = r {
            tracing::warn!(task = %task.task_id, "{what}: {e}");
        }
        if let Some(o) = &self.observer {
            o.ended(task, end, records, since.0.elapsed(), since.1).await;
        }
    }

    async fn handle(&self, lease: Box<dyn Lease>) {
        let task = lease.task().clone();
        let delivery = lease.delivery();
        let t0 = Instant::now();
        if let Some(admit) = &self.admit {
            if let Err(why) = admit(&task) {
                tracing::warn!(task = %task.task_id, "handing the task back: {why}");
                self.settle(lease, Settle::Nack(backoff(delivery), &why), TaskEnd::Refused, &task, &[], (t0, delivery)).await;
                return;
            }
        }
        match self.stores.vet(&task).await {
            Vetting::Run => {}
            Vetting::HandBack(why) => {
                tracing::warn!(task = %task.task_id, "handing the task back: {why}");
                self.settle(lease, Settle::Nack(backoff(delivery), &why), TaskEnd::Refused, &task, &[], (t0, delivery)).await;
                return;
            }
            Vetting::Reject(why) => {
                tracing::warn!(task = %task.task_id, job = %task.settings.job, "refusing the task for good: {why}");
                self.settle(lease, Settle::Term(&why), TaskEnd::Rejected, &task, &[], (t0, delivery)).await;
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
                        // The object's bytes say other than its name (a tar without `.tar`, a
                        // PDF named `.jpg`): a split of one part tells the finish what it is.
                        let uri = &t.source.uri;
                        if ObjectKind::planned(t.unit, uri) != ObjectKind::by_name(uri) {
                            store_split(store.as_ref(), &t.settings.job, &whole_split(&t)).await?;
                        }
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
                .map_err(|e| TaskFailure::caused(FailureKind::Output, "storing results", e))?;
            stage("upload", t);
            self.queue.announce(&task.settings.job, TaskEvent::Done { task_id: task.task_id.clone(), records: copy }).await;
            Ok::<_, TaskFailure>(Done::Records(records, run.unit))
        };
        tokio::pin!(work);
        // Renewed every third of the lease in force, which the queue may know better than
        // this worker's settings (a coordinator may have changed it since the worker started).
        // The lease may change while the task runs: the period follows it at every beat.
        let mut every = lease.renew_every();
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
                    if lease.renew_every() != every {
                        every = lease.renew_every();
                        beat = tokio::time::interval(every);
                        beat.tick().await;
                    }
                }
            }
        };
        let Some(result) = result else {
            tracing::warn!(task = %task.task_id, "shutting down: handing the unfinished task back");
            let why = "worker shut down before finishing the task";
            self.settle(lease, Settle::Nack(Duration::ZERO, why), TaskEnd::Interrupted, &task, &[], (t0, delivery)).await;
            return;
        };
        let p = &self.progress;
        match result {
            Ok(Done::Split) => {
                let how = Settle::Ack("ack failed (the split is stored; a redelivery will redo it)");
                self.settle(lease, how, TaskEnd::Split, &task, &[], (t0, delivery)).await;
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
                let how = Settle::Ack("ack failed (results are stored; a redelivery will redo them)");
                let opened = TaskSpec { unit, ..task.clone() };
                self.settle(lease, how, TaskEnd::Stored, &opened, &records, (t0, delivery)).await;
            }
            Err(f) => {
                let kind = f.kind.as_str();
                tracing::warn!(task = %task.task_id, source = %task.source.uri, delivery, kind, "task failed, will retry: {}", f.message);
                Progress::add(&p.tasks_retried, 1);
                self.settle(lease, Settle::Nack(backoff(delivery), &f.message), TaskEnd::Retried, &task, &[], (t0, delivery)).await;
            }
        }
    }
}

/// Stores `split` as `JOB/splits/DOCUMENT_TASK_ID.json`.
async fn store_split(store: &dyn BlobStore, job: &str, split: &Split) -> Result<(), TaskFailure> {
    let body = serde_json::to_vec(split).map_err(|e| TaskFailure::caused(FailureKind::Worker, "encoding the split", e))?;
    store
        .put(&split_key(job, &split.document_task_id), body)
        .await
        .map_err(|e| TaskFailure::caused(FailureKind::Output, "storing the split", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_core::SourceRef;
    use crate::source::Fetched;
    use crate::source::LocalFetch;
    use crate::worker::stores::OneStore;
    use std::path::PathBuf;
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
            TaskSpec { unit, first: 2, last: 3, resume, ..crate::stage::split::document_task(&JobSettings::new("j"), "f", &src) }
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
        let big = crate::stage::split::document_task(&s, &fp, &src("born_digital.pdf")); // 3 pages
        let small = crate::stage::split::document_task(&s, &fp, &src("image.png"));
        // A zip whose name does not say so: its worker finds out from the bytes.
        let dir = tempfile::tempdir().unwrap();
        let unnamed = dir.path().join("pictures");
        std::fs::copy(docs.join("../archives/pictures.zip"), &unnamed).unwrap();
        let zip = SourceRef { uri: unnamed.to_string_lossy().into(), rel: "pictures".into(), size: 1, version: "1".into() };
        let zip = crate::stage::split::document_task(&s, &fp, &zip);
        queue.publish(&big).await.unwrap();
        queue.publish(&small).await.unwrap();
        queue.publish(&zip).await.unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(LocalStore::new(dir.path()));
        run_until_drained(&queue, &store, pdf).await;
        // The 3-page PDF: a split record and the two tasks quire run plans.
        let split: crate::stage::split::Split =
            serde_json::from_slice(&store.get(&split_key("j", &big.task_id)).await.unwrap().expect("split stored")).unwrap();
        let planned = crate::stage::plan::plan_tasks(&s, &fp, &big.source, &Ok(quire_render::Probe { kind: quire_render::InputKind::Pdf, unit_count: 3, bytes: 0 }));
        assert_eq!(split.parts.iter().map(|p| p.task_id.clone()).collect::<Vec<_>>(), planned.iter().map(|t| t.task_id.clone()).collect::<Vec<_>>());
        let mut pages = Vec::new();
        for p in &split.parts {
            let body = store.get(&results_key("j", &p.task_id)).await.unwrap().expect("part results");
            for r in crate::sink::jsonl::parse_jsonl(&body).unwrap() {
                assert_eq!((r.task_id.as_str(), r.page_count), (p.task_id.as_str(), 3));
                pages.push(r.page);
            }
        }
        assert_eq!(pages, vec![1, 2, 3]);
        assert!(!store.exists(&results_key("j", &big.task_id)).await.unwrap());
        // The image fits one task: run whole, results under the document id.
        let body = store.get(&results_key("j", &small.task_id)).await.unwrap().expect("whole results");
        let recs = crate::sink::jsonl::parse_jsonl(&body).unwrap();
        assert_eq!((recs.len(), recs[0].task_id.as_str()), (1, small.task_id.as_str()));
        assert!(!store.exists(&split_key("j", &small.task_id)).await.unwrap());
        // The unnamed zip is run whole too; its split of one part says what it is, for the
        // finish's datasets (an image or PDF whose name says what it is needs none).
        let split: crate::stage::split::Split =
            serde_json::from_slice(&store.get(&split_key("j", &zip.task_id)).await.unwrap().expect("kind stored")).unwrap();
        assert_eq!(split.unit, Some(UnitKind::Archive));
        assert_eq!(split.parts.iter().map(|p| p.task_id.as_str()).collect::<Vec<_>>(), [zip.task_id.as_str()]);
        assert!(store.exists(&results_key("j", &zip.task_id)).await.unwrap());
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
            let mut doc = crate::stage::split::document_task(&s, &fp, &src);
            doc.check_stored = check_stored;
            let parts = crate::stage::plan::plan_tasks(&s, &fp, &src, &Ok(quire_render::Probe { kind: quire_render::InputKind::Pdf, unit_count: 3, bytes: 0 }));
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
            assert_eq!(crate::sink::jsonl::parse_jsonl(&last).unwrap()[0].page, 3, "{job}");
        }
    }

    #[tokio::test]
    async fn abort_hands_the_running_task_back_and_stops_pulling() {
        let Ok(pdf) = quire_render::PdfRenderer::start(1) else {
            panic!("libpdfium is needed: run scripts/setup-pdfium.sh and export QUIRE_PDFIUM");
        };
        let queue = MemoryQueue::new(QueueOptions { ack_wait: Duration::from_secs(60), max_deliver: 3 });
        let src = SourceRef { uri: "x.pdf".into(), rel: "x.pdf".into(), size: 1, version: "1".into() };
        let task = TaskSpec::new("t1".into(), JobSettings::new("j"), src, UnitKind::Pdf, (1, 1), 1);
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
