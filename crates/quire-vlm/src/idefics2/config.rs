//! `config.json` of an Idefics2 checkpoint: SigLIP vision config, Mistral text config and
//! the perceiver resampler's `perceiver_config`, with `Idefics2Config`'s defaults.

use serde::Deserialize;
use serde_json::Value;

use crate::error::bail;
use crate::Result;
use crate::config::{Common, Defaults, TextConfig, TextDefaults, VisionConfig, VisionDefaults};

/// `Idefics2Config`'s defaults for the shared keys.
const DEFAULTS: Defaults = Defaults {
    vision: VisionDefaults { hidden_size: 768, num_attention_heads: 12 },
    text: TextDefaults {
        model_type: "mistral",
        intermediate_size: 14336,
        num_key_value_heads: Some(8),
        // Idefics2Config builds an absent text config with rms_norm_eps 1e-5; a given
        // one without the key gets MistralConfig's 1e-6.
        rms_norm_eps: 1e-6,
        rms_norm_eps_without_text_config: 1e-5,
        sliding_window: Some(4096),
    },
    image_token_id: 32001,
};

/// `perceiver_config` as written.
#[derive(Default, Deserialize)]
struct RawPerceiver {
    hidden_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    resampler_n_latents: Option<usize>,
    resampler_depth: Option<usize>,
    resampler_n_heads: Option<usize>,
    resampler_head_dim: Option<usize>,
    num_key_value_heads: Option<usize>,
}

/// Idefics2's own top-level keys as written.
#[derive(Deserialize)]
struct Raw {
    perceiver_config: Option<RawPerceiver>,
}

/// `perceiver_config`, after the reference's reconciliation with the text config.
#[derive(Clone, Debug, PartialEq)]
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

#[derive(Clone, Debug, PartialEq)]
pub struct Idefics2Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub perceiver: PerceiverConfig,
    pub image_token_id: u32,
    pub tie_word_embeddings: bool,
}

impl Idefics2Config {
    pub fn from_json(v: &Value) -> Result<Self> {
        let Common { vision, text, image_token_id, tie_word_embeddings } = Common::from_json(v, &DEFAULTS)?;
        let p = crate::config::read::<Raw>(v)?.perceiver_config.unwrap_or_default();
        let p_hidden = p.hidden_size.unwrap_or(4096);
        let p_eps = p.rms_norm_eps.unwrap_or(1e-6);
        let perceiver = PerceiverConfig {
            // The reference replaces a perceiver hidden size that differs from the text
            // model's, together with its eps, by the text model's.
            hidden_size: text.hidden_size,
            rms_norm_eps: if p_hidden == text.hidden_size { p_eps } else { text.rms_norm_eps },
            hidden_act: p.hidden_act.unwrap_or_else(|| "silu".into()),
            n_latents: p.resampler_n_latents.unwrap_or(64),
            depth: p.resampler_depth.unwrap_or(3),
            n_heads: p.resampler_n_heads.unwrap_or(16),
            head_dim: p.resampler_head_dim.unwrap_or(96),
            num_key_value_heads: p.num_key_value_heads.unwrap_or(4),
        };
        if perceiver.num_key_value_heads == 0 || !perceiver.n_heads.is_multiple_of(perceiver.num_key_value_heads) {
            bail!(
                Config,
                "perceiver_config: {} heads cannot be grouped over {} key/value heads",
                perceiver.n_heads,
                perceiver.num_key_value_heads
            );
        }
        if perceiver.hidden_act != "silu" {
            bail!(Config, "perceiver_config.hidden_act {:?} is not supported (only silu)", perceiver.hidden_act);
        }
        Ok(Idefics2Config { vision, text, perceiver, image_token_id, tie_word_embeddings })
    }
}
