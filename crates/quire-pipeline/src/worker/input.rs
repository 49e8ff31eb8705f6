//! How a task reads its input: opened by ranged reads or fetched whole, examined when it is
//! a whole document, and the task's view of the fetcher that counts what it takes.

use crate::stage::plan::Examined;
use crate::stage::process::ProcessContext;
use crate::error::{FailureKind, TaskFailure};
use quire_core::{SourceRef, TaskSpec, UnitKind};
use quire_store::archive::{self, ArchiveLimits, ReadSeek, ARCHIVE_SNIFF_LEN};
use quire_store::ReadStats;
use std::sync::Arc;
use crate::source::Fetch;
use crate::source::Fetched;
use crate::source::RangedInput;
use crate::worker::observe::TaskObserver;

/// After a ranged read of `task`'s object: a store fault met while reading fails the task
/// (tried again later); else what was fetched is logged.
pub(crate) fn after_ranged_read(stats: &ReadStats, size: u64, task: &TaskSpec, what: &'static str) -> Result<(), TaskFailure> {
    if let Some(e) = stats.failure() {
        return Err(TaskFailure::new(FailureKind::Input, format!("reading {}: {e}", task.source.uri)));
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
pub(crate) enum Input {
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
pub(crate) async fn open_input(fetch: &dyn Fetch, task: &TaskSpec) -> Result<Input, TaskFailure> {
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
pub(crate) async fn examine_input(input: &mut Input, task: &TaskSpec, ctx: &ProcessContext) -> Result<Examined, TaskFailure> {
    let limits = task.settings.limits;
    match std::mem::replace(input, Input::None) {
        Input::Ranged(mut r) => {
            let (reader, scan) = tokio::task::spawn_blocking(move || {
                let scan = archive::scan_reader(&mut r.reader, &ArchiveLimits::from(&limits));
                (r, scan)
            })
            .await
            .map_err(|e| TaskFailure::caused(FailureKind::Worker, "opening the archive", e))?;
            r = reader;
            after_ranged_read(&r.stats, r.size, task, "archive scanned")?;
            *input = Input::Ranged(r);
            Ok(Examined::Archive(scan))
        }
        Input::Local(f) => {
            let (path, pdf) = (f.path.clone(), ctx.pdf.clone());
            *input = Input::Local(f);
            tokio::task::spawn_blocking(move || crate::stage::plan::examine(&path, &limits, &pdf))
                .await
                .map_err(|e| TaskFailure::caused(FailureKind::Worker, "opening the document", e))
        }
        Input::None => Err(TaskFailure::new(FailureKind::Worker, format!("{}: a whole-document task without its input", task.source.uri))),
    }
}

/// A task's view of the worker's [`Fetch`]: what it takes from the store is told to the
/// observer (`TaskObserver::fetched`). Whole downloads when they happen; ranged reads of an
/// object once its reader is dropped, the reader's whole count at once.
pub(crate) struct Counted<'a> {
    pub(crate) inner: &'a dyn Fetch,
    pub(crate) observer: Option<Arc<dyn TaskObserver>>,
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
