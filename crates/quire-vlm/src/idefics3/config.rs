//! `config.json` of an Idefics3 checkpoint: a Llama text model and the pixel-shuffle
//! connector's `scale_factor`; the shared parts are read by [`crate::config`].

use anyhow::Result;
use serde_json::Value;

pub use crate::config::{Rope, TextConfig, VisionConfig};
use crate::config::{get_usize, TextDefaults, VisionDefaults};

#[derive(Clone, Debug)]
pub struct Idefics3Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub scale_factor: usize,
    pub image_token_id: u32,
    pub tie_word_embeddings: bool,
}

impl Idefics3Config {
    pub fn from_json(v: &Value) -> Result<Self> {
        let vision = VisionConfig::from_json(
            v.get("vision_config"),
            VisionDefaults { hidden_size: 1152, num_attention_heads: 16 },
        )?;
        let empty = Value::Object(Default::default());
        let text = TextConfig::from_json(
            v.get("text_config").unwrap_or(&empty),
            TextDefaults {
                model_type: "llama",
                intermediate_size: 11008,
                num_key_value_heads: None,
                // Idefics3Config creates its default text config with rms_norm_eps 1e-5; a given
                // llama text_config without the key gets LlamaConfig's 1e-6.
                rms_norm_eps: if v.get("text_config").is_some() { 1e-6 } else { 1e-5 },
                sliding_window: None,
            },
        )?;
        Ok(Idefics3Config {
            vision,
            text,
            scale_factor: get_usize(v, "scale_factor", 2),
            image_token_id: get_usize(v, "image_token_id", 128257) as u32,
            tie_word_embeddings: crate::config::tie_word_embeddings(v),
        })
    }

    /// `<image>` tokens per tile: (image_size / patch_size)^2 / scale_factor^2.
    pub fn image_seq_len(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size;
        side * side / (self.scale_factor * self.scale_factor)
    }
}
