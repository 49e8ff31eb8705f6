//! `quire coordinator`, `quire worker`, `quire status` and `quire check`: the
//! distributed mode over NATS JetStream, with results in S3 or a shared folder.

use crate::cli::{CheckArgs, CoordinatorArgs, StatusArgs, WorkerArgs};
use crate::exit;
use crate::run::{check_job_name, settings};
use anyhow::Context as _;
use quire_core::{Engine, TaskSpec};
use quire_pipeline::coordinator::{connect_queue, job_status, submit, wait_and_finish, CoordinatorOptions};
use quire_store::{is_s3, open_store};
use quire_pipeline::source::s3::fetch_model;
use quire_pipeline::metrics::{self, Metrics};
use quire_pipeline::stage::process::ProcessContext;
use quire_pipeline::worker::service::WorkerService;
use quire_pipeline::worker::Admit;
use quire_queue::progress::{JobMeta, JobProgress};
use quire_queue::runlease::{Holder, RunLeases};
use quire_queue::QueueOptions;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn coordinator(mut args: CoordinatorArgs) -> u8 {
    match crate::run::expand_inputs(&args.inputs) {
        Ok(i) => args.inputs = i,
        Err(m) => {
            eprintln!("error: {m}");
            return exit::USAGE;
        }
    }
    if let Err(m) = check_job_name(&args.opts.job)
        .and_then(|_| crate::run::check_name("--run", &args.runs.run))
        .and_then(|_| crate::run::check_datasets(&args.opts))
    {
        eprintln!("error: {m}");
        return exit::USAGE;
    }
    for input in args.inputs.iter().filter(|i| !is_s3(i)) {
        if std::fs::metadata(input).is_err() {
            eprintln!("error: input {input:?} does not exist or cannot be read");
            return exit::USAGE;
        }
    }
    let mut s = settings(&args.opts);
    if s.engine == Engine::Vlm && s.model.is_none() {
        eprintln!(
            "error: --engine vlm needs --model (a checkpoint folder, hub id or s3:// prefix)"
        );
        return exit::USAGE;
    }
    s.out = Some(args.out.clone());
    let o = CoordinatorOptions {
        inputs: args.inputs.clone(),
        settings: s,
        access: args.services.s3.access(),
        force: args.force,
        price_per_hour: args.opts.price_per_hour,
        run: args.runs.run.clone(),
        retry_failed: args.runs.retry_failed,
        prune: args.runs.prune,
        run_metrics: args.metrics_addr.as_ref().map(|_| Arc::new(metrics::RunMetrics::new())),
    };
    let queue_opts = QueueOptions {
        ack_wait: Duration::from_secs(args.ack_wait_s),
        max_deliver: args.opts.max_deliver,
    };
    let started_at = SystemTime::now();
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let t0 = Instant::now();
            let queue = connect_queue(
                &args.services.nats,
                args.services.nats_auth.auth(),
                queue_opts,
                true,
                args.services.nats_auth.replicas(),
            )
            .await?;
            let store = open_store(&args.out, &o.access).await?;
            tracing::debug!("connected to the queue and the output in {:.3}s", t0.elapsed().as_secs_f64());
            let _metrics_server = match (&args.metrics_addr, &o.run_metrics) {
                (Some(addr), Some(m)) => Some(
                    metrics::serve(addr, m.clone() as Arc<dyn metrics::Exporter>).await.with_context(|| format!("--metrics-addr {addr}"))?,
                ),
                _ => None,
            };
            // One coordinator per job at a time: a second one (a retried Pod, a Job created
            // by hand the same night) waits for the first, then joins its run.
            let leases = RunLeases::open(queue.client(), args.services.nats_auth.replicas(), Duration::from_secs(args.run_lease_s)).await?;
            let me = Holder::here(&o.settings.job, &o.run, humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
            let mut last_said = None::<Instant>;
            let lease = leases
                .acquire(&me, |h| {
                    if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        last_said = Some(Instant::now());
                        match h {
                            Some(h) => eprintln!("job {}: {h} is running; waiting for it to end", o.settings.job),
                            None => eprintln!("job {}: another coordinator is running; waiting for it to end", o.settings.job),
                        }
                    }
                })
                .await?;
            // Followed from before the first publish, so no event is missed.
            let events = if args.wait { Some(queue.task_events(&o.settings.job).await?) } else { None };
            // Registered before the first publish: workers take a task only when its job is
            // registered and the task's input and output lie where the job's do.
            let jobs = JobProgress::open(queue.client(), queue.options().replicas).await?;
            let mut meta = JobMeta { settings: o.settings.clone(), documents: 0, planning_done: false, inputs: o.inputs.clone() };
            jobs.put_meta(&o.settings.job, &meta).await?;
            let t0 = Instant::now();
            let (sub, plan) = submit(&o, &queue, store.as_ref()).await?;
            tracing::debug!("listed and published in {:.3}s", t0.elapsed().as_secs_f64());
            // The job's settings (output location included) in the quire-jobs
            // KV bucket, so `quire status JOB --nats URL` finds the output.
            (meta.documents, meta.planning_done) = (sub.documents, true);
            jobs.put_meta(&o.settings.job, &meta).await?;
            println!("{}", serde_json::to_string(&sub)?);
            eprintln!(
                "job {} run {}: {} objects ({} new, {} changed, {} unchanged): {} tasks published, {} already done, {} already queued{}; planned in {:.3}s{}",
                o.settings.job,
                o.run,
                sub.documents,
                sub.objects_new,
                sub.objects_changed,
                sub.objects_unchanged,
                sub.published,
                sub.skipped,
                sub.duplicates,
                if sub.warnings.is_empty() { String::new() } else { format!(", {} listing warnings", sub.warnings.len()) },
                sub.planning_seconds,
                if sub.by_manifest { " (finished work known from the job manifest)" } else { "" },
            );
            if !args.wait {
                lease.release().await?;
                return Ok(exit::OK);
            }
            if let Some(m) = &o.run_metrics {
                m.waiting.set(1);
            }
            let closed =
                wait_and_finish(&o, &queue, store.as_ref(), &sub, plan, started_at, Duration::from_millis(args.poll_ms), events)
                    .await?;
            if let Some(m) = &o.run_metrics {
                m.waiting.set(0);
            }
            if lease.lost() {
                anyhow::bail!("the job's run lease was lost while this coordinator waited (its renewals failed); another coordinator may have run it too: check {}", store.locate(&closed.run_manifest_key));
            }
            lease.release().await?;
            eprintln!("{}", crate::run::run_line(&o.run, &closed.run.counts, o.prune));
            let m = &closed.job;
            let c = &m.counts;
            eprintln!(
                "{} documents, {} tasks ({} done, {} given up), {} pages ok, {} failed, {:.1}s",
                c.documents, c.tasks, c.tasks_done, c.tasks_dead_lettered, c.pages_ok, c.pages_failed, m.throughput.wall_seconds
            );
            for f in m.failures.iter().take(10) {
                eprintln!("  failed: {} page {}: {}: {}", f.source, f.page, f.kind.as_str(), f.message);
            }
            for d in m.dead_lettered.iter().take(10) {
                eprintln!("  given up: {} pages {}-{} after {} deliveries: {}", d.source, d.first, d.last, d.deliveries, d.reason);
            }
            eprintln!("run manifest: {}", store.locate(&closed.run_manifest_key));
            eprintln!("manifest: {}", store.locate(&quire_core::manifest_key(&o.settings.job)));
            Ok(if c.pages_failed > 0 || c.tasks_dead_lettered > 0 { exit::SOME_FAILED } else { exit::OK })
        })
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::INTERNAL
        }
    }
}

pub fn worker(args: WorkerArgs) -> u8 {
    match worker_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::INTERNAL
        }
    }
}

fn worker_inner(args: WorkerArgs) -> anyhow::Result<u8> {
    let rt = runtime()?;
    let access = args.services.s3.access();
    let metrics = Arc::new(Metrics::new());
    metrics.set_stall_after(Duration::from_secs(args.stall_s));
    let _server = match &args.metrics_addr {
        Some(addr) => Some(
            rt.block_on(metrics::serve(addr, metrics.clone() as Arc<dyn metrics::Exporter>))
                .with_context(|| format!("--metrics-addr {addr}"))?,
        ),
        None => None,
    };
    let pdf = match crate::start_renderer() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}", e.message);
            return Ok(exit::USAGE);
        }
    };
    let model = match &args.model {
        None => None,
        Some(m) => {
            let t0 = Instant::now();
            let local = if is_s3(m) {
                let cache = args.model_cache.clone().unwrap_or_else(|| {
                    std::env::var_os("HOME")
                        .map(std::path::PathBuf::from)
                        .unwrap_or_else(std::env::temp_dir)
                        .join(".cache/quire/models")
                });
                rt.block_on(fetch_model(m, &access, &cache))?
                    .to_string_lossy()
                    .into_owned()
            } else {
                m.clone()
            };
            let m2 = metrics.clone();
            let observe: quire_pipeline::stage::infer::BatchObserver = Box::new(move |n| m2.batch_size.observe(n as f64));
            let m3 = metrics.clone();
            let engine: quire_pipeline::stage::infer::EngineObserver = Box::new(move |s| {
                m3.progressed();
                m3.sequences_in_flight.set(s.in_flight as i64);
                m3.sequences_waiting.set(s.waiting as i64);
                m3.kv_cache_used_bytes.set(s.kv_used_bytes as i64);
                m3.kv_cache_budget_bytes.set(s.kv_budget_bytes as i64);
            });
            match crate::model::load(m, &local, &args.model_opts, Some(observe), Some(engine)) {
                Ok((handle, long_side)) => {
                    metrics.model_load_seconds.set(t0.elapsed().as_secs_f64());
                    Some((handle, long_side))
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Ok(exit::USAGE);
                }
            }
        }
    };
    let mine = args.model.clone();
    let admit: Admit = Arc::new(move |t: &TaskSpec| {
        if t.settings.engine == Engine::TextLayer {
            return Ok(());
        }
        match (&t.settings.model, &mine) {
            (Some(want), Some(have)) if want != have => Err(format!(
                "the task needs model {want}; this worker runs {have}"
            )),
            (Some(want), None) => Err(format!(
                "the task needs model {want}; this worker has none (--model)"
            )),
            _ => Ok(()),
        }
    });
    let queue_opts = QueueOptions {
        ack_wait: Duration::from_secs(args.ack_wait_s),
        max_deliver: args.max_deliver,
    };
    let grace = Duration::from_secs(args.grace_s);
    rt.block_on(async move {
        let queue = connect_queue(
            &args.services.nats,
            args.services.nats_auth.auth(),
            queue_opts,
            false,
            args.services.nats_auth.replicas(),
        )
        .await?;
        // The lease time in force is the consumer's (set by the coordinator).
        let ack_wait = queue.options().queue.ack_wait;
        if ack_wait != queue_opts.ack_wait {
            tracing::info!("the queue's ack wait is {ack_wait:?} (set by the coordinator); heartbeats follow it");
        }
        let (model, model_long_side) = match model {
            Some((h, l)) => (Some(h), l),
            None => (None, None),
        };
        let service = WorkerService {
            queue,
            access,
            doc_cache_bytes: args.doc_cache_mb.saturating_mul(1 << 20),
            ctx: ProcessContext { pdf, model, model_long_side },
            admit,
            metrics,
            slots: args.model_opts.workers as usize,
            grace,
        };
        tracing::info!("worker ready: {} task slots, model {}", args.model_opts.workers, args.model.as_deref().unwrap_or("none"));
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = sigterm.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        };
        service.run(stop).await?;
        Ok(exit::OK)
    })
}

/// Where `quire check` writes its probe, below the output folder or prefix.
const CHECK_KEY: &str = ".quire-check";

/// `quire check`: NATS with JetStream (the job registry opens) and the output store (a small
/// object is written and read back), each given `--timeout-s` to answer.
pub fn check(args: CheckArgs) -> u8 {
    let limit = Duration::from_secs(args.timeout_s.max(1));
    let mut access = args.services.s3.access();
    access.retry.budget = access.retry.budget.min(limit);
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let nats = &args.services.nats;
            let reach_queue = async {
                let opts = QueueOptions { ack_wait: Duration::from_secs(300), max_deliver: 3 };
                let queue = connect_queue(nats, args.services.nats_auth.auth(), opts, false, args.services.nats_auth.replicas()).await?;
                JobProgress::open(queue.client(), queue.options().replicas).await.context("opening the job registry on JetStream")?;
                anyhow::Ok(())
            };
            tokio::time::timeout(limit, reach_queue)
                .await
                .map_err(|_| anyhow::anyhow!("NATS at {nats} did not answer within {}s", limit.as_secs()))??;
            println!("queue ok: NATS JetStream at {nats}");
            let reach_store = async {
                let store = open_store(&args.out, &access).await?;
                let probe = format!("quire check {:?}", SystemTime::now());
                let at = store.locate(CHECK_KEY);
                store.put(CHECK_KEY, probe.clone().into_bytes()).await.with_context(|| format!("writing {at}"))?;
                let back = store.get(CHECK_KEY).await.with_context(|| format!("reading {at} back"))?;
                anyhow::ensure!(back.as_deref() == Some(probe.as_bytes()), "{at} read back differs from what was written");
                anyhow::Ok(at)
            };
            let at = tokio::time::timeout(limit + Duration::from_secs(5), reach_store)
                .await
                .map_err(|_| anyhow::anyhow!("the output store {} did not answer within {}s", args.out, limit.as_secs()))??;
            println!("store ok: wrote and read back {at}");
            anyhow::Ok(())
        })
    });
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::USAGE
        }
    }
}

pub fn status(args: StatusArgs) -> u8 {
    let mut access = args.s3.access();
    // Status is a quick look: an unreachable store or queue is reported, not waited out.
    access.retry.budget = access.retry.budget.min(Duration::from_secs(5));
    let mut auth = args.nats_auth.auth();
    auth.connect_wait = auth.connect_wait.min(Duration::from_secs(5));
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let queue = match &args.nats {
                Some(url) => Some(
                    connect_queue(
                        url,
                        auth.clone(),
                        QueueOptions {
                            ack_wait: Duration::from_secs(300),
                            max_deliver: 3,
                        },
                        false,
                        args.nats_auth.replicas(),
                    )
                    .await?,
                ),
                None => None,
            };
            let out = match (&args.out, &queue) {
                (Some(out), _) => out.clone(),
                (None, Some(q)) => {
                    let meta = JobProgress::open(q.client(), q.options().replicas)
                        .await?
                        .meta(&args.job)
                        .await?;
                    match meta.and_then(|m| m.settings.out) {
                        Some(out) => out,
                        None => return Ok(None),
                    }
                }
                (None, None) => anyhow::bail!("give --out URI or --nats URL"),
            };
            let looked = async {
                let store = open_store(&out, &access).await?;
                job_status(store.as_ref(), &args.job, queue.as_ref(), true).await
            };
            match looked.await {
                Ok(st) => Ok(st),
                // The output store is down: say so, with what the queue still knows.
                Err(e) if e.chain().any(|c| c.downcast_ref::<quire_store::StoreError>().is_some_and(|s| s.is_transient())) => {
                    let mut st = quire_pipeline::coordinator::JobStatus { job: args.job.clone(), ..Default::default() };
                    st.store_error = Some(format!("{e:#}"));
                    if let Some(q) = &queue {
                        st.queued = q.pending(&args.job).await.ok();
                        st.dead_lettered = q.dead_letters(&args.job).await.map(|d| d.len() as u64).unwrap_or(0);
                    }
                    Ok(Some(st))
                }
                Err(e) => Err(e),
            }
        })
    });
    match result {
        Ok(None) => {
            eprintln!(
                "error: no job {:?} {} (no plan of `quire coordinator` and no manifest.json of a finished run there)",
                args.job,
                args.out
                    .as_deref()
                    .map(|o| format!("under {o}"))
                    .unwrap_or_else(|| "known to the queue".into())
            );
            exit::USAGE
        }
        Ok(Some(st)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st).expect("status serialises")
                );
            } else if let Some(err) = &st.store_error {
                println!("job {}", st.job);
                println!("  store     unreachable, counts unknown: {err}");
                if let Some(q) = st.queued {
                    println!("  queue     {q} tasks in the work stream, {} dead-lettered", st.dead_lettered);
                }
            } else {
                println!("job {}", st.job);
                if let Some(n) = st.objects {
                    println!("  objects   {n} input objects as of the last finished run");
                }
                println!(
                    "  documents {} ({} not opened by a worker yet)",
                    st.documents, st.unopened
                );
                println!(
                    "  tasks     {} known, {} done, {} dead-lettered, {} pending",
                    st.tasks, st.done, st.dead_lettered, st.pending
                );
                if let Some(q) = st.queued {
                    println!("  queue     {q} tasks in the work stream");
                }
                println!("  pages     {} ok, {} failed", st.pages_ok, st.pages_failed);
                println!(
                    "  rate      {:.2} pages/s over {:.0}s",
                    st.pages_per_second, st.elapsed_seconds
                );
                match st.eta_seconds {
                    _ if st.finished => {
                        println!("  finished  every task has results or was given up")
                    }
                    Some(e) => println!("  eta       {e:.0}s"),
                    None => println!("  eta       unknown"),
                }
                if !st.runs.is_empty() {
                    println!("  runs      {} (the last 10, newest last):", st.runs.len());
                    for r in st.runs.iter().rev().take(10).rev() {
                        let c = &r.counts;
                        println!(
                            "    {:<20} {}  objects {} new, {} changed, {} unchanged, {} removed; tasks {} done, {} skipped, {} given up; pages {} ok, {} failed",
                            r.run, r.finished_at, c.objects_new, c.objects_changed, c.objects_unchanged, c.objects_removed,
                            c.tasks_done, c.tasks_skipped, c.tasks_dead_lettered, c.pages_ok, c.pages_failed
                        );
                    }
                }
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::INTERNAL
        }
    }
}
