//! What a job writes: one [`Record`] per page or image (JSON lines under
//! `JOB/results/`), and the [`Manifest`] that closes the job.

use crate::{ErrorKind, InputError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub kind: ErrorKind,
    pub message: String,
}

/// An input error as a record carries it: its kind as [`ErrorKind::recorded`] says, its message
/// as it is.
impl From<InputError> for ErrorInfo {
    fn from(e: InputError) -> Self {
        ErrorInfo { kind: e.kind.recorded(), message: e.message }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model emitted an end token (or the text layer was used).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
    /// The output repeated itself and was stopped (`--on-loop stop|retry`); `error` says so.
    Loop,
    /// No text: see `error`.
    Error,
}

/// Milliseconds spent per stage on this page.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub render: f64,
    /// From the page's arrival at the model to its answer (waiting for room included).
    pub infer: f64,
    /// The page's share of the model's busy time: its image encoding and prefill, plus each
    /// decode step it took part in divided by the sequences of that step (0 for the text layer).
    #[serde(default)]
    pub device: f64,
}

/// One page of a PDF, or one image (frame), as written to `results/TASK_ID.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub job: String,
    pub task_id: String,
    /// The input URI or path as given.
    pub source: String,
    /// 1-based page (or frame) number.
    pub page: u32,
    /// Pages (frames) in the document; 0 when the file could not be opened.
    pub page_count: u32,
    pub task: String,
    /// `vlm` or `text-layer`.
    pub engine: String,
    /// The model reference, `null` for the text layer.
    pub model: Option<String>,
    /// The prompt given to the model, `null` for the text layer.
    pub prompt: Option<String>,
    pub text: String,
    /// Prompt tokens including image tokens.
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub finish_reason: FinishReason,
    pub width: u32,
    pub height: u32,
    pub timings_ms: Timings,
    pub error: Option<ErrorInfo>,
    /// The WebDataset key of an archive member (its path up to the first dot of its base name);
    /// `null` for plain files.
    #[serde(default)]
    pub key: Option<String>,
    /// The member's path inside the archive named by `source`; `null` for plain files.
    #[serde(default)]
    pub member: Option<String>,
    /// DocTags models (SmolDocling, Granite-Docling): the page as Markdown,
    /// rendered from `text` as docling-core renders it; `null` otherwise.
    #[serde(default)]
    pub markdown: Option<String>,
    /// DocTags models: the page's layout blocks (kind, text, bounding box in
    /// page pixels, level, table, …); `null` otherwise.
    #[serde(default)]
    pub blocks: Option<Vec<quire_doctags::Block>>,
    /// Present when the model's output looped on this page (see `--on-loop`); absent otherwise.
    #[serde(rename = "loop", default, skip_serializing_if = "Option::is_none")]
    pub loop_info: Option<LoopInfo>,
}

/// How a page whose output looped was decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopInfo {
    /// Tokens in the repeated period.
    pub period: u32,
    /// New tokens each attempt generated (two under `--on-loop retry`: the first, then the
    /// retry with `--loop-retry-penalty`).
    pub attempts: Vec<u64>,
    /// `max_new_tokens` budget the stopped attempts did not spend.
    pub tokens_saved: u64,
}

impl Record {
    /// Whether the page failed: an error other than a loop. A page that looped keeps its
    /// text (marked by `error.kind == "loop"`); redoing it would loop again.
    pub fn failed(&self) -> bool {
        self.error.as_ref().is_some_and(|e| e.kind != ErrorKind::Loop)
    }

    /// Whether the page's output was stopped as a loop and kept marked.
    pub fn looped(&self) -> bool {
        self.error.as_ref().is_some_and(|e| e.kind == ErrorKind::Loop)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ManifestCounts {
    pub tasks: u64,
    /// Tasks whose results were already present and were skipped this run.
    pub tasks_skipped: u64,
    pub tasks_done: u64,
    pub tasks_dead_lettered: u64,
    pub documents: u64,
    pub records: u64,
    pub pages_ok: u64,
    pub pages_failed: u64,
    /// Pages whose output looped and was stopped: kept, marked `error.kind == "loop"`,
    /// counted neither as ok nor as failed.
    #[serde(default)]
    pub pages_looped: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Input objects of the job as it stands (job manifest) or as this run listed them (run
    /// manifest); the four below split them by what a run found: not seen before, another
    /// size or version than before, as before, and gone from the inputs.
    #[serde(default)]
    pub objects: u64,
    #[serde(default)]
    pub objects_new: u64,
    #[serde(default)]
    pub objects_changed: u64,
    #[serde(default)]
    pub objects_unchanged: u64,
    #[serde(default)]
    pub objects_removed: u64,
    /// Result, Markdown and dataset files the run moved under `JOB/superseded/RUN/` (or deleted
    /// with `--prune`) because they no longer belong to a current input.
    #[serde(default)]
    pub files_superseded: u64,
}

/// What a run found an input object to be, against the job's state before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectChange {
    /// Not in the job before.
    New,
    /// In the job before with another size or version (ETag, mtime).
    Changed,
    /// In the job before with the same path, size and version.
    Unchanged,
    /// In the job before, not in this run's inputs.
    Removed,
}

/// Where an object's work stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectStatus {
    /// Every task has results and every record is ok.
    Done,
    /// Every task has results and some records are errors (`--retry-failed` redoes them).
    Failed,
    /// Some task has no results (given up on, or the run stopped).
    Incomplete,
}

/// A task of an object, enough to find and order its results without planning again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectTask {
    pub task_id: String,
    /// The task's source URI: the object's own, or the input root of a group of loose images.
    pub uri: String,
    pub rel: String,
    pub first: u32,
    pub last: u32,
    pub unit: crate::UnitKind,
    /// Error records in its results (for `--retry-failed`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One input object of a standing job: its identity, how it came into the job, its tasks and
/// where its work stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    pub uri: String,
    pub rel: String,
    pub size: u64,
    /// S3 ETag or the local modification time in ns.
    pub version: String,
    /// `pdf`, `image`, `archive` or `unreadable`.
    pub kind: String,
    /// How this version of the object came into the job (`new` or `changed`), or, in a run
    /// manifest, what the run found (`removed` too).
    pub change: ObjectChange,
    /// The run that first saw this version.
    pub since_run: String,
    pub status: ObjectStatus,
    pub pages_ok: u64,
    pub pages_failed: u64,
    pub tasks: Vec<ObjectTask>,
}

/// A run in the job manifest's list of runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEntry {
    pub run: String,
    pub started_at: String,
    pub finished_at: String,
    /// `JOB/runs/RUN/manifest.json`.
    pub manifest: String,
    pub counts: ManifestCounts,
}

/// A page or file that produced an error record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub source: String,
    pub page: u32,
    pub kind: ErrorKind,
    pub message: String,
}

/// A task given up on after too many deliveries; its pages have no records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub task_id: String,
    pub source: String,
    pub first: u32,
    pub last: u32,
    pub deliveries: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub wall_seconds: f64,
    /// Pages (and images) with a record written this run, per wall second.
    pub pages_per_second: f64,
    /// CPU seconds used by the process (user + system).
    pub cpu_seconds: f64,
    /// Seconds the model was busy for the job's pages (the sum of their `timings_ms.device`),
    /// on whatever device it ran: the GPU time a run costs.
    pub gpu_seconds: f64,
    /// `gpu_seconds` per page and image that went to the model (0 when none did).
    #[serde(default)]
    pub device_seconds_per_page: f64,
    /// Generated tokens per `gpu_seconds`.
    #[serde(default)]
    pub new_tokens_per_device_second: f64,
    /// `--price-per-hour` (or `QUIRE_PRICE_PER_HOUR`) of the device, when given.
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    /// Dollars per 1,000 model pages at that price: device seconds per page × price / 3.6.
    #[serde(default)]
    pub usd_per_1000_pages: Option<f64>,
}

/// A caption dataset file of the job (`--dataset`), written at its finish from the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetFile {
    pub format: crate::DatasetFormat,
    /// The file's key under `--out` (`JOB/parquet/...`, `JOB/webdataset/...`).
    pub path: String,
    /// The archive the file holds the captions of; `null` for a file of loose images.
    pub source: Option<String>,
    /// The task of loose images the file holds; `null` for an archive.
    pub task_id: Option<String>,
    /// Parquet rows or WebDataset samples.
    pub rows: u64,
    /// SHA-256 of what the file was made from (its tasks' ids and result files): a rerun
    /// rewrites the file only when this changes (or the file is gone).
    pub digest: String,
    /// Whether this run wrote the file (`false`: unchanged since an earlier run wrote it).
    pub written: bool,
}

/// Records of one input archive.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchiveCounts {
    /// The archive's URI.
    pub source: String,
    /// Its path below the input root (the dataset files' name).
    pub rel: String,
    pub tasks: u64,
    /// Tasks given up on (dead-lettered) or not finished: their samples have no records.
    pub tasks_missing: u64,
    pub records: u64,
    pub ok: u64,
    pub failed: u64,
}

/// `JOB/manifest.json`: how the job went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub job: String,
    pub quire_version: String,
    pub settings: crate::JobSettings,
    pub inputs: Vec<String>,
    pub started_at: String,
    pub finished_at: String,
    pub counts: ManifestCounts,
    pub failures: Vec<Failure>,
    pub dead_lettered: Vec<DeadLetter>,
    pub throughput: Throughput,
    /// Caption dataset files (`--dataset`), in plan order.
    #[serde(default)]
    pub datasets: Vec<DatasetFile>,
    /// Counts per input archive, in plan order.
    #[serde(default)]
    pub archives: Vec<ArchiveCounts>,
    /// The run this manifest was written by (`--run`); `null` in manifests of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Job manifest: every current input object. Run manifest: the objects the run found new,
    /// changed or removed (unchanged ones are only counted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<ObjectEntry>,
    /// Job manifest: the job's runs, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RunEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_manifests_written_before_datasets_still_read() {
        let mut s = serde_json::to_value(crate::JobSettings::new("j")).unwrap();
        assert!(s.get("datasets").is_none(), "no datasets: the field is left out, as before");
        s.as_object_mut().unwrap().remove("datasets");
        let old: crate::JobSettings = serde_json::from_value(s.clone()).unwrap();
        assert!(old.datasets.is_empty());
        let m = Manifest {
            job: "j".into(),
            quire_version: "0.1.0".into(),
            settings: old,
            inputs: vec![],
            started_at: String::new(),
            finished_at: String::new(),
            counts: ManifestCounts::default(),
            failures: vec![],
            dead_lettered: vec![],
            throughput: Throughput::default(),
            datasets: vec![],
            archives: vec![],
            run: None,
            objects: vec![],
            runs: vec![],
        };
        let mut v = serde_json::to_value(&m).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("datasets");
        o.remove("archives");
        assert_eq!(serde_json::from_value::<Manifest>(v).unwrap(), m);
        let mut with = crate::JobSettings::new("j");
        with.datasets = vec![crate::DatasetFormat::Parquet, crate::DatasetFormat::Webdataset];
        let json = serde_json::to_string(&with).unwrap();
        assert!(json.contains(r#""datasets":["parquet","webdataset"]"#), "{json}");
    }

    /// A looping page's record: `finish_reason` and `error.kind` are `loop`, the `loop` object
    /// is written only when there was one, and manifests without `pages_looped` still read.
    #[test]
    fn loop_fields_serialise_as_documented_and_old_records_read() {
        let line = r#"{"job":"j","task_id":"t","source":"a.png","page":1,"page_count":1,"task":"ocr","engine":"vlm",
            "model":"m","prompt":"p","text":"row","tokens_in":9,"tokens_out":4,"finish_reason":"loop","width":1,"height":1,
            "timings_ms":{"render":0.0,"infer":1.0},"error":{"kind":"loop","message":"repeated"},
            "loop":{"period":4,"attempts":[260,300],"tokens_saved":7632}}"#;
        let r: Record = serde_json::from_str(line).unwrap();
        assert_eq!(r.finish_reason, FinishReason::Loop);
        assert_eq!(r.loop_info, Some(LoopInfo { period: 4, attempts: vec![260, 300], tokens_saved: 7632 }));
        assert!(r.looped() && !r.failed());
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["loop"]["attempts"], serde_json::json!([260, 300]));
        assert_eq!(back["error"]["kind"], "loop");
        let mut plain = r.clone();
        plain.loop_info = None;
        plain.error = Some(ErrorInfo { kind: ErrorKind::Model, message: "x".into() });
        assert!(serde_json::to_value(&plain).unwrap().get("loop").is_none(), "absent when there was no loop");
        assert!(plain.failed() && !plain.looped());
        let mut counts = serde_json::to_value(ManifestCounts::default()).unwrap();
        counts.as_object_mut().unwrap().remove("pages_looped");
        assert_eq!(serde_json::from_value::<ManifestCounts>(counts).unwrap(), ManifestCounts::default());
    }
}
