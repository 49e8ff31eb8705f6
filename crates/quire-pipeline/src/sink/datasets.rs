//! Caption datasets at the job's finish (`--dataset`): the records of each input archive
//! become `JOB/parquet/<archive path>.parquet` (and `JOB/webdataset/<archive path>` when
//! asked), the records of each task of loose images `JOB/parquet/images-TASK_ID.parquet`.
//!
//! [`DatasetSink`] is fed by [`crate::sink::finish::finish_job`] as it reads the result files in
//! plan order: [`DatasetSink::task`] for each task, [`DatasetSink::document`] when the
//! tasks of one input object are all read. It says which files to write and whether the
//! object still needs its Markdown (PDFs do; images whose records went into a dataset do
//! not).
//!
//! A file's digest (SHA-256 of its tasks' ids and result files) is kept in the manifest:
//! a rerun writes only files whose digest changed or that are gone, and a file is always
//! made from all of its records, so rows are never duplicated.

use quire_core::{names, ObjectKind};
use crate::stage::plan::PlannedTask;
use quire_core::{
    images_parquet_key, manifest_key, parquet_key, webdataset_key, ArchiveCounts, DatasetFile, DatasetFormat,
    JobSettings, Manifest, Record,
};
use quire_store::BlobStore;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// Bumped when the same records would give different dataset bytes, so that a rerun
/// after an upgrade rewrites the files.
const LAYOUT: &str = "quire-dataset/1";

struct TaskRead<'p> {
    task: &'p PlannedTask,
    /// Its records in the document's records.
    records: Range<usize>,
    /// SHA-256 of its result file, `None` when it has none.
    result: Option<[u8; 32]>,
}

/// What [`DatasetSink::document`] decided for one object.
pub struct DocumentOutput {
    /// Dataset files to write: `(key, bytes)`.
    pub writes: Vec<(String, Vec<u8>)>,
    /// Whether the object still gets its Markdown file.
    pub markdown: bool,
}

/// Collects the dataset files of a job's finish (see the module documentation).
pub struct DatasetSink<'p> {
    job: String,
    formats: Vec<DatasetFormat>,
    /// Digests of the files the previous finish listed.
    previous: HashMap<String, String>,
    /// Dataset keys in the store when this finish began.
    present: HashSet<String>,
    /// Keys given out by this finish (two archives with the same path below different
    /// input roots must not overwrite each other).
    taken: HashSet<String>,
    tasks: Vec<TaskRead<'p>>,
    pub files: Vec<DatasetFile>,
    pub archives: Vec<ArchiveCounts>,
}

fn digest_hex(parts: &[&TaskRead<'_>], format: DatasetFormat) -> String {
    let mut h = Sha256::new();
    for s in [LAYOUT, format.as_str()] {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    for t in parts {
        h.update((t.task.task_id.len() as u64).to_le_bytes());
        h.update(t.task.task_id.as_bytes());
        match &t.result {
            Some(d) => {
                h.update([1]);
                h.update(d);
            }
            None => h.update([0]),
        }
    }
    hex::encode(h.finalize())
}

impl<'p> DatasetSink<'p> {
    /// Reads what the previous finish wrote (its manifest, and which dataset files are
    /// still there) when datasets are asked for.
    pub async fn new(store: &dyn BlobStore, settings: &JobSettings) -> anyhow::Result<Self> {
        let mut sink = DatasetSink {
            job: settings.job.clone(),
            formats: settings.datasets.clone(),
            previous: HashMap::new(),
            present: HashSet::new(),
            taken: HashSet::new(),
            tasks: Vec::new(),
            files: Vec::new(),
            archives: Vec::new(),
        };
        if sink.formats.is_empty() {
            return Ok(sink);
        }
        if let Some(bytes) = store.get(&manifest_key(&settings.job)).await? {
            match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) => sink.previous = m.datasets.into_iter().map(|f| (f.path, f.digest)).collect(),
                Err(e) => tracing::warn!("the earlier manifest.json could not be read ({e}); every dataset file is written again"),
            }
        }
        if !sink.previous.is_empty() {
            let job_prefix = quire_core::job_prefix(&settings.job);
            for dir in ["parquet/", "webdataset/"] {
                sink.present.extend(store.list(&format!("{job_prefix}{dir}")).await?);
            }
        }
        Ok(sink)
    }

    /// One task of the current object was read: its records are `records` of the
    /// object's records so far; `result` is its result file (`None`: it has none).
    pub fn task(&mut self, task: &'p PlannedTask, records: Range<usize>, result: Option<&[u8]>) {
        let result = result.map(|b| Sha256::digest(b).into());
        self.tasks.push(TaskRead { task, records, result });
    }

    fn unique_key(&mut self, key: String, task_id: &str) -> String {
        if self.taken.insert(key.clone()) {
            return key;
        }
        // Same path below two input roots: keep both, the later one named after its task.
        let (stem, ext) = match key.rsplit_once('.') {
            Some((s, e)) if !s.ends_with('/') => (s.to_string(), format!(".{e}")),
            _ => (key.clone(), String::new()),
        };
        let short = &task_id[..task_id.len().min(12)];
        let other = format!("{stem}-{short}{ext}");
        tracing::warn!("two inputs would write {key}; the second is written as {other}");
        self.taken.insert(other.clone());
        other
    }

    /// Adds one file unless it is unchanged since the previous finish.
    fn file(
        &mut self,
        writes: &mut Vec<(String, Vec<u8>)>,
        format: DatasetFormat,
        (path, source, task_id): (String, Option<String>, Option<String>),
        digest: String,
        make: impl FnOnce(&str) -> anyhow::Result<(Vec<u8>, u64)>,
        rows_if_kept: u64,
    ) -> anyhow::Result<()> {
        let unchanged = self.previous.get(&path) == Some(&digest) && self.present.contains(&path);
        let rows = if unchanged {
            rows_if_kept
        } else {
            let (bytes, rows) = make(&digest)?;
            writes.push((path.clone(), bytes));
            rows
        };
        self.files.push(DatasetFile { format, path, source, task_id, rows, digest, written: !unchanged });
        Ok(())
    }

    /// The tasks of one object were all read; `records` are theirs, in plan order.
    pub fn document(&mut self, records: &[Record]) -> anyhow::Result<DocumentOutput> {
        let tasks = std::mem::take(&mut self.tasks);
        let mut writes = Vec::new();
        let planned: Vec<&PlannedTask> = tasks.iter().map(|t| t.task).collect();
        let Some(first) = planned.first().copied() else {
            return Ok(DocumentOutput { writes, markdown: true });
        };
        let job = self.job.clone();
        let meta = |digest: &str| vec![("quire.job", job.clone()), ("quire.digest", digest.to_string())];
        match first.object() {
            ObjectKind::Document => Ok(DocumentOutput { writes, markdown: true }),
            ObjectKind::Archive => {
                let mut c = ArchiveCounts {
                    source: first.uri.clone(),
                    rel: first.rel.clone(),
                    tasks: tasks.len() as u64,
                    tasks_missing: tasks.iter().filter(|t| t.result.is_none()).count() as u64,
                    records: records.len() as u64,
                    ..Default::default()
                };
                c.failed = records.iter().filter(|r| r.failed()).count() as u64;
                c.ok = c.records - c.failed;
                self.archives.push(c);
                let rows: Vec<&Record> = records.iter().collect();
                let parts: Vec<&TaskRead> = tasks.iter().collect();
                for format in self.formats.clone() {
                    let digest = digest_hex(&parts, format);
                    match format {
                        DatasetFormat::Parquet => {
                            let key = self.unique_key(parquet_key(&job, &first.rel), &first.task_id);
                            self.file(&mut writes, format, (key, Some(first.uri.clone()), None), digest, |d| {
                                let kv: Vec<(&str, String)> = meta(d);
                                let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
                                Ok((quire_dataset::write_parquet(&rows, &kv)?, rows.len() as u64))
                            }, rows.len() as u64)?;
                        }
                        DatasetFormat::Webdataset => {
                            let key = self.unique_key(webdataset_key(&job, &first.rel), &first.task_id);
                            let gzip = names::ends_with_any(&key, names::TAR_GZ_SUFFIXES);
                            let samples = rows.iter().filter(|r| r.key.as_deref().is_some_and(quire_dataset::is_sample_key)).count() as u64;
                            self.file(&mut writes, format, (key, Some(first.uri.clone()), None), digest, |_| {
                                let (bytes, counts) = quire_dataset::write_webdataset(&rows, gzip)?;
                                Ok((bytes, counts.samples))
                            }, samples)?;
                        }
                    }
                }
                Ok(DocumentOutput { writes, markdown: self.formats.is_empty() })
            }
            ObjectKind::Images => {
                if !self.formats.contains(&DatasetFormat::Parquet) {
                    return Ok(DocumentOutput { writes, markdown: true });
                }
                for t in &tasks {
                    if t.result.is_none() {
                        // No records: the manifest lists the task as dead-lettered.
                        continue;
                    }
                    let rows: Vec<&Record> = records[t.records.clone()].iter().collect();
                    let digest = digest_hex(&[t], DatasetFormat::Parquet);
                    let key = self.unique_key(images_parquet_key(&job, &t.task.task_id), &t.task.task_id);
                    let id = t.task.task_id.clone();
                    self.file(&mut writes, DatasetFormat::Parquet, (key, None, Some(id)), digest, |d| {
                        let kv: Vec<(&str, String)> = meta(d);
                        let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
                        Ok((quire_dataset::write_parquet(&rows, &kv)?, rows.len() as u64))
                    }, rows.len() as u64)?;
                }
                Ok(DocumentOutput { writes, markdown: false })
            }
        }
    }
}
