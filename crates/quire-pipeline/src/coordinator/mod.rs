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
//!   [`crate::stage::split`]);
//! - `JOB/job.json` ([`JobFile`]: settings, inputs, start time, counts) and
//!   `JOB/plan/NNNNNN.jsonl` (one [`PlanLine`] per document, in plan order)
//!   are written under the output by the coordinator; `quire status` and the
//!   finish step read them from there;
//! - `JOB/results/TASK_ID.jsonl` marks a task done; dead letters live in the
//!   `QUIRE_DEAD` stream.
//!
//! Files: [`options`] (what a coordinator is told, its queue), [`submit`] (planning a run),
//! [`planfiles`] (the job and plan files), [`ledger`] (how each task stands), [`wait`]
//! (following a run to its close), [`status`] (`quire status`), [`runs`] (standing jobs:
//! what a run plans against, what it supersedes, its manifests; `quire run` uses it too).
//! May import `source`, `stage`, `sink`, `worker`; nothing imports it but `embedded`.

pub mod ledger;
pub mod options;
pub mod planfiles;
pub mod runs;
pub mod status;
pub mod submit;
pub mod wait;

pub use ledger::{Ledger, TaskState};
pub use options::{connect_queue, CoordinatorOptions, RunPlan, Submitted};
pub use planfiles::{job_file_key, plan_part_key, read_job_file, read_plan, read_split, results_present, splits_present, IdSet, JobFile, PlanLine, PLAN_PART_LINES};
pub use status::{job_status, JobStatus};
pub use submit::{submit, Unlisted};
pub use wait::{wait_and_finish, KEEP_RECORDS_MAX};
