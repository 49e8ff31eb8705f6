//! The caption dataset sink driven through the finish step, as a job's finish drives it.

use crate::stage::plan::PlannedTask;
use quire_core::{DatasetFormat, JobSettings, Manifest, Record, UnitKind};
use quire_store::BlobStore;
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
