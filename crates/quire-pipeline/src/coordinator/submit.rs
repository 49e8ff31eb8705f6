//! Planning a run: list the inputs, compare them with what the job already did, publish a
//! whole-document task per new or changed object and write the plan files.

use crate::stage::plan::PlannedTask;
use crate::stage::plan::ImageGroups;
use crate::stage::plan::Planner;
use crate::coordinator::runs::begin_run;
use crate::coordinator::runs::object_task;
use crate::coordinator::runs::unfinished_runs;
use crate::coordinator::runs::JobState;
use crate::coordinator::runs::RunBook;
use crate::stage::split::document_task;
use quire_core::{
    results_key, superseded_prefix, JobSettings, ObjectStatus, ObjectTask, SourceRef, TaskSpec, UnitKind,
};
use quire_queue::jetstream::JetStreamQueue;
use quire_store::inputs::Listed;
use quire_store::BlobStore;
use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use crate::coordinator::options::CoordinatorOptions;
use crate::coordinator::options::Submitted;
use crate::coordinator::options::RunPlan;
use crate::coordinator::planfiles::PlanLine;
use quire_core::ObjectKind;
use crate::coordinator::planfiles::JobFile;
use crate::coordinator::planfiles::job_file_key;
use crate::coordinator::planfiles::IdSet;
use crate::coordinator::planfiles::results_present;
use crate::coordinator::planfiles::splits_present;
use crate::coordinator::planfiles::read_split;
use crate::source::s3::spawn_listing;
use quire_store::is_s3;
use crate::coordinator::planfiles::{unix_now, PlanWriter};
use crate::coordinator::options::Outage;

/// Tasks published at once before waiting for the server's acks.
const PUBLISH_WINDOW: usize = 512;

/// The task that redoes one failed task of an unchanged object (`--retry-failed`).
fn retry_task(
    settings: &JobSettings,
    fingerprint: &str,
    src: &SourceRef,
    t: &ObjectTask,
    unit_count: u32,
    submission: &str,
) -> TaskSpec {
    let mut task = document_task(settings, fingerprint, src);
    if t.unit != UnitKind::Document {
        task.task_id = t.task_id.clone();
        task.unit = t.unit;
        task.first = t.first;
        task.last = t.last;
        task.unit_count = unit_count;
    }
    task.submission = Some(submission.to_string());
    task
}

/// Lists the inputs and publishes the run's work without opening any object (workers do:
/// see [`crate::stage::split`]); writes the plan parts and `JOB/job.json`.
///
/// A run plans against the job manifest ([`JobState`]): an unchanged object whose tasks all
/// have results is skipped without a look at the store; new and changed objects get one
/// whole-document task each; loose images are grouped by name, and a group whose task has
/// results is skipped. The store's results and splits are listed only when the manifest
/// cannot say (no manifest, other settings, or an earlier run that never closed).
///
/// Memory grows with the job's objects (the manifest and this run's book of them) and the
/// set of finished task ids (16 bytes each) when the store is listed.
pub async fn submit(o: &CoordinatorOptions, queue: &JetStreamQueue, store: &dyn BlobStore) -> anyhow::Result<(Submitted, RunPlan)> {
    // An input that could not be listed at all (the store is down, the prefix refused) is not
    // an empty input: the submission is made again (its tasks are dropped by the queue as
    // duplicates of this run's) until the store's retry budget is spent.
    let mut outage = Outage::new(o.access.retry);
    loop {
        match submit_once(o, queue, store).await {
            Err(e) if e.downcast_ref::<Unlisted>().is_some() => outage.wait(&format!("{}: listing the inputs", o.settings.job), e).await?,
            other => return other,
        }
    }
}

/// An input of which nothing could be listed, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("could not list {input}: {why}")]
pub struct Unlisted {
    pub input: String,
    pub why: String,
}

async fn submit_once(o: &CoordinatorOptions, queue: &JetStreamQueue, store: &dyn BlobStore) -> anyhow::Result<(Submitted, RunPlan)> {
    let job = o.settings.job.clone();
    let started_at = SystemTime::now();
    let planner = Planner::new(o.settings.clone());
    let s3_client = if o.inputs.iter().any(|i| is_s3(i)) {
        Some(o.access.client().await)
    } else {
        None
    };
    let state = JobState::load(store, &job, &o.settings).await?;
    let unfinished = unfinished_runs(store, &job).await?;
    // The manifest knows every task of the closed runs; results from a run that never closed
    // (or of a job with no usable manifest) are found in the store.
    let manifest_knows = state.knows_objects() && unfinished.is_empty();
    let look_in_store = !o.force && !manifest_knows;
    if !unfinished.is_empty() {
        tracing::info!(
            "{job}: run(s) {} did not close; looking for their results in the store",
            unfinished.join(", ")
        );
    }
    begin_run(store, &job, &o.run, started_at).await?;
    let (done, split) = if look_in_store {
        (
            results_present(store, &job).await?,
            splits_present(store, &job).await?,
        )
    } else {
        (IdSet::default(), IdSet::default())
    };
    // Workers look for stored page-range results only where some may exist.
    let check_stored = !o.force && (!done.is_empty() || !split.is_empty());
    // A forced submission (and a retry of failed tasks) redoes tasks the queue may have seen
    // within its duplicate window: its own tag keeps them from being dropped.
    let tag = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    // Every run tags its tasks with its name: two coordinators of one run publish the same
    // messages (the second one's are dropped as duplicates), while a task an earlier run
    // published under other settings, superseded since and published again within the
    // queue's duplicate window, is not taken for one.
    let submission = Some(if o.force { format!("force-{tag}") } else { format!("run-{}", o.run) });
    let retry_tag = format!("retry-{tag}");
    let mut sub = Submitted {
        run: o.run.clone(),
        ..Default::default()
    };
    let mut book = RunBook::default();
    let mut queued = HashSet::new();
    let mut plan = PlanWriter {
        store,
        job: job.clone(),
        part: 0,
        buf: Vec::new(),
        lines: 0,
    };
    let mut publisher = queue.publisher(PUBLISH_WINDOW);
    for input in &o.inputs {
        let (tx, mut rx) = mpsc::channel(1024);
        let lister = spawn_listing(input, s3_client.as_ref(), tx);
        let mut groups = ImageGroups::new(planner.settings.images_per_task);
        let (listed_before, warned_before) = (sub.documents, sub.warnings.len());
        loop {
            let item = rx.recv().await;
            // (task, the tasks the job manifest knows for it, whether it is a retry)
            let tasks: Vec<(TaskSpec, Vec<ObjectTask>, bool)> = match item {
                None => {
                    let Some(last) = groups.flush(&planner) else {
                        break;
                    };
                    vec![(last, Vec::new(), false)]
                }
                Some(Listed::Warning(w)) => {
                    tracing::warn!("{}: {}", w.path, w.message);
                    book.unlisted(&w.path);
                    sub.warnings.push(w);
                    continue;
                }
                Some(Listed::Object(src)) => {
                    sub.documents += 1;
                    let found = state.classify(&src, &o.run);
                    if ObjectKind::by_name(&src.uri) == ObjectKind::Images {
                        book.add(&state, &o.run, &src, "image", found);
                        groups
                            .push(&planner, input, src)
                            .into_iter()
                            .map(|t| (t, Vec::new(), false))
                            .collect()
                    } else {
                        match state.unchanged(&src) {
                            // Finished before: its tasks stand as they are (a retry redoes the failed ones).
                            Some(p)
                                if !o.force
                                    && p.status != ObjectStatus::Incomplete
                                    && p.kind != "image" =>
                            {
                                book.add(&state, &o.run, &src, &p.kind, found);
                                book.set_tasks(&src.uri, p.tasks.clone());
                                let doc =
                                    document_task(&planner.settings, &planner.fingerprint, &src);
                                if p.status == ObjectStatus::Failed {
                                    // Its failed tasks run again with --retry-failed (their results moved
                                    // aside first, so that the wait sees the new ones), and whenever their
                                    // results are gone (a retry stopped between the two).
                                    let units = p.tasks.iter().map(|t| t.last).max().unwrap_or(0);
                                    let mut out = vec![(doc, p.tasks.clone(), false)];
                                    for t in p.tasks.iter().filter(|t| t.failed > 0) {
                                        let key = results_key(&job, &t.task_id);
                                        let present = store.exists(&key).await?;
                                        if o.retry_failed && present {
                                            store.rename(&key, &format!("{}results/{}.jsonl", superseded_prefix(&job, &o.run), t.task_id)).await?;
                                        }
                                        if o.retry_failed || !present {
                                            let task = retry_task(&planner.settings, &planner.fingerprint, &src, t, units, &retry_tag);
                                            out.push((task, Vec::new(), true));
                                        }
                                    }
                                    out
                                } else {
                                    vec![(doc, p.tasks.clone(), false)]
                                }
                            }
                            _ => {
                                book.add(
                                    &state,
                                    &o.run,
                                    &src,
                                    state
                                        .unchanged(&src)
                                        .map_or(ObjectKind::by_name(&src.uri).manifest_name(), |p| p.kind.as_str()),
                                    found,
                                );
                                let mut doc =
                                    document_task(&planner.settings, &planner.fingerprint, &src);
                                // An unfinished object of an earlier run: some of its parts may have results.
                                doc.check_stored = check_stored || state.unchanged(&src).is_some();
                                vec![(doc, Vec::new(), false)]
                            }
                        }
                    }
                }
            };
            for (mut doc, known, retry) in tasks {
                if !o.force {
                    state.attach_reuse(&mut doc);
                }
                if retry {
                    queued.insert(doc.task_id.clone());
                    publisher.send(&doc).await?;
                    continue;
                }
                if doc.unit == UnitKind::Images {
                    let p = PlannedTask {
                        task_id: doc.task_id.clone(),
                        uri: doc.source.uri.clone(),
                        rel: doc.source.rel.clone(),
                        first: doc.first,
                        last: doc.last,
                        unit: doc.unit,
                    };
                    for m in &doc.members {
                        book.set_tasks(&m.uri, vec![object_task(&p)]);
                    }
                }
                doc.check_stored = doc.check_stored || check_stored;
                doc.submission = submission.clone();
                let (unit, units) = if doc.unit == UnitKind::Images {
                    (Some(UnitKind::Images), doc.last)
                } else {
                    (None, 0)
                };
                let finished = !known.is_empty();
                plan.push(&PlanLine {
                    task_id: doc.task_id.clone(),
                    uri: doc.source.uri.clone(),
                    rel: doc.source.rel.clone(),
                    unit,
                    units,
                    tasks: known,
                })
                .await?;
                // A group the job manifest knows done, unless its error records are retried.
                let prior = if doc.unit == UnitKind::Images && !o.force {
                    state.done(&doc.task_id)
                } else {
                    None
                };
                let retry_group = o.retry_failed && prior.is_some_and(|failed| failed > 0);
                if !retry_group && (finished || prior.is_some() || done.contains(&doc.task_id)) {
                    sub.skipped += 1;
                    continue;
                }
                if split.contains(&doc.task_id) {
                    if let Some(sp) = read_split(store, &job, &doc.task_id).await? {
                        if sp.parts.iter().all(|p| done.contains(&p.task_id)) {
                            sub.skipped += 1;
                            continue;
                        }
                    }
                }
if retry_group {
                    // Past the queue's duplicate window for the id, and its earlier results moved
                    // aside so that the wait sees the new ones.
                    doc.submission = Some(retry_tag.clone());
                    let key = results_key(&job, &doc.task_id);
                    if store.exists(&key).await? {
                        store.rename(&key, &format!("{}results/{}.jsonl", superseded_prefix(&job, &o.run), doc.task_id)).await?;
                    }
                }
                queued.insert(doc.task_id.clone());
                publisher.send(&doc).await?;
            }
        }
        lister.await?;
        if sub.documents == listed_before && sub.warnings.len() > warned_before {
            let why = sub.warnings[warned_before..].iter().map(|w| format!("{}: {}", w.path, w.message)).collect::<Vec<_>>().join("; ");
            return Err(Unlisted { input: input.clone(), why }.into());
        }
    }
    // Objects of the job below a path whose listing failed: kept as they were.
    for t in book.carry_unlisted(&state) {
        let task = crate::coordinator::runs::object_task(&t);
        plan.push(&PlanLine { task_id: t.task_id.clone(), uri: t.uri.clone(), rel: t.rel.clone(), unit: None, units: 0, tasks: vec![task] })
            .await?;
        sub.skipped += 1;
    }
    plan.flush().await?;
    let acks = publisher.finish().await?;
    sub.published = acks.new;
    sub.done_before = done;
    sub.duplicates = acks.duplicates;
    (sub.objects_new, sub.objects_changed, sub.objects_unchanged) = book.counts();
    let jf = JobFile {
        settings: o.settings.clone(),
        inputs: o.inputs.clone(),
        submitted_at: unix_now(),
        documents: sub.documents,
        run: o.run.clone(),
        plan_parts: plan.part,
        published: sub.published,
        skipped: sub.skipped,
        duplicates: sub.duplicates,
    };
    store
        .put(&job_file_key(&job), serde_json::to_vec_pretty(&jf)?)
        .await?;
    if let Some(m) = &o.run_metrics {
        m.objects.with_label_values(&["new"]).set(sub.objects_new as i64);
        m.objects.with_label_values(&["changed"]).set(sub.objects_changed as i64);
        m.objects.with_label_values(&["unchanged"]).set(sub.objects_unchanged as i64);
    }
    sub.planning_seconds = started_at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    sub.by_manifest = !look_in_store;
    Ok((sub, RunPlan { state, book, queued }))
}
