//! Whole-document tasks: distributed planning publishes one task per input
//! object without opening it (listing a bucket must not mean downloading
//! it); the worker that takes such a task opens the object and either runs
//! it in one go, when it fits one task, or publishes its page-range tasks
//! and records the split under `JOB/splits/DOCUMENT_TASK_ID.json`.
//!
//! Page-range tasks get the same ids as in `quire run`'s planning, and the
//! queue drops a republished id, so a document split twice (a redelivery
//! after a crash) does not create work twice.

use crate::stage::plan::plan_archive_tasks;
use crate::stage::plan::plan_tasks;
use crate::stage::plan::Examined;
use quire_core::{document_task_id, job_prefix, settings_fingerprint, JobSettings, SourceRef, TaskSpec, UnitKind};
use serde::{Deserialize, Serialize};

/// The task for a whole, unopened object.
pub fn document_task(settings: &JobSettings, fingerprint: &str, src: &SourceRef) -> TaskSpec {
    TaskSpec::new(document_task_id(fingerprint, src), settings.clone(), src.clone(), UnitKind::Document, (0, 0), 0)
}

pub fn split_key(job: &str, document_task_id: &str) -> String {
    format!("{}splits/{document_task_id}.json", job_prefix(job))
}

pub fn splits_prefix(job: &str) -> String {
    format!("{}splits/", job_prefix(job))
}

/// One page-range task of a split document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub task_id: String,
    pub first: u32,
    pub last: u32,
}

/// `JOB/splits/ID.json`: the page-range tasks a document was split into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub document_task_id: String,
    pub uri: String,
    pub unit_count: u32,
    pub parts: Vec<Part>,
    /// What the parts' units are: PDF pages or frames (absent in splits written before
    /// archives were read), or archive samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<UnitKind>,
}

/// What to do with an opened document.
#[allow(clippy::large_enum_variant)] // one per task, moved once: boxing buys nothing
pub enum Opened {
    /// It fits one task: run this one (its id is the document task's, so
    /// its results mark the document done).
    Whole(TaskSpec),
    /// Publish these tasks and store the split.
    Split(Split, Vec<TaskSpec>),
}

/// Plans an opened document the way `quire run` does (same ids, same
/// ranges) and decides between running it whole and splitting it.
pub fn open_document(doc: &TaskSpec, probe: &Result<quire_render::Probe, quire_core::InputError>) -> Opened {
    let fp = settings_fingerprint(&doc.settings);
    split_planned(doc, plan_tasks(&doc.settings, &fp, &doc.source, probe))
}

/// Like [`open_document`] for an object examined by [`crate::stage::plan::examine`]: an archive
/// is split into the member-range tasks `quire run` plans for it.
pub fn open_examined(doc: &TaskSpec, examined: &Examined) -> Opened {
    match examined {
        Examined::Object(probe) => open_document(doc, probe),
        Examined::Archive(scan) => {
            let fp = settings_fingerprint(&doc.settings);
            split_planned(doc, plan_archive_tasks(&doc.settings, &fp, &doc.source, scan))
        }
    }
}

/// The split of an object run whole as `task` (its one part has the document task's id): stored
/// only where the object's bytes say other than its name, so that the finish knows its kind.
pub fn whole_split(task: &TaskSpec) -> Split {
    Split {
        document_task_id: task.task_id.clone(),
        uri: task.source.uri.clone(),
        unit_count: task.unit_count,
        unit: Some(task.unit),
        parts: vec![Part { task_id: task.task_id.clone(), first: task.first, last: task.last }],
    }
}

fn split_planned(doc: &TaskSpec, mut tasks: Vec<TaskSpec>) -> Opened {
    for t in &mut tasks {
        t.submission = doc.submission.clone();
    }
    if tasks.len() <= 1 {
        let mut t = tasks.pop().unwrap_or_else(|| TaskSpec {
            // An object with no pages at all still gets its one record.
            unit: UnitKind::Unreadable,
            first: 1,
            last: 1,
            unit_count: 0,
            ..doc.clone()
        });
        t.task_id = doc.task_id.clone();
        return Opened::Whole(t);
    }
    let split = Split {
        document_task_id: doc.task_id.clone(),
        uri: doc.source.uri.clone(),
        unit_count: tasks[0].unit_count,
        unit: Some(tasks[0].unit),
        parts: tasks
            .iter()
            .map(|t| Part { task_id: t.task_id.clone(), first: t.first, last: t.last })
            .collect(),
    };
    Opened::Split(split, tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_core::{ErrorKind, InputError};
    use quire_render::{InputKind, Probe};

    fn doc(pages_per_task: u32) -> TaskSpec {
        let mut s = JobSettings::new("j");
        s.pages_per_task = pages_per_task;
        let src = SourceRef { uri: "s3://b/a.pdf".into(), rel: "a.pdf".into(), size: 9, version: "e1".into() };
        document_task(&s, &settings_fingerprint(&s), &src)
    }

    #[test]
    fn small_documents_run_whole_under_the_document_id_and_big_ones_split_like_quire_run() {
        let pdf = |n| Ok(Probe { kind: InputKind::Pdf, unit_count: n, bytes: 9 });
        let d = doc(4);
        assert_eq!(d.units(), 0);
        match open_document(&d, &pdf(3)) {
            Opened::Whole(t) => assert_eq!((t.task_id.as_str(), t.unit, t.first, t.last, t.unit_count), (d.task_id.as_str(), UnitKind::Pdf, 1, 3, 3)),
            Opened::Split(..) => panic!("3 pages fit one task of 4"),
        }
        let Opened::Split(split, tasks) = open_document(&d, &pdf(10)) else { panic!("10 pages need 3 tasks") };
        let planned = plan_tasks(&d.settings, &settings_fingerprint(&d.settings), &d.source, &pdf(10));
        assert_eq!(tasks, planned, "the same tasks (and ids) as quire run plans");
        assert_eq!(split.parts.iter().map(|p| (p.first, p.last)).collect::<Vec<_>>(), vec![(1, 4), (5, 8), (9, 10)]);
        assert!(split.parts.iter().all(|p| p.task_id != d.task_id));
        match open_document(&d, &Err(InputError::new(ErrorKind::Corrupt, "bad xref"))) {
            Opened::Whole(t) => assert_eq!((t.task_id.as_str(), t.unit), (d.task_id.as_str(), UnitKind::Unreadable)),
            Opened::Split(..) => panic!("an unreadable file is one task"),
        }
    }
}
