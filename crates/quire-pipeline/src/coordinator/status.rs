//! `quire status`: a job as it stands, from its files under the output and the queue.

use crate::sink::jsonl::parse_jsonl;
use quire_core::{
    results_key, DeadLetter, Manifest,
};
use quire_queue::jetstream::JetStreamQueue;
use quire_store::BlobStore;
use serde::Serialize;
use crate::coordinator::ledger::Ledger;
use crate::coordinator::ledger::TaskState;
use crate::coordinator::planfiles::IdSet;
use crate::coordinator::planfiles::results_present;
use crate::coordinator::planfiles::unix_now;

/// Where a job stands, from the output store (and the queue when given).
#[derive(Debug, Default, Clone, Serialize)]
pub struct JobStatus {
    pub job: String,
    pub documents: u64,
    /// Tasks known now: unopened documents count as one task each.
    pub tasks: u64,
    pub done: u64,
    pub dead_lettered: u64,
    pub pending: u64,
    /// Documents not opened by a worker yet.
    pub unopened: u64,
    pub pages_ok: u64,
    pub pages_failed: u64,
    /// Tasks still in the work stream (queued, leased or backing off), when the queue was asked.
    pub queued: Option<u64>,
    pub elapsed_seconds: f64,
    /// Pages (and frames) with records per second since the submission; needs `pages`.
    pub pages_per_second: f64,
    /// From the task rate since the submission; an unopened document counts as one task.
    pub eta_seconds: Option<f64>,
    pub finished: bool,
    /// Set when the output store could not be read (an outage): the counts above then come
    /// from the queue alone, or are unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Input objects of the job as its last finished run left it (from its manifest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    /// The job's finished runs, oldest first (from its manifest).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<quire_core::RunEntry>,
}

impl JobStatus {
    /// The status of a job known only by its manifest (one made by `quire run`, or a
    /// distributed job whose plan is gone): everything settled as the manifest says.
    pub fn from_manifest(m: &Manifest) -> JobStatus {
        let c = &m.counts;
        JobStatus {
            job: m.job.clone(),
            documents: c.documents,
            tasks: c.tasks,
            done: c.tasks_done,
            dead_lettered: c.tasks_dead_lettered,
            pending: c.tasks.saturating_sub(c.tasks_done + c.tasks_dead_lettered),
            pages_ok: c.pages_ok,
            pages_failed: c.pages_failed,
            elapsed_seconds: m.throughput.wall_seconds,
            pages_per_second: m.throughput.pages_per_second,
            finished: true,
            objects: (!m.objects.is_empty() || c.objects > 0).then_some(c.objects),
            runs: m.runs.clone(),
            ..Default::default()
        }
    }
}

/// The job manifest under `job`, if there is one that reads.
async fn read_manifest(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<Manifest>> {
    Ok(store.get(&quire_core::manifest_key(job)).await?.and_then(|b| serde_json::from_slice(&b).ok()))
}

pub(crate) async fn dead_ids(queue: Option<&JetStreamQueue>, job: &str) -> anyhow::Result<(IdSet, Vec<DeadLetter>)> {
    let mut set = IdSet::default();
    let dead = match queue {
        Some(q) => q.dead_letters(job).await?,
        None => Vec::new(),
    };
    for d in &dead {
        set.insert(&d.task_id);
    }
    Ok((set, dead))
}

/// Counts a job's tasks; `pages` reads every result file to count pages.
pub async fn job_status(
    store: &dyn BlobStore,
    job: &str,
    queue: Option<&JetStreamQueue>,
    pages: bool,
) -> anyhow::Result<Option<JobStatus>> {
    let Some(mut ledger) = Ledger::load(store, job).await? else {
        // No plan of a coordinator: a job of `quire run`, known by its manifest.
        return Ok(read_manifest(store, job).await?.map(|m| JobStatus::from_manifest(&m)));
    };
    ledger.refresh_splits(store).await?;
    let present = results_present(store, job).await?;
    let (dead, _) = dead_ids(queue, job).await?;
    let mut st = JobStatus { job: job.to_string(), documents: ledger.docs.len() as u64, ..Default::default() };
    st.unopened = ledger.docs.iter().filter(|d| !ledger.splits.contains_key(&d.task_id) && !present.contains(&d.task_id)).count() as u64;
    let queued = match queue {
        Some(q) => Some(q.pending(job).await?),
        None => None,
    };
    for (t, state) in ledger.states(&present, &dead, queued == Some(0)) {
        st.tasks += 1;
        match state {
            TaskState::Done => {
                st.done += 1;
                if pages {
                    if let Some(bytes) = store.get(&results_key(job, &t.task_id)).await? {
                        for r in parse_jsonl(&bytes)? {
                            if r.failed() {
                                st.pages_failed += 1;
                            } else {
                                st.pages_ok += 1;
                            }
                        }
                    }
                }
            }
            TaskState::Dead => st.dead_lettered += 1,
            TaskState::Open => st.pending += 1,
        }
    }
    st.queued = queued;
    st.finished = st.pending == 0;
    if let Some(m) = read_manifest(store, job).await? {
        st.runs = m.runs;
        st.objects = (m.counts.objects > 0).then_some(m.counts.objects);
    }
    st.elapsed_seconds = (unix_now() - ledger.job.submitted_at).max(0.0);
    if st.elapsed_seconds > 0.0 {
        st.pages_per_second = (st.pages_ok + st.pages_failed) as f64 / st.elapsed_seconds;
    }
    // Tasks done since this submission: those done before it were skipped
    // as whole documents, which is what `skipped` counts.
    let new_done = st.done.saturating_sub(ledger.job.skipped);
    if st.pending == 0 {
        st.eta_seconds = Some(0.0);
    } else if new_done > 0 && st.elapsed_seconds > 0.0 {
        st.eta_seconds = Some(st.pending as f64 * st.elapsed_seconds / new_done as f64);
    }
    Ok(Some(st))
}
