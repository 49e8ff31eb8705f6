//! In-process work queue with JetStream's lease semantics, for `quire run`.

use crate::{Lease, Published, QueueError, QueueOptions, TaskQueue};
use async_trait::async_trait;
use quire_core::{DeadLetter, TaskSpec};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

struct Entry {
    task: TaskSpec,
    deliveries: u32,
}

#[derive(Default)]
struct State {
    seen: HashSet<String>,
    ready: VecDeque<Entry>,
    /// Nacked tasks waiting out their delay.
    delayed: Vec<(Instant, Entry)>,
    /// Leased tasks by lease number, with their deadline.
    leased: HashMap<u64, (Instant, Entry)>,
    next_lease: u64,
    closed: bool,
    dead: Vec<DeadLetter>,
}

struct Shared {
    opts: QueueOptions,
    state: Mutex<State>,
    wake: Notify,
}

/// A work queue living in this process. Call [`MemoryQueue::close`] once
/// everything is published so that pullers stop when the work runs out.
#[derive(Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

fn dead_letter(e: Entry, reason: &str) -> DeadLetter {
    DeadLetter {
        task_id: e.task.task_id.clone(),
        source: e.task.source.uri.clone(),
        first: e.task.first,
        last: e.task.last,
        deliveries: e.deliveries,
        reason: reason.to_string(),
    }
}

impl MemoryQueue {
    pub fn new(opts: QueueOptions) -> Self {
        MemoryQueue {
            shared: Arc::new(Shared { opts, state: Mutex::new(State::default()), wake: Notify::new() }),
        }
    }

    /// No more publishes: `pull` returns `None` once every task is settled.
    pub fn close(&self) {
        self.shared.state.lock().unwrap().closed = true;
        self.shared.wake.notify_waiters();
    }

    /// Tasks given up on so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.shared.state.lock().unwrap().dead.clone()
    }

    /// Tasks not yet settled (ready, delayed or leased).
    pub fn outstanding(&self) -> usize {
        let s = self.shared.state.lock().unwrap();
        s.ready.len() + s.delayed.len() + s.leased.len()
    }

    /// Moves due delayed tasks and expired leases back to `ready`, and
    /// returns when the next such event is due.
    fn promote(&self, s: &mut State, now: Instant) -> Option<Instant> {
        let max = self.shared.opts.max_deliver;
        let mut i = 0;
        while i < s.delayed.len() {
            if s.delayed[i].0 <= now {
                let (_, e) = s.delayed.swap_remove(i);
                s.ready.push_back(e);
            } else {
                i += 1;
            }
        }
        let expired: Vec<u64> = s.leased.iter().filter(|(_, (d, _))| *d <= now).map(|(k, _)| *k).collect();
        for k in expired {
            let (_, e) = s.leased.remove(&k).expect("listed above");
            if e.deliveries >= max {
                let d = dead_letter(e, "lease expired without ack on the last allowed delivery");
                s.dead.push(d);
            } else {
                s.ready.push_back(e);
            }
        }
        s.delayed.iter().map(|(t, _)| *t).chain(s.leased.values().map(|(t, _)| *t)).min()
    }
}

#[async_trait]
impl TaskQueue for MemoryQueue {
    async fn publish(&self, task: &TaskSpec) -> Result<Published, QueueError> {
        let mut s = self.shared.state.lock().unwrap();
        if s.closed {
            return Err(QueueError::Backend("queue is closed".into()));
        }
        if !s.seen.insert(task.task_id.clone()) {
            return Ok(Published::Duplicate);
        }
        s.ready.push_back(Entry { task: task.clone(), deliveries: 0 });
        drop(s);
        self.shared.wake.notify_one();
        Ok(Published::New)
    }

    async fn pull(&self) -> Result<Option<Box<dyn Lease>>, QueueError> {
        loop {
            let notified = self.shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_event = {
                let mut s = self.shared.state.lock().unwrap();
                let now = Instant::now();
                let next = self.promote(&mut s, now);
                if let Some(mut e) = s.ready.pop_front() {
                    e.deliveries += 1;
                    let id = s.next_lease;
                    s.next_lease += 1;
                    let deliveries = e.deliveries;
                    let task = e.task.clone();
                    s.leased.insert(id, (now + self.shared.opts.ack_wait, e));
                    return Ok(Some(Box::new(MemoryLease { queue: self.clone(), id, task, deliveries })));
                }
                if s.closed && s.delayed.is_empty() && s.leased.is_empty() {
                    drop(s);
                    // Let other pullers see the end too.
                    self.shared.wake.notify_waiters();
                    return Ok(None);
                }
                next
            };
            match next_event {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

struct MemoryLease {
    queue: MemoryQueue,
    id: u64,
    task: TaskSpec,
    deliveries: u32,
}

impl MemoryLease {
    fn settle(&self, f: impl FnOnce(&mut State, Entry)) -> Result<(), QueueError> {
        let mut s = self.queue.shared.state.lock().unwrap();
        match s.leased.remove(&self.id) {
            Some((_, e)) => f(&mut s, e),
            None => return Err(QueueError::Backend(format!("lease on task {} has expired", self.task.task_id))),
        }
        drop(s);
        self.queue.shared.wake.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Lease for MemoryLease {
    fn task(&self) -> &TaskSpec {
        &self.task
    }

    fn delivery(&self) -> u32 {
        self.deliveries
    }

    fn lease_time(&self) -> Duration {
        self.queue.shared.opts.ack_wait
    }

    async fn heartbeat(&self) -> Result<(), QueueError> {
        let mut s = self.queue.shared.state.lock().unwrap();
        let wait = self.queue.shared.opts.ack_wait;
        match s.leased.get_mut(&self.id) {
            Some((deadline, _)) => {
                *deadline = Instant::now() + wait;
                Ok(())
            }
            None => Err(QueueError::Backend(format!("lease on task {} has expired", self.task.task_id))),
        }
    }

    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        self.settle(|_, _| {})
    }

    async fn nack(self: Box<Self>, delay: Duration, reason: &str) -> Result<(), QueueError> {
        let max = self.queue.shared.opts.max_deliver;
        self.settle(|s, e| {
            if e.deliveries >= max {
                let d = dead_letter(e, reason);
                s.dead.push(d);
            } else {
                s.delayed.push((Instant::now() + delay, e));
            }
        })
    }

    async fn term(self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        self.settle(|s, e| {
            let d = dead_letter(e, reason);
            s.dead.push(d);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_core::{JobSettings, SourceRef, UnitKind};

    fn task(id: &str) -> TaskSpec {
        TaskSpec::new(id.into(), JobSettings::new("t"), SourceRef { uri: format!("{id}.pdf"), rel: format!("{id}.pdf"), size: 1, version: "1".into() }, UnitKind::Pdf, (1, 1), 1)
    }

    fn opts(ack_ms: u64, max: u32) -> QueueOptions {
        QueueOptions { ack_wait: Duration::from_millis(ack_ms), max_deliver: max }
    }

    #[tokio::test]
    async fn duplicates_are_dropped_and_close_ends_pulls() {
        let q = MemoryQueue::new(opts(1000, 3));
        assert_eq!(q.publish(&task("a")).await.unwrap(), Published::New);
        assert_eq!(q.publish(&task("a")).await.unwrap(), Published::Duplicate);
        q.close();
        let l = q.pull().await.unwrap().expect("one task");
        assert_eq!(l.task().task_id, "a");
        l.ack().await.unwrap();
        assert!(q.pull().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn nack_redelivers_after_delay_then_dead_letters() {
        let q = MemoryQueue::new(opts(1000, 2));
        q.publish(&task("p")).await.unwrap();
        q.close();
        let l = q.pull().await.unwrap().unwrap();
        assert_eq!(l.delivery(), 1);
        let t0 = Instant::now();
        l.nack(Duration::from_millis(50), "flaky").await.unwrap();
        let l = q.pull().await.unwrap().unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(50), "redelivered before the nack delay");
        assert_eq!(l.delivery(), 2);
        l.nack(Duration::ZERO, "still flaky").await.unwrap();
        assert!(q.pull().await.unwrap().is_none());
        let dead = q.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].task_id.as_str(), dead[0].deliveries, dead[0].reason.as_str()), ("p", 2, "still flaky"));
    }

    #[tokio::test]
    async fn expired_lease_is_redelivered_unless_heartbeats_keep_it() {
        let q = MemoryQueue::new(opts(80, 5));
        q.publish(&task("slow")).await.unwrap();
        q.publish(&task("lost")).await.unwrap();
        q.close();
        let slow = q.pull().await.unwrap().unwrap();
        let lost = q.pull().await.unwrap().unwrap();
        assert_eq!(lost.task().task_id, "lost");
        std::mem::forget(lost); // a worker that died holding the lease
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            slow.heartbeat().await.unwrap();
        }
        let again = q.pull().await.unwrap().unwrap();
        assert_eq!((again.task().task_id.as_str(), again.delivery()), ("lost", 2));
        slow.ack().await.unwrap();
        again.ack().await.unwrap();
        assert!(q.pull().await.unwrap().is_none());
        assert!(q.dead_letters().is_empty());
    }
}
