//! Opt-in phase timing and FLOP accounting, for benchmarks that report achieved GFLOP/s per
//! phase (`examples/bench.rs`).
//!
//! Timing is off unless [`set_enabled`] turns it on; while off, every hook is one relaxed
//! atomic load and nothing else, so the hooks stay compiled into the engine. While on, the
//! engine marks the [`Stage`] it is in ([`enter`]: image preparation, vision encoder,
//! connector, text prefill, one decode step) with the work it does there ([`Work`]: sequences,
//! rows, attention pairs), and times the [`Part`]s inside a stage ([`span`]: attention
//! projections, attention proper, MLP, activation, `lm_head`, sampling). A stage's time not
//! covered by its parts is the rest (norms, residual adds, RoPE, copies, host work).
//!
//! Stages follow one another: entering a stage ends the one that is open. The tables are
//! process-wide, so figures are only meaningful with one generation running at a time.
//!
//! [`FlopModel`] turns a stage's [`Work`] into FLOPs per part from the model's config: the
//! multiply-adds of the products as the engine computes them (2 FLOPs each; attention over
//! every (query, key) pair of its score matrices, masked ones included), nothing for
//! softmax, norms and activations.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use crate::config::{TextConfig, VisionConfig};
use crate::idefics2::config::{Idefics2Config, PerceiverConfig};
use crate::idefics3::config::Idefics3Config;

/// Where the engine is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Image resizing and tiling, prompt rendering and tokenizing.
    Prepare,
    /// The SigLIP encoder (patch embedding included).
    Vision,
    /// Pixel shuffle and projection (Idefics3), or modality projection and perceiver (Idefics2).
    Connector,
    /// The text model over the prompt, up to the first token's logits and its choice.
    Prefill,
    /// One decode step: embedding, the text model over the new token, the next token's choice.
    Decode,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::Prepare, Stage::Vision, Stage::Connector, Stage::Prefill, Stage::Decode];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Vision => "vision",
            Stage::Connector => "connector",
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
        }
    }
}

/// What a stage spends its time on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Attention projections (q, k, v, output).
    Proj,
    /// Attention proper: scores, softmax, weighted values (text: also RoPE and the KV cache).
    Attention,
    /// The MLP's products (text: with its SiLU gating).
    Mlp,
    /// The vision MLP's GELU.
    Act,
    /// Final norm and `lm_head`.
    LmHead,
    /// Logits to token ids: processors and argmax.
    Sampling,
}

impl Part {
    pub const ALL: [Part; 6] = [Part::Proj, Part::Attention, Part::Mlp, Part::Act, Part::LmHead, Part::Sampling];

    pub fn name(self) -> &'static str {
        match self {
            Part::Proj => "proj",
            Part::Attention => "attention",
            Part::Mlp => "mlp",
            Part::Act => "act",
            Part::LmHead => "lm_head",
            Part::Sampling => "sampling",
        }
    }
}

const STAGES: usize = Stage::ALL.len();
const PARTS: usize = Part::ALL.len();
/// `CURRENT` while no stage is open.
const NONE: usize = usize::MAX;

/// The work of one entry into a stage, what [`FlopModel`] counts FLOPs from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Sequences (text) or frames/tiles (vision, connector).
    pub seqs: usize,
    /// Rows through the layers: tokens (text), patches (vision and connector input).
    pub rows: usize,
    /// (query, key) pairs of one layer's score matrices, summed over sequences; per head group
    /// (the FLOPs multiply by the attention width).
    pub pairs: usize,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicUsize = AtomicUsize::new(NONE);

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO_ROW: [AtomicU64; PARTS] = [ZERO; PARTS];
static STAGE_NS: [AtomicU64; STAGES] = [ZERO; STAGES];
static CALLS: [AtomicU64; STAGES] = [ZERO; STAGES];
static SEQS: [AtomicU64; STAGES] = [ZERO; STAGES];
static ROWS: [AtomicU64; STAGES] = [ZERO; STAGES];
static PAIRS: [AtomicU64; STAGES] = [ZERO; STAGES];
static PART_NS: [[AtomicU64; PARTS]; STAGES] = [ZERO_ROW; STAGES];

/// The open stage: its index, the entry that opened it, and when.
static OPEN: Mutex<Option<(usize, u64, Instant)>> = Mutex::new(None);
static ENTRIES: AtomicU64 = AtomicU64::new(0);

/// Turns the timers on or off (off at start).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Zeroes every table and closes the open stage.
pub fn reset() {
    *OPEN.lock().unwrap_or_else(|e| e.into_inner()) = None;
    CURRENT.store(NONE, Relaxed);
    for s in 0..STAGES {
        for t in [&STAGE_NS, &CALLS, &SEQS, &ROWS, &PAIRS] {
            t[s].store(0, Relaxed);
        }
        PART_NS[s].iter().for_each(|p| p.store(0, Relaxed));
    }
}

fn close(open: &mut Option<(usize, u64, Instant)>) {
    if let Some((s, _, t0)) = open.take() {
        STAGE_NS[s].fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    }
    CURRENT.store(NONE, Relaxed);
}

/// Ends the open stage (if it is this guard's) when dropped.
#[must_use = "the stage ends when the guard is dropped"]
pub struct StageGuard(Option<u64>);

impl Drop for StageGuard {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
            if open.as_ref().is_some_and(|&(_, e, _)| e == id) {
                close(&mut open);
            }
        }
    }
}

/// Opens `stage` doing `work`, ending the stage that is open; it ends when the guard is
/// dropped or another stage is entered, whichever comes first.
pub fn enter(stage: Stage, work: Work) -> StageGuard {
    if !enabled() {
        return StageGuard(None);
    }
    let s = stage as usize;
    let id = ENTRIES.fetch_add(1, Relaxed);
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    close(&mut open);
    CALLS[s].fetch_add(1, Relaxed);
    SEQS[s].fetch_add(work.seqs as u64, Relaxed);
    ROWS[s].fetch_add(work.rows as u64, Relaxed);
    PAIRS[s].fetch_add(work.pairs as u64, Relaxed);
    CURRENT.store(s, Relaxed);
    *open = Some((s, id, Instant::now()));
    StageGuard(Some(id))
}

/// Times a part of the open stage until dropped (nothing when no stage is open).
#[must_use = "the span ends when it is dropped"]
pub struct Span(Option<(usize, Instant)>);

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((p, t0)) = self.0 {
            let s = CURRENT.load(Relaxed);
            if s != NONE {
                PART_NS[s][p].fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
            }
        }
    }
}

/// Starts timing `part` (see [`Span`]); spans of one stage must not overlap.
#[inline]
pub fn span(part: Part) -> Span {
    if !enabled() {
        return Span(None);
    }
    Span(Some((part as usize, Instant::now())))
}

/// What one stage took since the last [`reset`].
#[derive(Clone, Debug, PartialEq)]
pub struct StageTimes {
    pub stage: Stage,
    pub seconds: f64,
    /// Entries into the stage (decode: steps).
    pub calls: u64,
    /// The work of all entries together.
    pub work: Work,
    /// Seconds per part, in [`Part::ALL`] order.
    pub parts: [f64; PARTS],
}

impl StageTimes {
    /// Seconds not covered by a part.
    pub fn rest(&self) -> f64 {
        (self.seconds - self.parts.iter().sum::<f64>()).max(0.0)
    }
}

/// Every stage's figures since the last [`reset`] (a stage still open counts up to now).
pub fn snapshot() -> Vec<StageTimes> {
    let open = *OPEN.lock().unwrap_or_else(|e| e.into_inner());
    Stage::ALL
        .iter()
        .map(|&stage| {
            let s = stage as usize;
            let mut ns = STAGE_NS[s].load(Relaxed);
            if let Some((_, _, t0)) = open.filter(|o| o.0 == s) {
                ns += t0.elapsed().as_nanos() as u64;
            }
            let get = |t: &[AtomicU64; STAGES]| t[s].load(Relaxed) as usize;
            StageTimes {
                stage,
                seconds: ns as f64 * 1e-9,
                calls: CALLS[s].load(Relaxed),
                work: Work { seqs: get(&SEQS), rows: get(&ROWS), pairs: get(&PAIRS) },
                parts: std::array::from_fn(|p| PART_NS[s][p].load(Relaxed) as f64 * 1e-9),
            }
        })
        .collect()
}

/// The connector between the vision encoder and the text model.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectorShape {
    /// Idefics3: pixel shuffle (no arithmetic), then one bias-free projection from
    /// vision hidden · scale² to text hidden per `scale²` patches.
    PixelShuffle { scale: usize },
    /// Idefics2: a SwiGLU modality projection (vision hidden → `intermediate` → text hidden) on
    /// every patch, then the perceiver resampler.
    Perceiver { intermediate: usize, perceiver: PerceiverConfig },
}

/// FLOPs per part of each stage, from a model's config.
#[derive(Clone, Debug, PartialEq)]
pub struct FlopModel {
    pub vision: VisionConfig,
    pub connector: ConnectorShape,
    pub text: TextConfig,
}

/// FLOPs of a stage by part ([`Part::ALL`] order) plus those of no part (the patch embedding).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PartFlops {
    pub parts: [f64; PARTS],
    pub other: f64,
}

impl PartFlops {
    pub fn total(&self) -> f64 {
        self.parts.iter().sum::<f64>() + self.other
    }

    pub fn get(&self, p: Part) -> f64 {
        self.parts[p as usize]
    }

    fn add(&mut self, p: Part, flops: f64) {
        self.parts[p as usize] += flops;
    }
}

impl FlopModel {
    pub fn idefics3(c: &Idefics3Config) -> FlopModel {
        FlopModel {
            vision: c.vision.clone(),
            connector: ConnectorShape::PixelShuffle { scale: c.scale_factor },
            text: c.text.clone(),
        }
    }

    pub fn idefics2(c: &Idefics2Config) -> FlopModel {
        FlopModel {
            vision: c.vision.clone(),
            connector: ConnectorShape::Perceiver { intermediate: c.text.intermediate_size, perceiver: c.perceiver.clone() },
            text: c.text.clone(),
        }
    }

    /// The work the engine records for the vision encoder over `frames` frames of `patches`
    /// patches each (padded patches included: they are computed).
    pub fn vision_work(&self, frames: usize, patches: usize) -> Work {
        Work { seqs: frames, rows: frames * patches, pairs: frames * patches * patches }
    }

    /// The work the engine records for the connector over `frames` frames of `patches` patches.
    pub fn connector_work(&self, frames: usize, patches: usize) -> Work {
        let pairs = match &self.connector {
            ConnectorShape::PixelShuffle { .. } => 0,
            ConnectorShape::Perceiver { perceiver: p, .. } => frames * p.n_latents * (patches + p.n_latents),
        };
        Work { seqs: frames, rows: frames * patches, pairs }
    }

    /// The work the engine records for `seqs` sequences of `new` tokens each after `cached`
    /// ones (prefill: the prompt after none; decode: 1 after the keys cached so far).
    pub fn text_work(&self, seqs: usize, new: usize, cached: usize) -> Work {
        Work { seqs, rows: seqs * new, pairs: seqs * new * (cached + new) }
    }

    /// FLOPs of `work` done in `stage`.
    pub fn flops(&self, stage: Stage, work: &Work) -> PartFlops {
        let mut f = PartFlops::default();
        let (rows, pairs, seqs) = (work.rows as f64, work.pairs as f64, work.seqs as f64);
        match stage {
            Stage::Prepare => {}
            Stage::Vision => {
                let v = &self.vision;
                let (l, e, i) = (v.num_hidden_layers as f64, v.hidden_size as f64, v.intermediate_size as f64);
                // q, k, v and output projections: 4 products of e × e per row.
                f.add(Part::Proj, l * rows * 2.0 * 4.0 * e * e);
                // Scores and weighted values: e multiply-adds each per pair, over all heads.
                f.add(Part::Attention, l * pairs * 2.0 * 2.0 * e);
                f.add(Part::Mlp, l * rows * 2.0 * 2.0 * e * i);
                let patch = (v.num_channels * v.patch_size * v.patch_size) as f64;
                f.other = rows * 2.0 * patch * e;
            }
            Stage::Connector => {
                let e = self.vision.hidden_size as f64;
                let h = self.text.hidden_size as f64;
                match &self.connector {
                    // rows / s² output rows, each e·s² wide: rows · e · h multiply-adds.
                    ConnectorShape::PixelShuffle { .. } => f.add(Part::Proj, rows * 2.0 * e * h),
                    ConnectorShape::Perceiver { intermediate, perceiver: p } => {
                        let im = *intermediate as f64;
                        // Modality projection: gate and up (e → im each), down (im → h).
                        f.add(Part::Mlp, rows * 2.0 * (2.0 * e * im + im * h));
                        let (depth, lat) = (p.depth as f64, (work.seqs * p.n_latents) as f64);
                        let (q, kv) = ((p.n_heads * p.head_dim) as f64, (p.num_key_value_heads * p.head_dim) as f64);
                        // q and output on the latents; k and v on context and latents.
                        let proj = lat * 2.0 * 2.0 * h * q + (rows + lat) * 2.0 * 2.0 * h * kv;
                        f.add(Part::Proj, depth * proj);
                        f.add(Part::Attention, depth * pairs * 2.0 * 2.0 * q);
                        // The resampler's SwiGLU, 4·h wide: three products of h × 4h per latent.
                        f.add(Part::Mlp, depth * lat * 2.0 * 3.0 * 4.0 * h * h);
                    }
                }
            }
            Stage::Prefill | Stage::Decode => {
                let t = &self.text;
                let (l, h, i) = (t.num_hidden_layers as f64, t.hidden_size as f64, t.intermediate_size as f64);
                let q = (t.num_attention_heads * t.head_dim) as f64;
                let kv = (t.num_key_value_heads * t.head_dim) as f64;
                f.add(Part::Proj, l * rows * 2.0 * h * (2.0 * q + 2.0 * kv));
                f.add(Part::Attention, l * pairs * 2.0 * 2.0 * q);
                f.add(Part::Mlp, l * rows * 2.0 * 3.0 * h * i);
                // The last position of each sequence goes through lm_head.
                f.add(Part::LmHead, seqs * 2.0 * h * t.vocab_size as f64);
            }
        }
        f
    }

    /// Weight elements a decode step reads once whatever the batch: the text model's
    /// projections and MLPs and `lm_head`.
    pub fn decode_weight_elems(&self) -> f64 {
        let t = &self.text;
        let (l, h, i) = (t.num_hidden_layers as f64, t.hidden_size as f64, t.intermediate_size as f64);
        let q = (t.num_attention_heads * t.head_dim) as f64;
        let kv = (t.num_key_value_heads * t.head_dim) as f64;
        l * (h * (2.0 * q + 2.0 * kv) + 3.0 * h * i) + h * t.vocab_size as f64
    }

    /// KV-cache elements read by `work` pairs of decode attention (keys and values, all layers).
    pub fn kv_elems(&self, work: &Work) -> f64 {
        let t = &self.text;
        (t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim) as f64 * work.pairs as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rope;

    fn vision() -> VisionConfig {
        VisionConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_channels: 3,
            image_size: 8,
            patch_size: 2,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }

    fn text() -> TextConfig {
        TextConfig {
            vocab_size: 10,
            hidden_size: 6,
            intermediate_size: 12,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 2,
            rms_norm_eps: 1e-6,
            rope: Rope::Default { theta: 10000.0 },
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            sliding_window: None,
        }
    }

    #[test]
    fn vision_and_pixel_shuffle_flops_match_a_hand_count() {
        let m = FlopModel { vision: vision(), connector: ConnectorShape::PixelShuffle { scale: 2 }, text: text() };
        // One frame of 16 patches, width 8, MLP 16, 2 layers.
        let w = m.vision_work(1, 16);
        assert_eq!(w, Work { seqs: 1, rows: 16, pairs: 256 });
        let f = m.flops(Stage::Vision, &w);
        // q,k,v,o: 4 · (16×8 by 8×8) = 4 · 1024 multiply-adds per layer.
        assert_eq!(f.get(Part::Proj), 2.0 * 2.0 * 4.0 * 1024.0);
        // QKᵀ and PV: 16·16·8 multiply-adds each per layer.
        assert_eq!(f.get(Part::Attention), 2.0 * 2.0 * 2.0 * 2048.0);
        // fc1 and fc2: 16×8×16 each.
        assert_eq!(f.get(Part::Mlp), 2.0 * 2.0 * 2.0 * 2048.0);
        // Patch embedding: 16 patches of 3·2·2 inputs to 8 outputs.
        assert_eq!(f.other, 2.0 * 16.0 * 12.0 * 8.0);
        assert_eq!(f.total(), 16384.0 + 16384.0 + 16384.0 + 3072.0);
        // Pixel shuffle by 2: 4 rows of 32 inputs to 6 outputs.
        let c = m.flops(Stage::Connector, &m.connector_work(1, 16));
        assert_eq!(c.total(), 2.0 * 4.0 * 32.0 * 6.0);
    }

    #[test]
    fn text_flops_match_a_hand_count() {
        let m = FlopModel { vision: vision(), connector: ConnectorShape::PixelShuffle { scale: 2 }, text: text() };
        // Prefill of 5 tokens: q 8 wide, k and v 4 wide, hidden 6, MLP 12, 3 layers, vocab 10.
        let w = m.text_work(1, 5, 0);
        let f = m.flops(Stage::Prefill, &w);
        // Per row: q 6·8 + k 6·4 + v 6·4 + o 8·6 = 144 multiply-adds.
        assert_eq!(f.get(Part::Proj), 2.0 * 3.0 * 5.0 * 144.0);
        // 25 pairs, each 8 (scores over 4 heads × 2) + 8 (values) multiply-adds.
        assert_eq!(f.get(Part::Attention), 2.0 * 3.0 * 25.0 * 16.0);
        // gate, up, down: 3 · 6·12.
        assert_eq!(f.get(Part::Mlp), 2.0 * 3.0 * 5.0 * 216.0);
        assert_eq!(f.get(Part::LmHead), 2.0 * 60.0);
        // A decode step of two sequences with 7 keys cached: 2 rows, 16 pairs.
        let d = m.flops(Stage::Decode, &m.text_work(2, 1, 7));
        assert_eq!(d.get(Part::Proj), 2.0 * 3.0 * 2.0 * 144.0);
        assert_eq!(d.get(Part::Attention), 2.0 * 3.0 * 16.0 * 16.0);
        assert_eq!(d.get(Part::LmHead), 2.0 * 2.0 * 60.0);
        assert_eq!(m.decode_weight_elems(), 3.0 * (144.0 + 216.0) + 60.0);
        // Keys and values of 2 heads × 2 per pair and layer.
        assert_eq!(m.kv_elems(&Work { seqs: 2, rows: 2, pairs: 16 }), 3.0 * 8.0 * 16.0);
    }

    #[test]
    fn perceiver_flops_match_a_hand_count() {
        let p = PerceiverConfig {
            hidden_size: 6,
            rms_norm_eps: 1e-6,
            hidden_act: "silu".into(),
            n_latents: 2,
            depth: 1,
            n_heads: 2,
            head_dim: 3,
            num_key_value_heads: 1,
        };
        let m = FlopModel { vision: vision(), connector: ConnectorShape::Perceiver { intermediate: 12, perceiver: p }, text: text() };
        // One frame of 4 patches (vision width 8) to 2 latents (width 6).
        let w = m.connector_work(1, 4);
        assert_eq!(w, Work { seqs: 1, rows: 4, pairs: 2 * 6 });
        let f = m.flops(Stage::Connector, &w);
        // q (6→6) and o (6→6) on 2 latents; k and v (6→3 each) on 4 + 2 rows.
        assert_eq!(f.get(Part::Proj), 2.0 * (2.0 * 72.0 + 6.0 * 36.0));
        // 12 pairs, 6 multiply-adds for scores and 6 for values.
        assert_eq!(f.get(Part::Attention), 2.0 * 12.0 * 12.0);
        // Modality projection per patch: 8·12 · 2 + 12·6; resampler MLP per latent: 3 · 6·24.
        assert_eq!(f.get(Part::Mlp), 2.0 * (4.0 * 264.0 + 2.0 * 432.0));
    }

    #[test]
    fn stages_and_parts_are_timed_only_when_enabled() {
        // The tables are process-wide; this is the only test that touches them.
        reset();
        {
            let _g = enter(Stage::Vision, Work { seqs: 1, rows: 4, pairs: 16 });
            let _timer = span(Part::Mlp);
        }
        assert!(snapshot().iter().all(|s| s.calls == 0 && s.seconds == 0.0));
        set_enabled(true);
        {
            let mut g = enter(Stage::Prefill, Work { seqs: 1, rows: 5, pairs: 25 });
            {
                let _timer = span(Part::Mlp);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            for _ in 0..3 {
                // Replacing the guard ends the previous step; the old guard leaves the new one open.
                g = enter(Stage::Decode, Work { seqs: 1, rows: 1, pairs: 6 });
                let _timer = span(Part::Sampling);
            }
            drop(g);
            let _after = span(Part::Proj); // no stage open: not counted anywhere
        }
        set_enabled(false);
        let snap = snapshot();
        let get = |st: Stage| snap.iter().find(|s| s.stage == st).expect("every stage listed").clone();
        let (pre, dec) = (get(Stage::Prefill), get(Stage::Decode));
        assert_eq!((pre.calls, pre.work), (1, Work { seqs: 1, rows: 5, pairs: 25 }));
        assert!(pre.parts[Part::Mlp as usize] >= 0.002 && pre.seconds >= pre.parts[Part::Mlp as usize]);
        assert_eq!((dec.calls, dec.work), (3, Work { seqs: 3, rows: 3, pairs: 18 }));
        assert!(dec.parts[Part::Sampling as usize] > 0.0 && dec.parts[Part::Proj as usize] == 0.0);
        assert_eq!(get(Stage::Vision).calls, 0);
        reset();
        assert!(snapshot().iter().all(|s| s.calls == 0 && s.seconds == 0.0));
    }
}
