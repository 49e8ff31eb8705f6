//! Continuous batching over a loaded [`Vlm`]: requests wait in a queue, join the
//! sequences in flight as soon as the KV-cache budget has room (their images through the
//! vision encoder together, then one prefill each) and leave as each one finishes, while
//! every step decodes all sequences in flight at once.
//!
//! A step admits at most [`BatcherOptions::prefill_per_step`] requests, so a long queue of
//! new pages never stalls the pages already decoding for more than a few prefills.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use candle_core::Tensor;

use crate::engine::{Admission, KvBudget};
use crate::{Generation, Request, Vlm};

#[derive(Clone, Copy, Debug)]
pub struct BatcherOptions {
    pub kv: KvBudget,
    /// Requests admitted (encoded and prefilled) per step at most.
    pub prefill_per_step: usize,
}

/// A request whose prompt and image features are ready, waiting for room.
struct Encoded {
    id: u64,
    ids: Vec<u32>,
    feats: Tensor,
    max_new: Option<usize>,
}

pub struct Batcher {
    vlm: Vlm,
    pending: VecDeque<(u64, Request)>,
    ready: VecDeque<Encoded>,
    opts: BatcherOptions,
    /// Busy milliseconds spent on each unanswered request so far (see `Generation::device_ms`).
    spent: HashMap<u64, f64>,
}

/// The outcome of one request: its generation, or why it failed (that request only).
pub type Outcome = (u64, Result<Generation, String>);

impl Batcher {
    pub fn new(mut vlm: Vlm, opts: BatcherOptions) -> Batcher {
        vlm.decoder_mut().set_kv_budget(opts.kv);
        Batcher { vlm, pending: VecDeque::new(), ready: VecDeque::new(), opts, spent: HashMap::new() }
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
    }

    /// Requests submitted and not yet answered.
    pub fn outstanding(&mut self) -> usize {
        self.pending.len() + self.ready.len() + self.vlm.decoder_mut().in_flight()
    }

    pub fn in_flight(&mut self) -> usize {
        self.vlm.decoder_mut().in_flight()
    }

    /// (reserved, budget) bytes of KV cache.
    pub fn kv_usage(&mut self) -> (u64, u64) {
        let d = self.vlm.decoder_mut();
        (d.kv_reserved_bytes(), d.kv_budget().bytes)
    }

    /// Admits what fits, then runs one decode step; returns the requests that finished.
    pub fn step(&mut self) -> Vec<Outcome> {
        let mut out = Vec::new();
        let mut admitted = 0;
        let per_step = self.opts.prefill_per_step.max(1);
        while admitted < per_step {
            if self.ready.is_empty() {
                let room = self.opts.kv.max_sequences.saturating_sub(self.vlm.decoder_mut().in_flight());
                let take = room.min(per_step - admitted).min(self.pending.len());
                if take == 0 {
                    break;
                }
                let batch: Vec<(u64, Request)> = self.pending.drain(..take).collect();
                self.encode(batch, &mut out);
                if self.ready.is_empty() {
                    continue;
                }
            }
            let e = self.ready.front().expect("not empty");
            match self.vlm.decoder_mut().admission(e.ids.len(), e.max_new) {
                Admission::Now => {
                    let e = self.ready.pop_front().expect("not empty");
                    admitted += 1;
                    let t = Instant::now();
                    let r = self.vlm.decoder_mut().admit(e.id, &e.ids, &e.feats, e.max_new);
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
        for (id, r) in &mut out {
            let ms = self.spent.remove(id).unwrap_or(0.0);
            if let Ok(g) = r {
                g.device_ms = ms;
            }
        }
        out
    }

    /// Encodes `batch` together; when that fails, one by one, so a bad image fails alone.
    fn encode(&mut self, batch: Vec<(u64, Request)>, out: &mut Vec<Outcome>) {
        let reqs: Vec<Request> = batch.iter().map(|(_, r)| r.clone()).collect();
        let t = Instant::now();
        let encoded = self.vlm.encode(&reqs);
        let share = t.elapsed().as_secs_f64() * 1e3 / batch.len().max(1) as f64;
        for (id, _) in &batch {
            *self.spent.entry(*id).or_default() += share;
        }
        match encoded {
            Ok(enc) => {
                for ((id, r), (ids, feats)) in batch.into_iter().zip(enc) {
                    self.ready.push_back(Encoded { id, ids, feats, max_new: r.max_new_tokens });
                }
            }
            Err(_) if batch.len() > 1 => {
                for one in batch {
                    self.encode(vec![one], out);
                }
            }
            Err(err) => out.push((batch[0].0, Err(format!("{err:#}")))),
        }
    }
}
