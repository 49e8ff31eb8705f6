//! Prometheus metrics of a worker, and a tiny HTTP server for `/metrics`,
//! `/healthz` and `/readyz`.

use crate::worker::observe::TaskEnd;
use crate::worker::observe::TaskObserver;
use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use quire_core::{Record, TaskSpec, UnitKind};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Metrics {
    pub registry: Registry,
    /// Tasks by how they ended: stored, retried, refused, interrupted.
    pub tasks: IntCounterVec,
    /// Records by unit kind (page, image) and result (ok, failed).
    pub units: IntCounterVec,
    pub tokens_in: IntCounter,
    pub tokens_out: IntCounter,
    /// Seconds per task stage: fetch, process, upload.
    pub stage_seconds: HistogramVec,
    /// Per page: render and inference milliseconds as the records report them, in seconds.
    pub render_seconds: Histogram,
    pub infer_seconds: Histogram,
    /// Requests per model forward batch (pages and images that shared one `generate`).
    pub batch_size: Histogram,
    /// Continuous batching: sequences decoding, requests waiting for room, KV cache.
    pub sequences_in_flight: IntGauge,
    /// The model's busy time attributed to the pages (`timings_ms.device`), in seconds.
    pub device_seconds: Counter,
    pub sequences_waiting: IntGauge,
    pub kv_cache_used_bytes: IntGauge,
    pub kv_cache_budget_bytes: IntGauge,
    /// Error records and task failures by kind.
    pub errors: IntCounterVec,
    pub in_flight: IntGauge,
    /// Tasks in the work stream, per job this worker has seen.
    pub queue_pending: IntGaugeVec,
    pub model_load_seconds: Gauge,
    /// 1 once connected to the queue, 0 while starting or stopping.
    pub ready: IntGauge,
    /// Tasks that failed on their last allowed delivery (`max_deliver`), so
    /// that the queue dead-letters them.
    pub tasks_given_up: IntCounter,
    /// Input taken from the store, by how: `download` (whole objects) or `ranged` (archives
    /// read by ranged requests, and the first bytes read to tell an archive).
    pub input_bytes: IntCounterVec,
    pub input_requests: IntCounterVec,
    /// Pages and images whose output looped and was stopped (`--on-loop`; a page whose retry
    /// did not loop counts too), and the `max_new_tokens` budget those stops did not spend.
    pub loops: IntCounter,
    pub loop_tokens_saved: IntCounter,
    /// The queue's `max_deliver` in force (0 while unknown); see [`Metrics::set_max_deliver`].
    max_deliver: AtomicU32,
    /// Unix milliseconds of the last sign of progress (a task started or ended, a stage done,
    /// input fetched, a model step): see [`Metrics::stalled`].
    last_progress_ms: AtomicU64,
    /// `/healthz` fails when tasks are running and nothing progressed for this long (0: never).
    stall_after_ms: AtomicU64,
    jobs: Mutex<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.005, 2.5, 14).expect("valid buckets")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("quire".into()), None).expect("registry");
        let tasks =
            IntCounterVec::new(Opts::new("tasks_total", "Tasks by outcome"), &["outcome"]).unwrap();
        let units = IntCounterVec::new(
            Opts::new("records_total", "Page and image records by kind and result"),
            &["kind", "result"],
        )
        .unwrap();
        let tokens_in =
            IntCounter::new("tokens_in_total", "Prompt tokens including image tokens").unwrap();
        let tokens_out = IntCounter::new("tokens_out_total", "Generated tokens").unwrap();
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new("task_stage_seconds", "Seconds per task stage").buckets(buckets()),
            &["stage"],
        )
        .unwrap();
        let render_seconds = Histogram::with_opts(
            HistogramOpts::new("render_seconds", "Render seconds per page").buckets(buckets()),
        )
        .unwrap();
        let infer_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "inference_seconds",
                "Inference seconds of the batch a page was in",
            )
            .buckets(buckets()),
        )
        .unwrap();
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Pages and images per model batch (per decode step under continuous batching)")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
        )
        .unwrap();
        let device_seconds = Counter::new("device_seconds_total", "The model's busy time for the pages, in seconds").unwrap();
        let sequences_in_flight =
            IntGauge::new("sequences_in_flight", "Sequences decoding in the continuous-batching engine").unwrap();
        let sequences_waiting =
            IntGauge::new("sequences_waiting", "Pages and images waiting for room in the engine").unwrap();
        let kv_cache_used_bytes =
            IntGauge::new("kv_cache_used_bytes", "KV-cache bytes reserved by the sequences in flight").unwrap();
        let kv_cache_budget_bytes =
            IntGauge::new("kv_cache_budget_bytes", "KV-cache budget of the engine in bytes").unwrap();
        let errors = IntCounterVec::new(
            Opts::new("errors_total", "Error records and task failures by kind"),
            &["kind"],
        )
        .unwrap();
        let in_flight = IntGauge::new("tasks_in_flight", "Tasks being worked on").unwrap();
        let queue_pending = IntGaugeVec::new(
            Opts::new("queue_pending_tasks", "Tasks in the work stream"),
            &["job"],
        )
        .unwrap();
        let model_load_seconds =
            Gauge::new("model_load_seconds", "Seconds it took to load the model").unwrap();
        let ready = IntGauge::new("ready", "1 when the worker takes tasks").unwrap();
        let tasks_given_up = IntCounter::new(
            "tasks_given_up_total",
            "Tasks that failed on their last allowed delivery and go to the dead letters",
        )
        .unwrap();
        let input_bytes = IntCounterVec::new(
            Opts::new("input_fetched_bytes_total", "Bytes of input objects fetched from the store, by how: download or ranged"),
            &["how"],
        )
        .unwrap();
        let input_requests = IntCounterVec::new(
            Opts::new("input_requests_total", "Requests for input objects (a download counts one), by how: download or ranged"),
            &["how"],
        )
        .unwrap();
        let loops = IntCounter::new("loops_total", "Pages and images whose output looped and was stopped").unwrap();
        let loop_tokens_saved = IntCounter::new(
            "loop_tokens_saved_total",
            "Generation budget (max new tokens) not spent because looping outputs were stopped",
        )
        .unwrap();
        for c in [
            Box::new(tasks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(loops.clone()),
            Box::new(loop_tokens_saved.clone()),
            Box::new(units.clone()),
            Box::new(tokens_in.clone()),
            Box::new(tokens_out.clone()),
            Box::new(stage_seconds.clone()),
            Box::new(render_seconds.clone()),
            Box::new(infer_seconds.clone()),
            Box::new(batch_size.clone()),
            Box::new(sequences_in_flight.clone()),
            Box::new(device_seconds.clone()),
            Box::new(sequences_waiting.clone()),
            Box::new(kv_cache_used_bytes.clone()),
            Box::new(kv_cache_budget_bytes.clone()),
            Box::new(errors.clone()),
            Box::new(in_flight.clone()),
            Box::new(queue_pending.clone()),
            Box::new(model_load_seconds.clone()),
            Box::new(ready.clone()),
            Box::new(tasks_given_up.clone()),
            Box::new(input_bytes.clone()),
            Box::new(input_requests.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            tasks,
            units,
            tokens_in,
            tokens_out,
            stage_seconds,
            render_seconds,
            infer_seconds,
            batch_size,
            sequences_in_flight,
            device_seconds,
            sequences_waiting,
            kv_cache_used_bytes,
            kv_cache_budget_bytes,
            errors,
            in_flight,
            queue_pending,
            model_load_seconds,
            ready,
            tasks_given_up,
            input_bytes,
            input_requests,
            loops,
            loop_tokens_saved,
            max_deliver: AtomicU32::new(0),
            last_progress_ms: AtomicU64::new(unix_ms()),
            stall_after_ms: AtomicU64::new(0),
            jobs: Mutex::new(HashSet::new()),
        }
    }

    /// The deliveries a task gets before the queue gives it up (the rule in
    /// force on the queue), so that a failure on the last one is counted in
    /// `quire_tasks_given_up_total`.
    pub fn set_max_deliver(&self, n: u32) {
        self.max_deliver.store(n, Ordering::Relaxed);
    }

    /// Jobs this worker has had tasks of.
    pub fn jobs(&self) -> Vec<String> {
        self.jobs.lock().unwrap().iter().cloned().collect()
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("metrics encode");
        out
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Metrics {
    /// A sign that the worker is getting on with its tasks (a model step, a stage done).
    pub fn progressed(&self) {
        self.last_progress_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Makes `/healthz` fail once tasks have run this long without progress (zero: never), so
    /// that a worker whose model or renderer hangs is restarted and its tasks go to others.
    pub fn set_stall_after(&self, d: Duration) {
        self.stall_after_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Why the worker counts as stalled: tasks are running and nothing progressed within the
    /// stall time. An idle worker is never stalled.
    pub fn stalled(&self) -> Option<String> {
        let after = self.stall_after_ms.load(Ordering::Relaxed);
        let running = self.in_flight.get();
        let quiet = unix_ms().saturating_sub(self.last_progress_ms.load(Ordering::Relaxed));
        (after > 0 && running > 0 && quiet > after)
            .then(|| format!("stalled: {running} tasks running and no progress for {}s", quiet / 1000))
    }
}

#[async_trait::async_trait]
impl TaskObserver for Metrics {
    async fn started(&self, task: &TaskSpec) {
        self.progressed();
        self.in_flight.inc();
        self.jobs.lock().unwrap().insert(task.settings.job.clone());
    }

    async fn ended(
        &self,
        task: &TaskSpec,
        end: TaskEnd,
        records: &[Record],
        _elapsed: Duration,
        delivery: u32,
    ) {
        self.progressed();
        let outcome = match end {
            TaskEnd::Stored => "stored",
            TaskEnd::Retried => "retried",
            TaskEnd::Refused => "refused",
            TaskEnd::Interrupted => "interrupted",
            TaskEnd::Split => "split",
            TaskEnd::Rejected => "rejected",
        };
        self.tasks.with_label_values(&[outcome]).inc();
        if end != TaskEnd::Refused && end != TaskEnd::Rejected {
            self.in_flight.dec();
        }
        if end == TaskEnd::Retried {
            self.errors.with_label_values(&["task_retry"]).inc();
            let max = self.max_deliver.load(Ordering::Relaxed);
            if max > 0 && delivery >= max {
                self.tasks_given_up.inc();
            }
        }
        let kind = if matches!(task.unit, UnitKind::Image | UnitKind::Images | UnitKind::Archive) {
            "image"
        } else {
            "page"
        };
        for r in records {
            if let Some(l) = &r.loop_info {
                self.loops.inc();
                self.loop_tokens_saved.inc_by(l.tokens_saved);
            }
            match &r.error {
                None => self.units.with_label_values(&[kind, "ok"]).inc(),
                Some(_) if r.looped() => self.units.with_label_values(&[kind, "looped"]).inc(),
                Some(e) => {
                    self.units.with_label_values(&[kind, "failed"]).inc();
                    self.errors.with_label_values(&[e.kind.as_str()]).inc();
                }
            }
            self.tokens_in.inc_by(r.tokens_in);
            self.tokens_out.inc_by(r.tokens_out);
            self.render_seconds.observe(r.timings_ms.render / 1000.0);
            if r.timings_ms.infer > 0.0 {
                self.infer_seconds.observe(r.timings_ms.infer / 1000.0);
            }
            self.device_seconds.inc_by(r.timings_ms.device / 1000.0);
        }
    }

    fn stage(&self, stage: &'static str, seconds: f64) {
        self.progressed();
        self.stage_seconds
            .with_label_values(&[stage])
            .observe(seconds);
    }

    fn fetched(&self, how: &'static str, requests: u64, bytes: u64) {
        self.progressed();
        self.input_requests.with_label_values(&[how]).inc_by(requests);
        self.input_bytes.with_label_values(&[how]).inc_by(bytes);
    }
}

/// Serves `GET /metrics`, `/healthz` (200 unless [`Metrics::stalled`]) and `/readyz` (200 when
/// `ready` is 1) on `addr` until the returned task is dropped or aborted.
/// What the HTTP endpoint serves: the worker's [`Metrics`] or the coordinator's [`RunMetrics`].
pub trait Exporter: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn render(&self) -> Vec<u8>;
    /// Why `/healthz` fails, if it does.
    fn stalled(&self) -> Option<String> {
        None
    }
    /// Whether `/readyz` answers 200.
    fn ready(&self) -> bool {
        true
    }
}

impl Exporter for Metrics {
    fn render(&self) -> Vec<u8> {
        Metrics::render(self)
    }
    fn stalled(&self) -> Option<String> {
        Metrics::stalled(self)
    }
    fn ready(&self) -> bool {
        self.ready.get() == 1
    }
}

/// A waiting coordinator's view of its run, for alerts that see a stuck night (tasks queued
/// and nobody working on them: GPU Pods unschedulable, an image that crash-loops, a scaler
/// that cannot read the queue), which the workers' own metrics cannot show when no worker
/// runs.
pub struct RunMetrics {
    registry: Registry,
    /// Tasks of the run by state: `open` (queued, running or not yet published by a worker's
    /// split), `done` (results stored), `dead` (given up on).
    pub tasks: IntGaugeVec,
    /// Objects the run listed, by what it found: `new`, `changed`, `unchanged`.
    pub objects: IntGaugeVec,
    /// Tasks of the job still in the work stream.
    pub queue_pending: IntGauge,
    /// Unix seconds: when the run started, and when its count of settled tasks last grew.
    pub started: Gauge,
    pub last_progress: Gauge,
    /// 1 while the coordinator waits for its run (0 once it is closed).
    pub waiting: IntGauge,
    settled: AtomicU64,
}

impl Default for RunMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RunMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("quire".into()), None).expect("registry");
        let tasks = IntGaugeVec::new(Opts::new("run_tasks", "Tasks of the coordinator's run by state"), &["state"]).unwrap();
        let objects = IntGaugeVec::new(Opts::new("run_objects", "Objects the run listed, by change"), &["change"]).unwrap();
        let queue_pending = IntGauge::new("run_queue_pending", "Tasks of the run's job in the work stream").unwrap();
        let started = Gauge::new("run_started_timestamp_seconds", "When the coordinator's run started").unwrap();
        let last_progress =
            Gauge::new("run_last_progress_timestamp_seconds", "When the run's count of settled tasks last grew").unwrap();
        let waiting = IntGauge::new("run_waiting", "1 while the coordinator waits for its run to settle").unwrap();
        for c in [Box::new(tasks.clone()) as Box<dyn prometheus::core::Collector>, Box::new(objects.clone()), Box::new(queue_pending.clone()), Box::new(started.clone()), Box::new(last_progress.clone()), Box::new(waiting.clone())] {
            registry.register(c).expect("register");
        }
        let now = unix_ms() as f64 / 1e3;
        started.set(now);
        last_progress.set(now);
        RunMetrics { registry, tasks, objects, queue_pending, started, last_progress, waiting, settled: AtomicU64::new(0) }
    }

    /// One look at the run: its tasks by state and the queue's depth.
    pub fn looked(&self, open: u64, done: u64, dead: u64, pending: u64) {
        self.tasks.with_label_values(&["open"]).set(open as i64);
        self.tasks.with_label_values(&["done"]).set(done as i64);
        self.tasks.with_label_values(&["dead"]).set(dead as i64);
        self.queue_pending.set(pending as i64);
        if self.settled.fetch_max(done + dead, Ordering::Relaxed) < done + dead {
            self.last_progress.set(unix_ms() as f64 / 1e3);
        }
    }
}

impl Exporter for RunMetrics {
    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("metrics encode");
        out
    }
}

pub async fn serve(
    addr: &str,
    metrics: Arc<dyn Exporter>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                // Read the request head (we need only its first line).
                while n < buf.len() {
                    match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf[n..]))
                        .await
                    {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                        Ok(Ok(k)) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                                || buf[..n].contains(&b'\n')
                            {
                                break;
                            }
                        }
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let mut parts = head.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, ctype, body): (&str, &str, Vec<u8>) = match (method, path) {
                    ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", m.render()),
                    ("GET", "/healthz") => match m.stalled() {
                        None => ("200 OK", "text/plain", b"ok\n".to_vec()),
                        Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n").into_bytes()),
                    },
                    ("GET", "/readyz") if m.ready() => {
                        ("200 OK", "text/plain", b"ready\n".to_vec())
                    }
                    ("GET", "/readyz") => (
                        "503 Service Unavailable",
                        "text/plain",
                        b"not ready\n".to_vec(),
                    ),
                    ("GET", _) => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
                    _ => (
                        "405 Method Not Allowed",
                        "text/plain",
                        b"GET only\n".to_vec(),
                    ),
                };
                let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((local, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let m = Arc::new(Metrics::new());
        m.tokens_out.inc_by(7);
        let (addr, _h) = serve("127.0.0.1:0", m.clone() as Arc<dyn Exporter>).await.unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let body = get("/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("quire_tokens_out_total 7"), "{body}");
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        // A running task with no progress for longer than the stall time fails the check; an
        // idle worker never does, and progress brings it back.
        m.set_stall_after(Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"), "idle is healthy");
        m.in_flight.inc();
        let stalled = get("/healthz").await;
        assert!(stalled.starts_with("HTTP/1.1 503") && stalled.contains("1 tasks running"), "{stalled}");
        m.progressed();
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        m.in_flight.dec();
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        m.ready.set(1);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn the_run_s_progress_time_moves_only_when_more_tasks_settle() {
        let m = Arc::new(RunMetrics::new());
        m.last_progress.set(1.0);
        m.looked(5, 0, 0, 5);
        assert_eq!(m.last_progress.get(), 1.0, "nothing settled yet");
        m.looked(3, 2, 0, 3);
        let t = m.last_progress.get();
        assert!(t > 1.0);
        m.last_progress.set(2.0);
        m.looked(3, 2, 0, 3);
        assert_eq!(m.last_progress.get(), 2.0, "the same count again is no progress");
        m.looked(2, 2, 1, 2);
        assert!(m.last_progress.get() > 2.0, "a dead letter settles a task too");
        let (addr, _h) = serve("127.0.0.1:0", m.clone() as Arc<dyn Exporter>).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("quire_run_tasks{state=\"open\"} 2") && out.contains("quire_run_queue_pending 2"), "{out}");
    }

    #[tokio::test]
    async fn a_failure_on_the_last_delivery_counts_as_given_up() {
        let m = Metrics::new();
        let src = quire_core::SourceRef {
            uri: "a.pdf".into(),
            rel: "a.pdf".into(),
            size: 1,
            version: "1".into(),
        };
        let task = crate::stage::split::document_task(&quire_core::JobSettings::new("j"), "f", &src);
        m.set_max_deliver(3);
        m.ended(&task, TaskEnd::Retried, &[], Duration::ZERO, 2).await;
        assert_eq!(m.tasks_given_up.get(), 0);
        m.ended(&task, TaskEnd::Retried, &[], Duration::ZERO, 3).await;
        assert_eq!(m.tasks_given_up.get(), 1);
        // Handed back on the last delivery by a shutdown is not a failure of the task.
        m.ended(&task, TaskEnd::Interrupted, &[], Duration::ZERO, 3).await;
        assert_eq!(m.tasks_given_up.get(), 1);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("quire_tasks_given_up_total 1"), "{text}");
        assert!(text.contains("quire_tasks_total{outcome=\"retried\"} 2"), "{text}");
    }
}
