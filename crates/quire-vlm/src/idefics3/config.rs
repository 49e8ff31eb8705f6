//! `config.json` of an Idefics3 checkpoint, with the reference defaults for omitted keys and
//! both spellings of fields that moved between transformers versions.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

#[derive(Clone, Debug, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d_vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vision_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_16")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_32")]
    pub patch_size: usize,
    #[serde(default = "d_gelu_tanh")]
    pub hidden_act: String,
    #[serde(default = "d_eps6")]
    pub layer_norm_eps: f64,
}

/// Rotary embedding settings after merging `rope_theta`/`rope_scaling` (older) and
/// `rope_parameters` (newer).
#[derive(Clone, Debug)]
pub enum Rope {
    Default { theta: f64 },
    Linear { theta: f64, factor: f64 },
    Llama3 { theta: f64, factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max: f64 },
}

#[derive(Clone, Debug)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: String,
}

#[derive(Clone, Debug)]
pub struct Idefics3Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub scale_factor: usize,
    pub image_token_id: u32,
    pub tie_word_embeddings: bool,
}

fn d_vision_hidden() -> usize { 1152 }
fn d_vision_inter() -> usize { 3072 }
fn d_12() -> usize { 12 }
fn d_16() -> usize { 16 }
fn d_3() -> usize { 3 }
fn d_224() -> usize { 224 }
fn d_32() -> usize { 32 }
fn d_gelu_tanh() -> String { "gelu_pytorch_tanh".into() }
fn d_eps6() -> f64 { 1e-6 }

fn get_usize(v: &Value, k: &str, d: usize) -> usize {
    v.get(k).and_then(Value::as_u64).map(|x| x as usize).unwrap_or(d)
}
fn get_f64(v: &Value, k: &str, d: f64) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(d)
}
fn get_bool(v: &Value, k: &str, d: bool) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(d)
}

fn parse_rope(t: &Value) -> Result<Rope> {
    // Newer: rope_parameters {rope_type, rope_theta, ...}; older: rope_theta + rope_scaling {type|rope_type, ...}.
    let params = t.get("rope_parameters").filter(|v| v.is_object());
    let scaling = t.get("rope_scaling").filter(|v| v.is_object());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| t.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(10000.0);
    let Some(p) = params.or(scaling) else { return Ok(Rope::Default { theta }) };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    Ok(match kind {
        "default" => Rope::Default { theta },
        "linear" => Rope::Linear { theta, factor: get_f64(p, "factor", 1.0) },
        "llama3" => Rope::Llama3 {
            theta,
            factor: get_f64(p, "factor", 8.0),
            low_freq_factor: get_f64(p, "low_freq_factor", 1.0),
            high_freq_factor: get_f64(p, "high_freq_factor", 4.0),
            original_max: get_f64(
                p,
                "original_max_position_embeddings",
                get_f64(t, "max_position_embeddings", 8192.0),
            ),
        },
        other => bail!("rope type {other:?} is not supported by quire-vlm yet"),
    })
}

impl Idefics3Config {
    pub fn from_json(v: &Value) -> Result<Self> {
        let vision: VisionConfig =
            serde_json::from_value(v.get("vision_config").cloned().unwrap_or(Value::Object(Default::default())))
                .context("parsing vision_config")?;
        let empty = Value::Object(Default::default());
        let t = v.get("text_config").unwrap_or(&empty);
        let hidden_size = get_usize(t, "hidden_size", 4096);
        let heads = get_usize(t, "num_attention_heads", 32);
        let head_dim = t.get("head_dim").and_then(Value::as_u64).map(|x| x as usize).unwrap_or(hidden_size / heads);
        let text = TextConfig {
            vocab_size: get_usize(t, "vocab_size", 32000),
            hidden_size,
            intermediate_size: get_usize(t, "intermediate_size", 11008),
            num_hidden_layers: get_usize(t, "num_hidden_layers", 32),
            num_attention_heads: heads,
            num_key_value_heads: t
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(heads),
            head_dim,
            // Idefics3Config creates its default text config with rms_norm_eps 1e-5; a given
            // llama text_config without the key gets LlamaConfig's 1e-6.
            rms_norm_eps: get_f64(t, "rms_norm_eps", if v.get("text_config").is_some() { 1e-6 } else { 1e-5 }),
            rope: parse_rope(t)?,
            attention_bias: get_bool(t, "attention_bias", false),
            mlp_bias: get_bool(t, "mlp_bias", false),
            hidden_act: t.get("hidden_act").and_then(Value::as_str).unwrap_or("silu").to_string(),
        };
        if let Some(mt) = t.get("model_type").and_then(Value::as_str) {
            if mt != "llama" {
                bail!("text model type {mt:?} is not supported (only llama)");
            }
        }
        let tie = v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .or_else(|| t.get("tie_word_embeddings").and_then(Value::as_bool))
            .unwrap_or(false);
        Ok(Idefics3Config {
            vision,
            text,
            scale_factor: get_usize(v, "scale_factor", 2),
            image_token_id: get_usize(v, "image_token_id", 128257) as u32,
            tie_word_embeddings: tie,
        })
    }

    /// `<image>` tokens per tile: (image_size / patch_size)^2 / scale_factor^2.
    pub fn image_seq_len(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size;
        side * side / (self.scale_factor * self.scale_factor)
    }
}
