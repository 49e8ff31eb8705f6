//! `quire run`: the whole job in this process.

use crate::cli::{DatasetArg, EngineArg, JobOpts, RunArgs, TaskArg};
use crate::exit;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use quire_core::{DatasetFormat, Engine, JobSettings, Limits, RenderSize, TaskKind};
use quire_store::is_s3;
use quire_pipeline::source::s3::fetch_model;
use quire_pipeline::stage::process::ProcessContext;
use quire_pipeline::{run_embedded, Progress, RunOptions};
use quire_queue::QueueOptions;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run(args: RunArgs) -> u8 {
    match run_inner(args) {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            exit::USAGE
        }
        Err(Failure::Internal(e)) => {
            eprintln!("error: {e:#}");
            exit::INTERNAL
        }
    }
}

enum Failure {
    Usage(String),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Internal(e)
    }
}

pub fn settings(args: &JobOpts) -> JobSettings {
    let mut s = JobSettings::new(&args.job);
    s.task = match args.task {
        TaskArg::Ocr => TaskKind::Ocr,
        TaskArg::Caption => TaskKind::Caption,
    };
    s.engine = match args.engine {
        EngineArg::Auto => Engine::Auto,
        EngineArg::Vlm => Engine::Vlm,
        EngineArg::TextLayer => Engine::TextLayer,
    };
    s.model = if s.engine == Engine::TextLayer { None } else { args.model.clone() };
    s.prompt = args.prompt.clone();
    // Without --max-new-tokens the checkpoint's generation config decides, on whichever
    // machine runs the model (the coordinator does not load it).
    s.max_new_tokens = args
        .max_new_tokens
        .map_or(quire_pipeline::stage::vlm::MODEL_DEFAULT_MAX_NEW_TOKENS, |n| n as usize);
    s.pages_per_task = args.pages_per_task;
    s.images_per_task = args.images_per_task;
    s.render = match (args.render_long_side, args.render_dpi) {
        (_, Some(dpi)) => RenderSize::Dpi(dpi),
        (Some(px), None) => RenderSize::LongSide(px),
        // With a model: the size its processor reads, decided where the
        // model is loaded (`quire run`, or each worker).
        (None, None) if s.model.is_some() => RenderSize::Model,
        (None, None) => RenderSize::LongSide(quire_core::DEFAULT_LONG_SIDE),
    };
    s.limits = Limits {
        max_file_bytes: (args.max_file_mb.max(0.0) * 1024.0 * 1024.0) as u64,
        max_pages: args.max_pages,
        max_pixels: args.max_pixels,
        max_archive_members: args.max_archive_members,
        max_zip_ratio: args.max_zip_ratio,
    };
    s.text_min_chars = args.text_min_chars;
    s.datasets = dataset_formats(args);
    s
}

/// `--dataset`, in the order given, without repeats; `none` (checked by
/// [`check_datasets`] to stand alone) gives none, no flag the task's default.
pub fn dataset_formats(args: &JobOpts) -> Vec<DatasetFormat> {
    if args.datasets.is_empty() {
        return match args.task {
            TaskArg::Caption => vec![DatasetFormat::Parquet],
            TaskArg::Ocr => Vec::new(),
        };
    }
    let mut out = Vec::new();
    for d in &args.datasets {
        let f = match d {
            DatasetArg::Parquet => DatasetFormat::Parquet,
            DatasetArg::Webdataset => DatasetFormat::Webdataset,
            DatasetArg::None => continue,
        };
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// `--dataset none` cannot be combined with a format.
pub fn check_datasets(args: &JobOpts) -> Result<(), String> {
    if args.datasets.contains(&DatasetArg::None) && args.datasets.iter().any(|d| *d != DatasetArg::None) {
        return Err("--dataset none cannot be combined with parquet or webdataset".into());
    }
    Ok(())
}

/// Inputs with their brace patterns (`shard-{000000..000999}.tar`) expanded, in order.
pub fn expand_inputs(inputs: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for i in inputs {
        out.extend(quire_store::inputs::expand_braces(i).map_err(|e| format!("input {e}"))?);
    }
    Ok(out)
}

fn run_inner(mut args: RunArgs) -> Result<u8, Failure> {
    args.inputs = expand_inputs(&args.inputs).map_err(Failure::Usage)?;
    check_s3_spelling(&args)?;
    for input in args.inputs.iter().filter(|i| !is_s3(i)) {
        if std::fs::metadata(input).is_err() {
            return Err(Failure::Usage(format!("input {input:?} does not exist or cannot be read")));
        }
    }
    check_job_name(&args.opts.job).map_err(Failure::Usage)?;
    check_name("--run", &args.runs.run).map_err(Failure::Usage)?;
    check_datasets(&args.opts).map_err(Failure::Usage)?;
    let settings = settings(&args.opts);
    if settings.engine == Engine::Vlm && settings.model.is_none() {
        return Err(Failure::Usage("--engine vlm needs --model (a checkpoint folder, hub id or s3:// prefix)".into()));
    }
    let pdf = crate::start_renderer().map_err(|e| Failure::Usage(e.message))?;
    let access = args.s3.access();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(anyhow::Error::from)?;
    let (model, model_long_side) = match settings.model.clone() {
        None => (None, None),
        Some(m) => {
            // An s3:// checkpoint is downloaded once into the model cache, as workers do.
            let local = if is_s3(&m) {
                let cache = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache/quire/models");
                rt.block_on(fetch_model(&m, &access, &cache))?.to_string_lossy().into_owned()
            } else {
                m.clone()
            };
            let (handle, long_side) = crate::model::load(&m, &local, &args.model_opts, None, None).map_err(|e| Failure::Usage(format!("{e:#}")))?;
            (Some(handle), long_side)
        }
    };
    let opts = RunOptions {
        inputs: args.inputs.clone(),
        out: args.out.clone(),
        access,
        download_cache_bytes: args.doc_cache_mb.saturating_mul(1 << 20),
        settings,
        workers: args.model_opts.workers as usize,
        force: args.force,
        run: args.runs.run.clone(),
        retry_failed: args.runs.retry_failed,
        prune: args.runs.prune,
        queue: QueueOptions { ack_wait: Duration::from_secs(600), max_deliver: args.opts.max_deliver },
        ctx: ProcessContext { pdf, model, model_long_side },
        price_per_hour: args.opts.price_per_hour,
    };
    let progress = Arc::new(Progress::default());
    let show = Shower::start(progress.clone(), args.quiet);
    let t0 = Instant::now();
    let result = rt.block_on(run_embedded(opts, progress.clone()));
    show.stop();
    let summary = result?;
    let m = &summary.manifest;
    let c = &m.counts;
    eprintln!("{}", run_line(&args.runs.run, &summary.run.counts, args.runs.prune));
    let secs = t0.elapsed().as_secs_f64();
    let done_now = c.tasks_done.saturating_sub(c.tasks_skipped);
    eprintln!(
        "{} documents, {} tasks ({} done now, {} already done and skipped{}), {} pages ok, {} failed, {:.1}s, {:.2} pages/s",
        c.documents,
        c.tasks,
        done_now,
        c.tasks_skipped,
        if c.tasks_dead_lettered > 0 { format!(", {} given up", c.tasks_dead_lettered) } else { String::new() },
        c.pages_ok,
        c.pages_failed,
        secs,
        m.throughput.pages_per_second,
    );
    for f in m.failures.iter().take(10) {
        eprintln!("  failed: {} page {}: {}: {}", f.source, f.page, f.kind.as_str(), f.message);
    }
    if m.failures.len() > 10 {
        eprintln!("  … and {} more (see the manifest)", m.failures.len() - 10);
    }
    eprintln!("manifest: {}", summary.manifest_path);
    eprintln!("run manifest: {}", summary.run_manifest_path);
    Ok(if c.pages_failed > 0 || c.tasks_dead_lettered > 0 { exit::SOME_FAILED } else { exit::OK })
}

/// What a closed run found, for `quire run` and `quire coordinator --wait` alike.
pub fn run_line(run: &str, r: &quire_core::ManifestCounts, prune: bool) -> String {
    let superseded = match r.files_superseded {
        0 => String::new(),
        n => format!(", {n} files {}", if prune { "deleted" } else { "moved to superseded/" }),
    };
    format!(
        "run {run}: {} objects ({} new, {} changed, {} unchanged, {} removed){superseded}",
        r.objects, r.objects_new, r.objects_changed, r.objects_unchanged, r.objects_removed
    )
}

/// A job name is a folder name and a subject token: no slashes.
pub fn check_job_name(job: &str) -> Result<(), String> {
    check_name("--job", job)
}

/// A job or run name is a folder name: no slashes, not `.` or `..`.
pub fn check_name(flag: &str, name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(format!("{flag} {name:?}: give a plain name (no slashes)"));
    }
    Ok(())
}

/// `s3://bucket/prefix` is the only way to name S3: a near miss (`S3://`, `s3:/`, `s3:bucket`)
/// is refused with a usage error instead of being taken for a local folder named `s3:`.
fn check_s3_spelling(args: &RunArgs) -> Result<(), Failure> {
    let near_miss = |s: &str| s.to_ascii_lowercase().starts_with("s3:") && !is_s3(s);
    if let Some(uri) = args.inputs.iter().map(String::as_str).chain([args.out.as_str()]).find(|s| near_miss(s)) {
        return Err(Failure::Usage(format!("{uri}: write S3 locations as s3://bucket/prefix")));
    }
    if args.out.starts_with("s3://") && args.out.trim_start_matches("s3://").split('/').next().is_none_or(str::is_empty) {
        return Err(Failure::Usage(format!("--out {}: name a bucket (s3://bucket/prefix)", args.out)));
    }
    Ok(())
}

/// A progress bar on a terminal, a log line every 10 s otherwise.
struct Shower {
    /// Dropped to stop the thread at once (it redraws every 200 ms otherwise).
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Shower {
    fn start(p: Arc<Progress>, quiet: bool) -> Shower {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let tty = std::io::stderr().is_terminal() && !quiet;
        let handle = std::thread::spawn(move || {
            let bar = ProgressBar::with_draw_target(Some(0), if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} pages  {per_sec}  ETA {eta}  {msg}")
                    .expect("valid template"),
            );
            let mut last_log = Instant::now();
            let t0 = Instant::now();
            let mut done = false;
            loop {
                let planned = Progress::get(&p.pages_planned).saturating_sub(Progress::get(&p.pages_skipped));
                let settled = Progress::get(&p.pages_ok) + Progress::get(&p.pages_failed);
                bar.set_length(planned);
                bar.set_position(settled);
                let failed = Progress::get(&p.pages_failed);
                let planning = if p.planning_done.load(Ordering::Relaxed) { "" } else { "planning… " };
                bar.set_message(format!("{planning}{failed} failed, {} skipped", Progress::get(&p.pages_skipped)));
                if !tty && !quiet && last_log.elapsed() >= Duration::from_secs(10) {
                    last_log = Instant::now();
                    let rate = settled as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                    tracing::info!("progress: {settled}/{planned} pages ({failed} failed), {rate:.2} pages/s");
                }
                if done {
                    bar.finish_and_clear();
                    return;
                }
                // One last redraw once stopped, without waiting out the period.
                done = matches!(stopped.recv_timeout(Duration::from_millis(200)), Err(std::sync::mpsc::RecvTimeoutError::Disconnected) | Ok(()));
            }
        });
        Shower { stop: Some(stop), handle: Some(handle) }
    }

    fn stop(mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
