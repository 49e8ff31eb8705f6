//! The Idefics2 family (Idefics2-8B, -8B-base, -8B-chatty): processor, weights and batched
//! greedy generation.
//!
//! Weight names follow the checkpoint: `model.vision_model.*`, `model.connector.*`
//! (`modality_projection`, `perceiver_resampler`), `model.text_model.*` (Mistral),
//! `lm_head.weight`. What is Idefics2's own: the processor (quarter crops, edge-bounded
//! resize, frames of their own sizes), the all-pixels patch rule and the perceiver
//! connector; the encoder, decoder and generation loop are shared with Idefics3
//! ([`crate::siglip`], [`crate::engine`]).

pub mod config;
pub mod connector;
pub mod processor;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{bail, Context};
use crate::engine::{linear_dtype, load_weights, pick_prefix, Decoder, PromptMaker};
use crate::family::{FamilyModel, FamilyProcessor, PreparedInput};
use crate::frames::{pad_frames, PatchRule, Tile};
use crate::siglip::VisionModel;
use crate::Result;
use config::Idefics2Config;
use connector::Connector;
use processor::ImageProcessorConfig;

/// Frames sent through the vision encoder at once (bounds activation memory).
const VISION_CHUNK: usize = 16;

/// A request after processing: prompt token ids and the image's frames.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    /// One frame, or four quarters and the whole image with splitting.
    pub frames: Vec<Tile>,
}

/// Idefics2's host-side processing (frames, prompt expansion, tokenizing), detached from the
/// model so that other threads can prepare requests while the device works.
#[derive(Clone)]
pub struct Idefics2Processor {
    image: ImageProcessorConfig,
    image_seq_len: usize,
    prompts: PromptMaker,
}

impl PreparedInput for Prepared {
    fn input_ids(&self) -> &[u32] {
        &self.input_ids
    }

    fn pixel_bytes(&self) -> usize {
        self.frames.iter().map(|t| t.data.len() * 4).sum()
    }

    fn into_any(self) -> crate::Prepared {
        crate::Prepared::Idefics2(self)
    }

    fn from_any(p: &crate::Prepared) -> Option<&Self> {
        match p {
            crate::Prepared::Idefics2(p) => Some(p),
            _ => None,
        }
    }
}

impl FamilyProcessor for Idefics2Processor {
    type Prepared = Prepared;

    fn render_prompt(&self, text: &str) -> Result<String> {
        self.prompts.render(text, |t| format!("User:<image>{t}<end_of_utterance>\nAssistant:"))
    }

    /// Frames, expanded prompt and token ids.
    fn prepare(&self, image: &image::DynamicImage, text: &str) -> Result<Prepared> {
        let frames = self.image.process(image)?;
        let templ = self.render_prompt(text)?;
        let n_images = templ.matches(processor::IMAGE_TOKEN).count();
        if n_images != 1 {
            bail!(Processor, "the prompt has {n_images} <image> tokens for one image");
        }
        let prompt = processor::expand_prompt(&templ, self.image_seq_len, frames.len());
        let input_ids = self.prompts.tokenizer.encode(&prompt)?;
        Ok(Prepared { prompt, input_ids, frames })
    }

    fn into_any(self) -> crate::Processor {
        crate::Processor::Idefics2(self)
    }
}

pub struct Idefics2 {
    pub config: Idefics2Config,
    pub image_processor: ImageProcessorConfig,
    pub image_seq_len: usize,
    processor: Idefics2Processor,
    vision: VisionModel,
    connector: Connector,
    decoder: Decoder,
}

impl Idefics2 {
    /// Loads `ck` on `device` in `dtype`, the text model's linear layers as `quantize` asks.
    pub fn load(ck: &Checkpoint, device: &Device, dtype: DType, quantize: crate::Quantize) -> Result<Idefics2> {
        let config = Idefics2Config::from_json(&ck.config)?;
        let image_processor = ImageProcessorConfig::from_json(&ck.image_processor)?;
        let image_seq_len = ck
            .processor
            .get("image_seq_len")
            .and_then(|v| v.as_u64())
            .map(|x| x as usize)
            .unwrap_or(config.perceiver.n_latents);
        if image_seq_len != config.perceiver.n_latents {
            bail!(
                Checkpoint,
                "{}: the processor's image_seq_len ({image_seq_len}) differs from perceiver_config.resampler_n_latents ({})",
                ck.dir.display(),
                config.perceiver.n_latents
            );
        }
        let linears = linear_dtype(device, dtype)?;
        let text_linears = crate::engine::text_linears(device, dtype, quantize)?;
        let (dtype, vb) = load_weights(ck, device, dtype)?;
        let text_vb = pick_prefix(&vb, "embed_tokens.weight", &["model.text_model", "text_model", "model.language_model"])?;
        let vision_vb = pick_prefix(&vb, "embeddings.patch_embedding.weight", &["model.vision_model", "vision_model"])?;
        let conn_vb = pick_prefix(&vb, "modality_projection.gate_proj.weight", &["model.connector", "connector"])?;
        let vision = VisionModel::new(&config.vision, vision_vb, linears).context("loading model.vision_model")?;
        let connector =
            Connector::new(config.vision.hidden_size, config.text.intermediate_size, &config.perceiver, conn_vb, linears)
                .context("loading model.connector")?;
        let decoder = Decoder::load(ck, &config.text, &vb, text_vb, config.image_token_id, dtype, text_linears)
            .context("loading model.text_model")?;
        let processor =
            Idefics2Processor { image: image_processor.clone(), image_seq_len, prompts: decoder.prompt_maker() };
        Ok(Idefics2 { config, image_processor, image_seq_len, processor, vision, connector, decoder })
    }
}

impl FamilyModel for Idefics2 {
    type Processor = Idefics2Processor;

    fn processing(&self) -> &Idefics2Processor {
        &self.processor
    }

    fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    /// Image features (frames × image_seq_len rows, text hidden) for each prepared request.
    /// Frames are padded to the largest of each chunk with the patch mask; padded patches
    /// are masked in the encoder and the resampler, so a frame gives what it gives alone up
    /// to rounding: the sums over a padded sequence round differently. On the CPU, whose
    /// kernels sum each row the same way whatever is beside it, frames go to the encoder in
    /// groups of one size (no padding), so a frame's features, and the page's text, are
    /// the same bits batched or alone.
    fn image_features(&self, preps: &[&Prepared]) -> Result<Vec<Tensor>> {
        let mut frames: Vec<(usize, &Tile)> = preps.iter().flat_map(|p| p.frames.iter()).enumerate().collect();
        let by_size = self.decoder.device.is_cpu();
        if by_size {
            // Stable: frames of one size keep their order.
            frames.sort_by_key(|(_, t)| (t.height, t.width));
        }
        let p = self.config.vision.patch_size;
        let mut feats = Vec::new();
        let mut start = 0;
        while start < frames.len() {
            let first = frames[start].1;
            let same = |t: &Tile| !by_size || (t.height, t.width) == (first.height, first.width);
            let len = frames[start..].iter().take(VISION_CHUNK).take_while(|(_, t)| same(t)).count();
            let chunk: Vec<&Tile> = frames[start..start + len].iter().map(|(_, t)| *t).collect();
            start += len;
            let size = chunk.iter().fold((0, 0), |(h, w), t| (h.max(t.height), w.max(t.width)));
            let (px, valid) = pad_frames(&chunk, p, PatchRule::AllPixels, size, &self.decoder.device, self.decoder.dtype)?;
            if let Some(t) = chunk.iter().find(|t| t.height < p || t.width < p) {
                bail!(Processor, "a {}x{} frame is smaller than one {p}x{p} patch", t.width, t.height);
            }
            let h = self.vision.forward(&px, &valid)?;
            feats.push(self.connector.forward(&h, &valid, size.1 / p)?);
        }
        let mut all = Tensor::cat(&feats, 0)?; // (frames, latents, hidden), in `frames` order
        if by_size {
            // Back to the requests' order: row i of `all` is frame frames[i].0.
            let mut at = vec![0u32; frames.len()];
            for (row, (i, _)) in frames.iter().enumerate() {
                at[*i] = row as u32;
            }
            all = all.index_select(&Tensor::new(at, all.device())?, 0)?;
        }
        let (_, seq, hid) = all.dims3()?;
        let mut out = Vec::with_capacity(preps.len());
        let mut start = 0;
        for p in preps {
            let n = p.frames.len();
            out.push(all.narrow(0, start, n)?.reshape((n * seq, hid))?);
            start += n;
        }
        Ok(out)
    }
}
