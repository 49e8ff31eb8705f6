//! The vocabulary every quire crate shares: job settings, tasks and their
//! stable ids, the per-page [`Record`] that lands in `results/*.jsonl`, the
//! job [`Manifest`], and the error kinds: [`ErrorKind`], one list for every crate (the
//! `error.kind` users see in records), and [`InputError`], the error about one input file.
//!
//! Nothing here does I/O; it is plain data plus the id and path rules that
//! make reruns idempotent and keep outputs inside `--out`.

mod error;
mod ids;
mod keys;
pub mod names;
mod record;
mod settings;

pub use error::{ErrorKind, InputError};
pub use names::ObjectKind;
pub use ids::{document_task_id, images_task_id, settings_fingerprint, task_id};
pub use keys::{
    images_parquet_key, job_prefix, markdown_key, manifest_key, parquet_key, results_key, run_manifest_key, run_started_key, safe_relative_path,
    superseded_prefix, webdataset_key, with_suffix,
};
pub use record::{
    ArchiveCounts, DatasetFile, DeadLetter, ErrorInfo, Failure, FinishReason, LoopInfo, Manifest, ManifestCounts,
    ObjectChange, ObjectEntry, ObjectStatus, ObjectTask, Record, RunEntry, Throughput, Timings,
};
pub use settings::{
    lies_under, JobScope,
    ArchiveResume, DatasetFormat, Engine, JobSettings, Limits, RenderSize, SourceRef, TaskKind, TaskSpec, UnitKind, DEFAULT_IMAGES_PER_TASK,
    DEFAULT_LONG_SIDE, DEFAULT_MAX_ARCHIVE_MEMBERS, DEFAULT_MAX_ZIP_RATIO, MAX_RENDER_DPI,
};
