//! The Idefics3 family (SmolVLM, SmolDocling, Granite-Docling, Idefics3-8B): processor,
//! weights and batched greedy generation.
//!
//! Weight names follow the checkpoint: `model.vision_model.*`, `model.connector.*`,
//! `model.text_model.*`, `lm_head.weight` (absent when tied to the embeddings). What is
//! Idefics3's own: the tiling processor, the any-pixel patch rule and the pixel-shuffle
//! connector; the encoder, decoder and generation loop are shared ([`crate::siglip`],
//! [`crate::engine`]).

pub mod config;
pub mod connector;
pub mod processor;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::Context;
use crate::engine::{linear_dtype, load_weights, pick_prefix, Decoder, PromptMaker};
use crate::family::{FamilyModel, FamilyProcessor, PreparedInput};
use crate::frames::{pad_frames, PatchRule};
use crate::prompt::TextTokenizer;
use crate::siglip::VisionModel;
use crate::Result;
use config::Idefics3Config;
use connector::Connector;
use processor::{ImageProcessorConfig, ProcessedImage};

/// Tiles sent through the vision encoder at once (bounds activation memory).
const VISION_CHUNK: usize = 16;

/// A request after processing: prompt token ids and the image tiles.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub image: ProcessedImage,
}

/// Idefics3's host-side processing (tiling, prompt expansion, tokenizing), detached from the
/// model so that other threads can prepare requests while the device works.
#[derive(Clone)]
pub struct Idefics3Processor {
    image: ImageProcessorConfig,
    image_seq_len: usize,
    prompts: PromptMaker,
}

impl PreparedInput for Prepared {
    fn input_ids(&self) -> &[u32] {
        &self.input_ids
    }

    fn pixel_bytes(&self) -> usize {
        self.image.tiles.iter().map(|t| t.data.len() * 4).sum()
    }

    fn into_any(self) -> crate::Prepared {
        crate::Prepared::Idefics3(self)
    }

    fn from_any(p: &crate::Prepared) -> Option<&Self> {
        match p {
            crate::Prepared::Idefics3(p) => Some(p),
            _ => None,
        }
    }
}

impl FamilyProcessor for Idefics3Processor {
    type Prepared = Prepared;

    fn render_prompt(&self, text: &str) -> Result<String> {
        self.prompts.render(text, |t| format!("<|im_start|>User:<image>{t}<end_of_utterance>\nAssistant:"))
    }

    /// Tiles, expanded prompt and token ids.
    fn prepare(&self, image: &image::DynamicImage, text: &str) -> Result<Prepared> {
        let img = self.image.process(image)?;
        let templ = self.render_prompt(text)?;
        let prompt = processor::expand_prompt(&templ, &[(img.rows, img.cols)], self.image_seq_len)?;
        let input_ids = self.prompts.tokenizer.encode(&prompt)?;
        Ok(Prepared { prompt, input_ids, image: img })
    }

    fn into_any(self) -> crate::Processor {
        crate::Processor::Idefics3(self)
    }
}

pub struct Idefics3 {
    pub config: Idefics3Config,
    pub image_processor: ImageProcessorConfig,
    pub image_seq_len: usize,
    processor: Idefics3Processor,
    vision: VisionModel,
    connector: Connector,
    decoder: Decoder,
}

impl Idefics3 {
    /// Loads `ck` on `device` in `dtype`, the text model's linear layers as `quantize` asks.
    pub fn load(ck: &Checkpoint, device: &Device, dtype: DType, quantize: crate::Quantize) -> Result<Idefics3> {
        let mut config = Idefics3Config::from_json(&ck.config)?;
        config.text.sliding_window = None; // Llama attends to the whole prefix
        let image_processor = ImageProcessorConfig::from_json(&ck.image_processor)?;
        let image_seq_len = ck
            .processor
            .get("image_seq_len")
            .and_then(|v| v.as_u64())
            .map(|x| x as usize)
            .unwrap_or_else(|| config.image_seq_len());
        let linears = linear_dtype(device, dtype)?;
        let text_linears = crate::engine::text_linears(device, dtype, quantize)?;
        let (dtype, vb) = load_weights(ck, device, dtype)?;
        let text_vb = pick_prefix(&vb, "embed_tokens.weight", &["model.text_model", "text_model", "model.language_model"])?;
        let vision_vb = pick_prefix(
            &vb,
            "embeddings.patch_embedding.weight",
            &["model.vision_model", "vision_model", "model.vision_tower"],
        )?;
        let conn_vb = pick_prefix(&vb, "modality_projection.proj.weight", &["model.connector", "connector"])?;
        let vision = VisionModel::new(&config.vision, vision_vb, linears).context("loading model.vision_model")?;
        let connector = Connector::new(config.vision.hidden_size, config.text.hidden_size, config.scale_factor, conn_vb, linears)
            .context("loading model.connector")?;
        let decoder = Decoder::load(ck, &config.text, &vb, text_vb, config.image_token_id, dtype, text_linears)
            .context("loading model.text_model")?;
        let processor =
            Idefics3Processor { image: image_processor.clone(), image_seq_len, prompts: decoder.prompt_maker() };
        Ok(Idefics3 { config, image_processor, image_seq_len, processor, vision, connector, decoder })
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.decoder.tokenizer
    }
}

impl FamilyModel for Idefics3 {
    type Processor = Idefics3Processor;

    fn processing(&self) -> &Idefics3Processor {
        &self.processor
    }

    fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    /// Image features (tiles × image_seq_len rows, text hidden) for each prepared request.
    fn image_features(&self, preps: &[&Prepared]) -> Result<Vec<Tensor>> {
        let tiles: Vec<&processor::Tile> = preps.iter().flat_map(|p| p.image.tiles.iter()).collect();
        let p = self.config.vision.patch_size;
        let mut feats = Vec::new();
        // Zero-padded bottom/right to the largest tile of the whole batch, like the
        // processor's do_pad; a patch is real when any of its pixels is.
        let (mh, mw) = tiles.iter().fold((0, 0), |(h, w), t| (h.max(t.height), w.max(t.width)));
        for chunk in tiles.chunks(VISION_CHUNK) {
            let (px, valid) =
                pad_frames(chunk, p, PatchRule::AnyPixel, (mh, mw), &self.decoder.device, self.decoder.dtype)?;
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
}
