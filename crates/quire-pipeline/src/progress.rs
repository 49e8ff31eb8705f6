//! Job counters shared between the stages and whoever shows progress.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Progress {
    pub objects_listed: AtomicU64,
    pub tasks_planned: AtomicU64,
    pub tasks_skipped: AtomicU64,
    pub tasks_done: AtomicU64,
    pub tasks_retried: AtomicU64,
    /// Pages (and images) in planned tasks, skipped ones included.
    pub pages_planned: AtomicU64,
    /// Pages already done by an earlier run.
    pub pages_skipped: AtomicU64,
    pub pages_ok: AtomicU64,
    pub pages_failed: AtomicU64,
    pub tokens_in: AtomicU64,
    pub tokens_out: AtomicU64,
    /// Set once planning has finished, so `pages_planned` is final.
    pub planning_done: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Pages with a record, this run or before.
    pub fn pages_settled(&self) -> u64 {
        Self::get(&self.pages_ok) + Self::get(&self.pages_failed) + Self::get(&self.pages_skipped)
    }
}
