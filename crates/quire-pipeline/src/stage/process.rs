//! One task in, its records out: render or decode the units, route each PDF
//! page to its text layer or the model, and build the records.
//!
//! Input problems (a corrupt page, a refused limit, a scanned page with no
//! model) become error records: they are final and rerunning will not change
//! them. Only transient trouble (I/O) comes back as [`TaskFailure`], for the
//! worker to retry the task later.

use crate::stage::infer::GenRequest;
use crate::stage::infer::InferenceHandle;
use crate::stage::route::usable_text;
use quire_core::{
    Engine, ErrorInfo, ErrorKind, FinishReason, InputError, JobSettings, Record, SourceRef, TaskSpec, Timings, UnitKind,
};
use quire_render::{self as render, PdfRenderer, RenderOptions};
use quire_store::archive::{self, ArchiveLimits, Entry};
use std::path::{Path, PathBuf};
use crate::error::{FailureKind, TaskFailure};

/// What the worker needs to process tasks.
#[derive(Clone)]
pub struct ProcessContext {
    pub pdf: PdfRenderer,
    /// The model, when one was given.
    pub model: Option<InferenceHandle>,
    /// The long side the model reads images at (for `RenderSize::Model`).
    pub model_long_side: Option<u32>,
}

/// A page on its way to a record.
struct Unit {
    page: u32,
    width: u32,
    height: u32,
    render_ms: f64,
    text: Option<String>,
    image: Option<image::RgbImage>,
    /// The image with its alpha channel, when it has one (see `quire_render::Page::alpha`).
    alpha: Option<image::RgbaImage>,
    outcome: Option<Outcome>,
    /// Where the unit comes from when it is not the task's source (an image of a group).
    source: Option<String>,
    /// Pages (frames) of the unit's own file when it is not the task's document.
    page_count: Option<u32>,
    /// WebDataset key and member path of an archive member.
    key: Option<String>,
    member: Option<String>,
}

enum Outcome {
    TextLayer(String),
    Vlm {
        text: String,
        tokens_in: u64,
        tokens_out: u64,
        finish: FinishReason,
        infer_ms: f64,
        device_ms: f64,
        prompt: String,
        loop_info: Option<quire_core::LoopInfo>,
    },
    Failed(ErrorInfo),
}

fn failed(kind: ErrorKind, message: impl Into<String>) -> Outcome {
    Outcome::Failed(ErrorInfo { kind, message: message.into() })
}

fn from_render(e: InputError) -> Outcome {
    Outcome::Failed(e.into())
}

fn unit_from_page(p: render::Page) -> Unit {
    Unit {
        page: p.page,
        width: p.width,
        height: p.height,
        render_ms: p.render_ms,
        text: p.text,
        image: p.image,
        alpha: p.alpha,
        outcome: None,
        source: None,
        page_count: None,
        key: None,
        member: None,
    }
}

fn unit_with(page: u32, outcome: Outcome) -> Unit {
    Unit {
        page,
        width: 0,
        height: 0,
        render_ms: 0.0,
        text: None,
        image: None,
        alpha: None,
        outcome: Some(outcome),
        source: None,
        page_count: None,
        key: None,
        member: None,
    }
}

fn unit_failed(page: u32, e: InputError) -> Unit {
    unit_with(page, from_render(e))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, TaskFailure> {
    tokio::task::spawn_blocking(f).await.map_err(|e| TaskFailure::caused(FailureKind::Worker, "worker thread failed", e))
}

/// Turns an error about the whole file into a record per unit, or a retry
/// when it is transient.
fn whole_file_error(task: &TaskSpec, e: InputError) -> Result<Vec<Unit>, TaskFailure> {
    if e.kind.is_transient() {
        return Err(TaskFailure::caused(FailureKind::Input, &task.source.uri, e));
    }
    Ok((task.first..=task.last).map(|p| unit_failed(p, e.clone())).collect())
}

/// Runs `task` on the local file `path` and returns one record per unit.
pub async fn process_task(task: &TaskSpec, path: &Path, ctx: &ProcessContext) -> Result<Vec<Record>, TaskFailure> {
    let s = &task.settings;
    let limits = s.limits;
    let path: PathBuf = path.to_path_buf();
    let mut page_count = task.unit_count;
    let mut units = match task.unit {
        UnitKind::Unreadable => {
            // The planner could not open the file; find out why again (it may
            // have been a passing fault) and record it.
            let p = path.clone();
            let archive_scan = blocking(move || {
                archive::sniff_archive_file(&p).map(|_| archive::scan(&p, &ArchiveLimits::from(&limits)))
            })
            .await?;
            let pdf = ctx.pdf.clone();
            let p = path.clone();
            let probe = match archive_scan {
                Some(Err(e)) if e.kind == ErrorKind::Io => return Err(TaskFailure::caused(FailureKind::Input, &task.source.uri, e)),
                Some(Err(e)) => Err(e),
                Some(Ok(scan)) => Ok(scan.units),
                None => match blocking(move || render::probe(&p, &limits, &pdf)).await? {
                    Ok(p) => Ok(p.unit_count),
                    Err(e) if e.kind.is_transient() => return Err(TaskFailure::caused(FailureKind::Input, &task.source.uri, e)),
                    Err(e) => Err(e),
                },
            };
            match probe {
                Err(e) => vec![unit_failed(1, e)],
                Ok(units) => vec![unit_failed(
                    1,
                    InputError::new(
                        ErrorKind::Io,
                        format!("the file could not be opened when planned but can now ({units} units); rerun the job to process it"),
                    ),
                )],
            }
        }
        UnitKind::Image => {
            let p = path.clone();
            let range = task.first..=task.last;
            match blocking(move || render::decode_image(&p, range, &limits)).await? {
                Err(e) => whole_file_error(task, e)?,
                Ok(pages) => pages
                    .into_iter()
                    .zip(task.first..)
                    .map(|(r, n)| r.map(unit_from_page).unwrap_or_else(|e| unit_failed(n, e)))
                    .collect(),
            }
        }
        UnitKind::Archive => return process_archive(task, ArchiveSource::File(path), ctx).await,
        UnitKind::Images => {
            return Err(TaskFailure::new(
                FailureKind::Worker,
                format!("{}: an image group is processed with process_images (its members are fetched one by one)", task.source.uri),
            ))
        }
        UnitKind::Document => {
            return Err(TaskFailure::new(
                FailureKind::Worker,
                format!("{}: a whole-document task must be opened and split by the worker first", task.source.uri),
            ))
        }
        UnitKind::Pdf => {
            let (units, count) = render_pdf(task, &path, ctx).await?;
            page_count = count.unwrap_or(page_count);
            units
        }
    };

    if task.unit == UnitKind::Unreadable {
        page_count = 0;
    }
    run_model(task, &mut units, ctx).await;
    Ok(units.into_iter().map(|u| to_record(task, s, page_count, u, ctx)).collect())
}

/// PDF pages: the text layer first (cheap, no pixels) unless the engine is
/// the VLM, then pixels only for the pages that need the model.
async fn render_pdf(task: &TaskSpec, path: &Path, ctx: &ProcessContext) -> Result<(Vec<Unit>, Option<u32>), TaskFailure> {
    let s = &task.settings;
    let range = task.first..=task.last;
    let size = s.render.resolve(ctx.model_long_side);
    let base = RenderOptions { size, want_image: false, want_text: true, limits: s.limits };
    let mut units: Vec<Unit>;
    if s.engine == Engine::Vlm {
        units = (task.first..=task.last)
            .map(|page| Unit { outcome: None, ..unit_with(page, Outcome::TextLayer(String::new())) })
            .collect();
    } else {
        let (pdf, p, r, o) = (ctx.pdf.clone(), path.to_path_buf(), range.clone(), base.clone());
        match blocking(move || pdf.render(&p, r, &o)).await? {
            Err(e) => return Ok((whole_file_error(task, e)?, None)),
            Ok(pages) => {
                units = pages
                    .into_iter()
                    .zip(task.first..)
                    .map(|(r, n)| r.map(unit_from_page).unwrap_or_else(|e| unit_failed(n, e)))
                    .collect();
            }
        }
        for u in units.iter_mut().filter(|u| u.outcome.is_none()) {
            let text = u.text.take().unwrap_or_default();
            if s.engine == Engine::TextLayer || usable_text(&text, s.text_min_chars) {
                u.outcome = Some(Outcome::TextLayer(text));
            } else if ctx.model.is_none() {
                u.outcome = Some(failed(
                    ErrorKind::NeedsModel,
                    "the page has no usable text layer (scanned?); pass --model to transcribe it with a VLM",
                ));
            }
        }
    }
    // Pixels for the pages still without an outcome, in contiguous runs.
    let need: Vec<u32> = units.iter().filter(|u| u.outcome.is_none()).map(|u| u.page).collect();
    for run in contiguous_runs(&need) {
        let opts = RenderOptions { want_image: true, want_text: false, ..base.clone() };
        let (pdf, p) = (ctx.pdf.clone(), path.to_path_buf());
        let r = run.clone();
        match blocking(move || pdf.render(&p, r, &opts)).await? {
            Err(e) if e.kind.is_transient() => return Err(TaskFailure::caused(FailureKind::Input, &task.source.uri, e)),
            Err(e) => {
                for u in units.iter_mut().filter(|u| run.contains(&u.page)) {
                    u.outcome = Some(from_render(e.clone()));
                }
            }
            Ok(pages) => {
                for (res, n) in pages.into_iter().zip(run.clone()) {
                    let u = units.iter_mut().find(|u| u.page == n).expect("unit for every page");
                    match res {
                        Ok(p) => {
                            u.width = p.width;
                            u.height = p.height;
                            u.render_ms += p.render_ms;
                            u.image = p.image;
                            u.alpha = p.alpha;
                        }
                        Err(e) => u.outcome = Some(from_render(e)),
                    }
                }
            }
        }
    }
    Ok((units, None))
}

fn contiguous_runs(pages: &[u32]) -> Vec<std::ops::RangeInclusive<u32>> {
    let mut runs: Vec<std::ops::RangeInclusive<u32>> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some(r) if *r.end() + 1 == p => *r = *r.start()..=p,
            _ => runs.push(p..=p),
        }
    }
    runs
}

/// Sends every unit that has pixels and no outcome to the model, all at
/// once so the inference thread can batch them with other tasks' pages.
async fn run_model(task: &TaskSpec, units: &mut [Unit], ctx: &ProcessContext) {
    let s = &task.settings;
    let pending: Vec<usize> = (0..units.len()).filter(|&i| units[i].outcome.is_none()).collect();
    if pending.is_empty() {
        return;
    }
    let Some(model) = &ctx.model else {
        for &i in &pending {
            units[i].outcome = Some(failed(
                ErrorKind::NeedsModel,
                "images have no text layer; pass --model to caption or transcribe them with a VLM",
            ));
        }
        return;
    };
    let prompt = s.prompt.clone().unwrap_or_else(|| model.default_prompt(s.task).to_string());
    let mut calls = Vec::new();
    for &i in &pending {
        let Some(image) = units[i].image.take() else {
            units[i].outcome = Some(failed(ErrorKind::Internal, "page has no pixels to give the model"));
            continue;
        };
        let req = GenRequest { image, alpha: units[i].alpha.take(), prompt: prompt.clone(), max_new_tokens: s.max_new_tokens };
        let model = model.clone();
        calls.push((i, tokio::spawn(async move { model.submit(req).await })));
    }
    for (i, call) in calls {
        let outcome = match call.await {
            Ok(Ok((out, ms))) => Outcome::Vlm {
                text: out.text,
                tokens_in: out.tokens_in,
                tokens_out: out.tokens_out,
                finish: out.finish,
                infer_ms: ms,
                device_ms: out.device_ms,
                prompt: prompt.clone(),
                loop_info: out.loop_info,
            },
            Ok(Err(msg)) => failed(ErrorKind::Model, msg),
            Err(e) => failed(ErrorKind::Internal, e.to_string()),
        };
        units[i].outcome = Some(outcome);
    }
}

fn to_record(task: &TaskSpec, s: &JobSettings, page_count: u32, u: Unit, ctx: &ProcessContext) -> Record {
    let model_name = ctx.model.as_ref().map(|m| m.model_name().to_string()).or_else(|| s.model.clone());
    let mut r = Record {
        job: s.job.clone(),
        task_id: task.task_id.clone(),
        source: u.source.unwrap_or_else(|| task.source.uri.clone()),
        page: u.page,
        page_count: u.page_count.unwrap_or(page_count),
        task: s.task.as_str().to_string(),
        engine: Engine::TextLayer.as_str().to_string(),
        model: None,
        prompt: None,
        text: String::new(),
        tokens_in: 0,
        tokens_out: 0,
        finish_reason: FinishReason::Stop,
        width: u.width,
        height: u.height,
        timings_ms: Timings { render: round_ms(u.render_ms), infer: 0.0, device: 0.0 },
        error: None,
        key: u.key,
        member: u.member,
        markdown: None,
        blocks: None,
        loop_info: None,
    };
    let images = matches!(task.unit, UnitKind::Image | UnitKind::Images | UnitKind::Archive);
    let vlm_engine = s.engine == Engine::Vlm || (images && s.engine != Engine::TextLayer);
    match u.outcome.unwrap_or_else(|| failed(ErrorKind::Internal, "page was not processed")) {
        Outcome::TextLayer(text) => r.text = text,
        Outcome::Vlm { text, tokens_in, tokens_out, finish, infer_ms, device_ms, prompt, loop_info } => {
            r.engine = Engine::Vlm.as_str().into();
            r.model = model_name;
            r.prompt = Some(prompt);
            if ctx.model.as_ref().is_some_and(|m| m.emits_doctags()) {
                if let Some((markdown, blocks)) = crate::stage::doctags::transform(&text, r.width, r.height) {
                    r.markdown = Some(markdown);
                    r.blocks = Some(blocks);
                }
            }
            r.text = text;
            r.tokens_in = tokens_in;
            r.tokens_out = tokens_out;
            r.finish_reason = finish;
            if finish == FinishReason::Loop {
                r.error = Some(ErrorInfo { kind: ErrorKind::Loop, message: loop_message(loop_info.as_ref()) });
            }
            r.loop_info = loop_info;
            r.timings_ms.infer = round_ms(infer_ms);
            r.timings_ms.device = round_ms(device_ms);
        }
        Outcome::Failed(e) => {
            if vlm_engine {
                r.engine = Engine::Vlm.as_str().into();
                r.model = model_name;
            }
            r.finish_reason = FinishReason::Error;
            r.error = Some(e);
        }
    }
    r
}

/// The `error.message` of a page whose output looped.
fn loop_message(info: Option<&quire_core::LoopInfo>) -> String {
    match info {
        Some(l) => {
            let attempts: Vec<String> = l.attempts.iter().map(u64::to_string).collect();
            format!(
                "the output repeated a {}-token period and was stopped after {} new tokens; the text keeps one period of the repetition",
                l.period,
                attempts.join(" + ")
            )
        }
        None => "the output repeated itself and was stopped".to_string(),
    }
}

/// Images are decoded and given to the model this many at a time: a task of hundreds of
/// images holds a bounded number of decoded pictures, and decoding the next ones overlaps
/// the model's work on these.
const IMAGE_CHUNK: usize = 32;

/// Runs the model on `units` and appends their records.
async fn finish_units(task: &TaskSpec, units: &mut Vec<Unit>, page_count: u32, ctx: &ProcessContext, out: &mut Vec<Record>) {
    if units.is_empty() {
        return;
    }
    run_model(task, units, ctx).await;
    out.extend(units.drain(..).map(|u| to_record(task, &task.settings, page_count, u, ctx)));
}

/// Where an archive task reads its archive from.
pub enum ArchiveSource {
    /// A local file (the input, or a download of it).
    File(PathBuf),
    /// Any random-access source, e.g. an `s3://` object read by ranged requests. Whoever
    /// made it checks it for store faults afterwards (an archive reader takes a failed read
    /// for a damaged archive).
    Reader(Box<dyn archive::ReadSeek>),
}

/// An archive task: the images of samples `first..=last`, read from the archive as a stream
/// (decoded on a blocking thread while the model works), one record per image member or
/// refused member, in archive order.
pub async fn process_archive(task: &TaskSpec, src: ArchiveSource, ctx: &ProcessContext) -> Result<Vec<Record>, TaskFailure> {
    let limits = task.settings.limits;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Unit>(IMAGE_CHUNK);
    let range = task.first..=task.last;
    let resume = task.resume.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let limits_a = ArchiveLimits::from(&limits);
        let mut on_entry = |e: Entry| {
            let mut u = match e {
                Entry::Image { key, member, data, .. } => {
                    let mut u = match render::decode_image_bytes(&member, &data, &limits) {
                        Ok(page) => unit_from_page(page),
                        Err(e) => unit_failed(1, e),
                    };
                    u.key = Some(key);
                    u.member = Some(member);
                    u
                }
                Entry::Refused { key, member, kind, message, .. } => {
                    let mut u = unit_with(1, failed(kind, message));
                    u.key = key;
                    u.member = member;
                    u
                }
            };
            u.page_count = Some(1);
            let _ = tx.blocking_send(u);
        };
        match src {
            ArchiveSource::File(p) => archive::walk_from(&p, &limits_a, Some(range), resume.as_ref(), &mut on_entry),
            ArchiveSource::Reader(r) => archive::walk_reader_from(r, &limits_a, Some(range), resume.as_ref(), &mut on_entry),
        }
    });
    let mut records = Vec::new();
    let mut chunk = Vec::new();
    while let Some(u) = rx.recv().await {
        chunk.push(u);
        if chunk.len() >= IMAGE_CHUNK {
            finish_units(task, &mut chunk, 1, ctx, &mut records).await;
        }
    }
    finish_units(task, &mut chunk, 1, ctx, &mut records).await;
    let scan = reader.await.map_err(|e| TaskFailure::caused(FailureKind::Worker, "archive reader failed", e))?;
    match scan {
        Err(e) if e.kind == ErrorKind::Io => return Err(TaskFailure::caused(FailureKind::Input, &task.source.uri, e)),
        Err(e) => {
            let mut u = unit_with(1, failed(e.kind, e.message));
            u.page_count = Some(0);
            finish_units(task, &mut vec![u], 0, ctx, &mut records).await;
        }
        Ok(scan) => {
            let whole = task.first == 1 && task.last >= task.unit_count;
            if whole && records.is_empty() && scan.images == 0 && scan.refused == 0 {
                let mut u = unit_with(
                    1,
                    failed(
                        ErrorKind::Empty,
                        format!("no images in the archive: {} samples without an image, {} members", scan.without_image, scan.members),
                    ),
                );
                u.page_count = Some(0);
                finish_units(task, &mut vec![u], 0, ctx, &mut records).await;
            } else if scan.without_image > 0 {
                tracing::info!(source = %task.source.uri, samples = scan.without_image, "samples without an image skipped");
            }
        }
    }
    Ok(records)
}

/// Decodes every frame of one loose image (one unit per frame; one error unit when the file
/// cannot be read). Blocks.
fn decode_loose(path: &Path, uri: &str, limits: &quire_core::Limits) -> Result<Vec<Unit>, InputError> {
    let decoded = render::frame_count(path).and_then(|n| Ok((n, render::decode_image(path, 1..=n, limits)?)));
    let mut units = match decoded {
        Err(e) if e.kind.is_transient() => return Err(e),
        Err(e) => {
            let mut u = unit_failed(1, e);
            u.page_count = Some(0);
            vec![u]
        }
        Ok((n, frames)) => frames
            .into_iter()
            .zip(1..)
            .map(|(r, f)| {
                let mut u = r.map(unit_from_page).unwrap_or_else(|e| unit_failed(f, e));
                u.page_count = Some(n);
                u
            })
            .collect(),
    };
    for u in &mut units {
        u.source = Some(uri.to_string());
    }
    Ok(units)
}

/// One member of an image group, fetched and decoded.
async fn load_member(m: &SourceRef, fetch: &dyn crate::source::Fetch, limits: quire_core::Limits) -> Result<Vec<Unit>, TaskFailure> {
    let f = fetch.fetch(m).await?;
    let (path, uri) = (f.path.clone(), m.uri.clone());
    let units = blocking(move || decode_loose(&path, &uri, &limits)).await?;
    drop(f);
    units.map_err(|e| TaskFailure::caused(FailureKind::Input, &m.uri, e))
}

/// An image-group task: each member fetched (a few at a time) and decoded, frames of a
/// multi-frame TIFF one record each, records in member order.
pub async fn process_images(task: &TaskSpec, fetch: &dyn crate::source::Fetch, ctx: &ProcessContext) -> Result<Vec<Record>, TaskFailure> {
    use futures_util::StreamExt;
    const FETCH_AHEAD: usize = 8;
    let limits = task.settings.limits;
    let mut members = task.members.iter();
    let mut pending = futures_util::stream::FuturesOrdered::new();
    let mut records = Vec::new();
    let mut chunk = Vec::new();
    loop {
        while pending.len() < FETCH_AHEAD {
            let Some(m) = members.next() else { break };
            pending.push_back(load_member(m, fetch, limits));
        }
        let Some(units) = pending.next().await else { break };
        chunk.extend(units?);
        if chunk.len() >= IMAGE_CHUNK {
            finish_units(task, &mut chunk, 1, ctx, &mut records).await;
        }
    }
    finish_units(task, &mut chunk, 1, ctx, &mut records).await;
    Ok(records)
}

fn round_ms(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}
