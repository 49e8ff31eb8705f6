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

use crate::sink::finish::PlannedTask;
use quire_core::{
    images_parquet_key, manifest_key, parquet_key, webdataset_key, ArchiveCounts, DatasetFile, DatasetFormat,
    JobSettings, Manifest, Record, UnitKind,
};
use quire_store::BlobStore;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// Bumped when the same records would give different dataset bytes, so that a rerun
/// after an upgrade rewrites the files.
const LAYOUT: &str = "quire-dataset/1";

/// Names that make an object an archive when nothing else says so (it could not be
/// opened, or it was never opened by this finish's planner).
const ARCHIVE_SUFFIXES: &[&str] = &[".tar", ".tar.gz", ".tgz", ".zip"];
/// Names that make an object a loose image when nothing else says so.
const IMAGE_SUFFIXES: &[&str] = &[".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"];

fn has_suffix(uri: &str, suffixes: &[&str]) -> bool {
    let lower = uri.to_ascii_lowercase();
    suffixes.iter().any(|s| lower.ends_with(s))
}

/// What the tasks of one input object are, for the datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A tar or zip: one dataset file per object.
    Archive,
    /// Loose images: one dataset file per task.
    Images,
    /// Anything else (PDF documents): Markdown only.
    Document,
}

/// Decides from the planned units, then from the records (a record with `member` comes
/// from an archive), then from the name for objects whose kind was never found out
/// (unopened or unreadable).
pub fn object_kind(tasks: &[&PlannedTask], records: &[Record]) -> ObjectKind {
    let units: Vec<UnitKind> = tasks.iter().map(|t| t.unit).collect();
    let uri = tasks.first().map_or("", |t| t.uri.as_str());
    let undecided = units.iter().all(|u| matches!(u, UnitKind::Unreadable | UnitKind::Document));
    if units.contains(&UnitKind::Archive)
        || records.iter().any(|r| r.member.is_some())
        || (undecided && has_suffix(uri, ARCHIVE_SUFFIXES))
    {
        ObjectKind::Archive
    } else if units.iter().any(|u| matches!(u, UnitKind::Images | UnitKind::Image))
        || (undecided && has_suffix(uri, IMAGE_SUFFIXES))
    {
        ObjectKind::Images
    } else {
        ObjectKind::Document
    }
}

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
        match object_kind(&planned, records) {
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
                            let gzip = has_suffix(&key, &[".tar.gz", ".tgz"]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::finish::{finish_job, JobOutcome, PagesThisRun};
    use arrow_array::{Array, StringArray};
    use quire_core::{markdown_key, results_key, ErrorInfo, ErrorKind, FinishReason, Timings};
    use quire_store::local::LocalStore;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::time::SystemTime;

    /// Records the keys written.
    struct Puts(LocalStore, Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl BlobStore for Puts {
        async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), quire_store::StoreError> {
            self.1.lock().unwrap().push(key.to_string());
            self.0.put(key, data).await
        }
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, quire_store::StoreError> {
            self.0.get(key).await
        }
        async fn exists(&self, key: &str) -> Result<bool, quire_store::StoreError> {
            self.0.exists(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, quire_store::StoreError> {
            self.0.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), quire_store::StoreError> {
            self.0.delete(key).await
        }
        fn locate(&self, key: &str) -> String {
            self.0.locate(key)
        }
    }

    impl Puts {
        fn take(&self) -> Vec<String> {
            let mut v = std::mem::take(&mut *self.1.lock().unwrap());
            v.sort();
            v
        }

        /// The dataset files written since the last call.
        fn datasets(&self) -> Vec<String> {
            self.take().into_iter().filter(|k| k.contains("/parquet/") || k.contains("/webdataset/")).collect()
        }
    }

    fn rec(task: &str, source: &str, key: Option<&str>, member: Option<&str>, error: Option<ErrorKind>) -> Record {
        Record {
            job: "j".into(),
            task_id: task.into(),
            source: source.into(),
            page: 1,
            page_count: 1,
            task: "caption".into(),
            engine: "vlm".into(),
            model: Some("tiny".into()),
            prompt: Some("Describe the image.".into()),
            text: if error.is_some() { String::new() } else { format!("a caption of {}", key.or(member).unwrap_or(source)) },
            tokens_in: 80,
            tokens_out: if error.is_some() { 0 } else { 6 },
            finish_reason: if error.is_some() { FinishReason::Error } else { FinishReason::Stop },
            width: 64,
            height: 48,
            timings_ms: Timings { render: 1.5, infer: 20.25, device: 12.5 },
            error: error.map(|kind| ErrorInfo { kind, message: format!("{} is {}", member.unwrap_or(source), kind.as_str()) }),
            key: key.map(str::to_string),
            member: member.map(str::to_string),
            markdown: None,
            blocks: None,
            loop_info: None,
        }
    }

    fn member(task: &str, shard: &str, key: &str, error: Option<ErrorKind>) -> Record {
        rec(task, shard, Some(key), Some(&format!("{key}.jpg")), error)
    }

    fn planned(id: &str, uri: &str, rel: &str, (first, last): (u32, u32), unit: UnitKind) -> PlannedTask {
        PlannedTask { task_id: id.into(), uri: uri.into(), rel: rel.into(), first, last, unit }
    }

    async fn store_results(store: &dyn BlobStore, task: &str, records: &[Record]) {
        store.put(&results_key("j", task), crate::sink::jsonl::to_jsonl(records)).await.unwrap();
    }

    async fn finish(store: &dyn BlobStore, settings: &JobSettings, plan: &[PlannedTask]) -> Manifest {
        finish_job(
            store,
            JobOutcome {
                settings,
                inputs: &[],
                plan,
                dead: &[],
                tasks_skipped: 0,
                started_at: SystemTime::now(),
                pages_this_run: PagesThisRun::Counted(0),
                price_per_hour: None,
                known_records: None,
                fresh: None,
            },
        )
        .await
        .unwrap()
    }

    fn parquet_column(path: &Path, column: &str) -> Vec<Option<String>> {
        let f = std::fs::File::open(path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
        let mut out = Vec::new();
        for b in reader {
            let b = b.unwrap();
            let a = b.column_by_name(column).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            out.extend((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_string())));
        }
        out
    }

    fn tar_names(path: &Path) -> Vec<String> {
        let f = std::fs::File::open(path).unwrap();
        let mut ar = tar::Archive::new(f);
        ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect()
    }

    fn caption_settings() -> JobSettings {
        let mut s = JobSettings::new("j");
        s.task = quire_core::TaskKind::Caption;
        s.datasets = vec![DatasetFormat::Parquet, DatasetFormat::Webdataset];
        s
    }

    const SHARD0: &str = "in/shards/shard-000000.tar";
    const SHARD1: &str = "in/shard-000001.zip";

    /// Two archives (one split into member ranges, one truncated), a task of loose images,
    /// and a PDF, as the planner lays them out.
    async fn job(store: &dyn BlobStore) -> (Vec<PlannedTask>, Vec<Record>, Vec<Record>) {
        let plan = vec![
            planned("a1", SHARD0, "shards/shard-000000.tar", (1, 3), UnitKind::Archive),
            planned("a2", SHARD0, "shards/shard-000000.tar", (4, 5), UnitKind::Archive),
            planned("b1", SHARD1, "shard-000001.zip", (1, 3), UnitKind::Archive),
            planned("i1", "in/photos/a.png", "photos/a.png", (1, 3), UnitKind::Images),
            planned("p1", "in/doc.pdf", "doc.pdf", (1, 1), UnitKind::Pdf),
        ];
        let shard0 = vec![
            member("a1", SHARD0, "000000000", None),
            member("a1", SHARD0, "000000001", Some(ErrorKind::Corrupt)),
            member("a1", SHARD0, "sub/000000002", None),
            member("a2", SHARD0, "000000003", None),
            member("a2", SHARD0, "000000004", None),
        ];
        let shard1 = vec![
            member("b1", SHARD1, "x0", None),
            // The rest of a truncated archive: one record without a key.
            rec("b1", SHARD1, None, None, Some(ErrorKind::Truncated)),
        ];
        store_results(store, "a1", &shard0[..3]).await;
        store_results(store, "a2", &shard0[3..]).await;
        store_results(store, "b1", &shard1).await;
        let images: Vec<Record> = ["in/photos/a.png", "in/photos/b.png", "in/photos/c.jpg"]
            .iter()
            .map(|s| rec("i1", s, None, None, if s.ends_with(".jpg") { Some(ErrorKind::Corrupt) } else { None }))
            .collect();
        store_results(store, "i1", &images).await;
        let mut page = rec("p1", "in/doc.pdf", None, None, None);
        page.task = "ocr".into();
        store_results(store, "p1", &[page]).await;
        (plan, shard0, shard1)
    }

    #[tokio::test]
    async fn archives_and_loose_images_become_datasets_in_input_order_and_pdfs_keep_markdown() {
        let dir = tempfile::tempdir().unwrap();
        let store = Puts(LocalStore::new(dir.path()), Mutex::new(Vec::new()));
        let (plan, shard0, _) = job(&store).await;
        store.take();
        let m = finish(&store, &caption_settings(), &plan).await;
        let root = dir.path();
        let p0 = root.join("j/parquet/shards/shard-000000.tar.parquet");
        let keys: Vec<Option<String>> = shard0.iter().map(|r| r.key.clone()).collect();
        assert_eq!(parquet_column(&p0, "key"), keys, "one row per record, in sample order across tasks");
        assert_eq!(parquet_column(&p0, "status"), ["ok", "error", "ok", "ok", "ok"].map(|s| Some(s.to_string())));
        assert_eq!(parquet_column(&p0, "caption")[0].as_deref(), Some("a caption of 000000000"));
        assert_eq!(
            tar_names(&root.join("j/webdataset/shards/shard-000000.tar")),
            ["000000000", "000000001", "sub/000000002", "000000003", "000000004"]
                .iter()
                .flat_map(|k| [format!("{k}.txt"), format!("{k}.json")])
                .collect::<Vec<_>>()
        );
        let p1 = root.join("j/parquet/shard-000001.zip.parquet");
        assert_eq!(parquet_column(&p1, "error_kind"), vec![None, Some("truncated".to_string())]);
        assert_eq!(tar_names(&root.join("j/webdataset/shard-000001.zip.tar")), ["x0.txt", "x0.json"], "a record without a key is no sample");
        let pi = root.join("j/parquet/images-i1.parquet");
        assert_eq!(
            parquet_column(&pi, "source"),
            ["in/photos/a.png", "in/photos/b.png", "in/photos/c.jpg"].map(|s| Some(s.to_string()))
        );
        assert_eq!(parquet_column(&pi, "key"), vec![None, None, None]);
        let written = store.take();
        assert!(written.contains(&markdown_key("j", "doc.pdf")), "PDFs keep their Markdown");
        assert_eq!(written.iter().filter(|k| k.contains("/markdown/")).count(), 1, "no Markdown for images: {written:?}");
        assert_eq!(m.datasets.len(), 5);
        let rows: Vec<(&str, u64, bool)> = m.datasets.iter().map(|f| (f.path.as_str(), f.rows, f.written)).collect();
        assert_eq!(
            rows,
            [
                ("j/parquet/shards/shard-000000.tar.parquet", 5, true),
                ("j/webdataset/shards/shard-000000.tar", 5, true),
                ("j/parquet/shard-000001.zip.parquet", 2, true),
                ("j/webdataset/shard-000001.zip.tar", 1, true),
                ("j/parquet/images-i1.parquet", 3, true),
            ]
        );
        let counts: Vec<(&str, u64, u64, u64, u64)> = m.archives.iter().map(|a| (a.source.as_str(), a.tasks, a.records, a.ok, a.failed)).collect();
        assert_eq!(counts, [(SHARD0, 2, 5, 4, 1), (SHARD1, 1, 2, 1, 1)]);
        assert_eq!((m.counts.records, m.counts.pages_failed), (11, 3));

        // The same job with datasets off: Markdown for everything, no dataset files.
        let mut none = caption_settings();
        none.job = "j".into();
        none.datasets.clear();
        std::fs::remove_dir_all(root.join("j/parquet")).unwrap();
        let m = finish(&store, &none, &plan).await;
        let written = store.take();
        assert!(m.datasets.is_empty() && !root.join("j/parquet").exists());
        assert!(written.contains(&markdown_key("j", "shards/shard-000000.tar")), "{written:?}");
        assert_eq!(m.archives.len(), 2, "archives are counted with or without datasets");
    }

    #[tokio::test]
    async fn a_rerun_rewrites_only_the_dataset_files_whose_records_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Puts(LocalStore::new(dir.path()), Mutex::new(Vec::new()));
        let (mut plan, shard0, _) = job(&store).await;
        let s = caption_settings();
        // First finish: task a2 of shard 0 has no results yet (given up on, say).
        std::fs::remove_file(dir.path().join("j/results/a2.jsonl")).unwrap();
        let m1 = finish(&store, &s, &plan).await;
        let p0 = dir.path().join("j/parquet/shards/shard-000000.tar.parquet");
        assert_eq!(parquet_column(&p0, "key").len(), 3, "rows of the tasks that have records");
        assert_eq!(m1.archives[0].tasks_missing, 1);
        let before: Vec<Vec<u8>> = m1.datasets.iter().map(|f| std::fs::read(dir.path().join(&f.path)).unwrap()).collect();
        store.take();

        // Nothing changed: no dataset file is written, the files stay as they were.
        let m2 = finish(&store, &s, &plan).await;
        assert!(m2.datasets.iter().all(|f| !f.written), "{:?}", m2.datasets);
        assert_eq!(store.datasets(), Vec::<String>::new());
        assert_eq!(m2.datasets.iter().map(|f| f.rows).collect::<Vec<_>>(), m1.datasets.iter().map(|f| f.rows).collect::<Vec<_>>());

        // a2 finished and a new shard came: only shard 0's files and the new shard's are
        // written, and shard 0 holds each of its samples once.
        store_results(&store, "a2", &shard0[3..]).await;
        const SHARD2: &str = "in/shard-000002.tar";
        plan.insert(3, planned("c1", SHARD2, "shard-000002.tar", (1, 1), UnitKind::Archive));
        store_results(&store, "c1", &[member("c1", SHARD2, "y0", None)]).await;
        store.take();
        let m3 = finish(&store, &s, &plan).await;
        assert_eq!(
            store.datasets(),
            [
                "j/parquet/shard-000002.tar.parquet",
                "j/parquet/shards/shard-000000.tar.parquet",
                "j/webdataset/shard-000002.tar",
                "j/webdataset/shards/shard-000000.tar",
            ]
        );
        assert_eq!(parquet_column(&p0, "key").len(), 5);
        assert_eq!(m3.archives[0].tasks_missing, 0);
        // Same bytes as a finish that had everything from the start.
        let fresh = tempfile::tempdir().unwrap();
        let fresh_store = LocalStore::new(fresh.path());
        let (fresh_plan, _, _) = job(&fresh_store).await;
        finish(&fresh_store, &s, &fresh_plan).await;
        assert_eq!(std::fs::read(&p0).unwrap(), std::fs::read(fresh.path().join("j/parquet/shards/shard-000000.tar.parquet")).unwrap());
        assert_ne!(std::fs::read(&p0).unwrap(), before[0]);

        // A dataset file removed by hand is written again.
        std::fs::remove_file(dir.path().join("j/parquet/images-i1.parquet")).unwrap();
        finish(&store, &s, &plan).await;
        assert_eq!(store.datasets(), ["j/parquet/images-i1.parquet"]);
    }

    /// The python with pyarrow and webdataset (`scripts/setup-python-readers.sh`):
    /// `QUIRE_PYTHON`, else the venv that script makes by default. Missing, the test fails
    /// unless `QUIRE_SKIP_PYTHON_READERS=1` says to leave the read-back out.
    fn python_readers() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("QUIRE_PYTHON") {
            return Some(PathBuf::from(p));
        }
        let tools = std::env::var_os("QUIRE_TOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/quire-tools"));
        let default = tools.join("py-readers/bin/python");
        if default.exists() {
            return Some(default);
        }
        if std::env::var("QUIRE_SKIP_PYTHON_READERS").as_deref() == Ok("1") {
            eprintln!("QUIRE_SKIP_PYTHON_READERS=1: the pyarrow/webdataset read-back is left out");
            return None;
        }
        panic!("no python with pyarrow and webdataset: run scripts/setup-python-readers.sh and set QUIRE_PYTHON to the path it prints (or QUIRE_SKIP_PYTHON_READERS=1)");
    }

    #[tokio::test]
    async fn pyarrow_and_webdataset_read_the_datasets_back() {
        let Some(python) = python_readers() else { return };
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let (plan, shard0, shard1) = job(&store).await;
        finish(&store, &caption_settings(), &plan).await;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../quire-dataset/tests/read_back.py");
        for (records, parquet, shard) in [
            (shard0, "j/parquet/shards/shard-000000.tar.parquet", "j/webdataset/shards/shard-000000.tar"),
            (shard1, "j/parquet/shard-000001.zip.parquet", "j/webdataset/shard-000001.zip.tar"),
        ] {
            let expected = dir.path().join("expected.jsonl");
            std::fs::write(&expected, crate::sink::jsonl::to_jsonl(&records)).unwrap();
            let o = std::process::Command::new(&python)
                .arg(&script)
                .arg(&expected)
                .arg("--parquet")
                .arg(dir.path().join(parquet))
                .arg("--webdataset")
                .arg(dir.path().join(shard))
                .output()
                .expect("running the python readers");
            let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            assert!(o.status.success(), "{parquet}: {err}");
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            assert_eq!(v["parquet"]["rows"], records.len());
            assert_eq!(v["webdataset"]["zipped"], records.iter().filter(|r| r.key.is_some()).count());
            assert!(v["parquet"]["metadata"].as_array().unwrap().iter().any(|k| k == "quire.digest"));
        }
    }
}
