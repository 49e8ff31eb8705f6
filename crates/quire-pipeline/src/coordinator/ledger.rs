//! The coordinator's ledger of a run: every planned task and how it stands, fed by task events.

use crate::stage::plan::PlannedTask;
use crate::stage::split::Split;
use quire_core::{
    DeadLetter, UnitKind,
};
use quire_store::BlobStore;
use std::collections::{HashMap, HashSet};
use crate::coordinator::planfiles::PlanLine;
use crate::coordinator::planfiles::JobFile;
use crate::coordinator::planfiles::read_plan;
use crate::coordinator::planfiles::read_job_file;
use crate::coordinator::planfiles::IdSet;
use crate::coordinator::planfiles::splits_present;
use crate::coordinator::planfiles::read_split;

/// Every task of a job as known now: a document not opened yet is one
/// task; a split document is its page-range tasks.
pub struct Ledger {
    pub job: JobFile,
    pub docs: Vec<PlanLine>,
    pub(crate) splits: HashMap<String, Split>,
}

/// Where one task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Done,
    Dead,
    Open,
}

impl Ledger {
    pub async fn load(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<Ledger>> {
        let Some(jf) = read_job_file(store, job).await? else {
            return Ok(None);
        };
        let docs = read_plan(store, job, &jf).await?;
        Ok(Some(Ledger { job: jf, docs, splits: HashMap::new() }))
    }

    /// Reads the splits that appeared since the last call (a split never
    /// changes once written).
    pub async fn refresh_splits(&mut self, store: &dyn BlobStore) -> anyhow::Result<()> {
        let job = self.job.settings.job.clone();
        let present = splits_present(store, &job).await?;
        if present.len() == self.splits.len() {
            return Ok(());
        }
        for d in self.docs.iter().filter(|d| d.tasks.is_empty()) {
            if present.contains(&d.task_id) && !self.splits.contains_key(&d.task_id) {
                if let Some(sp) = read_split(store, &job, &d.task_id).await? {
                    self.splits.insert(d.task_id.clone(), sp);
                }
            }
        }
        Ok(())
    }

    /// The tasks of each document in plan order: `(document, tasks)`, each
    /// task as a [`PlannedTask`] (an unopened document has pages `1..=0`).
    pub fn tasks(&self) -> impl Iterator<Item = (&PlanLine, Vec<PlannedTask>)> {
        self.docs.iter().map(|d| {
            if !d.tasks.is_empty() {
                return (d, d.tasks.iter().map(crate::coordinator::runs::planned).collect());
            }
            let tasks = match self.splits.get(&d.task_id) {
                Some(sp) => sp
                    .parts
                    .iter()
                    .map(|p| PlannedTask {
                        task_id: p.task_id.clone(),
                        uri: d.uri.clone(),
                        rel: d.rel.clone(),
                        first: p.first,
                        last: p.last,
                        unit: sp.unit.unwrap_or(UnitKind::Pdf),
                    })
                    .collect(),
                None if d.unit == Some(UnitKind::Images) => vec![PlannedTask {
                    task_id: d.task_id.clone(),
                    uri: d.uri.clone(),
                    rel: d.rel.clone(),
                    first: 1,
                    last: d.units,
                    unit: UnitKind::Images,
                }],
                None => vec![PlannedTask {
                    task_id: d.task_id.clone(),
                    uri: d.uri.clone(),
                    rel: d.rel.clone(),
                    first: 1,
                    last: 0,
                    unit: UnitKind::Document,
                }],
            };
            (d, tasks)
        })
    }

    /// Dead letters for the parts [`Ledger::states`] counts as given up because their
    /// document's task was, so that the manifest lists every task without results.
    pub fn implied_dead(&self, states: &[(PlannedTask, TaskState)], dead: &[DeadLetter]) -> Vec<DeadLetter> {
        let by_id: HashMap<&str, &DeadLetter> = dead.iter().map(|d| (d.task_id.as_str(), d)).collect();
        let given_up: HashSet<&str> =
            states.iter().filter(|(_, s)| *s == TaskState::Dead).map(|(t, _)| t.task_id.as_str()).collect();
        let mut out = Vec::new();
        for (d, tasks) in self.tasks() {
            let Some(doc) = by_id.get(d.task_id.as_str()) else { continue };
            for t in tasks.iter().filter(|t| given_up.contains(t.task_id.as_str()) && !by_id.contains_key(t.task_id.as_str())) {
                out.push(DeadLetter {
                    task_id: t.task_id.clone(),
                    source: d.uri.clone(),
                    first: t.first,
                    last: t.last,
                    deliveries: 0,
                    reason: format!("never ran: its document's task was given up on ({})", doc.reason),
                });
            }
        }
        out
    }

    /// The state of every task. A split document whose own task was given up on may have
    /// left parts unpublished (it died between storing the split and publishing); such
    /// parts count as given up too, but only once `queue_idle` (the queue holds no task of
    /// the job): until then they may still be queued or running.
    pub fn states(&self, present: &IdSet, dead: &IdSet, queue_idle: bool) -> Vec<(PlannedTask, TaskState)> {
        let mut out = Vec::new();
        for (d, tasks) in self.tasks() {
            let doc_dead = queue_idle && dead.contains(&d.task_id);
            for t in tasks {
                let st = if present.contains(&t.task_id) {
                    TaskState::Done
                } else if dead.contains(&t.task_id) || doc_dead {
                    TaskState::Dead
                } else {
                    TaskState::Open
                };
                out.push((t, st));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_core::JobSettings;

    #[test]
    fn parts_of_a_given_up_document_count_as_given_up_only_once_the_queue_is_idle() {
        let job = JobFile {
            settings: JobSettings::new("j"),
            inputs: vec![],
            submitted_at: 0.0,
            documents: 1,
            run: "r".into(),
            plan_parts: 1,
            published: 1,
            skipped: 0,
            duplicates: 0,
        };
        let id = |n: u32| format!("{n:032x}");
        let doc = PlanLine { task_id: id(100), uri: "s3://b/in/a.pdf".into(), rel: "a.pdf".into(), unit: None, units: 0, tasks: Vec::new() };
        let parts = (1..=3).map(|p| crate::stage::split::Part { task_id: id(p), first: p, last: p }).collect();
        let split = Split { document_task_id: id(100), uri: doc.uri.clone(), unit_count: 3, parts, unit: None };
        let ledger = Ledger { job, docs: vec![doc], splits: HashMap::from([(id(100), split)]) };
        let mut present = IdSet::default();
        present.insert(&id(1));
        let mut dead_set = IdSet::default();
        dead_set.insert(&id(100));
        let dead = vec![DeadLetter { task_id: id(100), source: "s3://b/in/a.pdf".into(), first: 0, last: 0, deliveries: 5, reason: "lease expired".into() }];
        // Parts 2 and 3 may still be queued or running: the job is not over.
        let busy = ledger.states(&present, &dead_set, false);
        assert_eq!(busy.iter().map(|(_, s)| *s).collect::<Vec<_>>(), vec![TaskState::Done, TaskState::Open, TaskState::Open]);
        // Nothing of the job is queued any more: they will never run, and the manifest says so.
        let idle = ledger.states(&present, &dead_set, true);
        assert_eq!(idle.iter().map(|(_, s)| *s).collect::<Vec<_>>(), vec![TaskState::Done, TaskState::Dead, TaskState::Dead]);
        let implied = ledger.implied_dead(&idle, &dead);
        assert_eq!(implied.iter().map(|d| (d.task_id.as_str(), d.first)).collect::<Vec<_>>(), vec![(id(2).as_str(), 2), (id(3).as_str(), 3)]);
        assert!(implied[0].reason.contains("lease expired"), "{:?}", implied[0]);
    }

}
