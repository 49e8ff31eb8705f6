//! What a worker tells about each task it ends: how it went ([`TaskEnd`]) and the
//! [`TaskObserver`] that metrics and progress records implement. Imports nothing of this crate.

use quire_core::{Record, TaskSpec};
use std::time::Duration;

/// How a task went, for metrics and progress records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEnd {
    /// Records stored and acked.
    Stored,
    /// Failed this delivery; nacked for a later one.
    Retried,
    /// Not taken (e.g. it needs another model); handed back.
    Refused,
    /// Interrupted by a shutdown; handed back.
    Interrupted,
    /// A whole-document task whose page-range tasks were published.
    Split,
    /// Failed the checks on its origin (see [`ResultStores::vet`]); given up at once.
    Rejected,
}

/// Told about each task a worker finishes; all methods default to nothing.
#[async_trait::async_trait]
pub trait TaskObserver: Send + Sync {
    async fn started(&self, _task: &TaskSpec) {}
    /// `records` is empty unless `end` is [`TaskEnd::Stored`].
    async fn ended(&self, _task: &TaskSpec, _end: TaskEnd, _records: &[Record], _elapsed: Duration, _delivery: u32) {}
    /// Seconds spent fetching, processing and storing one task.
    fn stage(&self, _stage: &'static str, _seconds: f64) {}
    /// Input read from the store: `how` is `download` (whole objects) or `ranged` (ranged
    /// reads of archives, and the first bytes read to tell an archive).
    fn fetched(&self, _how: &'static str, _requests: u64, _bytes: u64) {}
}
