//! Planning: an input object becomes tasks. A PDF or a TIFF becomes page (frame) range
//! tasks, a tar or zip archive member-range tasks, and loose images are grouped
//! `images_per_task` at a time.

use quire_core::{images_task_id, settings_fingerprint, task_id, InputError, JobSettings, Limits, SourceRef, TaskSpec, UnitKind};
use quire_render::{InputKind, PdfRenderer, Probe};
use quire_store::archive::{self, ArchiveLimits, Scan};
use std::path::Path;

/// What opening an object for planning found out.
pub enum Examined {
    /// A PDF or an image (or why not).
    Object(Result<Probe, InputError>),
    /// A tar or zip archive (by its first bytes), and its samples counted.
    Archive(Result<Scan, InputError>),
}

/// Opens the object at `path` as an archive when its bytes say so, else probes it as a PDF
/// or image. Blocks.
pub fn examine(path: &Path, limits: &Limits, pdf: &PdfRenderer) -> Examined {
    if archive::sniff_archive_file(path).is_some() {
        return Examined::Archive(archive::scan(path, &ArchiveLimits::from(limits)));
    }
    Examined::Object(quire_render::probe(path, limits, pdf))
}

/// Member-range tasks of an archive: `images_per_task` samples each, numbered as
/// [`quire_store::archive`] counts them. An archive that cannot be read becomes one
/// [`UnitKind::Unreadable`] task (its one error record); one without a single image or
/// refused member becomes one task over all its samples, whose record says so.
pub fn plan_archive_tasks(settings: &JobSettings, fingerprint: &str, src: &SourceRef, scan: &Result<Scan, InputError>) -> Vec<TaskSpec> {
    let make = range_task(settings, fingerprint, src);
    match scan {
        Err(_) => vec![make(UnitKind::Unreadable, 1, 1, 0)],
        Ok(s) if s.images == 0 && s.refused == 0 => vec![make(UnitKind::Archive, 1, s.units.max(1), s.units)],
        Ok(s) => {
            let per = settings.images_per_task.max(1);
            (0..s.units.div_ceil(per))
                .map(|i| {
                    let (first, last) = (i * per + 1, ((i + 1) * per).min(s.units));
                    // A plain tar's later ranges start reading at their first sample.
                    TaskSpec { resume: s.resume_at(first, last), ..make(UnitKind::Archive, first, last, s.units) }
                })
                .collect()
        }
    }
}

/// Makes the tasks of one object: `make(unit, first, last, unit_count)`. An unreadable
/// object's one task must not share its id with page 1 of the same object once it can be
/// read: it is keyed on range 0..=0.
fn range_task<'a>(settings: &'a JobSettings, fingerprint: &'a str, src: &'a SourceRef) -> impl Fn(UnitKind, u32, u32, u32) -> TaskSpec + 'a {
    move |unit, first, last, count| {
        let id = if unit == UnitKind::Unreadable { task_id(fingerprint, src, 0, 0) } else { task_id(fingerprint, src, first, last) };
        TaskSpec::new(id, settings.clone(), src.clone(), unit, (first, last), count)
    }
}

/// The task for a group of loose images listed below `root`.
pub fn images_task(settings: &JobSettings, fingerprint: &str, root: &SourceRef, members: Vec<SourceRef>) -> TaskSpec {
    let n = members.len() as u32;
    let id = images_task_id(fingerprint, &members);
    TaskSpec { members, ..TaskSpec::new(id, settings.clone(), root.clone(), UnitKind::Images, (1, n), n) }
}

/// The input root (`input` as given) an image group's members were listed from: its `rel` is
/// the members' common start, so that [`member_rel`] gives each member's own `rel` back.
pub fn group_root(input: &str, member: &SourceRef) -> SourceRef {
    let below = member.uri.strip_prefix(input).unwrap_or("").trim_start_matches('/');
    let rel = member.rel.strip_suffix(below).unwrap_or(&member.rel).trim_end_matches('/');
    let rel = if rel.is_empty() { member.rel.clone() } else { rel.to_string() };
    SourceRef { uri: input.to_string(), rel, size: 0, version: String::new() }
}

/// The `rel` (path for Markdown) of the member `uri` of an image group listed below the
/// root `root_uri` whose `rel` is `root_rel`.
pub fn member_rel(root_uri: &str, root_rel: &str, uri: &str) -> String {
    match uri.strip_prefix(root_uri).map(|b| b.trim_start_matches('/')) {
        Some("") => root_rel.to_string(),
        Some(below) => format!("{root_rel}/{below}"),
        None => uri.trim_start_matches("s3://").to_string(),
    }
}

/// Collects loose images into groups of about `images_per_task`, in listing order, with
/// boundaries that depend on the images' own names only, so that a folder that grows, loses or
/// replaces an image re-forms the group that holds it and no other.
///
/// A group ends after an image whose name ([`SourceRef::rel`]) hashes to a multiple of
/// `images_per_task` ([`is_group_boundary`]): groups are `images_per_task` long on average,
/// and adding or removing a name moves no boundary but its own. Adding a boundary name splits
/// its group in two, removing one joins two; replacing an image changes its group's id only.
/// A run of names without a boundary is cut every [`MAX_GROUP_FACTOR`] × `images_per_task`
/// images, so no task grows without bound; a change inside such a run re-forms the groups
/// from it to the run's next boundary (a run that long is rare: e⁻⁴ ≈ 2 % of groups).
pub struct ImageGroups {
    per: usize,
    root: Option<SourceRef>,
    members: Vec<SourceRef>,
}

/// The longest group, in multiples of `images_per_task`.
pub const MAX_GROUP_FACTOR: usize = 4;

/// Whether a group of loose images ends after the image named `rel`, for groups of `per` on
/// average: the first 8 bytes of the name's SHA-256 are a multiple of `per`.
pub fn is_group_boundary(rel: &str, per: usize) -> bool {
    use sha2::Digest;
    let h = sha2::Sha256::digest(rel.as_bytes());
    let n = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    n % per.max(1) as u64 == 0
}

impl ImageGroups {
    pub fn new(images_per_task: u32) -> Self {
        ImageGroups { per: images_per_task.max(1) as usize, root: None, members: Vec::new() }
    }

    /// Adds an image listed from `input`; returns the task of the group it closes.
    pub fn push(&mut self, planner: &Planner, input: &str, src: SourceRef) -> Option<TaskSpec> {
        if self.root.is_none() {
            self.root = Some(group_root(input, &src));
        }
        let ends = is_group_boundary(&src.rel, self.per);
        self.members.push(src);
        (ends || self.members.len() >= self.per.saturating_mul(MAX_GROUP_FACTOR)).then(|| self.flush(planner)).flatten()
    }

    /// The last, partial group (call at the end of each input).
    pub fn flush(&mut self, planner: &Planner) -> Option<TaskSpec> {
        let root = self.root.take()?;
        let members = std::mem::take(&mut self.members);
        Some(images_task(&planner.settings, &planner.fingerprint, &root, members))
    }
}

/// Splits one probed object into tasks of at most `pages_per_task` units.
/// An object whose probe failed becomes a single task for its one error
/// record, so that the failure is recorded, counted and skipped on rerun
/// like any finished work.
pub fn plan_tasks(settings: &JobSettings, fingerprint: &str, src: &SourceRef, probe: &Result<Probe, InputError>) -> Vec<TaskSpec> {
    let make = range_task(settings, fingerprint, src);
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

    pub fn plan(&self, src: &SourceRef, probe: &Result<Probe, InputError>) -> Vec<TaskSpec> {
        plan_tasks(&self.settings, &self.fingerprint, src, probe)
    }

    pub fn plan_archive(&self, src: &SourceRef, scan: &Result<Scan, InputError>) -> Vec<TaskSpec> {
        plan_archive_tasks(&self.settings, &self.fingerprint, src, scan)
    }
}

/// What the planner decided for one task; enough to find and order results.
#[derive(Debug, Clone)]
pub struct PlannedTask {
    pub task_id: String,
    pub uri: String,
    pub rel: String,
    pub first: u32,
    pub last: u32,
    pub unit: quire_core::UnitKind,
}

impl PlannedTask {
    /// What its object is: planning's units say it where the object was opened (by the planner,
    /// or by the worker that split it), its name where it was not or could not be read.
    pub fn object(&self) -> quire_core::ObjectKind {
        quire_core::ObjectKind::planned(self.unit, &self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_core::ErrorKind;

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
        let bad = p.plan(&src, &Err(InputError::new(ErrorKind::Corrupt, "x")));
        assert_eq!((bad.len(), bad[0].unit), (1, UnitKind::Unreadable));
    }

    #[test]
    fn archives_split_into_sample_ranges_and_images_into_groups() {
        let mut s = JobSettings::new("j");
        s.images_per_task = 4;
        let p = Planner::new(s);
        let src = SourceRef { uri: "in/shard.tar".into(), rel: "shard.tar".into(), size: 9, version: "v".into() };
        let scan = Scan { units: 10, images: 9, without_image: 1, ..Default::default() };
        let tasks = p.plan_archive(&src, &Ok(scan));
        assert_eq!(tasks.iter().map(|t| (t.first, t.last, t.unit)).collect::<Vec<_>>(), vec![
            (1, 4, UnitKind::Archive),
            (5, 8, UnitKind::Archive),
            (9, 10, UnitKind::Archive)
        ]);
        let none = p.plan_archive(&src, &Ok(Scan { units: 7, without_image: 7, ..Default::default() }));
        assert_eq!(none.iter().map(|t| (t.first, t.last, t.unit_count)).collect::<Vec<_>>(), vec![(1, 7, 7)], "one record says: no images");
        let bad = p.plan_archive(&src, &Err(InputError::new(ErrorKind::TooLarge, "x")));
        assert_eq!((bad.len(), bad[0].unit), (1, UnitKind::Unreadable));

        let m = |rel: &str| SourceRef { uri: format!("/data/pics/{rel}"), rel: format!("pics/{rel}"), size: 1, version: "1".into() };
        let mut groups = ImageGroups::new(2);
        // Names picked so that the first group ends after its second image.
        let names = ["c.png", "sub/a.jpg", "e.png"];
        assert_eq!(names.map(|n| is_group_boundary(&format!("pics/{n}"), 2)), [false, true, false]);
        let mut tasks: Vec<TaskSpec> = names.iter().filter_map(|r| groups.push(&p, "/data/pics/", m(r))).collect();
        tasks.extend(groups.flush(&p));
        assert_eq!(tasks.len(), 2);
        assert_eq!((tasks[0].source.uri.as_str(), tasks[0].source.rel.as_str()), ("/data/pics/", "pics"));
        assert_eq!((tasks[0].units(), tasks[1].units(), tasks[1].members[0].rel.as_str()), (2, 1, "pics/e.png"));
        for t in &tasks {
            for mem in &t.members {
                assert_eq!(member_rel(&t.source.uri, &t.source.rel, &mem.uri), mem.rel);
            }
        }
        let single = SourceRef { uri: "x/one.png".into(), rel: "one.png".into(), size: 1, version: "1".into() };
        let root = group_root("x/one.png", &single);
        assert_eq!(member_rel(&root.uri, &root.rel, &single.uri), "one.png");
        let s3 = SourceRef { uri: "s3://b/p/q/r.jpg".into(), rel: "p/q/r.jpg".into(), size: 1, version: "e".into() };
        let root = group_root("s3://b/p", &s3);
        assert_eq!((root.rel.as_str(), member_rel(&root.uri, &root.rel, &s3.uri).as_str()), ("p", "p/q/r.jpg"));
        assert_ne!(tasks[0].task_id, tasks[1].task_id);
    }

    /// The ids of the groups a sorted listing of `names` forms.
    fn group_ids(p: &Planner, names: &[String], version: impl Fn(&str) -> String) -> Vec<(String, usize)> {
        let mut groups = ImageGroups::new(p.settings.images_per_task);
        let src = |n: &str| SourceRef { uri: format!("/in/{n}"), rel: format!("in/{n}"), size: 1, version: version(n) };
        let mut sorted = names.to_vec();
        sorted.sort();
        let mut out: Vec<TaskSpec> = sorted.iter().filter_map(|n| groups.push(p, "/in", src(n))).collect();
        out.extend(groups.flush(p));
        out.into_iter().map(|t| (t.task_id, t.members.len())).collect()
    }

    #[test]
    fn one_changed_image_re_forms_at_most_two_groups_wherever_it_sits() {
        for per in [8u32, 64, 256] {
            let mut s = JobSettings::new("j");
            s.images_per_task = per;
            let p = Planner::new(s);
            let names: Vec<String> = (0..600).map(|i| format!("img-{i:04}.png")).collect();
            let v1 = |_: &str| "1".to_string();
            let before = group_ids(&p, &names, v1);
            let sizes: Vec<usize> = before.iter().map(|g| g.1).collect();
            assert_eq!(sizes.iter().sum::<usize>(), 600);
            assert!(sizes.iter().all(|&n| n <= MAX_GROUP_FACTOR * per as usize), "{sizes:?}");
            let mean = 600.0 / sizes.len() as f64;
            assert!(mean > per as f64 / 4.0 && mean < per as f64 * 4.0, "groups of {mean} on average for {per}");
            let new_work = |after: &[(String, usize)]| after.iter().filter(|g| !before.contains(g)).count();
            let mut changes: Vec<(String, Vec<(String, usize)>)> = Vec::new();
            for (i, at) in [("a-first.png", 0), ("img-0300a.png", 300), ("zz-last.png", 600)].into_iter().map(|(n, i)| (i, n)) {
                let mut grown = names.clone();
                grown.push(at.to_string());
                changes.push((format!("add at {i}"), group_ids(&p, &grown, v1)));
            }
            for i in [0usize, 1, 299, 599] {
                let mut fewer = names.clone();
                fewer.remove(i);
                changes.push((format!("remove {i}"), group_ids(&p, &fewer, v1)));
                let changed = names[i].clone();
                changes.push((format!("replace {i}"), group_ids(&p, &names, |n| if n == changed { "2".into() } else { "1".into() })));
            }
            for (what, after) in &changes {
                let n = new_work(after);
                assert!((1..=2).contains(&n), "{what} with groups of {per}: {n} groups to run again");
                let kept = after.len() - n;
                assert!(kept + 2 >= before.len(), "{what}: only {kept} of {} groups kept", before.len());
            }
        }
    }
}
