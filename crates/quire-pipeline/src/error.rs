//! A task that could not be finished now: the worker hands it back to be tried again later.
//! Imports nothing of this crate.

/// The task could not be finished now; try again later.
#[derive(Debug)]
pub struct TaskFailure(pub String);
