//! The stages of a quire job, independent of where the queue and the
//! results live:
//!
//! * [`plan`]: an input object and its probe become page-range tasks with stable ids;
//! * [`route`]: whether a PDF page's own text layer is good enough to skip the model;
//! * [`infer`]: one model per process behind a channel, batching pages across tasks;
//! * [`process`]: one task → its records (render, route, infer, and [`doctags`]: DocTags → Markdown + blocks);
//! * [`split`]: whole-document tasks (distributed planning) opened and split by a worker;
//! * [`worker`]: the loop that leases tasks, processes them, stores results and acks;
//! * [`finish`]: per-document Markdown and `manifest.json` once every task is settled;
//! * [`datasets`]: caption datasets (Parquet, WebDataset caption shards) at the finish;
//! * [`vlm`]: the `quire-vlm` models behind the [`Generator`] trait;
//! * [`runs`]: standing jobs and their runs: what a run plans against, what it supersedes, its manifests;
//! * [`embedded`]: all of it in one process for `quire run`.

#[cfg(feature = "distributed")]
pub mod distributed;
pub mod datasets;
pub mod doctags;
pub mod embedded;
pub mod faults;
pub mod finish;
pub mod infer;
pub mod metrics;
pub mod plan;
pub mod process;
pub mod progress;
pub mod route;
pub mod runs;
pub mod split;
pub mod vlm;
pub mod worker;

pub use embedded::{run_embedded, RunOptions, RunSummary};
pub use infer::{GenOutput, GenRequest, Generator, InferenceHandle};
pub use progress::Progress;
