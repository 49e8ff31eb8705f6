//! `config.json` of an Idefics3 checkpoint: a Llama text model and the pixel-shuffle
//! connector's `scale_factor`; the shared parts are read by [`crate::config`].

use serde::Deserialize;
use serde_json::Value;

pub use crate::config::{Rope, TextConfig, VisionConfig};
use crate::Result;
use crate::config::{Common, Defaults, TextDefaults, VisionDefaults};

/// `Idefics3Config`'s defaults for the shared keys.
const DEFAULTS: Defaults = Defaults {
    vision: VisionDefaults { hidden_size: 1152, num_attention_heads: 16 },
    text: TextDefaults {
        model_type: "llama",
        intermediate_size: 11008,
        num_key_value_heads: None,
        // Idefics3Config creates its default text config with rms_norm_eps 1e-5; a given
        // llama text_config without the key gets LlamaConfig's 1e-6.
        rms_norm_eps: 1e-6,
        rms_norm_eps_without_text_config: 1e-5,
        sliding_window: None,
    },
    image_token_id: 128257,
};

/// Idefics3's own top-level keys as written.
#[derive(Deserialize)]
struct Raw {
    scale_factor: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Idefics3Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub scale_factor: usize,
    pub image_token_id: u32,
    pub tie_word_embeddings: bool,
}

impl Idefics3Config {
    pub fn from_json(v: &Value) -> Result<Self> {
        let Common { vision, text, image_token_id, tie_word_embeddings } = Common::from_json(v, &DEFAULTS)?;
        let raw: Raw = crate::config::read(v)?;
        Ok(Idefics3Config { vision, text, scale_factor: raw.scale_factor.unwrap_or(2), image_token_id, tie_word_embeddings })
    }

    /// `<image>` tokens per tile: (image_size / patch_size)^2 / scale_factor^2.
    pub fn image_seq_len(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size;
        side * side / (self.scale_factor * self.scale_factor)
    }
}
