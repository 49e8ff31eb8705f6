//! Closing a job: per-document Markdown, caption datasets ([`crate::sink::datasets`]) and
//! `manifest.json`, built from the stored results of every planned task (this run's and
//! earlier runs').
//!
//! Documents are handled one at a time in plan order, so memory holds one
//! document's records, not the job's.

use quire_core::{
    manifest_key, markdown_key, results_key, DeadLetter, Failure, JobSettings, Manifest, ManifestCounts, Record,
    Throughput,
};
use futures_util::StreamExt;
use quire_store::BlobStore;
use std::collections::HashMap;
use std::time::SystemTime;
use crate::sink::jsonl::parse_jsonl;
use crate::stage::plan::PlannedTask;

/// How to tell the pages this run produced from those of earlier runs.
pub enum PagesThisRun<'a> {
    Counted(u64),
    /// Records of tasks for which this returns true were there before the run.
    DoneBefore(&'a (dyn Fn(&str) -> bool + Sync)),
}

pub struct JobOutcome<'a> {
    pub settings: &'a JobSettings,
    pub inputs: &'a [String],
    pub plan: &'a [PlannedTask],
    pub dead: &'a [DeadLetter],
    pub tasks_skipped: u64,
    pub started_at: SystemTime,
    /// Pages with a record written by this run (for the rate).
    pub pages_this_run: PagesThisRun<'a>,
    /// The device's price per hour (`--price-per-hour`), for the cost in the manifest.
    pub price_per_hour: Option<f64>,
    /// Stored results already at hand (task id → JSON lines), read from
    /// the store only for the other tasks.
    pub known_records: Option<&'a HashMap<String, Vec<u8>>>,
    /// Says which tasks this run worked on; the Markdown of a document none of whose
    /// records came from such a task is compared with the stored file and written only when
    /// it differs (a nightly run then rewrites only what changed). `None`: write every file.
    pub fresh: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The throughput figures of a job or a run: `wall` seconds for `pages`, and the model's
/// work in it (device milliseconds, pages and new tokens), priced at `price_per_hour` of device
/// time when given.
pub fn throughput(wall: f64, pages: u64, (device_ms, model_pages, model_tokens): (f64, u64, u64), price_per_hour: Option<f64>) -> Throughput {
    Throughput {
        wall_seconds: round3(wall),
        pages_per_second: if wall > 0.0 { ((pages as f64 / wall) * 100.0).round() / 100.0 } else { 0.0 },
        cpu_seconds: (process_cpu_seconds() * 100.0).round() / 100.0,
        gpu_seconds: round3(device_ms / 1e3),
        device_seconds_per_page: if model_pages > 0 { round3(device_ms / 1e3 / model_pages as f64) } else { 0.0 },
        new_tokens_per_device_second: if device_ms > 0.0 { round3(model_tokens as f64 / (device_ms / 1e3)) } else { 0.0 },
        price_per_hour,
        usd_per_1000_pages: price_per_hour.filter(|_| model_pages > 0).map(|p| round3(device_ms / 1e3 / model_pages as f64 * p / 3.6)),
    }
}

/// Renders one document's records as Markdown: pages in order, each after a
/// `<!-- page N -->` marker (a DocTags model's page as its `markdown`);
/// failed or missing pages say so in a comment.
pub fn document_markdown(records: &[Record], first_missing: &[(u32, u32)]) -> String {
    let mut pages: Vec<&Record> = records.iter().collect();
    pages.sort_by_key(|r| r.page);
    let mut out = String::new();
    let mut missing = first_missing.to_vec();
    missing.sort();
    let mut entries: Vec<(u32, String)> = pages
        .iter()
        .map(|r| {
            let body = match &r.error {
                None => r.markdown.as_deref().unwrap_or(&r.text).trim_end().to_string(),
                Some(e) if e.kind == quire_core::ErrorKind::Loop => format!(
                    "{}\n\n<!-- loop: {} -->",
                    r.markdown.as_deref().unwrap_or(&r.text).trim_end(),
                    e.message.replace("--", "- -")
                ),
                Some(e) => format!("<!-- error {}: {} -->", e.kind.as_str(), e.message.replace("--", "- -")),
            };
            (r.page, body)
        })
        .collect();
    for (a, b) in missing {
        let what = if b < a { "document".to_string() } else { format!("pages {a}-{b}") };
        entries.push((a, format!("<!-- {what}: not processed (gave up after repeated failures) -->")));
    }
    entries.sort_by_key(|(p, _)| *p);
    for (page, body) in entries {
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(&format!("<!-- page {page} -->\n"));
        out.push_str(&body);
    }
    out.push('\n');
    out
}

/// An archive's Markdown: each member's text after a `<!-- member NAME -->` marker, in
/// archive order; refused members and samples not processed say so in a comment.
pub fn archive_markdown(records: &[Record], missing: &[(u32, u32)]) -> String {
    let mut parts: Vec<String> = records
        .iter()
        .map(|r| {
            let what = match (&r.member, &r.key) {
                (Some(m), _) => format!("member {}", m.replace("--", "- -")),
                (None, _) => "archive".to_string(),
            };
            let body = match &r.error {
                None => r.text.trim_end().to_string(),
                Some(e) => format!("<!-- error {}: {} -->", e.kind.as_str(), e.message.replace("--", "- -")),
            };
            format!("<!-- {what} -->\n{body}")
        })
        .collect();
    for (a, b) in missing {
        parts.push(format!("<!-- samples {a}-{b}: not processed (gave up after repeated failures) -->"));
    }
    let mut out = parts.join("\n\n");
    out.push('\n');
    out
}

/// The Markdown files (path below `markdown/`, text) of one planned document's records: an
/// archive gives one file, an image group one per image file, anything else one.
fn markdown_files(first: &PlannedTask, records: &[Record], missing: &[(u32, u32)]) -> Vec<(String, String)> {
    use quire_core::UnitKind;
    if first.unit == UnitKind::Archive || records.iter().any(|r| r.member.is_some()) {
        return vec![(first.rel.clone(), archive_markdown(records, missing))];
    }
    if first.unit == UnitKind::Images || records.iter().any(|r| r.source != first.uri) {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut i = 0;
        while i < records.len() {
            let n = records[i..].iter().take_while(|r| r.source == records[i].source).count();
            let rel = crate::stage::plan::member_rel(&first.uri, &first.rel, &records[i].source);
            out.push((rel, document_markdown(&records[i..i + n], &[])));
            i += n;
        }
        return out;
    }
    vec![(first.rel.clone(), document_markdown(records, missing))]
}


fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// CPU seconds (user + system) used by this process so far.
pub fn process_cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Writes `body` at `key`; with `compare`, not when the store holds those bytes already.
async fn put(store: &dyn BlobStore, key: String, body: Vec<u8>, compare: bool) -> Result<(), quire_store::StoreError> {
    if compare && store.get(&key).await?.is_some_and(|old| old == body) {
        return Ok(());
    }
    store.put(&key, body).await
}

/// Writes the Markdown of every document, the caption datasets and the manifest; returns
/// the manifest.
pub async fn finish_job(store: &dyn BlobStore, o: JobOutcome<'_>) -> anyhow::Result<Manifest> {
    let report = finish_outputs(store, o).await?;
    store.put(&manifest_key(&report.manifest.job), serde_json::to_vec_pretty(&report.manifest)?).await?;
    Ok(report.manifest)
}

/// What one task's records hold, for a run's own counts and the objects' status.
#[derive(Debug, Clone, Default)]
pub struct TaskTally {
    pub ok: u64,
    pub failed: u64,
    /// Pages whose generation looped and was stopped (kept, not failed).
    pub looped: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Model busy time over its pages answered by the model without error.
    pub device_ms: f64,
    pub model_pages: u64,
    pub model_tokens: u64,
}

/// What [`finish_outputs`] wrote and found.
pub struct FinishReport {
    /// The job manifest (not yet written).
    pub manifest: Manifest,
    /// Every Markdown file of the current documents, written or not.
    pub markdown_keys: std::collections::HashSet<String>,
    /// Per task with results: its records' counts.
    pub tasks: HashMap<String, TaskTally>,
    /// Per source (`Record::source`: a file, or an archive): ok and failed records.
    pub sources: HashMap<String, (u64, u64)>,
}

/// Writes the Markdown of every document and the caption datasets, and builds the manifest
/// (which the caller writes).
pub async fn finish_outputs(store: &dyn BlobStore, o: JobOutcome<'_>) -> anyhow::Result<FinishReport> {
    let job = &o.settings.job;
    let mut markdown_keys = std::collections::HashSet::new();
    let mut task_tallies: HashMap<String, TaskTally> = HashMap::new();
    let mut sources: HashMap<String, (u64, u64)> = HashMap::new();
    let dead_by_id: HashMap<&str, &DeadLetter> = o.dead.iter().map(|d| (d.task_id.as_str(), d)).collect();
    // The model's busy time over the pages it answered, for the cost figures.
    let (mut device_ms, mut model_pages, mut model_tokens) = (0f64, 0u64, 0u64);
    let mut counts = ManifestCounts { tasks: o.plan.len() as u64, tasks_skipped: o.tasks_skipped, ..Default::default() };
    let mut failures = Vec::new();
    let mut dead_lettered = Vec::new();
    let mut pages_new = 0u64;
    // Result files are read up to READ_AHEAD at once, in plan order, and
    // Markdown files written up to WRITE_AHEAD at once: an object store
    // answers each request in milliseconds, not microseconds.
    const READ_AHEAD: usize = 32;
    const WRITE_AHEAD: usize = 16;
    let mut reads = futures_util::stream::iter(o.plan.iter())
        .map(|t| async move {
            match o.known_records.and_then(|k| k.get(&t.task_id)) {
                Some(body) => (t, Ok(Some(std::borrow::Cow::Borrowed(body.as_slice())))),
                None => (t, store.get(&results_key(job, &t.task_id)).await.map(|b| b.map(std::borrow::Cow::Owned))),
            }
        })
        .buffered(READ_AHEAD);
    let mut writes = futures_util::stream::FuturesUnordered::new();
    let mut datasets = crate::sink::datasets::DatasetSink::new(store, o.settings).await?;
    // The document being read: its first task, its records so far, its missing page ranges.
    type OpenDoc<'a> = (&'a PlannedTask, Vec<Record>, Vec<(u32, u32)>);
    let mut doc: Option<OpenDoc> = None;
    loop {
        let next = reads.next().await;
        let new_doc = match (&next, &doc) {
            (Some((t, _)), Some((d, ..))) => t.uri != d.uri,
            _ => true,
        };
        if new_doc {
            if let Some((first, records, missing)) = doc.take() {
                let md_files = markdown_files(first, &records, &missing);
                counts.documents += if first.unit == quire_core::UnitKind::Images { md_files.len() as u64 } else { 1 };
                for r in &records {
                    counts.records += 1;
                    counts.tokens_in += r.tokens_in;
                    counts.tokens_out += r.tokens_out;
                    let tally = task_tallies.entry(r.task_id.clone()).or_default();
                    tally.tokens_in += r.tokens_in;
                    tally.tokens_out += r.tokens_out;
                    if r.engine == "vlm" && r.error.is_none() {
                        device_ms += r.timings_ms.device;
                        model_pages += 1;
                        model_tokens += r.tokens_out;
                        tally.device_ms += r.timings_ms.device;
                        tally.model_pages += 1;
                        tally.model_tokens += r.tokens_out;
                    }
                    let per_source = sources.entry(r.source.clone()).or_default();
                    match &r.error {
                        None => {
                            counts.pages_ok += 1;
                            tally.ok += 1;
                            per_source.0 += 1;
                        }
                        // A looping page keeps its text, marked: not a failure to redo.
                        Some(_) if r.looped() => {
                            counts.pages_looped += 1;
                            tally.looped += 1;
                            per_source.0 += 1;
                        }
                        Some(e) => {
                            counts.pages_failed += 1;
                            tally.failed += 1;
                            per_source.1 += 1;
                            failures.push(Failure { source: r.source.clone(), page: r.page, kind: e.kind, message: e.message.clone() });
                        }
                    }
                }
                let out = datasets.document(&records)?;
                let mut files: Vec<(String, Vec<u8>, bool)> = out.writes.into_iter().map(|(k, b)| (k, b, false)).collect();
                if out.markdown {
                    let stale = o.fresh.is_some_and(|fresh| !records.iter().any(|r| fresh(&r.task_id)));
                    for (rel, md) in md_files {
                        let key = markdown_key(job, &rel);
                        markdown_keys.insert(key.clone());
                        files.push((key, md.into_bytes(), stale));
                    }
                }
                for (key, body, compare) in files {
                    while writes.len() >= WRITE_AHEAD {
                        if let Some(r) = writes.next().await {
                            r?;
                        }
                    }
                    writes.push(put(store, key, body, compare));
                }
            }
        }
        let Some((t, got)) = next else { break };
        let (_, records, missing) = doc.get_or_insert_with(|| (t, Vec::new(), Vec::new()));
        match got? {
            Some(bytes) => {
                counts.tasks_done += 1;
                task_tallies.entry(t.task_id.clone()).or_default();
                let recs = parse_jsonl(&bytes)?;
                datasets.task(t, records.len()..records.len() + recs.len(), Some(&bytes));
                if let PagesThisRun::DoneBefore(before) = &o.pages_this_run {
                    if !before(&t.task_id) {
                        pages_new += recs.len() as u64;
                    }
                }
                records.extend(recs);
            }
            None => {
                datasets.task(t, records.len()..records.len(), None);
                missing.push((t.first, t.last));
                if let Some(d) = dead_by_id.get(t.task_id.as_str()) {
                    dead_lettered.push((*d).clone());
                }
            }
        }
    }
    while let Some(r) = writes.next().await {
        r?;
    }
    counts.tasks_dead_lettered = dead_lettered.len() as u64;
    let wall = SystemTime::now().duration_since(o.started_at).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let pages_this_run = match o.pages_this_run {
        PagesThisRun::Counted(n) => n,
        PagesThisRun::DoneBefore(_) => pages_new,
    };
    let manifest = Manifest {
        job: job.clone(),
        quire_version: env!("CARGO_PKG_VERSION").to_string(),
        settings: o.settings.clone(),
        inputs: o.inputs.to_vec(),
        started_at: rfc3339(o.started_at),
        finished_at: rfc3339(SystemTime::now()),
        counts,
        failures,
        dead_lettered,
        throughput: throughput(wall, pages_this_run, (device_ms, model_pages, model_tokens), o.price_per_hour),
        datasets: datasets.files,
        archives: datasets.archives,
        run: None,
        objects: Vec::new(),
        runs: Vec::new(),
    };
    Ok(FinishReport { manifest, markdown_keys, tasks: task_tallies, sources })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_core::{FinishReason, Timings};
    use quire_store::local::LocalStore;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the reads of result files.
    struct Counting(LocalStore, AtomicUsize);

    #[async_trait::async_trait]
    impl BlobStore for Counting {
        async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), quire_store::StoreError> {
            self.0.put(key, data).await
        }
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, quire_store::StoreError> {
            if key.contains("/results/") {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
            self.0.get(key).await
        }
        async fn exists(&self, key: &str) -> Result<bool, quire_store::StoreError> {
            self.0.exists(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, quire_store::StoreError> {
            self.0.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), quire_store::StoreError> {
        self.0.delete(key).await
    }

    fn locate(&self, key: &str) -> String {
            self.0.locate(key)
        }
    }

    fn record(task: &str, page: u32) -> Record {
        Record {
            job: "j".into(),
            task_id: task.into(),
            source: "in/a.pdf".into(),
            page,
            page_count: 3,
            task: "ocr".into(),
            engine: "text-layer".into(),
            model: None,
            prompt: None,
            text: format!("text of page {page}"),
            tokens_in: 0,
            tokens_out: 0,
            finish_reason: FinishReason::Stop,
            width: 0,
            height: 0,
            timings_ms: Timings::default(),
            error: None,
            key: None,
            member: None,
            markdown: None,
            blocks: None,
            loop_info: None,
        }
    }

    #[tokio::test]
    async fn records_at_hand_are_not_read_back_and_give_the_same_output() {
        let dir = tempfile::tempdir().unwrap();
        let store = Counting(LocalStore::new(dir.path()), AtomicUsize::new(0));
        let settings = JobSettings::new("j");
        let plan: Vec<PlannedTask> = [("t1", 1, 2), ("t2", 3, 3)]
            .iter()
            .map(|(id, a, b)| PlannedTask { task_id: id.to_string(), uri: "in/a.pdf".into(), rel: "a.pdf".into(), first: *a, last: *b, unit: quire_core::UnitKind::Pdf })
            .collect();
        let t1 = crate::sink::jsonl::to_jsonl(&[record("t1", 1), record("t1", 2)]);
        store.put(&results_key("j", "t1"), t1.clone()).await.unwrap();
        store.put(&results_key("j", "t2"), crate::sink::jsonl::to_jsonl(&[record("t2", 3)])).await.unwrap();
        let known = HashMap::from([("t1".to_string(), t1)]);
        let mut outputs = Vec::new();
        for k in [None, Some(&known)] {
            store.1.store(0, Ordering::SeqCst);
            let m = finish_job(
                &store,
                JobOutcome {
                    settings: &settings,
                    inputs: &[],
                    plan: &plan,
                    dead: &[],
                    tasks_skipped: 0,
                    started_at: SystemTime::now(),
                    pages_this_run: PagesThisRun::Counted(3),
                    price_per_hour: None,
                    known_records: k,
                    fresh: None,
                },
            )
            .await
            .unwrap();
            let md = store.get(&markdown_key("j", "a.pdf")).await.unwrap().unwrap();
            outputs.push((m.counts, md, store.1.load(Ordering::SeqCst)));
        }
        assert_eq!((outputs[0].2, outputs[1].2), (2, 1), "result files read without / with records at hand");
        assert_eq!(outputs[0].0, outputs[1].0);
        assert_eq!(outputs[0].1, outputs[1].1);
        assert!(String::from_utf8_lossy(&outputs[1].1).contains("text of page 3"));
    }

    /// A page whose output looped is counted apart (neither ok nor failed, not a failure to
    /// redo) and keeps its text in the Markdown, marked.
    #[tokio::test]
    async fn a_looping_page_is_counted_apart_and_keeps_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let settings = JobSettings::new("j");
        let plan = vec![PlannedTask { task_id: "t1".into(), uri: "in/a.pdf".into(), rel: "a.pdf".into(), first: 1, last: 3, unit: quire_core::UnitKind::Pdf }];
        let mut looped = record("t1", 2);
        looped.finish_reason = FinishReason::Loop;
        looped.error = Some(quire_core::ErrorInfo { kind: quire_core::ErrorKind::Loop, message: "repeated".into() });
        let mut failed = record("t1", 3);
        failed.error = Some(quire_core::ErrorInfo { kind: quire_core::ErrorKind::Model, message: "no".into() });
        let body = crate::sink::jsonl::to_jsonl(&[record("t1", 1), looped.clone(), failed]);
        store.put(&results_key("j", "t1"), body).await.unwrap();
        let outcome = JobOutcome {
            settings: &settings,
            inputs: &[],
            plan: &plan,
            dead: &[],
            tasks_skipped: 0,
            started_at: SystemTime::now(),
            pages_this_run: PagesThisRun::Counted(3),
            price_per_hour: None,
            known_records: None,
            fresh: None,
        };
        let m = finish_job(&store, outcome).await.unwrap();
        assert_eq!((m.counts.pages_ok, m.counts.pages_looped, m.counts.pages_failed), (1, 1, 1));
        assert_eq!(m.failures.len(), 1, "the looping page is no failure: {:?}", m.failures);
        assert!(looped.looped() && !looped.failed());
        let md = String::from_utf8(store.get(&markdown_key("j", "a.pdf")).await.unwrap().unwrap()).unwrap();
        assert!(md.contains("text of page 2\n\n<!-- loop: repeated -->"), "{md}");
    }
}
