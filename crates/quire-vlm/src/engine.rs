//! What both families share around their vision side: reading the weights, the tokenizer
//! and chat template, the generation config, and the text decoder with batched greedy
//! generation. A family turns requests into prompt token ids plus image features (one row
//! per `<image>` token) and hands them to [`Decoder::generate`].

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::config::TextConfig;
use crate::generation::GenerationConfig;
use crate::prompt::{ChatTemplate, TextTokenizer};
use crate::text_model::TextModel;
use crate::{FinishReason, Generation};

/// Weights read in `via` precision and handed out in the requested one: bf16 weights for
/// f32 arithmetic (see [`load_weights`]).
struct RoundedWeights {
    inner: candle_core::safetensors::MmapedSafetensors,
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
        candle_nn::var_builder::SimpleBackend::contains_tensor(&self.inner, name)
    }
}

/// Memory-maps the checkpoint's safetensors (single file or shards) and returns the dtype
/// the model computes in with a builder for its weights.
///
/// candle 0.9's CPU backend has no bf16 matrix product (f16, f32 and f64 only), so bf16 on
/// the CPU means bf16 weights with f32 arithmetic: every weight is rounded to bf16, then
/// widened (exactly) to f32.
pub fn load_weights(ck: &Checkpoint, device: &Device, dtype: DType) -> Result<(DType, VarBuilder<'static>)> {
    let files = ck.safetensors_files()?;
    if device.is_cpu() && dtype == DType::BF16 {
        tracing::info!(
            "bf16 on the CPU: weights rounded to bf16, arithmetic in f32 (candle's CPU backend \
             has no bf16 matrix product); use --dtype f16 for 16-bit arithmetic on the CPU"
        );
        // SAFETY: the weight files are memory-mapped read-only and not modified while loaded.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
        let backend = RoundedWeights { inner: st, via: DType::BF16 };
        Ok((DType::F32, VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())))
    } else {
        // SAFETY: as above.
        Ok((dtype, unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? }))
    }
}

/// Finds the prefix under which a checkpoint stores a component (names changed across versions).
pub fn pick_prefix<'a>(vb: &VarBuilder<'a>, probe: &str, candidates: &[&str]) -> Result<VarBuilder<'a>> {
    for c in candidates {
        if vb.contains_tensor(&format!("{c}.{probe}")) {
            return Ok(vb.pp(*c));
        }
    }
    bail!("no weight named {} (looked under {candidates:?})", probe)
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
            out.extend(h.join().map_err(|_| anyhow::anyhow!("preparing an image panicked"))??);
        }
        Ok(out)
    })
}

/// The text side of a loaded checkpoint: tokenizer, chat template, decoder and generation settings.
pub struct Decoder {
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    text: TextModel,
    generation: GenerationConfig,
    pad: u32,
    image_token_id: u32,
    hidden: usize,
    sliding_window: Option<usize>,
    pub device: Device,
    pub dtype: DType,
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
    ) -> Result<Decoder> {
        let tokenizer = TextTokenizer::load(&ck.dir, &ck.tokenizer_config)?;
        let template = match &ck.chat_template {
            Some(t) => Some(ChatTemplate::new(t, &ck.tokenizer_config)?),
            None => None,
        };
        // Tied in config but stored anyway: the stored copy equals the embeddings.
        let head = vb.contains_tensor("lm_head.weight").then(|| vb.pp("lm_head"));
        let text = TextModel::new(cfg, text_vb, head)?;
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
        })
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// The chat-templated prompt for one user turn with the image first, then `text`;
    /// `fallback` formats it when the checkpoint has no template.
    pub fn render_prompt(&self, text: &str, fallback: impl FnOnce(&str) -> String) -> Result<String> {
        match &self.template {
            Some(t) => t.render_user_image_turn(text),
            None => Ok(fallback(text)),
        }
    }

    /// Input embeddings of one request with image features scattered onto `<image>` positions.
    fn merged_embeddings(&self, ids: &[u32], feats: &Tensor) -> Result<Tensor> {
        let l = ids.len();
        let ids_t = Tensor::new(ids, &self.device)?;
        let tok = self.text.embed(&ids_t)?;
        let n_img = ids.iter().filter(|&&t| t == self.image_token_id).count();
        let n_feat = feats.dim(0)?;
        if n_img != n_feat {
            bail!("image features and image tokens do not match: {n_img} tokens, {n_feat} features");
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
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let b = ids.len();
        let max_len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let pads: Vec<usize> = ids.iter().map(|p| max_len - p.len()).collect();
        let budgets: Vec<usize> =
            max_new.iter().zip(ids).map(|(&n, p)| self.generation.budget(n, p.len())).collect();
        let budget = budgets.iter().copied().max().unwrap_or(0);
        let process = self.generation.processes_scores();
        // Each row's prompt followed by what it generated: what the logits processors look at.
        let mut seqs: Vec<Vec<u32>> = ids.to_vec();
        let mut done: Vec<Option<FinishReason>> =
            budgets.iter().map(|&n| if n == 0 { Some(FinishReason::Length) } else { None }).collect();
        if budget > 0 {
            self.text.set_cache_capacity(max_len + budget);
            let mut logits = self.prefill(ids, feats)?;
            let mut step = 0;
            loop {
                let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
                let mut next = Vec::with_capacity(b);
                for (i, row) in rows.iter_mut().enumerate() {
                    if done[i].is_some() {
                        next.push(self.pad);
                        continue;
                    }
                    let prompt_len = ids[i].len();
                    if process {
                        self.generation.process(&seqs[i], prompt_len, budgets[i], row);
                    }
                    let tok = argmax(row);
                    seqs[i].push(tok);
                    if self.generation.eos_token_ids.contains(&tok) {
                        done[i] = Some(FinishReason::Stop);
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
            .map(|((p, mut seq), d)| {
                let new = seq.split_off(p.len());
                Ok(Generation {
                    text: self.tokenizer.decode(&new)?,
                    tokens_in: p.len(),
                    tokens_out: new.len(),
                    token_ids: new,
                    finish_reason: d.unwrap_or(FinishReason::Length),
                })
            })
            .collect()
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
