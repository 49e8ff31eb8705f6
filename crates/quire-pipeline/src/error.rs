//! A task that could not be finished now: the worker hands it back to be tried again later.
//! It keeps where the trouble lay ([`FailureKind`]) and the error that caused it.
//! Imports nothing of this crate.

use std::fmt;
use std::sync::Arc;

/// Where the trouble that stopped a task lay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Fetching or reading the task's input (an object store, the file system).
    Input,
    /// Opening the output, or reading or writing the task's results or split there.
    Output,
    /// Publishing the page-range tasks of a split on the queue.
    Queue,
    /// The worker itself: a thread that failed, a task it cannot run in this shape.
    Worker,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Input => "input",
            FailureKind::Output => "output",
            FailureKind::Queue => "queue",
            FailureKind::Worker => "worker",
        }
    }
}

/// The task could not be finished now; try again later. `message` is what the nack and the
/// log say (the cause's text included).
#[derive(Debug, Clone)]
pub struct TaskFailure {
    pub kind: FailureKind,
    pub message: String,
    pub cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl TaskFailure {
    /// A failure with no error behind it.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        TaskFailure { kind, message: message.into(), cause: None }
    }

    /// A failure caused by `cause` while doing `what`: the message is `what: cause`.
    pub fn caused<E: std::error::Error + Send + Sync + 'static>(kind: FailureKind, what: impl fmt::Display, cause: E) -> Self {
        TaskFailure { kind, message: format!("{what}: {cause}"), cause: Some(Arc::new(cause)) }
    }
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}
