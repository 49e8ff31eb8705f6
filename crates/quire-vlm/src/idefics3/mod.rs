//! The Idefics3 family (SmolVLM, SmolDocling, Granite-Docling, Idefics3-8B): processor,
//! weights and batched greedy generation.
//!
//! Weight names follow the checkpoint: `model.vision_model.*`, `model.connector.*`,
//! `model.text_model.*`, `lm_head.weight` (absent when tied to the embeddings).

pub mod config;
pub mod processor;
pub mod text_model;
pub mod vision_model;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::generation::GenerationConfig;
use crate::prompt::{ChatTemplate, TextTokenizer};
use crate::{FinishReason, Generation, Request};
use config::Idefics3Config;
use processor::{ImageProcessorConfig, ProcessedImage};
use text_model::TextModel;
use vision_model::{Connector, VisionModel};

/// Tiles sent through the vision encoder at once (bounds activation memory).
const VISION_CHUNK: usize = 16;

/// A request after processing: prompt token ids and the image tiles.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub image: ProcessedImage,
}

pub struct Idefics3 {
    pub config: Idefics3Config,
    pub image_processor: ImageProcessorConfig,
    pub image_seq_len: usize,
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    vision: VisionModel,
    connector: Connector,
    text: TextModel,
    generation: GenerationConfig,
    pad: u32,
    device: Device,
    dtype: DType,
}

/// Weights read in `via` precision and handed out in the requested one: bf16 weights for
/// f32 arithmetic (see [`Idefics3::load`]).
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

/// Finds the prefix under which a checkpoint stores a component (names changed across versions).
fn pick_prefix<'a>(vb: &VarBuilder<'a>, probe: &str, candidates: &[&str]) -> Result<VarBuilder<'a>> {
    for c in candidates {
        if vb.contains_tensor(&format!("{c}.{probe}")) {
            return Ok(vb.pp(*c));
        }
    }
    bail!("no weight named {} (looked under {candidates:?})", probe)
}

impl Idefics3 {
    pub fn load(ck: &Checkpoint, device: &Device, dtype: DType) -> Result<Idefics3> {
        let config = Idefics3Config::from_json(&ck.config)?;
        let image_processor = ImageProcessorConfig::from_json(&ck.image_processor)?;
        let image_seq_len = ck
            .processor
            .get("image_seq_len")
            .and_then(|v| v.as_u64())
            .map(|x| x as usize)
            .unwrap_or_else(|| config.image_seq_len());
        let tokenizer = TextTokenizer::load(&ck.dir, &ck.tokenizer_config)?;
        let template = match &ck.chat_template {
            Some(t) => Some(ChatTemplate::new(t, &ck.tokenizer_config)?),
            None => None,
        };
        let files = ck.safetensors_files()?;
        // candle 0.9's CPU backend has no bf16 matrix product (f16, f32 and f64 only), so bf16
        // on the CPU means bf16 weights with f32 arithmetic: every weight is rounded to bf16,
        // then widened (exactly) to f32.
        let (dtype, vb) = if device.is_cpu() && dtype == DType::BF16 {
            tracing::info!(
                "bf16 on the CPU: weights rounded to bf16, arithmetic in f32 (candle's CPU backend \
                 has no bf16 matrix product); use --dtype f16 for 16-bit arithmetic on the CPU"
            );
            // SAFETY: the weight files are memory-mapped read-only and not modified while loaded.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
            let backend = RoundedWeights { inner: st, via: DType::BF16 };
            (DType::F32, VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone()))
        } else {
            // SAFETY: as above.
            (dtype, unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? })
        };
        let text_vb = pick_prefix(&vb, "embed_tokens.weight", &["model.text_model", "text_model", "model.language_model"])?;
        let vision_vb = pick_prefix(
            &vb,
            "embeddings.patch_embedding.weight",
            &["model.vision_model", "vision_model", "model.vision_tower"],
        )?;
        let conn_vb = pick_prefix(&vb, "modality_projection.proj.weight", &["model.connector", "connector"])?;
        let head = if vb.contains_tensor("lm_head.weight") && !config.tie_word_embeddings {
            Some(vb.pp("lm_head"))
        } else if vb.contains_tensor("lm_head.weight") {
            // Tied in config but stored anyway: the stored copy equals the embeddings.
            Some(vb.pp("lm_head"))
        } else {
            None
        };
        let vision = VisionModel::new(&config.vision, vision_vb).context("loading model.vision_model")?;
        let connector = Connector::new(config.vision.hidden_size, config.text.hidden_size, config.scale_factor, conn_vb)
            .context("loading model.connector")?;
        let text = TextModel::new(&config.text, text_vb, head).context("loading model.text_model")?;
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
        Ok(Idefics3 {
            config,
            image_processor,
            image_seq_len,
            tokenizer,
            template,
            vision,
            connector,
            text,
            generation,
            pad,
            device: device.clone(),
            dtype,
        })
    }

    /// The chat-templated prompt for one user turn with the image first, then `text`.
    pub fn render_prompt(&self, text: &str) -> Result<String> {
        match &self.template {
            Some(t) => t.render_user_image_turn(text),
            None => Ok(format!("<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant:")),
        }
    }

    /// Processor output for one request: tiles, expanded prompt and token ids.
    pub fn prepare(&self, image: &image::DynamicImage, text: &str) -> Result<Prepared> {
        let img = self.image_processor.process(image)?;
        let templ = self.render_prompt(text)?;
        let prompt = processor::expand_prompt(&templ, &[(img.rows, img.cols)], self.image_seq_len)?;
        let input_ids = self.tokenizer.encode(&prompt)?;
        Ok(Prepared { prompt, input_ids, image: img })
    }

    /// [`Self::prepare`] for every request, spread over the CPU cores (resizing and tiling
    /// large pages is CPU work that would otherwise keep the device waiting).
    pub fn prepare_all(&self, reqs: &[Request]) -> Result<Vec<Prepared>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(reqs.len());
        if threads <= 1 {
            return reqs.iter().map(|r| self.prepare(&r.image, &r.prompt)).collect();
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = reqs
                .chunks(reqs.len().div_ceil(threads))
                .map(|c| s.spawn(move || c.iter().map(|r| self.prepare(&r.image, &r.prompt)).collect::<Result<Vec<_>>>()))
                .collect();
            let mut out = Vec::with_capacity(reqs.len());
            for h in handles {
                out.extend(h.join().map_err(|_| anyhow::anyhow!("preparing an image panicked"))??);
            }
            Ok(out)
        })
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The checkpoint's generation settings as applied by [`Self::generate`].
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// Image features (tiles × image_seq_len rows, text hidden) for each prepared request.
    fn image_features(&self, preps: &[Prepared]) -> Result<Vec<Tensor>> {
        let tiles: Vec<&processor::Tile> = preps.iter().flat_map(|p| p.image.tiles.iter()).collect();
        let (mh, mw) = tiles.iter().fold((0, 0), |(h, w), t| (h.max(t.height), w.max(t.width)));
        let p = self.config.vision.patch_size;
        let mut feats = Vec::new();
        for chunk in tiles.chunks(VISION_CHUNK) {
            let mut data = Vec::with_capacity(chunk.len() * 3 * mh * mw);
            let mut valid = Vec::with_capacity(chunk.len());
            for t in chunk {
                // zero-pad bottom/right to the largest tile, like the processor's do_pad
                for c in 0..3 {
                    for y in 0..mh {
                        if y < t.height {
                            let row = &t.data[c * t.height * t.width + y * t.width..][..t.width];
                            data.extend_from_slice(row);
                            data.extend(std::iter::repeat_n(0f32, mw - t.width));
                        } else {
                            data.extend(std::iter::repeat_n(0f32, mw));
                        }
                    }
                }
                // a patch is valid when any of its pixels is
                valid.push((t.height.div_ceil(p), t.width.div_ceil(p)));
            }
            let px = Tensor::from_vec(data, (chunk.len(), 3, mh, mw), &self.device)?.to_dtype(self.dtype)?;
            let h = self.vision.forward(&px, &valid)?;
            feats.push(self.connector.forward(&h)?);
        }
        let all = Tensor::cat(&feats, 0)?; // (tiles, seq, hidden)
        let (_, seq, hid) = all.dims3()?;
        let mut out = Vec::new();
        let mut start = 0;
        for p in preps {
            let n = p.image.tiles.len();
            out.push(all.narrow(0, start, n)?.reshape((n * seq, hid))?);
            start += n;
        }
        Ok(out)
    }

    /// Input embeddings of one request with image features scattered onto `<image>` positions.
    fn merged_embeddings(&self, ids: &[u32], feats: &Tensor) -> Result<Tensor> {
        let l = ids.len();
        let ids_t = Tensor::new(ids, &self.device)?;
        let tok = self.text.embed(&ids_t)?;
        let n_img = ids.iter().filter(|&&t| t == self.config.image_token_id).count();
        let n_feat = feats.dim(0)?;
        if n_img != n_feat {
            bail!("image features and image tokens do not match: {n_img} tokens, {n_feat} features");
        }
        let mut k = 0u32;
        let index: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.config.image_token_id {
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

    /// First-step logits (f32, vocab) for each request; used by the parity tests.
    pub fn prefill_logits(&mut self, reqs: &[Request]) -> Result<Vec<Vec<f32>>> {
        let preps = self.prepare_all(reqs)?;
        self.text.set_cache_capacity(0);
        let logits = self.prefill(&preps)?;
        self.text.clear_cache();
        Ok(logits.to_vec2()?)
    }

    fn prefill(&mut self, preps: &[Prepared]) -> Result<Tensor> {
        self.text.clear_cache();
        let feats = self.image_features(preps)?;
        let max_len = preps.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
        let hidden = self.config.text.hidden_size;
        let mut rows = Vec::with_capacity(preps.len());
        let mut positions = Vec::with_capacity(preps.len());
        for (p, f) in preps.iter().zip(&feats) {
            let e = self.merged_embeddings(&p.input_ids, f)?;
            let pad = max_len - p.input_ids.len();
            let e = if pad > 0 {
                Tensor::cat(&[&Tensor::zeros((pad, hidden), e.dtype(), &self.device)?, &e], 0)?
            } else {
                e
            };
            rows.push(e);
            positions.push((0..max_len).map(|t| if t < pad { 0 } else { (t - pad) as i64 }).collect::<Vec<_>>());
        }
        let embeds = Tensor::stack(&rows, 0)?;
        let pads: Vec<usize> = preps.iter().map(|p| max_len - p.input_ids.len()).collect();
        let mask = self.prefill_mask(&pads, max_len)?;
        Ok(self.text.forward_last(&embeds, &positions, Some(&mask))?)
    }

    fn prefill_mask(&self, pads: &[usize], len: usize) -> Result<Tensor> {
        let mut m = Vec::with_capacity(pads.len() * len * len);
        for &pad in pads {
            for i in 0..len {
                for j in 0..len {
                    m.push(if j <= i && j >= pad { 0f32 } else { f32::MIN });
                }
            }
        }
        Ok(Tensor::from_vec(m, (pads.len(), 1, len, len), &self.device)?)
    }

    /// Batched greedy decoding with the checkpoint's generation config (see
    /// [`crate::generation`]); each row yields exactly the tokens of a run on its own.
    pub fn generate(&mut self, reqs: &[Request]) -> Result<Vec<Generation>> {
        if reqs.is_empty() {
            return Ok(vec![]);
        }
        let preps = self.prepare_all(reqs)?;
        let b = preps.len();
        let max_len = preps.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
        let pads: Vec<usize> = preps.iter().map(|p| max_len - p.input_ids.len()).collect();
        let budgets: Vec<usize> = reqs
            .iter()
            .zip(&preps)
            .map(|(r, p)| self.generation.budget(r.max_new_tokens, p.input_ids.len()))
            .collect();
        let budget = budgets.iter().copied().max().unwrap_or(0);
        let process = self.generation.processes_scores();
        // Each row's prompt followed by what it generated: what the logits processors look at.
        let mut seqs: Vec<Vec<u32>> = preps.iter().map(|p| p.input_ids.clone()).collect();
        let mut done: Vec<Option<FinishReason>> =
            budgets.iter().map(|&n| if n == 0 { Some(FinishReason::Length) } else { None }).collect();
        if budget > 0 {
            self.text.set_cache_capacity(max_len + budget);
            let mut logits = self.prefill(&preps)?;
            let mut step = 0;
            loop {
                let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
                let mut next = Vec::with_capacity(b);
                for (i, row) in rows.iter_mut().enumerate() {
                    if done[i].is_some() {
                        next.push(self.pad);
                        continue;
                    }
                    let prompt_len = preps[i].input_ids.len();
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
                let ids = Tensor::from_vec(next, (b, 1), &self.device)?;
                let embeds = self.text.embed(&ids)?;
                let positions: Vec<Vec<i64>> =
                    pads.iter().map(|&pad| vec![(total - 1 - pad) as i64]).collect();
                let mask = if pads.iter().any(|&p| p > 0) {
                    let mut m = Vec::with_capacity(b * total);
                    for &pad in &pads {
                        m.extend((0..total).map(|j| if j >= pad { 0f32 } else { f32::MIN }));
                    }
                    Some(Tensor::from_vec(m, (b, 1, 1, total), &self.device)?)
                } else {
                    None
                };
                logits = self.text.forward_last(&embeds, &positions, mask.as_ref())?;
            }
            self.text.clear_cache();
        }
        preps
            .iter()
            .zip(seqs)
            .zip(done)
            .map(|((p, mut seq), d)| {
                let ids = seq.split_off(p.input_ids.len());
                Ok(Generation {
                    text: self.tokenizer.decode(&ids)?,
                    tokens_in: p.input_ids.len(),
                    tokens_out: ids.len(),
                    token_ids: ids,
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
