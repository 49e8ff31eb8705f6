//! What both families share around their vision side: reading the weights, the tokenizer
//! and chat template, the generation config, and the text decoder with batched greedy
//! generation. A family turns requests into prompt token ids plus image features (one row
//! per `<image>` token) and hands them to [`Decoder::generate`].

use std::sync::Arc;

use crate::error::bail;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::config::TextConfig;
use crate::generation::GenerationConfig;
use crate::linear::Linears;
use crate::loops::{Found, LoopDetector, LoopOptions, LoopReport, Wildcards};
use crate::profile::{enter, span, Part, Stage, Work};
use crate::prompt::{ChatTemplate, TextTokenizer};
use crate::text_model::TextModel;
use crate::weights::SafetensorsFiles;
use crate::{FinishReason, Generation};

/// Weights read in `via` precision and handed out in the requested one: bf16 weights for
/// f32 arithmetic (see [`load_weights`]).
struct RoundedWeights {
    inner: SafetensorsFiles,
    via: DType,
}

impl candle_nn::var_builder::SimpleBackend for RoundedWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        use candle_nn::var_builder::SimpleBackend;
        SimpleBackend::get(&self.inner, s, name, h, self.via, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        candle_nn::var_builder::SimpleBackend::get_unchecked(&self.inner, name, self.via, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}

/// Opens the checkpoint's safetensors (single file or shards) and returns the dtype the
/// model computes in with a builder for its weights. Each weight is read into a buffer of
/// its own as it is built ([`SafetensorsFiles`]): no mapped copy of the file sits in memory
/// beside the model's.
///
/// On the CPU, bf16 means bf16 weights with f32 activations: every weight is rounded to bf16,
/// then widened (exactly) to f32; linear layers built with [`linear_dtype`] repack theirs in
/// bf16 and multiply in bf16 (candle's CPU backend has no bf16 matrix product).
pub fn load_weights(ck: &Checkpoint, device: &Device, dtype: DType) -> Result<(DType, VarBuilder<'static>)> {
    let st = SafetensorsFiles::open(&ck.safetensors_files()?)?;
    if device.is_cpu() && dtype == DType::BF16 {
        tracing::info!("bf16 on the CPU: weights rounded to bf16, bf16 products with f32 sums, f32 elsewhere");
        let backend = RoundedWeights { inner: st, via: DType::BF16 };
        Ok((DType::F32, VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())))
    } else {
        Ok((dtype, VarBuilder::from_backend(Box::new(st), dtype, device.clone())))
    }
}

/// The dtype linear layers compute their products in for a requested `dtype`: bf16 on the
/// CPU is bf16 products (weights packed once, activations rounded per product, f32 sums, see
/// [`crate::bf16`]) and needs AVX-512; it fails here, before any weight is read, on a CPU
/// without it. Everything else (norms, softmax, residuals) computes in f32 then.
pub fn linear_dtype(device: &Device, dtype: DType) -> Result<DType> {
    if device.is_cpu() && dtype == DType::BF16 {
        if let Err(why) = crate::bf16::support() {
            bail!(Invalid, "{why}");
        }
    }
    Ok(dtype)
}

/// How the text model's linear layers hold their weights for a requested `dtype` and
/// `quantize`: as [`linear_dtype`] says, or int8 or 4 bits ([`Linears::Q8`], [`Linears::Q4`]),
/// which run on the CPU's kernels of [`crate::bf16`] with f32 or bf16 activations elsewhere.
/// Fails before any weight is read where they cannot run: another device, f16, a CPU without
/// AVX-512 (or, for q4, without AVX512-VNNI).
pub fn text_linears(device: &Device, dtype: DType, quantize: crate::Quantize) -> Result<Linears> {
    let linears = linear_dtype(device, dtype)?;
    let (name, quantized) = match quantize {
        crate::Quantize::None => return Ok(Linears::Dtype(linears)),
        crate::Quantize::Q8 => ("q8", Linears::Q8),
        crate::Quantize::Q4 => ("q4", Linears::Q4),
    };
    if !device.is_cpu() {
        bail!(Invalid, "--quantize {name} runs on the CPU only; on a GPU use --dtype bf16 or f16");
    }
    if dtype == DType::F16 {
        bail!(Invalid, "--quantize {name} runs with --dtype f32 or bf16 (the activations' dtype), not f16");
    }
    if let Err(why) = crate::bf16::support() {
        bail!(Invalid, "--quantize {name} runs on the CPU's bf16 kernels: {why}");
    }
    if quantized == Linears::Q4 && !crate::bf16::vnni() {
        bail!(Invalid, "--quantize q4 runs on AVX512-VNNI's integer dot products, which this CPU lacks; use --quantize q8");
    }
    Ok(quantized)
}

/// Finds the prefix under which a checkpoint stores a component (names changed across versions).
pub fn pick_prefix<'a>(vb: &VarBuilder<'a>, probe: &str, candidates: &[&str]) -> Result<VarBuilder<'a>> {
    for c in candidates {
        if vb.contains_tensor(&format!("{c}.{probe}")) {
            return Ok(vb.pp(*c));
        }
    }
    bail!(Checkpoint, "no weight named {} (looked under {candidates:?})", probe)
}

/// `f` over `items`, spread over the CPU cores (resizing and tiling large pages is CPU work
/// that would otherwise keep the device waiting); results in order.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len());
    if threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Result<Vec<_>>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            out.extend(h.join().map_err(|_| Error::Processor("preparing an image panicked".into()))??);
        }
        Ok(out)
    })
}

/// Tokenizer and chat template: what turns a user's text into prompt token ids. Cheap to
/// clone and shareable with the threads that prepare requests ahead of the device.
#[derive(Clone)]
pub struct PromptMaker {
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
}

impl PromptMaker {
    /// The chat-templated prompt for one user turn with the image first, then `text`;
    /// `fallback` formats it when the checkpoint has no template.
    pub fn render(&self, text: &str, fallback: impl FnOnce(&str) -> String) -> Result<String> {
        match &self.template {
            Some(t) => t.render_user_image_turn(text),
            None => Ok(fallback(text)),
        }
    }
}

/// The text side of a loaded checkpoint: tokenizer, chat template, decoder and generation settings.
pub struct Decoder {
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    text: TextModel,
    generation: GenerationConfig,
    pad: u32,
    image_token_id: u32,
    hidden: usize,
    sliding_window: Option<usize>,
    pub device: Device,
    pub dtype: DType,
    /// Continuous batching: the sequences in flight and the KV-cache budget.
    /// Sequence i is in cache slot i.
    live: Vec<Live>,
    kv_budget: KvBudget,
    /// Positions reserved in the KV cache by the sequences in flight (prompt + new tokens each)
    /// and the one being prefilled.
    reserved: usize,
    /// The prompt being prefilled chunk by chunk, if any.
    filling: Option<Filling>,
    /// Runaway generation: what to look for, and the ids that compare equal (`<loc_…>`).
    loops: LoopOptions,
    wildcards: Wildcards,
}

/// A prompt whose prefill runs in chunks between decode steps; its keys and values so far
/// sit in the text model's own cache until the last chunk moves them into a slot.
struct Filling {
    id: u64,
    ids: Vec<u32>,
    /// (1, prompt, hidden) input embeddings, image features merged.
    embeds: Tensor,
    /// Positions prefilled so far.
    done: usize,
    budget: usize,
    /// Positions reserved: prompt + budget.
    need: usize,
    /// The generation config with another repetition penalty (a retry after a loop).
    generation: Option<Arc<GenerationConfig>>,
}

/// What continuous batching may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBudget {
    /// Bytes of key/value cache for all sequences in flight together.
    pub bytes: u64,
    /// Sequences in flight at most, whatever the bytes allow.
    pub max_sequences: usize,
}

/// A sequence in flight: its prompt and what it generated so far.
struct Live {
    id: u64,
    prompt_len: usize,
    /// Prompt followed by the generated tokens.
    seq: Vec<u32>,
    budget: usize,
    reserved: usize,
    /// Per-sequence generation config (a retry's repetition penalty); `None`: the checkpoint's.
    generation: Option<Arc<GenerationConfig>>,
    loops: Option<LoopDetector>,
    /// The loop that ended it.
    found: Option<Found>,
}

impl Live {
    fn new(id: u64, seq: Vec<u32>, budget: usize, reserved: usize, generation: Option<Arc<GenerationConfig>>, loops: &LoopOptions) -> Live {
        let prompt_len = seq.len();
        let loops = loops.enabled().then(|| LoopDetector::new(loops));
        Live { id, prompt_len, seq, budget, reserved, generation, loops, found: None }
    }

    /// Holds a slot's place while its sequence is taken out for a moment.
    fn placeholder() -> Live {
        Live { id: 0, prompt_len: 0, seq: Vec::new(), budget: 0, reserved: 0, generation: None, loops: None, found: None }
    }
}

/// Whether a prompt can join the sequences in flight now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Now,
    /// After some sequence in flight finishes.
    Later,
    /// Never: it needs more KV cache than the whole budget (the message says how much).
    Never(String),
}

impl Decoder {
    /// Loads the text model from `text_vb` (and `lm_head` when stored) plus the tokenizer,
    /// chat template and generation config of `ck`.
    pub fn load(
        ck: &Checkpoint,
        cfg: &TextConfig,
        vb: &VarBuilder,
        text_vb: VarBuilder,
        image_token_id: u32,
        dtype: DType,
        linears: Linears,
    ) -> Result<Decoder> {
        let tokenizer = Arc::new(TextTokenizer::load(&ck.dir, &ck.tokenizer_config)?);
        let tokenizer_loc_ids = tokenizer.loc_token_ids();
        let template = match &ck.chat_template {
            Some(t) => Some(Arc::new(ChatTemplate::new(t, &ck.tokenizer_config)?)),
            None => None,
        };
        // Tied in config but stored anyway: the stored copy equals the embeddings.
        let head = vb.contains_tensor("lm_head.weight").then(|| vb.pp("lm_head"));
        let text = TextModel::new(cfg, text_vb, head, linears)?;
        let eos = ck.eos_token_ids();
        let pad = ck.pad_token_id().or_else(|| eos.first().copied()).unwrap_or(0);
        let generation = GenerationConfig::from_json(&ck.generation_config, eos);
        let ignored = generation.ignored();
        if !ignored.is_empty() {
            tracing::info!(
                "{}: generation_config.json asks for {}; quire decodes greedily with one beam (deterministic), \
                 applying the rest of the generation config",
                ck.dir.display(),
                ignored.join(", ")
            );
        }
        Ok(Decoder {
            tokenizer,
            template,
            text,
            generation,
            pad,
            image_token_id,
            hidden: cfg.hidden_size,
            sliding_window: cfg.sliding_window,
            device: vb.device().clone(),
            dtype,
            live: Vec::new(),
            kv_budget: KvBudget { bytes: 1 << 30, max_sequences: 8 },
            reserved: 0,
            filling: None,
            loops: LoopOptions::default(),
            wildcards: Wildcards::new(tokenizer_loc_ids),
        })
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// Sets what the decoder does with sequences that loop (see [`crate::loops`]).
    pub fn set_loop_options(&mut self, opts: LoopOptions) -> Result<()> {
        opts.validate()?;
        self.loops = opts;
        Ok(())
    }

    pub fn loop_options(&self) -> LoopOptions {
        self.loops
    }

    /// The ids that compare equal in loop detection (a DocTags model's `<loc_…>` tokens).
    pub fn loop_wildcards(&self) -> &Wildcards {
        &self.wildcards
    }

    /// The checkpoint's generation config with a retry's repetition penalty.
    fn with_penalty(&self, penalty: Option<f64>) -> Option<Arc<GenerationConfig>> {
        penalty.map(|p| Arc::new(GenerationConfig { repetition_penalty: p, ..self.generation.clone() }))
    }

    /// Tokenizer and chat template, for preparing requests on other threads.
    pub fn prompt_maker(&self) -> PromptMaker {
        PromptMaker { tokenizer: self.tokenizer.clone(), template: self.template.clone() }
    }

    /// Input embeddings of one request with image features scattered onto `<image>` positions.
    fn merged_embeddings(&self, ids: &[u32], feats: &Tensor) -> Result<Tensor> {
        let l = ids.len();
        let ids_t = Tensor::new(ids, &self.device)?;
        let tok = self.text.embed(&ids_t)?;
        let n_img = ids.iter().filter(|&&t| t == self.image_token_id).count();
        let n_feat = feats.dim(0)?;
        if n_img != n_feat {
            bail!(Processor, "image features and image tokens do not match: {n_img} tokens, {n_feat} features");
        }
        let mut k = 0u32;
        let index: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.image_token_id {
                    k += 1;
                    (l as u32) + k - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let both = Tensor::cat(&[&tok, &feats.to_dtype(tok.dtype())?], 0)?;
        Ok(both.index_select(&Tensor::new(index.as_slice(), &self.device)?, 0)?)
    }

    /// Whether key `j` is visible from query `i` (both indices into one row, left padding
    /// `pad`): causal, not padding, and inside the sliding window when there is one.
    fn visible(&self, i: usize, j: usize, pad: usize) -> bool {
        j <= i && j >= pad && self.sliding_window.is_none_or(|w| i - j < w)
    }

    /// First-step logits (f32, vocab) for each request; used by the parity tests.
    pub fn prefill_logits(&mut self, ids: &[Vec<u32>], feats: &[Tensor]) -> Result<Vec<Vec<f32>>> {
        self.text.set_cache_capacity(0);
        let logits = self.prefill(ids, feats)?;
        self.text.clear_cache();
        Ok(logits.to_vec2()?)
    }

    fn prefill(&mut self, ids: &[Vec<u32>], feats: &[Tensor]) -> Result<Tensor> {
        self.text.clear_cache();
        let max_len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mut rows = Vec::with_capacity(ids.len());
        let mut positions = Vec::with_capacity(ids.len());
        for (p, f) in ids.iter().zip(feats) {
            let e = self.merged_embeddings(p, f)?;
            let pad = max_len - p.len();
            let e = if pad > 0 {
                Tensor::cat(&[&Tensor::zeros((pad, self.hidden), e.dtype(), &self.device)?, &e], 0)?
            } else {
                e
            };
            rows.push(e);
            positions.push((0..max_len).map(|t| if t < pad { 0 } else { (t - pad) as i64 }).collect::<Vec<_>>());
        }
        let embeds = Tensor::stack(&rows, 0)?;
        let pads: Vec<usize> = ids.iter().map(|p| max_len - p.len()).collect();
        let mut m = Vec::with_capacity(pads.len() * max_len * max_len);
        for &pad in &pads {
            for i in 0..max_len {
                for j in 0..max_len {
                    m.push(if self.visible(i, j, pad) { 0f32 } else { f32::MIN });
                }
            }
        }
        let mask = Tensor::from_vec(m, (pads.len(), 1, max_len, max_len), &self.device)?;
        Ok(self.text.forward_last(&embeds, &positions, Some(&mask))?)
    }

    /// Batched greedy decoding with the checkpoint's generation config (see
    /// [`crate::generation`]) of prompts `ids` whose `<image>` tokens take `feats`; each row
    /// yields exactly the tokens of a run on its own. `max_new`: per-request length limits.
    pub fn generate(&mut self, ids: &[Vec<u32>], feats: &[Tensor], max_new: &[Option<usize>]) -> Result<Vec<Generation>> {
        self.generate_with(ids, feats, max_new, None)
    }

    /// [`Self::generate`] with `penalty` in place of the generation config's repetition
    /// penalty when given (the retry of pages that looped).
    pub fn generate_with(
        &mut self,
        ids: &[Vec<u32>],
        feats: &[Tensor],
        max_new: &[Option<usize>],
        penalty: Option<f64>,
    ) -> Result<Vec<Generation>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let b = ids.len();
        let max_len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let pads: Vec<usize> = ids.iter().map(|p| max_len - p.len()).collect();
        let budgets: Vec<usize> =
            max_new.iter().zip(ids).map(|(&n, p)| self.generation.budget(n, p.len())).collect();
        let budget = budgets.iter().copied().max().unwrap_or(0);
        // Each row's prompt followed by what it generated: what the logits processors look at.
        let mut seqs: Vec<Vec<u32>> = ids.to_vec();
        let mut done: Vec<Option<FinishReason>> =
            budgets.iter().map(|&n| if n == 0 { Some(FinishReason::Length) } else { None }).collect();
        let generation = self.with_penalty(penalty);
        let mut detectors: Vec<Option<LoopDetector>> =
            ids.iter().map(|_| self.loops.enabled().then(|| LoopDetector::new(&self.loops))).collect();
        let mut found: Vec<Option<Found>> = vec![None; b];
        if budget > 0 {
            self.text.set_cache_capacity(max_len + budget);
            // Prefill up to the first token's choice, then one decode stage per step.
            let mut _stage = enter(Stage::Prefill, Work { seqs: b, rows: b * max_len, pairs: b * max_len * max_len });
            let mut logits = self.prefill(ids, feats)?;
            let mut step = 0;
            let config = generation.as_deref().unwrap_or(&self.generation);
            loop {
                let rows = self.greedy(&logits, config.processes_scores(), |i, row| {
                    if done[i].is_none() {
                        config.process(&seqs[i], ids[i].len(), budgets[i], row);
                    }
                })?;
                let mut next = Vec::with_capacity(b);
                for (i, tok) in rows.into_iter().enumerate() {
                    if done[i].is_some() {
                        next.push(self.pad);
                        continue;
                    }
                    let prompt_len = ids[i].len();
                    seqs[i].push(tok);
                    let looped = detectors[i].as_mut().and_then(|d| d.push(&seqs[i][prompt_len..], &self.wildcards));
                    if self.generation.eos_token_ids.contains(&tok) {
                        done[i] = Some(FinishReason::Stop);
                    } else if looped.is_some() {
                        found[i] = looped;
                        done[i] = Some(FinishReason::Loop);
                    } else if seqs[i].len() - prompt_len >= budgets[i] {
                        done[i] = Some(FinishReason::Length);
                    }
                    next.push(tok);
                }
                step += 1;
                if done.iter().all(Option::is_some) || step >= budget {
                    break;
                }
                let total = max_len + step; // keys after appending this token
                _stage = enter(Stage::Decode, Work { seqs: b, rows: b, pairs: b * total });
                let tokens = Tensor::from_vec(next, (b, 1), &self.device)?;
                let embeds = self.text.embed(&tokens)?;
                let positions: Vec<Vec<i64>> =
                    pads.iter().map(|&pad| vec![(total - 1 - pad) as i64]).collect();
                let windowed = self.sliding_window.is_some_and(|w| total > w);
                let mask = if windowed || pads.iter().any(|&p| p > 0) {
                    let mut m = Vec::with_capacity(b * total);
                    for &pad in &pads {
                        m.extend((0..total).map(|j| if self.visible(total - 1, j, pad) { 0f32 } else { f32::MIN }));
                    }
                    Some(Tensor::from_vec(m, (b, 1, 1, total), &self.device)?)
                } else {
                    None
                };
                logits = self.text.forward_last(&embeds, &positions, mask.as_ref())?;
            }
            self.text.clear_cache();
        }
        ids.iter()
            .zip(seqs)
            .zip(done)
            .zip(found.into_iter().zip(budgets))
            .map(|(((p, mut seq), d), (f, budget))| {
                let new = seq.split_off(p.len());
                self.finished(p.len(), new, d.unwrap_or(FinishReason::Length), f, budget)
            })
            .collect()
    }
}

/// Continuous batching: sequences join (prefill into a free KV slot) and leave (EOS or
/// length) one at a time while the others keep decoding; one decode step runs every
/// sequence in flight at once. Each sequence yields exactly what it yields alone.
impl Decoder {
    pub fn set_kv_budget(&mut self, budget: KvBudget) {
        self.kv_budget = budget;
    }

    pub fn kv_budget(&self) -> KvBudget {
        self.kv_budget
    }

    /// Bytes of KV cache reserved by the sequences in flight.
    pub fn kv_reserved_bytes(&self) -> u64 {
        (self.reserved * self.text.kv_bytes_per_position()) as u64
    }

    pub fn in_flight(&self) -> usize {
        self.live.len()
    }

    /// Ids of the sequences in flight, in slot order.
    pub fn live_ids(&self) -> Vec<u64> {
        self.live.iter().map(|s| s.id).collect()
    }

    /// New tokens a prompt of `prompt_len` tokens may generate (the generation config's rule).
    pub fn budget_for(&self, prompt_len: usize, max_new: Option<usize>) -> usize {
        self.generation.budget(max_new, prompt_len)
    }

    /// Cache positions per slot for a sequence needing `need` (rounded up, so that pages
    /// of similar lengths share one slot size).
    fn slot_positions(need: usize) -> usize {
        need.div_ceil(256) * 256
    }

    /// Slots the budget holds at `positions` per slot.
    fn slots_for(&self, positions: usize) -> usize {
        let per = (positions * self.text.kv_bytes_per_position()) as u64;
        ((self.kv_budget.bytes / per.max(1)) as usize).min(self.kv_budget.max_sequences.max(1))
    }

    /// Whether a prompt of `prompt_len` tokens with `max_new` can be admitted now.
    pub fn admission(&self, prompt_len: usize, max_new: Option<usize>) -> Admission {
        let need = prompt_len + self.budget_for(prompt_len, max_new);
        let per = self.text.kv_bytes_per_position() as u64;
        if need as u64 * per > self.kv_budget.bytes {
            return Admission::Never(format!(
                "this page needs {:.1} MiB of KV cache ({need} positions: {prompt_len} in, up to {} new) \
                 and the whole KV-cache budget is {:.1} MiB: raise --kv-cache-mb or lower --max-new-tokens",
                (need as u64 * per) as f64 / 1048576.0,
                need - prompt_len,
                self.kv_budget.bytes as f64 / 1048576.0
            ));
        }
        let (_, positions) = self.text.slot_shape();
        let most = (self.kv_budget.bytes / per.max(1)) as usize;
        let positions = if need > positions { Self::slot_positions(need).min(most).max(need) } else { positions };
        let held = self.live.len() + usize::from(self.filling.is_some());
        if held < self.slots_for(positions) {
            Admission::Now
        } else {
            Admission::Later
        }
    }

    /// Prefills prompt `ids` (whose `<image>` tokens take `feats`) into the next free cache
    /// slot at once and picks its first token: [`Self::begin`] then [`Self::fill`] to the end.
    /// Returns the generation when it is already over (EOS first, or a budget of 0 or 1),
    /// else `None`: the sequence is in flight under `id`.
    pub fn admit(&mut self, id: u64, ids: &[u32], feats: &Tensor, max_new: Option<usize>) -> Result<Option<Generation>> {
        if let Some(g) = self.begin(id, ids, feats, max_new, None)? {
            return Ok(Some(g));
        }
        match self.fill(usize::MAX) {
            Ok(Some((_, g))) => Ok(g),
            Ok(None) => bail!(Invalid, "a prefill without a token limit did not finish"),
            Err(e) => {
                self.abort_filling();
                Err(e)
            }
        }
    }

    /// Starts the prefill of prompt `ids` (whose `<image>` tokens take `feats`): its KV cache
    /// is reserved now, and [`Self::fill`] runs it chunk by chunk between decode steps. One
    /// prompt is filled at a time. Returns the generation when it is over before it starts
    /// (a budget of 0). The caller checks [`Self::admission`] first; this does not. `penalty`
    /// replaces the generation config's repetition penalty for this sequence (a retry).
    pub fn begin(
        &mut self,
        id: u64,
        ids: &[u32],
        feats: &Tensor,
        max_new: Option<usize>,
        penalty: Option<f64>,
    ) -> Result<Option<Generation>> {
        if self.filling.is_some() {
            bail!(Invalid, "a prefill is under way already");
        }
        let budget = self.budget_for(ids.len(), max_new);
        if budget == 0 {
            return Ok(Some(self.finished(ids.len(), Vec::new(), FinishReason::Length, None, 0)?));
        }
        let embeds = self.merged_embeddings(ids, feats)?.unsqueeze(0)?;
        let need = ids.len() + budget;
        self.reserved += need;
        let generation = self.with_penalty(penalty);
        self.filling = Some(Filling { id, ids: ids.to_vec(), embeds, done: 0, budget, need, generation });
        Ok(None)
    }

    /// The prompt being prefilled: its id and the positions still to fill.
    pub fn filling(&self) -> Option<(u64, usize)> {
        self.filling.as_ref().map(|f| (f.id, f.ids.len() - f.done))
    }

    /// Prefills up to `tokens` more positions of the prompt begun by [`Self::begin`]. When
    /// that ends its prompt, the sequence moves into the next free slot with its first token
    /// chosen: `Some((id, None))` when it is now in flight, `Some((id, Some(generation)))`
    /// when it is already over (EOS first, or a budget of 1). `None`: more to fill. Chunks
    /// attend to the keys of the chunks before them, so the result does not depend on their
    /// size. After an error, call [`Self::abort_filling`].
    pub fn fill(&mut self, tokens: usize) -> Result<Option<(u64, Option<Generation>)>> {
        let Some(f) = self.filling.as_ref() else { return Ok(None) };
        let (l, off) = (f.ids.len(), f.done);
        let n = tokens.max(1).min(l - off);
        let chunk = f.embeds.narrow(1, off, n)?;
        let positions = vec![(off as i64..(off + n) as i64).collect::<Vec<_>>()];
        let mut m = Vec::with_capacity(n * (off + n));
        for i in off..off + n {
            m.extend((0..off + n).map(|j| if self.visible(i, j, 0) { 0f32 } else { f32::MIN }));
        }
        let mask = Tensor::from_vec(m, (1, 1, n, off + n), &self.device)?;
        let _stage = enter(Stage::Prefill, Work { seqs: 1, rows: n, pairs: n * (off + n) });
        if off == 0 {
            self.text.clear_cache();
        }
        let logits = self.text.prefill_chunk(&chunk, &positions, Some(&mask), l)?;
        let f = self.filling.as_mut().expect("checked above");
        f.done += n;
        if f.done < l {
            return Ok(None);
        }
        let f = self.filling.take().expect("checked above");
        let slot = self.live.len();
        let (slots, positions) = self.text.slot_shape();
        if f.need > positions || slot >= slots {
            // A longer slot size when this sequence needs one (rounded up, within the budget).
            let most = (self.kv_budget.bytes / self.text.kv_bytes_per_position().max(1) as u64) as usize;
            let positions = if f.need > positions { Self::slot_positions(f.need).min(most).max(f.need) } else { positions };
            let n = self.slots_for(positions).max(slot + 1);
            let keep_positions = self.live.iter().map(|s| s.seq.len()).max().unwrap_or(0);
            if let Err(e) = self.text.resize_slots(n, positions, slot, keep_positions) {
                self.reserved -= f.need;
                return Err(e.into());
            }
        }
        if let Err(e) = self.text.commit_prefill(slot) {
            self.reserved -= f.need;
            return Err(e.into());
        }
        let mut live = Live::new(f.id, f.ids, f.budget, f.need, f.generation, &self.loops);
        let config = live.generation.as_deref().unwrap_or(&self.generation);
        let tok = match self.greedy(&logits, config.processes_scores(), |_, row| config.process(&live.seq, l, live.budget, row)) {
            Ok(t) => t[0],
            Err(e) => {
                self.reserved -= f.need;
                return Err(e);
            }
        };
        match self.advance(&mut live, tok) {
            Some(reason) => {
                self.reserved -= live.reserved;
                let new = live.seq.split_off(l);
                Ok(Some((f.id, Some(self.finished(l, new, reason, live.found, live.budget)?))))
            }
            None => {
                self.live.push(live);
                Ok(Some((f.id, None)))
            }
        }
    }

    /// Drops the prompt being prefilled (after an error) and returns its id.
    pub fn abort_filling(&mut self) -> Option<u64> {
        let f = self.filling.take()?;
        self.reserved -= f.need;
        self.text.clear_cache();
        Some(f.id)
    }

    /// One decode step of every sequence in flight; returns those that finished (the
    /// others move up so that the sequences in flight keep the first slots). On an error
    /// every sequence in flight is dropped ([`Self::abort_all`] lists them).
    pub fn step(&mut self) -> Result<Vec<(u64, Generation)>> {
        if self.live.is_empty() {
            return Ok(Vec::new());
        }
        let b = self.live.len();
        // The newest token is fed at position len - 1; the cache holds len - 1 keys before it.
        let lens: Vec<usize> = self.live.iter().map(|s| s.seq.len() - 1).collect();
        let keys = lens.iter().map(|&l| self.sliding_window.map_or(l + 1, |w| (l + 1).min(w))).sum();
        let _stage = enter(Stage::Decode, Work { seqs: b, rows: b, pairs: keys });
        // One upload per step (new tokens and cache lengths); the rest is derived on the device.
        let mut host: Vec<u32> = self.live.iter().map(|s| *s.seq.last().expect("a prompt is never empty")).collect();
        host.extend(lens.iter().map(|&l| l as u32));
        let both = Tensor::from_vec(host, (2, b), &self.device)?;
        let (tokens, lens_t) = (both.get(0)?, both.get(1)?);
        let (kvh, d) = self.text.kv_heads_and_dim();
        let index = lens_t.reshape((b, 1, 1, 1))?.broadcast_as((b, kvh, 1, d))?.contiguous()?;
        let mask = if self.text.cpu_f32() {
            None
        } else {
            let keys = lens.iter().max().map_or(0, |l| l + 1);
            let j = Tensor::arange(0u32, keys as u32, &self.device)?.reshape((1, keys))?;
            let l = lens_t.reshape((b, 1))?;
            let mut seen = j.broadcast_le(&l)?;
            if let Some(w) = self.sliding_window {
                // j > l - w, as j + w > l (no underflow)
                seen = (seen.to_dtype(DType::U32)? * (j + w as f64)?.broadcast_gt(&l)?.to_dtype(DType::U32)?)?.ne(0u32)?;
            }
            let zeros = Tensor::zeros((b, keys), DType::F32, &self.device)?;
            let masked = zeros.affine(0.0, f32::MIN as f64)?;
            Some(seen.where_cond(&zeros, &masked)?.reshape((b, 1, 1, keys))?)
        };
        let st = crate::text_model::SlotStep { lens: &lens, index: &index, mask: mask.as_ref(), window: self.sliding_window };
        let embeds = self.text.embed(&tokens.reshape((b, 1))?)?;
        let logits = self.text.forward_slots(&embeds, &lens_t, &st)?;
        let processes = self.generation.processes_scores()
            || self.live.iter().any(|s| s.generation.as_ref().is_some_and(|g| g.processes_scores()));
        let toks = self.greedy(&logits, processes, |i, row| {
            let s = &self.live[i];
            s.generation.as_deref().unwrap_or(&self.generation).process(&s.seq, s.prompt_len, s.budget, row)
        })?;
        let mut done = Vec::new();
        for (i, tok) in toks.into_iter().enumerate() {
            let mut live = std::mem::replace(&mut self.live[i], Live::placeholder());
            if let Some(reason) = self.advance(&mut live, tok) {
                done.push((i, reason));
            }
            self.live[i] = live;
        }
        let mut out = Vec::with_capacity(done.len());
        // From the last row up: the last sequence moves into the leaving one's slot.
        for &(i, reason) in done.iter().rev() {
            let last = self.live.len() - 1;
            if i != last {
                let len = self.live[last].seq.len() - 1;
                self.text.move_slot(last, i, len)?;
            }
            let mut live = self.live.swap_remove(i);
            self.reserved -= live.reserved;
            let new = live.seq.split_off(live.prompt_len);
            out.push((live.id, self.finished(live.prompt_len, new, reason, live.found, live.budget)?));
        }
        out.reverse();
        Ok(out)
    }

    /// Drops every sequence in flight and returns their ids (after a failed step).
    pub fn abort_all(&mut self) -> Vec<u64> {
        let filling = self.abort_filling();
        self.reserved = 0;
        std::mem::take(&mut self.live).into_iter().map(|s| s.id).chain(filling).collect()
    }

    /// Appends the chosen token `tok` to `live`; the finish reason when it ends the sequence
    /// (an EOS id, a loop, or the budget reached, in that order).
    fn advance(&self, live: &mut Live, tok: u32) -> Option<FinishReason> {
        live.seq.push(tok);
        let looped = live.loops.as_mut().and_then(|d| d.push(&live.seq[live.prompt_len..], &self.wildcards));
        if self.generation.eos_token_ids.contains(&tok) {
            Some(FinishReason::Stop)
        } else if looped.is_some() {
            live.found = looped;
            Some(FinishReason::Loop)
        } else if live.seq.len() - live.prompt_len >= live.budget {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// The greedy next token of every row of `logits` (b, vocab). With processors in the
    /// generation config (`processes`), rows come to the host and `process(row index, row)` runs first;
    /// without, on a GPU the argmax runs there and only the ids come back (a copy of the
    /// whole logits per step would cost more than the step; an exact tie may then resolve
    /// to another index than `torch.argmax`'s first).
    fn greedy(&self, logits: &Tensor, processes: bool, mut process: impl FnMut(usize, &mut [f32])) -> Result<Vec<u32>> {
        let _timer = span(Part::Sampling);
        if !processes && !self.device.is_cpu() {
            return Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?);
        }
        let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
        Ok(rows
            .iter_mut()
            .enumerate()
            .map(|(i, row)| {
                if processes {
                    process(i, row);
                }
                argmax(row)
            })
            .collect())
    }

    /// The generation of a sequence that ended: a loop's repeated tail is cut to one period,
    /// and the loop reported with what the sequence generated of its `budget`.
    fn finished(&self, prompt_len: usize, mut new: Vec<u32>, reason: FinishReason, found: Option<Found>, budget: usize) -> Result<Generation> {
        let loop_report = found.map(|f| {
            let generated = new.len();
            new.truncate(f.keep);
            LoopReport { period: f.period, attempts: vec![generated], tokens_saved: budget.saturating_sub(generated), looped: true }
        });
        Ok(Generation {
            loop_report,
            text: self.tokenizer.decode(&new)?,
            tokens_in: prompt_len,
            tokens_out: new.len(),
            token_ids: new,
            finish_reason: reason,
            device_ms: 0.0,
        })
    }
}

/// Index of the largest value; the first one on ties, like `torch.argmax`.
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
