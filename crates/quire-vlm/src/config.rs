//! The parts of a checkpoint's `config.json` both families share: the SigLIP-style vision
//! encoder and the Llama/Mistral text decoder, with the reference defaults for omitted keys
//! (which differ by family, hence the `*Defaults` arguments) and both spellings of fields
//! that moved between `transformers` versions.

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// `vision_config`.
#[derive(Clone, Debug)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

/// Defaults of the family's vision config class for keys a `config.json` omits.
#[derive(Clone, Copy, Debug)]
pub struct VisionDefaults {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
}

impl VisionConfig {
    pub fn from_json(v: Option<&Value>, d: VisionDefaults) -> Result<VisionConfig> {
        let empty = Value::Object(Default::default());
        let v = v.unwrap_or(&empty);
        if !v.is_object() {
            bail!("vision_config is not an object");
        }
        let cfg = VisionConfig {
            hidden_size: get_usize(v, "hidden_size", d.hidden_size),
            intermediate_size: get_usize(v, "intermediate_size", 3072),
            num_hidden_layers: get_usize(v, "num_hidden_layers", 12),
            num_attention_heads: get_usize(v, "num_attention_heads", d.num_attention_heads),
            num_channels: get_usize(v, "num_channels", 3),
            image_size: get_usize(v, "image_size", 224),
            patch_size: get_usize(v, "patch_size", 32),
            hidden_act: v.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh").to_string(),
            layer_norm_eps: get_f64(v, "layer_norm_eps", 1e-6),
        };
        if cfg.patch_size == 0 || cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!("vision_config: hidden_size {} / heads {} / patch_size {} do not fit", cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size);
        }
        Ok(cfg)
    }
}

/// Rotary embedding settings after merging `rope_theta`/`rope_scaling` (older) and
/// `rope_parameters` (newer).
#[derive(Clone, Debug)]
pub enum Rope {
    Default { theta: f64 },
    Linear { theta: f64, factor: f64 },
    Llama3 { theta: f64, factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max: f64 },
}

/// `text_config`: a Llama (Idefics3) or Mistral (Idefics2) decoder.
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
    /// Mistral's sliding window: a position attends to itself and the `w - 1` before it.
    /// `None` means full causal attention.
    pub sliding_window: Option<usize>,
}

/// Defaults of the family's text config class for keys a `config.json` omits.
#[derive(Clone, Copy, Debug)]
pub struct TextDefaults {
    /// The only `text_config.model_type` the family runs.
    pub model_type: &'static str,
    pub intermediate_size: usize,
    /// `None`: as many as attention heads.
    pub num_key_value_heads: Option<usize>,
    pub rms_norm_eps: f64,
    pub sliding_window: Option<usize>,
}

pub(crate) fn get_usize(v: &Value, k: &str, d: usize) -> usize {
    v.get(k).and_then(Value::as_u64).map(|x| x as usize).unwrap_or(d)
}
pub(crate) fn get_f64(v: &Value, k: &str, d: f64) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(d)
}
pub(crate) fn get_bool(v: &Value, k: &str, d: bool) -> bool {
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

impl TextConfig {
    /// Reads `text_config` (`t`, an empty object when absent).
    pub fn from_json(t: &Value, d: TextDefaults) -> Result<TextConfig> {
        if let Some(mt) = t.get("model_type").and_then(Value::as_str) {
            if mt != d.model_type {
                bail!("text model type {mt:?} is not supported here (only {})", d.model_type);
            }
        }
        let hidden_size = get_usize(t, "hidden_size", 4096);
        let heads = get_usize(t, "num_attention_heads", 32);
        if heads == 0 {
            bail!("text_config: num_attention_heads is 0");
        }
        let head_dim = t.get("head_dim").and_then(Value::as_u64).map(|x| x as usize).unwrap_or(hidden_size / heads);
        let sliding_window = match t.get("sliding_window") {
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().context("text_config.sliding_window is not a number")? as usize),
            None => d.sliding_window,
        };
        let cfg = TextConfig {
            vocab_size: get_usize(t, "vocab_size", 32000),
            hidden_size,
            intermediate_size: get_usize(t, "intermediate_size", d.intermediate_size),
            num_hidden_layers: get_usize(t, "num_hidden_layers", 32),
            num_attention_heads: heads,
            num_key_value_heads: t
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(d.num_key_value_heads.unwrap_or(heads)),
            head_dim,
            rms_norm_eps: get_f64(t, "rms_norm_eps", d.rms_norm_eps),
            rope: parse_rope(t)?,
            attention_bias: get_bool(t, "attention_bias", false),
            mlp_bias: get_bool(t, "mlp_bias", false),
            hidden_act: t.get("hidden_act").and_then(Value::as_str).unwrap_or("silu").to_string(),
            sliding_window: sliding_window.filter(|&w| w > 0),
        };
        if cfg.num_key_value_heads == 0 || cfg.num_attention_heads % cfg.num_key_value_heads != 0 {
            bail!("text_config: {} attention heads cannot be grouped over {} key/value heads", heads, cfg.num_key_value_heads);
        }
        Ok(cfg)
    }
}

/// `tie_word_embeddings` at the top level, else in `text_config`, else false.
pub fn tie_word_embeddings(v: &Value) -> bool {
    v.get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .or_else(|| v.get("text_config").and_then(|t| t.get("tie_word_embeddings")).and_then(Value::as_bool))
        .unwrap_or(false)
}
