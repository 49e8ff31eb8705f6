//! Planning: an input object becomes tasks.

use quire_core::{settings_fingerprint, task_id, JobSettings, SourceRef, TaskSpec, UnitKind};
use quire_render::{InputKind, Probe, RenderError};

/// Splits one probed object into tasks of at most `pages_per_task` units.
/// An object whose probe failed becomes a single task for its one error
/// record, so that the failure is recorded, counted and skipped on rerun
/// like any finished work.
pub fn plan_tasks(settings: &JobSettings, fingerprint: &str, src: &SourceRef, probe: &Result<Probe, RenderError>) -> Vec<TaskSpec> {
    let make = |unit, first, last, count| TaskSpec {
        // An unreadable file's one task must not share its id with page 1
        // of the same file once it can be read: it is keyed on range 0..=0.
        task_id: if unit == UnitKind::Unreadable { task_id(fingerprint, src, 0, 0) } else { task_id(fingerprint, src, first, last) },
        settings: settings.clone(),
        source: src.clone(),
        unit,
        first,
        last,
        unit_count: count,
        check_stored: false,
        submission: None,
    };
    match probe {
        Err(_) => vec![make(UnitKind::Unreadable, 1, 1, 0)],
        Ok(p) => {
            let unit = if p.kind == InputKind::Pdf { UnitKind::Pdf } else { UnitKind::Image };
            let per = settings.pages_per_task.max(1);
            (0..p.unit_count.div_ceil(per))
                .map(|i| {
                    let first = i * per + 1;
                    let last = ((i + 1) * per).min(p.unit_count);
                    make(unit, first, last, p.unit_count)
                })
                .collect()
        }
    }
}

/// Convenience for callers planning many objects with the same settings.
pub struct Planner {
    pub settings: JobSettings,
    pub fingerprint: String,
}

impl Planner {
    pub fn new(settings: JobSettings) -> Self {
        let fingerprint = settings_fingerprint(&settings);
        Planner { settings, fingerprint }
    }

    pub fn plan(&self, src: &SourceRef, probe: &Result<Probe, RenderError>) -> Vec<TaskSpec> {
        plan_tasks(&self.settings, &self.fingerprint, src, probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_render::ErrorKind;

    #[test]
    fn page_ranges_cover_the_document_once() {
        let mut s = JobSettings::new("j");
        s.pages_per_task = 4;
        let p = Planner::new(s);
        let src = SourceRef { uri: "a.pdf".into(), rel: "a.pdf".into(), size: 9, version: "v".into() };
        let probe = Ok(Probe { kind: InputKind::Pdf, unit_count: 10, bytes: 9 });
        let tasks = p.plan(&src, &probe);
        let ranges: Vec<_> = tasks.iter().map(|t| (t.first, t.last)).collect();
        assert_eq!(ranges, vec![(1, 4), (5, 8), (9, 10)]);
        assert!(tasks.iter().all(|t| t.unit_count == 10 && t.unit == UnitKind::Pdf));
        assert_eq!(tasks, p.plan(&src, &probe), "planning is deterministic");
        let bad = p.plan(&src, &Err(RenderError::new(ErrorKind::Corrupt, "x")));
        assert_eq!((bad.len(), bad[0].unit), (1, UnitKind::Unreadable));
    }
}
