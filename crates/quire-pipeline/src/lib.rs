//! The stages of a quire job, independent of where the queue and the results live. Folders
//! by role; each folder's `mod.rs` says what lives there and what it may import:
//!
//! * [`source`]: where a task's input comes from (local paths, S3 downloads and ranged reads);
//! * [`stage`]: plan, split, process (render, route, infer, DocTags), reuse;
//! * [`sink`]: results files, Markdown, manifests and caption datasets at the finish;
//! * [`worker`]: the loop that leases tasks, processes them, stores results and acks;
//! * [`coordinator`]: distributed planning, the run's ledger, waiting and closing, status;
//! * [`embedded`]: all of it in one process for `quire run`;
//! * [`metrics`], [`progress`], [`faults`]: what every part reports, and test-only faults.

pub mod coordinator;
pub mod embedded;
pub mod error;
pub mod faults;
pub mod metrics;
pub mod progress;
pub mod sink;
pub mod source;
pub mod stage;
pub mod worker;

pub use embedded::{run_embedded, RunOptions, RunSummary};
pub use error::TaskFailure;
pub use stage::infer::{GenOutput, GenRequest, Generator, InferenceHandle};
pub use progress::Progress;
