//! Continuous batching over a loaded [`Vlm`]: requests are prepared on the host ahead of the
//! device (resize, tile, normalise, tokenize on threads of their own), wait until the
//! KV-cache budget has room, go through the vision encoder together, are prefilled in chunks
//! between decode steps, and leave as each one finishes, while every step decodes all
//! sequences in flight at once.
//!
//! Per step, at most [`BatcherOptions::prefill_per_step`] requests are admitted and at most
//! [`BatcherOptions::prefill_tokens`] prompt positions are prefilled, so a long queue of new
//! pages never stalls the pages already decoding for more than that much work.
//!
//! A sequence that loops (see [`crate::loops`]) leaves at once. Under [`OnLoop::Retry`] its
//! prompt and image features, kept while it decodes, go back to the front of the queue with
//! the retry's repetition penalty, and the page is answered after the second attempt.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;

use crate::engine::{Admission, KvBudget};
use crate::{FinishReason, Generation, OnLoop, Prepared, Processor, Request, Vlm};

#[derive(Clone, Copy, Debug)]
pub struct BatcherOptions {
    pub kv: KvBudget,
    /// Requests admitted (encoded and begun) per step at most.
    pub prefill_per_step: usize,
    /// Prompt positions prefilled per step at most (chunked prefill); 0: no limit, each
    /// prompt prefilled whole when admitted.
    pub prefill_tokens: usize,
    /// Threads preparing requests ahead of the device; 0: prepared on the stepping thread
    /// when needed, over all cores.
    pub prep_threads: usize,
}

impl BatcherOptions {
    /// `kv` with the other settings at their defaults: 8 admissions and whole prefills per
    /// step, preparation on the stepping thread.
    pub fn new(kv: KvBudget) -> Self {
        BatcherOptions { kv, prefill_per_step: 8, prefill_tokens: 0, prep_threads: 0 }
    }
}

/// A request whose prompt and image features are ready, waiting for room.
#[derive(Clone)]
struct Encoded {
    id: u64,
    ids: Vec<u32>,
    feats: Tensor,
    max_new: Option<usize>,
    /// Repetition penalty of a retry after a loop.
    penalty: Option<f64>,
}

/// A prepared request, or why it could not be prepared.
type PrepResult = (u64, Result<Prepared, String>, Option<usize>);

/// Threads turning requests into [`Prepared`] inputs while the device works.
struct PrepPool {
    jobs: mpsc::Sender<(u64, u64, Request)>,
    done: mpsc::Receiver<(u64, PrepResult)>,
}

impl PrepPool {
    /// `None` when no thread could be started (the batcher then prepares on its own thread).
    fn start(processor: Processor, threads: usize) -> Option<PrepPool> {
        let (jobs, job_rx) = mpsc::channel::<(u64, u64, Request)>();
        let (done_tx, done) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut started = 0;
        for i in 0..threads {
            let (rx, tx, p) = (job_rx.clone(), done_tx.clone(), processor.clone());
            let spawned = std::thread::Builder::new().name(format!("quire-prep-{i}")).spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((order, id, req)) = job else { return };
                // A panic answers its request with an error instead of leaving it unanswered.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.prepare(&req)))
                    .unwrap_or_else(|_| Err(crate::Error::Processor("preparing the image panicked".into())))
                    .map_err(|e| format!("{e:#}"));
                if tx.send((order, (id, r, req.max_new_tokens))).is_err() {
                    return;
                }
            });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!("cannot start a preparation thread: {e}"),
            }
        }
        (started > 0).then_some(PrepPool { jobs, done })
    }
}

pub struct Batcher {
    vlm: Vlm,
    processor: Processor,
    /// Submitted, not yet handed to preparation.
    pending: VecDeque<(u64, Request)>,
    /// Prepared (or failed to), by submission order.
    prepared: BTreeMap<u64, PrepResult>,
    /// Handed to the preparation threads, not back yet.
    preparing: usize,
    pool: Option<PrepPool>,
    next_order: u64,
    ready: VecDeque<Encoded>,
    opts: BatcherOptions,
    /// Busy milliseconds spent on each unanswered request so far (see `Generation::device_ms`).
    spent: HashMap<u64, f64>,
    /// Under `--on-loop retry`: the inputs of the sequences in flight, for a second attempt.
    retry_inputs: HashMap<u64, Encoded>,
    /// First attempts that looped, waiting for their retry to finish.
    first_attempts: HashMap<u64, Generation>,
}

/// The outcome of one request: its generation, or why it failed (that request only).
pub type Outcome = (u64, Result<Generation, String>);

impl Batcher {
    pub fn new(mut vlm: Vlm, opts: BatcherOptions) -> Batcher {
        vlm.decoder_mut().set_kv_budget(opts.kv);
        let processor = vlm.processor();
        let pool = if opts.prep_threads > 0 { PrepPool::start(processor.clone(), opts.prep_threads) } else { None };
        Batcher {
            vlm,
            processor,
            pending: VecDeque::new(),
            prepared: BTreeMap::new(),
            preparing: 0,
            pool,
            next_order: 0,
            ready: VecDeque::new(),
            opts,
            spent: HashMap::new(),
            retry_inputs: HashMap::new(),
            first_attempts: HashMap::new(),
        }
    }

    pub fn vlm(&self) -> &Vlm {
        &self.vlm
    }

    /// The model back; requests not answered yet are dropped.
    pub fn into_inner(mut self) -> Vlm {
        self.vlm.decoder_mut().abort_all();
        self.vlm
    }

    pub fn submit(&mut self, id: u64, req: Request) {
        self.pending.push_back((id, req));
        self.feed_preparation();
    }

    /// Requests submitted and not yet answered.
    pub fn outstanding(&mut self) -> usize {
        let d = self.vlm.decoder_mut();
        self.pending.len()
            + self.preparing
            + self.prepared.len()
            + self.ready.len()
            + d.in_flight()
            + usize::from(d.filling().is_some())
    }

    /// Sequences in flight (decoding), the one being prefilled not counted.
    pub fn in_flight(&mut self) -> usize {
        self.vlm.decoder_mut().in_flight()
    }

    /// Requests prepared by the preparation threads and not yet through the vision encoder.
    pub fn prepared(&mut self) -> usize {
        self.drain_prepared();
        self.prepared.len()
    }

    /// (reserved, budget) bytes of KV cache.
    pub fn kv_usage(&mut self) -> (u64, u64) {
        let d = self.vlm.decoder_mut();
        (d.kv_reserved_bytes(), d.kv_budget().bytes)
    }

    /// Requests prepared or being prepared at most before the device asks for them: enough
    /// for the next admissions, few enough to bound the host memory their pixels take.
    fn prepare_ahead(&self) -> usize {
        (2 * self.opts.prefill_per_step.max(1)).max(self.opts.prep_threads)
    }

    /// Hands pending requests to the preparation threads, up to the look-ahead.
    fn feed_preparation(&mut self) {
        let Some(pool) = &self.pool else { return };
        while self.preparing + self.prepared.len() < self.prepare_ahead() {
            let Some((id, req)) = self.pending.pop_front() else { break };
            if pool.jobs.send((self.next_order, id, req)).is_err() {
                break;
            }
            self.next_order += 1;
            self.preparing += 1;
        }
    }

    /// Collects what the preparation threads finished; with `wait`, waits for one first.
    /// Without threads, prepares up to the look-ahead here when nothing is prepared.
    fn collect_prepared(&mut self, wait: bool) {
        let Some(pool) = &self.pool else {
            if self.prepared.is_empty() && !self.pending.is_empty() {
                let n = self.prepare_ahead().min(self.pending.len());
                let batch: Vec<(u64, Request)> = self.pending.drain(..n).collect();
                let p = &self.processor;
                let done: Vec<Result<Prepared, String>> =
                    crate::engine::par_map(&batch, |(_, r)| Ok(p.prepare(r).map_err(|e| format!("{e:#}"))))
                        .unwrap_or_else(|e| vec![Err(format!("{e:#}")); batch.len()]);
                for ((id, req), r) in batch.into_iter().zip(done) {
                    self.prepared.insert(self.next_order, (id, r, req.max_new_tokens));
                    self.next_order += 1;
                }
            }
            return;
        };
        if wait && self.preparing > 0 {
            if let Ok((order, r)) = pool.done.recv() {
                self.prepared.insert(order, r);
                self.preparing -= 1;
            }
        }
        self.drain_prepared();
    }

    /// Takes what the preparation threads finished, without waiting, and hands them more.
    fn drain_prepared(&mut self) {
        let Some(pool) = &self.pool else { return };
        while let Ok((order, r)) = pool.done.try_recv() {
            self.prepared.insert(order, r);
            self.preparing -= 1;
        }
        self.feed_preparation();
    }

    /// Admits what fits, prefills up to the step's token budget, then runs one decode step;
    /// returns the requests that finished.
    pub fn step(&mut self) -> Vec<Outcome> {
        let mut out = Vec::new();
        let idle = {
            let d = self.vlm.decoder_mut();
            d.in_flight() == 0 && d.filling().is_none()
        };
        self.collect_prepared(idle && self.ready.is_empty() && self.prepared.is_empty());
        let per_step = self.opts.prefill_per_step.max(1);
        let mut tokens = if self.opts.prefill_tokens == 0 { usize::MAX } else { self.opts.prefill_tokens };
        let mut admitted = 0;
        loop {
            if let Some((id, left)) = self.vlm.decoder_mut().filling() {
                if tokens == 0 {
                    break;
                }
                let n = left.min(tokens);
                tokens -= n;
                let t = Instant::now();
                let r = self.vlm.decoder_mut().fill(n);
                *self.spent.entry(id).or_default() += t.elapsed().as_secs_f64() * 1e3;
                match r {
                    Ok(Some((id, Some(g)))) => out.push((id, Ok(g))),
                    Ok(_) => {}
                    Err(err) => {
                        self.vlm.decoder_mut().abort_filling();
                        out.push((id, Err(format!("{err:#}"))));
                    }
                }
                continue;
            }
            if admitted >= per_step || tokens == 0 {
                break;
            }
            if self.ready.is_empty() {
                let d = self.vlm.decoder_mut();
                let room = self.opts.kv.max_sequences.saturating_sub(d.in_flight());
                let take = room.min(per_step - admitted).min(self.prepared.len());
                if take == 0 {
                    break;
                }
                let batch: Vec<PrepResult> = (0..take).filter_map(|_| self.prepared.pop_first().map(|(_, r)| r)).collect();
                self.encode(batch, &mut out);
                self.feed_preparation();
                if self.ready.is_empty() {
                    continue;
                }
            }
            let e = self.ready.front().expect("not empty");
            match self.vlm.decoder_mut().admission(e.ids.len(), e.max_new) {
                Admission::Now => {
                    let e = self.ready.pop_front().expect("not empty");
                    admitted += 1;
                    if e.penalty.is_none() && self.vlm.decoder_mut().loop_options().on_loop == OnLoop::Retry {
                        self.retry_inputs.insert(e.id, e.clone());
                    }
                    let t = Instant::now();
                    let r = self.vlm.decoder_mut().begin(e.id, &e.ids, &e.feats, e.max_new, e.penalty);
                    *self.spent.entry(e.id).or_default() += t.elapsed().as_secs_f64() * 1e3;
                    match r {
                        Ok(Some(g)) => out.push((e.id, Ok(g))),
                        Ok(None) => {}
                        Err(err) => out.push((e.id, Err(format!("{err:#}")))),
                    }
                }
                Admission::Later => break,
                Admission::Never(why) => {
                    let e = self.ready.pop_front().expect("not empty");
                    out.push((e.id, Err(why)));
                }
            }
        }
        let ids = self.vlm.decoder_mut().live_ids();
        let t = Instant::now();
        let stepped = self.vlm.decoder_mut().step();
        let share = t.elapsed().as_secs_f64() * 1e3 / ids.len().max(1) as f64;
        for id in ids {
            *self.spent.entry(id).or_default() += share;
        }
        match stepped {
            Ok(done) => out.extend(done.into_iter().map(|(id, g)| (id, Ok(g)))),
            Err(err) => {
                let msg = format!("{err:#}");
                for id in self.vlm.decoder_mut().abort_all() {
                    out.push((id, Err(msg.clone())));
                }
            }
        }
        let mut out = self.retry_loops(out);
        for (id, r) in &mut out {
            let ms = self.spent.remove(id).unwrap_or(0.0);
            if let Ok(g) = r {
                g.device_ms = ms;
            }
        }
        out
    }

    /// Under `--on-loop retry`: a first attempt that looped goes back to the front of the
    /// queue with the retry's penalty instead of being answered; a retry is answered with the
    /// better attempt (see [`Generation::after_retry`]). Returns what to answer now.
    fn retry_loops(&mut self, out: Vec<Outcome>) -> Vec<Outcome> {
        if self.retry_inputs.is_empty() && self.first_attempts.is_empty() {
            return out;
        }
        let penalty = self.vlm.decoder_mut().loop_options().retry_penalty;
        let mut answer = Vec::with_capacity(out.len());
        for (id, r) in out {
            let input = self.retry_inputs.remove(&id);
            match r {
                Ok(g) => {
                    if let Some(first) = self.first_attempts.remove(&id) {
                        answer.push((id, Ok(Generation::after_retry(first, g))));
                    } else if let (Some(mut e), FinishReason::Loop) = (input, g.finish_reason) {
                        e.penalty = Some(penalty);
                        self.first_attempts.insert(id, g);
                        self.ready.push_front(e);
                    } else {
                        answer.push((id, Ok(g)));
                    }
                }
                Err(e) => {
                    self.first_attempts.remove(&id);
                    answer.push((id, Err(e)));
                }
            }
        }
        answer
    }

    /// Runs the vision encoder over `batch` together; when that fails, one by one, so a bad
    /// image fails alone. Requests that could not be prepared fail here.
    fn encode(&mut self, batch: Vec<PrepResult>, out: &mut Vec<Outcome>) {
        let mut ok = Vec::with_capacity(batch.len());
        for (id, r, max_new) in batch {
            match r {
                Ok(p) => ok.push((id, p, max_new)),
                Err(e) => out.push((id, Err(e))),
            }
        }
        if ok.is_empty() {
            return;
        }
        let preps: Vec<&Prepared> = ok.iter().map(|(_, p, _)| p).collect();
        let t = Instant::now();
        let encoded = self.vlm.encode_prepared(&preps);
        let share = t.elapsed().as_secs_f64() * 1e3 / ok.len() as f64;
        for (id, ..) in &ok {
            *self.spent.entry(*id).or_default() += share;
        }
        match encoded {
            Ok(enc) => {
                for ((id, _, max_new), (ids, feats)) in ok.into_iter().zip(enc) {
                    self.ready.push_back(Encoded { id, ids, feats, max_new, penalty: None });
                }
            }
            Err(_) if ok.len() > 1 => {
                for (id, p, max_new) in ok {
                    self.encode(vec![(id, Ok(p), max_new)], out);
                }
            }
            Err(err) => out.push((ok[0].0, Err(format!("{err:#}")))),
        }
    }
}
