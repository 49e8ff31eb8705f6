//! Standing jobs and their runs.
//!
//! A job (`--job`) is a standing collection; every invocation is a run of it (`--run`). A run
//! does the current inputs minus what the job already did with the same output settings: the
//! job manifest (`JOB/manifest.json`) lists every current input object with its identity
//! (path, size, ETag or mtime), its tasks and where its work stands, and is what the next run
//! plans against ([`JobState`]). While a run lists its inputs it books each object as new,
//! changed or unchanged ([`RunBook`]); objects of the job it did not list are removed. At the
//! run's finish ([`close_run`]) the results and derived files that no longer belong to a
//! current input are moved under `JOB/superseded/RUN/` (or deleted with `--prune`), the run's
//! own manifest (`JOB/runs/RUN/manifest.json`) says what it found and did, and the job
//! manifest is written last.

use crate::sink::finish::throughput;
use crate::sink::finish::FinishReport;
use crate::stage::plan::PlannedTask;
use quire_core::{
    job_prefix, manifest_key, results_key, run_manifest_key, run_started_key, settings_fingerprint, superseded_prefix, DeadLetter, Manifest,
    ObjectChange, ObjectEntry, ObjectStatus, ObjectTask, RunEntry, SourceRef, TaskSpec,
};
use quire_store::BlobStore;
use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

/// The job as the previous runs left it.
#[derive(Default)]
pub struct JobState {
    previous: Option<Manifest>,
    objects: HashMap<String, ObjectEntry>,
    /// Whether the earlier runs had the settings of this one: only then are their task ids
    /// this run's task ids.
    same_settings: bool,
    /// Task ids with results when the previous run finished → their error records.
    done: HashMap<String, u64>,
}

/// What a run found one listed object to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// What this run counts it as (a repeated run of the same name counts as its first
    /// attempt did).
    pub change: ObjectChange,
    /// How its current version came into the job, and in which run.
    pub origin: ObjectChange,
}

impl JobState {
    /// Reads the job manifest under `job`, if any. A manifest of an older version (no
    /// objects) or one that cannot be read leaves nothing to plan against: every object is
    /// opened and planned, and finished tasks are still found by their results.
    pub async fn load(store: &dyn BlobStore, job: &str, settings: &quire_core::JobSettings) -> anyhow::Result<JobState> {
        let Some(bytes) = store.get(&manifest_key(job)).await? else { return Ok(JobState::default()) };
        let m: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("{}: cannot be read ({e}); every input is planned again", store.locate(&manifest_key(job)));
                return Ok(JobState::default());
            }
        };
        let same_settings = settings_fingerprint(&m.settings) == settings_fingerprint(settings);
        let mut done = HashMap::new();
        for o in &m.objects {
            for t in &o.tasks {
                if o.status != ObjectStatus::Incomplete {
                    done.insert(t.task_id.clone(), t.failed);
                }
            }
        }
        let objects = m.objects.iter().map(|o| (o.uri.clone(), o.clone())).collect();
        Ok(JobState { previous: Some(m), objects, same_settings, done })
    }

    pub fn previous(&self) -> Option<&Manifest> {
        self.previous.as_ref()
    }

    /// Whether the job manifest lists its objects with this run's settings: then it knows
    /// every finished task of the closed runs, and they need not be looked for in the store.
    pub fn knows_objects(&self) -> bool {
        self.same_settings && self.previous.as_ref().is_some_and(|m| !m.objects.is_empty())
    }

    /// New, changed or unchanged, against the job before this run (`run`).
    pub fn classify(&self, src: &SourceRef, run: &str) -> Found {
        match self.objects.get(&src.uri) {
            None => Found { change: ObjectChange::New, origin: ObjectChange::New },
            Some(p) if p.size == src.size && p.version == src.version => {
                if p.since_run == run {
                    Found { change: p.change, origin: p.change }
                } else {
                    Found { change: ObjectChange::Unchanged, origin: p.change }
                }
            }
            Some(_) => Found { change: ObjectChange::Changed, origin: ObjectChange::Changed },
        }
    }

    /// The earlier entry of an unchanged object whose tasks are this run's tasks (same
    /// settings): its kind and tasks need no second look at its bytes.
    pub fn unchanged(&self, src: &SourceRef) -> Option<&ObjectEntry> {
        let p = self.objects.get(&src.uri)?;
        (self.same_settings && p.size == src.size && p.version == src.version).then_some(p)
    }

    /// Names, for a group of loose images this run re-formed (a new task id), the earlier
    /// group task of each member that is unchanged and was done without errors: the worker
    /// takes those records over instead of captioning the images again, so one image added
    /// to a folder costs one image, not a group of them.
    pub fn attach_reuse(&self, task: &mut TaskSpec) {
        if task.unit != quire_core::UnitKind::Images || !self.same_settings || self.done.contains_key(&task.task_id) {
            return;
        }
        for m in &task.members {
            let Some(p) = self.unchanged(m) else { continue };
            if p.kind != "image" || p.status != ObjectStatus::Done {
                continue;
            }
            if let Some(t) = p.tasks.first().filter(|t| t.task_id != task.task_id && t.failed == 0) {
                task.reuse.insert(m.uri.clone(), t.task_id.clone());
            }
        }
    }

    /// Whether a task had results when the previous run finished, and how many of its records
    /// were errors.
    pub fn done(&self, task_id: &str) -> Option<u64> {
        if !self.same_settings {
            return None;
        }
        self.done.get(task_id).copied()
    }

    /// The run that first saw `src` as it is now.
    fn since(&self, src: &SourceRef, run: &str) -> String {
        match self.objects.get(&src.uri) {
            Some(p) if p.size == src.size && p.version == src.version => p.since_run.clone(),
            _ => run.to_string(),
        }
    }
}

/// The planned task of an object as the job manifest keeps it.
pub fn object_task(t: &PlannedTask) -> ObjectTask {
    ObjectTask { task_id: t.task_id.clone(), uri: t.uri.clone(), rel: t.rel.clone(), first: t.first, last: t.last, unit: t.unit, failed: 0 }
}

/// A task of the job manifest as a planned task.
pub fn planned(t: &ObjectTask) -> PlannedTask {
    PlannedTask { task_id: t.task_id.clone(), uri: t.uri.clone(), rel: t.rel.clone(), first: t.first, last: t.last, unit: t.unit }
}

/// The objects one run listed, in listing order.
#[derive(Default, Clone)]
pub struct RunBook {
    /// As the job manifest will keep them: `change` is how the current version came in.
    entries: Vec<ObjectEntry>,
    /// What this run counts each entry as.
    found: Vec<ObjectChange>,
    index: HashMap<String, usize>,
    /// Paths (files, folders, prefixes) whose listing failed: objects of the job below them
    /// were not seen, yet are not gone.
    unlisted: Vec<String>,
}

impl RunBook {
    /// Books a listed object with what `state` says of it; `kind` is `pdf`, `image`,
    /// `archive` or `unreadable`. The same object given twice (two inputs naming it) is
    /// booked once.
    pub fn add(&mut self, state: &JobState, run: &str, src: &SourceRef, kind: &str, found: Found) {
        if self.index.contains_key(&src.uri) {
            return;
        }
        self.index.insert(src.uri.clone(), self.entries.len());
        self.entries.push(ObjectEntry {
            uri: src.uri.clone(),
            rel: src.rel.clone(),
            size: src.size,
            version: src.version.clone(),
            kind: kind.to_string(),
            change: found.origin,
            since_run: state.since(src, run),
            status: ObjectStatus::Incomplete,
            pages_ok: 0,
            pages_failed: 0,
            tasks: Vec::new(),
        });
        self.found.push(found.change);
    }

    /// The tasks of a booked object.
    pub fn set_tasks(&mut self, uri: &str, tasks: Vec<ObjectTask>) {
        if let Some(&i) = self.index.get(uri) {
            self.entries[i].tasks = tasks;
        }
    }

    /// One more task of a booked object (for a group of loose images: of each member).
    pub fn push_task(&mut self, uri: &str, task: ObjectTask) {
        if let Some(&i) = self.index.get(uri) {
            self.entries[i].tasks.push(task);
        }
    }

    /// A listing problem under `path`: the job's objects there are kept as they were.
    pub fn unlisted(&mut self, path: &str) {
        self.unlisted.push(path.to_string());
    }

    /// Books the job's objects that sit below a path whose listing failed, as they were, and
    /// returns their tasks for the plan (they are neither gone nor worked on).
    pub fn carry_unlisted(&mut self, state: &JobState) -> Vec<PlannedTask> {
        let mut tasks = Vec::new();
        // Images of one group share its task: it is carried once.
        let mut seen = HashSet::new();
        let mut carried: Vec<&ObjectEntry> = state
            .objects
            .values()
            .filter(|o| !self.index.contains_key(&o.uri) && self.unlisted.iter().any(|p| o.uri.starts_with(p.as_str())))
            .collect();
        carried.sort_by(|a, b| a.uri.cmp(&b.uri));
        for o in carried {
            tracing::warn!("{}: not listed this time; kept as it was", o.uri);
            self.index.insert(o.uri.clone(), self.entries.len());
            self.entries.push(o.clone());
            self.found.push(ObjectChange::Unchanged);
            tasks.extend(o.tasks.iter().filter(|t| seen.insert(t.task_id.clone())).map(planned));
        }
        tasks
    }

    /// Whether some listing failed: the run then does not know every input, and supersedes
    /// nothing (a file it did not see listed may still be current).
    pub fn incomplete(&self) -> bool {
        !self.unlisted.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Booked objects counted as new, changed and unchanged.
    pub fn counts(&self) -> (u64, u64, u64) {
        let n = |c: ObjectChange| self.found.iter().filter(|f| **f == c).count() as u64;
        (n(ObjectChange::New), n(ObjectChange::Changed), n(ObjectChange::Unchanged))
    }

    /// Sets what a booked object turned out to be once a worker opened it.
    pub fn set_kind(&mut self, uri: &str, kind: &str) {
        if let Some(&i) = self.index.get(uri) {
            self.entries[i].kind = kind.to_string();
        }
    }

    /// Whether a booked object's tasks are known.
    pub fn has_tasks(&self, uri: &str) -> bool {
        self.index.get(uri).is_some_and(|&i| !self.entries[i].tasks.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a run did besides the finish's outputs (see [`close_run`]).
pub struct CloseRun<'a> {
    pub run: &'a str,
    /// Delete superseded files instead of moving them under `JOB/superseded/RUN/`.
    pub prune: bool,
    pub started_at: SystemTime,
    /// Every current task (the finish's plan).
    pub plan: &'a [PlannedTask],
    /// The tasks this run queued: its own work.
    pub published: &'a HashSet<String>,
    pub tasks_skipped: u64,
    /// Tasks this run gave up on.
    pub dead: &'a [DeadLetter],
    pub price_per_hour: Option<f64>,
}

/// The two manifests a run wrote.
pub struct RunOutcome {
    pub job: Manifest,
    pub run: Manifest,
    /// Where the run manifest was written.
    pub run_manifest_key: String,
}

/// The folders of a job whose files belong to inputs: results and what is derived from them.
const OUTPUT_DIRS: [&str; 4] = ["results/", "markdown/", "parquet/", "webdataset/"];

/// Marks the start of a run (see [`run_started_key`]); [`close_run`] removes the mark.
pub async fn begin_run(store: &dyn BlobStore, job: &str, run: &str, started_at: SystemTime) -> anyhow::Result<()> {
    let body = serde_json::json!({ "run": run, "started_at": humantime::format_rfc3339_seconds(started_at).to_string() });
    store.put(&run_started_key(job, run), serde_json::to_vec(&body)?).await?;
    Ok(())
}

/// Runs of `job` that started and were never closed (a coordinator or `quire run` that was
/// killed): their finished tasks are in the store but not in the job manifest.
pub async fn unfinished_runs(store: &dyn BlobStore, job: &str) -> anyhow::Result<Vec<String>> {
    let prefix = format!("{}runs/", job_prefix(job));
    Ok(store
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix("/started.json").map(str::to_string))
        .collect())
}

/// Moves (or with `prune` deletes) every file under the job's output folders that is not
/// in `current`; returns how many.
pub async fn supersede(store: &dyn BlobStore, job: &str, run: &str, current: &HashSet<String>, prune: bool) -> anyhow::Result<u64> {
    let (from, to) = (job_prefix(job), superseded_prefix(job, run));
    let mut n = 0u64;
    for dir in OUTPUT_DIRS {
        for key in store.list(&format!("{from}{dir}")).await? {
            if current.contains(&key) {
                continue;
            }
            if prune {
                store.delete(&key).await?;
            } else {
                let below = key.strip_prefix(&from).unwrap_or(&key);
                store.rename(&key, &format!("{to}{below}")).await?;
            }
            n += 1;
        }
    }
    Ok(n)
}

/// Closes a run after its finish: sets each booked object's status from the results, moves
/// aside what no current input owns, and writes the run manifest, then the job manifest.
pub async fn close_run(store: &dyn BlobStore, state: &JobState, book: RunBook, report: FinishReport, c: CloseRun<'_>) -> anyhow::Result<RunOutcome> {
    let FinishReport { manifest: mut job_manifest, markdown_keys, tasks, sources } = report;
    let job = job_manifest.job.clone();
    let RunBook { mut entries, found, index, unlisted } = book;
    for e in &mut entries {
        let (ok, failed) = sources.get(&e.uri).copied().unwrap_or_default();
        (e.pages_ok, e.pages_failed) = (ok, failed);
        let mut complete = !e.tasks.is_empty();
        for t in &mut e.tasks {
            match tasks.get(&t.task_id) {
                Some(tally) => t.failed = tally.failed,
                None => complete = false,
            }
        }
        e.status = if !complete {
            ObjectStatus::Incomplete
        } else if failed > 0 {
            ObjectStatus::Failed
        } else {
            ObjectStatus::Done
        };
    }
    // Gone from the inputs: in the job before, not listed (and not below a failed listing).
    let mut removed: Vec<ObjectEntry> = state.objects.values().filter(|o| !index.contains_key(&o.uri)).cloned().collect();
    // A run started again under the same name continues it: what its first attempt found
    // gone stays in its manifest.
    let run_key = run_manifest_key(&job, c.run);
    // The work of the run's earlier attempts: the tasks of the objects they found new or changed.
    let mut published: HashSet<String> = c.published.clone();
    if let Some(bytes) = store.get(&run_key).await? {
        if let Ok(earlier) = serde_json::from_slice::<Manifest>(&bytes) {
            for o in earlier.objects {
                if o.change == ObjectChange::Removed {
                    if !index.contains_key(&o.uri) && !removed.iter().any(|r| r.uri == o.uri) {
                        removed.push(o);
                    }
                } else {
                    published.extend(o.tasks.into_iter().map(|t| t.task_id));
                }
            }
        }
    }
    removed.sort_by(|a, b| a.uri.cmp(&b.uri));
    for r in &mut removed {
        r.change = ObjectChange::Removed;
    }

    let mut current: HashSet<String> = c.plan.iter().map(|t| results_key(&job, &t.task_id)).collect();
    current.extend(markdown_keys);
    current.extend(job_manifest.datasets.iter().map(|d| d.path.clone()));
    let files_superseded = if unlisted.is_empty() {
        supersede(store, &job, c.run, &current, c.prune).await?
    } else {
        tracing::warn!("{job}: some inputs could not be listed ({}); nothing is superseded this run", unlisted.join(", "));
        0
    };

    // This run's own work: the tasks it queued.
    let mut run_counts = quire_core::ManifestCounts {
        tasks: c.plan.len() as u64,
        tasks_skipped: c.tasks_skipped,
        tasks_dead_lettered: c.dead.len() as u64,
        objects: entries.len() as u64,
        objects_removed: removed.len() as u64,
        files_superseded,
        ..Default::default()
    };
    for f in &found {
        match f {
            ObjectChange::New => run_counts.objects_new += 1,
            ObjectChange::Changed => run_counts.objects_changed += 1,
            ObjectChange::Unchanged => run_counts.objects_unchanged += 1,
            ObjectChange::Removed => {}
        }
    }
    let (mut device_ms, mut model_pages, mut model_tokens) = (0f64, 0u64, 0u64);
    for id in &published {
        if let Some(t) = tasks.get(id) {
            run_counts.tasks_done += 1;
            run_counts.records += t.ok + t.failed + t.looped;
            run_counts.pages_ok += t.ok;
            run_counts.pages_failed += t.failed;
            run_counts.pages_looped += t.looped;
            run_counts.tokens_in += t.tokens_in;
            run_counts.tokens_out += t.tokens_out;
            device_ms += t.device_ms;
            model_pages += t.model_pages;
            model_tokens += t.model_tokens;
        }
    }
    let worked: HashSet<&str> =
        entries.iter().filter(|e| e.tasks.iter().any(|t| published.contains(&t.task_id))).map(|e| e.uri.as_str()).collect();
    run_counts.documents = worked.len() as u64;
    let wall = SystemTime::now().duration_since(c.started_at).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let run_pages = run_counts.pages_ok + run_counts.pages_failed;
    let throughput = throughput(wall, run_pages, (device_ms, model_pages, model_tokens), c.price_per_hour);
    let mut run_objects: Vec<ObjectEntry> = entries
        .iter()
        .zip(&found)
        .filter(|(_, f)| **f != ObjectChange::Unchanged)
        .map(|(e, f)| ObjectEntry { change: *f, ..e.clone() })
        .collect();
    run_objects.extend(removed);
    let finished_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let started_at = humantime::format_rfc3339_seconds(c.started_at).to_string();
    let run_manifest = Manifest {
        job: job.clone(),
        quire_version: job_manifest.quire_version.clone(),
        settings: job_manifest.settings.clone(),
        inputs: job_manifest.inputs.clone(),
        started_at: started_at.clone(),
        finished_at: finished_at.clone(),
        counts: run_counts.clone(),
        failures: job_manifest.failures.iter().filter(|f| worked.contains(f.source.as_str())).cloned().collect(),
        dead_lettered: c.dead.to_vec(),
        throughput,
        datasets: job_manifest.datasets.iter().filter(|d| d.written).cloned().collect(),
        archives: job_manifest.archives.iter().filter(|a| worked.contains(a.source.as_str())).cloned().collect(),
        run: Some(c.run.to_string()),
        objects: run_objects,
        runs: Vec::new(),
    };
    store.put(&run_key, serde_json::to_vec_pretty(&run_manifest)?).await?;

    // The job as it stands: every current object, and the runs so far.
    let mut runs: Vec<RunEntry> = state.previous().map(|m| m.runs.clone()).unwrap_or_default();
    runs.retain(|r| r.run != c.run);
    runs.push(RunEntry { run: c.run.to_string(), started_at, finished_at, manifest: run_key.clone(), counts: run_counts.clone() });
    job_manifest.run = Some(c.run.to_string());
    job_manifest.counts.objects = entries.len() as u64;
    job_manifest.counts.objects_new = run_counts.objects_new;
    job_manifest.counts.objects_changed = run_counts.objects_changed;
    job_manifest.counts.objects_unchanged = run_counts.objects_unchanged;
    job_manifest.counts.objects_removed = run_counts.objects_removed;
    job_manifest.counts.files_superseded = files_superseded;
    job_manifest.objects = entries;
    job_manifest.runs = runs;
    store.put(&manifest_key(&job), serde_json::to_vec_pretty(&job_manifest)?).await?;
    store.delete(&run_started_key(&job, c.run)).await?;
    Ok(RunOutcome { job: job_manifest, run: run_manifest, run_manifest_key: run_key })
}
