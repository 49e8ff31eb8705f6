//! One model per process, fed through a channel so that pages from
//! different tasks share forward passes.
//!
//! [`InferenceHandle::submit`] is called by every task in flight; a
//! dedicated thread takes the first waiting request, gathers more for up to
//! `linger` (or until `max_batch`), runs them as one batch and answers each
//! caller. The model never blocks the async runtime.

use quire_core::{FinishReason, TaskKind};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub struct GenRequest {
    /// RGB pixels, transparency composited on white.
    pub image: image::RgbImage,
    /// The same pixels with their alpha, when the source had an alpha channel: the model's
    /// own processor then flattens it (Idefics2's drops the alpha, Idefics3's composites).
    pub alpha: Option<image::RgbaImage>,
    pub prompt: String,
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct GenOutput {
    pub text: String,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub finish: FinishReason,
    /// The request's share of the model's busy time (see `quire_vlm::Generation::device_ms`).
    pub device_ms: f64,
    /// Set when the output looped (see `--on-loop`).
    pub loop_info: Option<quire_core::LoopInfo>,
}

/// A vision-language model as the pipeline sees it.
pub trait Generator: Send {
    /// The model reference written into records.
    fn model_name(&self) -> String;
    /// The prompt used when the user gives none.
    fn default_prompt(&self, task: TaskKind) -> String;
    /// Generates for every request; the output has one entry per request, in order.
    fn generate(&mut self, reqs: &[GenRequest]) -> anyhow::Result<Vec<GenOutput>>;
    /// Whether the model writes DocTags (see [`crate::stage::doctags`]); its pages then get
    /// `markdown` and `blocks` in their records.
    fn emits_doctags(&self) -> bool {
        false
    }
    /// The model's continuous-batching engine, when it has one: the inference thread then
    /// feeds it requests as they come and answers each as it finishes, instead of running
    /// static batches through [`Generator::generate`].
    fn stepper(&mut self) -> Option<&mut dyn Stepper> {
        None
    }
}

/// A continuous-batching engine: requests join and leave between decode steps.
pub trait Stepper {
    fn submit(&mut self, id: u64, req: GenRequest);
    /// Admits what fits, runs one decode step and returns the requests that finished.
    fn step(&mut self) -> Vec<(u64, Result<GenOutput, String>)>;
    /// Requests submitted and not yet answered.
    fn outstanding(&mut self) -> usize;
    /// The engine's state after a step, for metrics.
    fn stats(&mut self) -> EngineStats;
}

/// What a continuous-batching engine holds after a step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    /// Sequences decoding (each with its KV slot).
    pub in_flight: usize,
    /// Requests waiting for room.
    pub waiting: usize,
    pub kv_used_bytes: u64,
    pub kv_budget_bytes: u64,
}

/// Told the engine's state after every continuous-batching step.
pub type EngineObserver = Box<dyn Fn(EngineStats) + Send>;

struct Job {
    req: GenRequest,
    reply: oneshot::Sender<Result<(GenOutput, f64), String>>,
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub max_batch: usize,
    /// How long the first request of a batch waits for company.
    pub linger: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions { max_batch: 8, linger: Duration::from_millis(20) }
    }
}

/// Told the size of every batch the model runs.
pub type BatchObserver = Box<dyn Fn(usize) + Send>;

/// Cloneable handle to the inference thread.
#[derive(Clone)]
pub struct InferenceHandle {
    tx: std_mpsc::Sender<Job>,
    model_name: String,
    prompts: [String; 2],
    doctags: bool,
}

impl InferenceHandle {
    /// Moves `model` onto its own thread and returns the handle that feeds it.
    pub fn start(model: Box<dyn Generator>, opts: BatchOptions) -> Self {
        Self::start_observed(model, opts, None)
    }

    /// Like [`InferenceHandle::start`], calling `observe` with each batch's size (the
    /// sequences of each decode step under continuous batching) and `engine` with the
    /// engine's state after each continuous-batching step.
    pub fn start_observed(model: Box<dyn Generator>, opts: BatchOptions, observe: Option<BatchObserver>) -> Self {
        Self::start_with(model, opts, observe, None)
    }

    pub fn start_with(
        mut model: Box<dyn Generator>,
        opts: BatchOptions,
        observe: Option<BatchObserver>,
        engine: Option<EngineObserver>,
    ) -> Self {
        let model_name = model.model_name();
        let prompts = [model.default_prompt(TaskKind::Ocr), model.default_prompt(TaskKind::Caption)];
        let doctags = model.emits_doctags();
        let continuous = model.stepper().is_some();
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("quire-infer".into())
            .spawn(move || {
                if continuous {
                    serve_continuous(model, rx, observe, engine)
                } else {
                    serve(model, rx, opts, observe)
                }
            })
            .expect("spawn the inference thread");
        InferenceHandle { tx, model_name, prompts, doctags }
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Whether the model writes DocTags ([`Generator::emits_doctags`]).
    pub fn emits_doctags(&self) -> bool {
        self.doctags
    }

    pub fn default_prompt(&self, task: TaskKind) -> &str {
        match task {
            TaskKind::Ocr => &self.prompts[0],
            TaskKind::Caption => &self.prompts[1],
        }
    }

    /// Queues one request; resolves to the output and the milliseconds its batch took.
    pub async fn submit(&self, req: GenRequest) -> Result<(GenOutput, f64), String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { req, reply }).map_err(|_| "the inference thread has stopped".to_string())?;
        rx.await.map_err(|_| "the inference thread dropped the request".to_string())?
    }
}

fn serve(mut model: Box<dyn Generator>, rx: std_mpsc::Receiver<Job>, opts: BatchOptions, observe: Option<BatchObserver>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + opts.linger;
        while batch.len() < opts.max_batch.max(1) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let (reqs, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|j| (j.req, j.reply)).unzip();
        if let Some(o) = &observe {
            o(reqs.len());
        }
        let t0 = Instant::now();
        let result = model.generate(&reqs);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(outs) if outs.len() == replies.len() => {
                for (out, reply) in outs.into_iter().zip(replies) {
                    let _ = reply.send(Ok((out, ms)));
                }
            }
            Ok(outs) => {
                let msg = format!("model returned {} outputs for {} requests", outs.len(), replies.len());
                for reply in replies {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for reply in replies {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
        }
    }
}

/// The inference thread under continuous batching: takes requests as they come (waiting
/// only when nothing is in flight), steps the engine, and answers each request as soon as
/// it finishes, with the milliseconds from its arrival to its answer.
fn serve_continuous(
    mut model: Box<dyn Generator>,
    rx: std_mpsc::Receiver<Job>,
    observe: Option<BatchObserver>,
    engine: Option<EngineObserver>,
) {
    // Per request in flight: where its answer goes, and when it was sent.
    type Waiter = (oneshot::Sender<Result<(GenOutput, f64), String>>, Instant);
    let mut waiting: std::collections::HashMap<u64, Waiter> = std::collections::HashMap::new();
    let mut next_id = 0u64;
    let stepper = model.stepper().expect("checked by the caller");
    loop {
        let mut take = |job: Job, stepper: &mut dyn Stepper| {
            waiting.insert(next_id, (job.reply, Instant::now()));
            stepper.submit(next_id, job.req);
            next_id += 1;
        };
        if stepper.outstanding() == 0 {
            match rx.recv() {
                Ok(job) => take(job, stepper),
                Err(_) => break,
            }
        }
        while let Ok(job) = rx.try_recv() {
            take(job, stepper);
        }
        let done = stepper.step();
        let stats = stepper.stats();
        if let Some(o) = &observe {
            // The sequences this step decoded: those still in flight and those it finished.
            let n = stats.in_flight + done.len();
            if n > 0 {
                o(n);
            }
        }
        if let Some(e) = &engine {
            e(stats);
        }
        for (id, result) in done {
            if let Some((reply, since)) = waiting.remove(&id) {
                let ms = since.elapsed().as_secs_f64() * 1e3;
                let _ = reply.send(result.map(|out| (out, ms)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Echoes each prompt and remembers the batch sizes it was given.
    struct Echo(Arc<Mutex<Vec<usize>>>);

    impl Generator for Echo {
        fn model_name(&self) -> String {
            "echo".into()
        }
        fn default_prompt(&self, _: TaskKind) -> String {
            "p".into()
        }
        fn generate(&mut self, reqs: &[GenRequest]) -> anyhow::Result<Vec<GenOutput>> {
            self.0.lock().unwrap().push(reqs.len());
            std::thread::sleep(Duration::from_millis(30));
            Ok(reqs
                .iter()
                .map(|r| GenOutput { text: r.prompt.clone(), tokens_in: 1, tokens_out: 1, finish: FinishReason::Stop, device_ms: 0.0, loop_info: None })
                .collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_from_many_callers_share_batches_and_get_their_own_answers() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let h = InferenceHandle::start_observed(
            Box::new(Echo(sizes.clone())),
            BatchOptions { max_batch: 4, linger: Duration::from_millis(50) },
            Some(Box::new(move |n| s2.lock().unwrap().push(n))),
        );
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move {
                    let req = GenRequest { image: image::RgbImage::new(1, 1), alpha: None, prompt: format!("task {i}"), max_new_tokens: 1 };
                    h.submit(req).await.unwrap().0.text
                })
            })
            .collect();
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap(), format!("task {i}"));
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 10);
        assert!(sizes.iter().all(|&s| s <= 4), "{sizes:?}");
        assert!(sizes.len() <= 4, "requests arriving together are batched: {sizes:?}");
        assert_eq!(*seen.lock().unwrap(), sizes, "the observer sees every batch");
    }

    /// Sequences of `n` steps each (n from the prompt), three in flight at most.
    struct Steps {
        live: Vec<(u64, usize, String)>,
        queue: std::collections::VecDeque<(u64, GenRequest)>,
    }

    impl Generator for Steps {
        fn model_name(&self) -> String {
            "steps".into()
        }
        fn default_prompt(&self, _: TaskKind) -> String {
            "p".into()
        }
        fn generate(&mut self, _: &[GenRequest]) -> anyhow::Result<Vec<GenOutput>> {
            anyhow::bail!("static batches are not used when the model has a stepper")
        }
        fn stepper(&mut self) -> Option<&mut dyn Stepper> {
            Some(self)
        }
    }

    impl Stepper for Steps {
        fn submit(&mut self, id: u64, req: GenRequest) {
            self.queue.push_back((id, req));
        }
        fn step(&mut self) -> Vec<(u64, Result<GenOutput, String>)> {
            while self.live.len() < 3 {
                let Some((id, req)) = self.queue.pop_front() else { break };
                let n: usize = req.prompt.split(' ').nth(1).unwrap().parse().unwrap();
                self.live.push((id, n, req.prompt));
            }
            std::thread::sleep(Duration::from_millis(5));
            let mut out = Vec::new();
            self.live.retain_mut(|(id, n, p)| {
                *n -= 1;
                if *n == 0 {
                    out.push((*id, Ok(GenOutput { text: p.clone(), tokens_in: 1, tokens_out: 1, finish: FinishReason::Stop, device_ms: 0.0, loop_info: None })));
                }
                *n > 0
            });
            out
        }
        fn outstanding(&mut self) -> usize {
            self.live.len() + self.queue.len()
        }
        fn stats(&mut self) -> EngineStats {
            EngineStats { in_flight: self.live.len(), waiting: self.queue.len(), ..EngineStats::default() }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_continuous_batching_a_short_request_does_not_wait_for_a_long_one() {
        let stats = Arc::new(Mutex::new(Vec::new()));
        let s2 = stats.clone();
        let h = InferenceHandle::start_with(
            Box::new(Steps { live: Vec::new(), queue: Default::default() }),
            BatchOptions::default(),
            None,
            Some(Box::new(move |s| s2.lock().unwrap().push(s))),
        );
        let ask = |prompt: String| {
            let h = h.clone();
            tokio::spawn(async move {
                let req = GenRequest { image: image::RgbImage::new(1, 1), alpha: None, prompt, max_new_tokens: 1 };
                let t = Instant::now();
                let text = h.submit(req).await.unwrap().0.text;
                (text, t.elapsed())
            })
        };
        let long = ask("long 200".into());
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Joins while the long one decodes, and leaves long before it.
        let short = ask("short 2".into());
        let many: Vec<_> = (0..6).map(|i| ask(format!("n {}", 3 + i))).collect();
        let (text, short_took) = short.await.unwrap();
        assert_eq!(text, "short 2");
        for (i, m) in many.into_iter().enumerate() {
            assert_eq!(m.await.unwrap().0, format!("n {}", 3 + i));
        }
        let (text, long_took) = long.await.unwrap();
        assert_eq!(text, "long 200");
        assert!(short_took * 5 < long_took, "short {short_took:?}, long {long_took:?}");
        let stats = stats.lock().unwrap();
        assert!(stats.iter().all(|s| s.in_flight <= 3));
        assert!(stats.iter().any(|s| s.in_flight == 3 && s.waiting > 0), "requests waited for a free slot");
    }
}
