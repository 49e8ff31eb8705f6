//! The task queue between planning and work.
//!
//! One trait pair, [`TaskQueue`] and [`Lease`], with the semantics of a
//! JetStream work queue: a pulled task is leased, not removed; the worker
//! acks it when its results are stored, nacks it (with a delay) on a
//! transient fault, heartbeats while a long task runs, or terminates it. A
//! lease that is neither acked nor extended within `ack_wait` is delivered
//! again; after `max_deliver` deliveries the task is dead-lettered.
//!
//! [`memory::MemoryQueue`] implements this in process for `quire run`.

#[cfg(feature = "nats")]
pub mod jetstream;
pub mod memory;
#[cfg(feature = "nats")]
pub mod progress;
#[cfg(feature = "nats")]
pub mod runlease;

use async_trait::async_trait;
use quire_core::TaskSpec;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue backend: {0}")]
    Backend(String),
    #[error("malformed task message: {0}")]
    Malformed(String),
}

/// Delivery rules shared by every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// How long a lease lives without an ack or heartbeat.
    pub ack_wait: Duration,
    /// Deliveries before a task is given up on and dead-lettered.
    pub max_deliver: u32,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions { ack_wait: Duration::from_secs(300), max_deliver: 5 }
    }
}

/// Whether a publish created work or hit an id already known to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    New,
    Duplicate,
}

/// What happened to a task, told as it happens to whoever follows the job
/// (the coordinator's `--wait`). Best effort: a follower may miss events
/// and must treat the output store as the record; events only tell it when
/// looking there is worth it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEvent {
    /// The task's results are stored; `records` is a copy of the stored
    /// JSON lines when they are small enough to travel along (a follower
    /// that has them need not read them back from the store).
    Done {
        task_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        records: Option<String>,
    },
    /// A whole-document task was split and these page-range tasks were
    /// published for it (parts with results already stored are left out).
    Split { task_id: String, published: Vec<String> },
    /// The task was dead-lettered.
    Dead { task_id: String },
}

/// The one renewal rule for every lease quire holds (task leases and the coordinator's run
/// lease): renew at a third of the lease time, so that two renewals may fail before it lapses,
/// and never more often than every 10 ms (tests run leases of tens of milliseconds).
pub fn renew_every(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(10))
}

#[async_trait]
pub trait TaskQueue: Send + Sync {
    /// Publish a task; a task id the queue has already seen is dropped.
    async fn publish(&self, task: &TaskSpec) -> Result<Published, QueueError>;
    /// Wait for the next task. `None` means no more work will come.
    async fn pull(&self) -> Result<Option<Box<dyn Lease>>, QueueError>;
    /// Tell the followers of `job` what happened (best effort, never
    /// fails; backends without followers do nothing).
    async fn announce(&self, _job: &str, _event: TaskEvent) {}
}

#[async_trait]
pub trait Lease: Send + Sync {
    fn task(&self) -> &TaskSpec;
    /// 1 on the first delivery.
    fn delivery(&self) -> u32;
    /// How long the lease lives without a heartbeat, as the backend has it now (for JetStream
    /// it may differ from what the worker was started with: the coordinator sets it).
    fn lease_time(&self) -> Duration;
    /// How often a holder renews this lease ([`renew_every`] of its time).
    fn renew_every(&self) -> Duration {
        renew_every(self.lease_time())
    }
    /// Keep the lease alive for another `ack_wait`.
    async fn heartbeat(&self) -> Result<(), QueueError>;
    /// Done: results are stored.
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    /// Transient failure: deliver again after `delay` (or dead-letter when
    /// this was the last allowed delivery).
    async fn nack(self: Box<Self>, delay: Duration, reason: &str) -> Result<(), QueueError>;
    /// Give up on this task now and dead-letter it.
    async fn term(self: Box<Self>, reason: &str) -> Result<(), QueueError>;
}
