//! `config.json` of an Idefics2 checkpoint: SigLIP vision config, Mistral text config and
//! the perceiver resampler's `perceiver_config`, with `Idefics2Config`'s defaults.

use anyhow::{bail, Result};
use serde_json::Value;

use crate::config::{get_f64, get_usize, TextConfig, TextDefaults, VisionConfig, VisionDefaults};

/// `perceiver_config`, after the reference's reconciliation with the text config.
#[derive(Clone, Debug)]
pub struct PerceiverConfig {
    /// Always the text model's hidden size.
    pub hidden_size: usize,
    pub rms_norm_eps: f64,
    pub hidden_act: String,
    pub n_latents: usize,
    pub depth: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub num_key_value_heads: usize,
}

#[derive(Clone, Debug)]
pub struct Idefics2Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub perceiver: PerceiverConfig,
    pub image_token_id: u32,
    pub tie_word_embeddings: bool,
}

impl Idefics2Config {
    pub fn from_json(v: &Value) -> Result<Self> {
        let vision = VisionConfig::from_json(
            v.get("vision_config"),
            VisionDefaults { hidden_size: 768, num_attention_heads: 12 },
        )?;
        let empty = Value::Object(Default::default());
        let t = v.get("text_config");
        let text = TextConfig::from_json(
            t.unwrap_or(&empty),
            TextDefaults {
                model_type: "mistral",
                intermediate_size: 14336,
                num_key_value_heads: Some(8),
                // Idefics2Config builds an absent text config with rms_norm_eps 1e-5; a given
                // one without the key gets MistralConfig's 1e-6.
                rms_norm_eps: if t.is_some() { 1e-6 } else { 1e-5 },
                sliding_window: Some(4096),
            },
        )?;
        let p = v.get("perceiver_config").unwrap_or(&empty);
        let p_hidden = get_usize(p, "hidden_size", 4096);
        let p_eps = get_f64(p, "rms_norm_eps", 1e-6);
        let perceiver = PerceiverConfig {
            // The reference replaces a perceiver hidden size that differs from the text
            // model's, together with its eps, by the text model's.
            hidden_size: text.hidden_size,
            rms_norm_eps: if p_hidden == text.hidden_size { p_eps } else { text.rms_norm_eps },
            hidden_act: p.get("hidden_act").and_then(Value::as_str).unwrap_or("silu").to_string(),
            n_latents: get_usize(p, "resampler_n_latents", 64),
            depth: get_usize(p, "resampler_depth", 3),
            n_heads: get_usize(p, "resampler_n_heads", 16),
            head_dim: get_usize(p, "resampler_head_dim", 96),
            num_key_value_heads: get_usize(p, "num_key_value_heads", 4),
        };
        if perceiver.num_key_value_heads == 0 || perceiver.n_heads % perceiver.num_key_value_heads != 0 {
            bail!(
                "perceiver_config: {} heads cannot be grouped over {} key/value heads",
                perceiver.n_heads,
                perceiver.num_key_value_heads
            );
        }
        if perceiver.hidden_act != "silu" {
            bail!("perceiver_config.hidden_act {:?} is not supported (only silu)", perceiver.hidden_act);
        }
        Ok(Idefics2Config {
            vision,
            text,
            perceiver,
            image_token_id: get_usize(v, "image_token_id", 32001) as u32,
            tie_word_embeddings: crate::config::tie_word_embeddings(v),
        })
    }
}
