//! Waiting for a run's tasks and closing it: follow task events, finish the outputs, write the
//! run's manifests.

use crate::sink::finish::finish_outputs;
use crate::sink::finish::JobOutcome;
use crate::sink::finish::PagesThisRun;
use crate::stage::plan::PlannedTask;
use crate::coordinator::runs::close_run;
use crate::coordinator::runs::object_task;
use crate::coordinator::runs::CloseRun;
use crate::coordinator::runs::RunOutcome;
use anyhow::Context as _;
use quire_core::UnitKind;
use quire_queue::jetstream::{JetStreamQueue, TaskEvents};
use quire_queue::TaskEvent;
use quire_store::BlobStore;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};
use crate::coordinator::ledger::Ledger;
use crate::coordinator::ledger::TaskState;
use crate::coordinator::options::CoordinatorOptions;
use crate::coordinator::options::Submitted;
use crate::coordinator::options::RunPlan;
use crate::coordinator::planfiles::results_present;
use crate::coordinator::options::Outage;
use crate::coordinator::status::dead_ids;

/// Waits until every task has results or is dead-lettered, then writes the
/// Markdown and the manifest. Dead letters of expired leases are forwarded
/// meanwhile.
///
/// The output store is the record: the wait ends only when a full look
/// there (results, splits, dead letters) finds no open task. `events`
/// (subscribe before [`submit`] so that none is missed) says when a look is
/// worth it: the open tasks of the last look are followed through the
/// events, and the store is looked at again as soon as none is left, or
/// after `poll` in any case (events are best effort).
#[allow(clippy::too_many_arguments)]
pub async fn wait_and_finish(
    o: &CoordinatorOptions,
    queue: &JetStreamQueue,
    store: &dyn BlobStore,
    sub: &Submitted,
    plan: RunPlan,
    started_at: SystemTime,
    poll: Duration,
    mut events: Option<TaskEvents>,
) -> anyhow::Result<RunOutcome> {
    let job = &o.settings.job;
    let mut ledger = Ledger::load(store, job).await?.context("job.json vanished from the output")?;
    let q = queue.clone();
    let forwarder = tokio::spawn(async move { q.forward_dead_letters().await });
    let mut last_log = std::time::Instant::now();
    let mut looks = 0u64;
    // Records that came with the events (the last copy of each task's),
    // so that the finish need not read them back.
    let (mut kept, mut kept_bytes) = (HashMap::<String, Vec<u8>>::new(), 0usize);
    let (states, dead) = loop {
        looks += 1;
        // A store or broker outage is waited out (the store retries its own operations;
        // this also covers the queue), for as long as the store's retry budget.
        let mut outage = Outage::new(o.access.retry);
        let (present, dead_set, dead, pending) = loop {
            let look = async {
                ledger.refresh_splits(store).await?;
                let present = results_present(store, job).await?;
                let (dead_set, dead) = dead_ids(Some(queue), job).await?;
                let pending = queue.pending(job).await?;
                anyhow::Ok((present, dead_set, dead, pending))
            };
            match look.await {
                Ok(v) => break v,
                Err(e) => outage.wait(&format!("{job}: looking at the job's output and dead letters"), e).await?,
            }
        };
        let states = ledger.states(&present, &dead_set, pending == 0);
        if let Some(m) = &o.run_metrics {
            let n = |want: TaskState| states.iter().filter(|(_, s)| *s == want).count() as u64;
            m.looked(n(TaskState::Open), n(TaskState::Done), n(TaskState::Dead), pending);
        }
        let mut open: HashSet<String> =
            states.iter().filter(|(_, s)| *s == TaskState::Open).map(|(t, _)| t.task_id.clone()).collect();
        if open.is_empty() {
            let mut dead = dead;
            dead.extend(ledger.implied_dead(&states, &dead));
            break (states, dead);
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = std::time::Instant::now();
            tracing::info!("{job}: {} of {} tasks still open", open.len(), states.len());
        }
        let deadline = tokio::time::Instant::now() + poll;
        let mut settled = HashSet::new();
        while !open.is_empty() {
            let Some(ev) = events.as_mut() else {
                tokio::time::sleep_until(deadline).await;
                break;
            };
            match tokio::time::timeout_at(deadline, ev.next()).await {
                Err(_) => break,
                Ok(None) => {
                    events = None;
                }
                Ok(Some(TaskEvent::Done { task_id, records })) => {
                    // Only the latest copy stands (a redelivered task wrote its results again).
                    if let Some(old) = kept.remove(&task_id) {
                        kept_bytes -= old.len();
                    }
                    if let Some(r) = records.filter(|r| kept_bytes + r.len() <= KEEP_RECORDS_MAX) {
                        kept_bytes += r.len();
                        kept.insert(task_id.clone(), r.into_bytes());
                    }
                    open.remove(&task_id);
                    settled.insert(task_id);
                }
                Ok(Some(TaskEvent::Dead { task_id })) => {
                    open.remove(&task_id);
                    settled.insert(task_id);
                }
                Ok(Some(TaskEvent::Split { task_id, published })) => {
                    if open.remove(&task_id) {
                        open.extend(published.into_iter().filter(|p| !settled.contains(p)));
                    }
                }
            }
        }
    };
    tracing::debug!("{job}: every task settled after {looks} looks at the output");
    forwarder.abort();
    let planned: Vec<PlannedTask> = states.into_iter().map(|(t, _)| t).collect();
    // This run's work: the tasks it queued, and the parts of the documents it queued.
    let RunPlan {
        state,
        mut book,
        queued,
    } = plan;
    let mut this_run: HashSet<String> = HashSet::new();
    for (d, tasks) in ledger.tasks() {
        let doc_queued = queued.contains(&d.task_id);
        this_run.extend(
            tasks
                .iter()
                .filter(|t| doc_queued || queued.contains(&t.task_id))
                .map(|t| t.task_id.clone()),
        );
        if d.unit == Some(UnitKind::Images) || !d.tasks.is_empty() {
            continue;
        }
        // A document opened by a worker this run: what it turned out to be, and its tasks.
        match tasks.first().map(|t| t.unit) {
            Some(UnitKind::Archive) => book.set_kind(&d.uri, "archive"),
            Some(UnitKind::Pdf) => book.set_kind(&d.uri, "pdf"),
            Some(UnitKind::Image) => book.set_kind(&d.uri, "image"),
            Some(UnitKind::Unreadable) => book.set_kind(&d.uri, "unreadable"),
            _ => {}
        }
        book.set_tasks(&d.uri, tasks.iter().map(object_task).collect());
    }
    let before = |id: &str| !this_run.contains(id);
    let fresh = |id: &str| this_run.contains(id);
    tracing::debug!("{job}: every task settled; writing Markdown and the manifests");
    let t0 = std::time::Instant::now();
    let mut outage = Outage::new(o.access.retry);
    let outcome = loop {
        let finished = async {
            let report = finish_outputs(
                store,
                JobOutcome {
                    settings: &o.settings,
                    inputs: &o.inputs,
                    plan: &planned,
                    dead: &dead,
                    tasks_skipped: sub.skipped,
                    started_at,
                    pages_this_run: PagesThisRun::DoneBefore(&before),
                    price_per_hour: o.price_per_hour,
                    known_records: Some(&kept),
                    fresh: Some(&fresh),
                },
            )
            .await?;
            close_run(
                store,
                &state,
                book.clone(),
                report,
                CloseRun {
                    run: &o.run,
                    prune: o.prune,
                    started_at,
                    plan: &planned,
                    published: &this_run,
                    tasks_skipped: sub.skipped,
                    dead: &dead,
                    price_per_hour: o.price_per_hour,
                },
            )
            .await
        }
        .await;
        // Every file of the finish is written whole under a fixed key, and a superseded file
        // is moved once, so doing it again is safe.
        match finished {
            Ok(m) => break m,
            Err(e) => {
                outage
                    .wait(&format!("{job}: writing the Markdown and the manifests"), e)
                    .await?
            }
        }
    };
    tracing::debug!("{job}: finished in {:.3}s", t0.elapsed().as_secs_f64());
    Ok(outcome)
}

/// The most bytes of records `--wait` keeps from task events for the
/// finish; beyond that the finish reads them from the store.
pub const KEEP_RECORDS_MAX: usize = 512 << 20;
