//! The parts of a checkpoint's `config.json` both families share: the SigLIP-style vision
//! encoder and the Llama/Mistral text decoder, with the reference defaults for omitted keys
//! (which differ by family, hence [`Defaults`]) and both spellings of fields that moved
//! between `transformers` versions.
//!
//! Keys are read by serde into `Raw*` structs whose fields are all optional: an omitted key
//! (or `null`) takes the family default, a key of the wrong type is an error naming it
//! (`config.json: text_config.rope_theta: invalid type: string "x", expected f64`), and keys
//! quire does not use are ignored.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::bail;
use crate::{Error, Result};

/// Deserializes `v` (a whole `config.json`) as `T`; the error names the key that failed.
pub(crate) fn read<T: DeserializeOwned>(v: &Value) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "" | "." => Error::Config(format!("config.json: {}", e.inner())),
            _ => Error::Config(format!("config.json: {path}: {}", e.inner())),
        }
    })
}

/// A key that can be absent, `null` or set, where `null` means something else than leaving
/// the key out (`sliding_window: null` is no window, an omitted one the family's window).
#[derive(Clone, Debug, Default)]
pub(crate) enum Field<T> {
    #[default]
    Absent,
    Null,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Option::<T>::deserialize(d)?.map_or(Field::Null, Field::Set))
    }
}

/// `vision_config` as written.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct RawVision {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

/// `rope_parameters` (newer) or `rope_scaling` (older) as written.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct RawRope {
    /// Both keys can be present (transformers adds `rope_type` next to an older `type`);
    /// `rope_type` wins, even when `null`.
    #[serde(default)]
    rope_type: Field<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// `text_config` as written.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct RawText {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    max_position_embeddings: Option<f64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    #[serde(default)]
    sliding_window: Field<usize>,
    tie_word_embeddings: Option<bool>,
}

/// The top-level keys both families read.
#[derive(Clone, Debug, Default, Deserialize)]
struct RawCommon {
    #[serde(default)]
    vision_config: Field<RawVision>,
    #[serde(default)]
    text_config: Field<RawText>,
    image_token_id: Option<usize>,
    tie_word_embeddings: Option<bool>,
}

/// `vision_config`.
#[derive(Clone, Debug, PartialEq)]
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
    fn new(v: &RawVision, d: VisionDefaults) -> Result<VisionConfig> {
        let cfg = VisionConfig {
            hidden_size: v.hidden_size.unwrap_or(d.hidden_size),
            intermediate_size: v.intermediate_size.unwrap_or(3072),
            num_hidden_layers: v.num_hidden_layers.unwrap_or(12),
            num_attention_heads: v.num_attention_heads.unwrap_or(d.num_attention_heads),
            num_channels: v.num_channels.unwrap_or(3),
            image_size: v.image_size.unwrap_or(224),
            patch_size: v.patch_size.unwrap_or(32),
            hidden_act: v.hidden_act.clone().unwrap_or_else(|| "gelu_pytorch_tanh".into()),
            layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-6),
        };
        if cfg.patch_size == 0 || cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!(Config, "vision_config: hidden_size {} / heads {} / patch_size {} do not fit", cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size);
        }
        Ok(cfg)
    }
}

/// Rotary embedding settings after merging `rope_theta`/`rope_scaling` (older) and
/// `rope_parameters` (newer).
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    Default { theta: f64 },
    Linear { theta: f64, factor: f64 },
    Llama3 { theta: f64, factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max: f64 },
}

/// `text_config`: a Llama (Idefics3) or Mistral (Idefics2) decoder.
#[derive(Clone, Debug, PartialEq)]
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
    /// For a `text_config` without the key (the text config class's default).
    pub rms_norm_eps: f64,
    /// When `text_config` itself is absent (the family config's default text config).
    pub rms_norm_eps_without_text_config: f64,
    pub sliding_window: Option<usize>,
}

/// A family's defaults for what [`Common`] reads.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub vision: VisionDefaults,
    pub text: TextDefaults,
    pub image_token_id: usize,
}

fn rope(t: &RawText) -> Result<Rope> {
    // Newer: rope_parameters {rope_type, rope_theta, ...}; older: rope_theta + rope_scaling {type|rope_type, ...}.
    let theta = t.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(t.rope_theta).unwrap_or(10000.0);
    let Some(p) = t.rope_parameters.as_ref().or(t.rope_scaling.as_ref()) else { return Ok(Rope::Default { theta }) };
    let kind = match &p.rope_type {
        Field::Set(k) => k.as_str(),
        Field::Null => "default",
        Field::Absent => p.kind.as_deref().unwrap_or("default"),
    };
    Ok(match kind {
        "default" => Rope::Default { theta },
        "linear" => Rope::Linear { theta, factor: p.factor.unwrap_or(1.0) },
        "llama3" => Rope::Llama3 {
            theta,
            factor: p.factor.unwrap_or(8.0),
            low_freq_factor: p.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: p.high_freq_factor.unwrap_or(4.0),
            original_max: p.original_max_position_embeddings.or(t.max_position_embeddings).unwrap_or(8192.0),
        },
        other => bail!(Config, "rope type {other:?} is not supported by quire-vlm yet"),
    })
}

impl TextConfig {
    /// `text_config` (`None` when absent or `null`) with the family's defaults; `rms_norm_eps`
    /// is the default for a missing key.
    fn new(t: Option<&RawText>, d: TextDefaults, rms_norm_eps: f64) -> Result<TextConfig> {
        let empty = RawText::default();
        let t = t.unwrap_or(&empty);
        if let Some(mt) = &t.model_type {
            if mt != d.model_type {
                bail!(Config, "text model type {mt:?} is not supported here (only {})", d.model_type);
            }
        }
        let hidden_size = t.hidden_size.unwrap_or(4096);
        let heads = t.num_attention_heads.unwrap_or(32);
        if heads == 0 {
            bail!(Config, "text_config: num_attention_heads is 0");
        }
        let sliding_window = match t.sliding_window {
            Field::Null => None,
            Field::Set(w) => Some(w),
            Field::Absent => d.sliding_window,
        };
        let cfg = TextConfig {
            vocab_size: t.vocab_size.unwrap_or(32000),
            hidden_size,
            intermediate_size: t.intermediate_size.unwrap_or(d.intermediate_size),
            num_hidden_layers: t.num_hidden_layers.unwrap_or(32),
            num_attention_heads: heads,
            num_key_value_heads: t.num_key_value_heads.unwrap_or(d.num_key_value_heads.unwrap_or(heads)),
            head_dim: t.head_dim.unwrap_or(hidden_size / heads),
            rms_norm_eps: t.rms_norm_eps.unwrap_or(rms_norm_eps),
            rope: rope(t)?,
            attention_bias: t.attention_bias.unwrap_or(false),
            mlp_bias: t.mlp_bias.unwrap_or(false),
            hidden_act: t.hidden_act.clone().unwrap_or_else(|| "silu".into()),
            sliding_window: sliding_window.filter(|&w| w > 0),
        };
        if cfg.num_key_value_heads == 0 || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
            bail!(Config, "text_config: {} attention heads cannot be grouped over {} key/value heads", heads, cfg.num_key_value_heads);
        }
        Ok(cfg)
    }
}

/// What both families take from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Common {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_id: u32,
    /// `tie_word_embeddings` at the top level, else in `text_config`, else false.
    pub tie_word_embeddings: bool,
}

impl Common {
    /// Reads the shared keys of a whole `config.json` with the family's defaults.
    pub fn from_json(v: &Value, d: &Defaults) -> Result<Common> {
        let raw: RawCommon = read(v)?;
        let vision = match &raw.vision_config {
            Field::Absent => VisionConfig::new(&RawVision::default(), d.vision)?,
            Field::Null => bail!(Config, "vision_config is not an object"),
            Field::Set(vc) => VisionConfig::new(vc, d.vision)?,
        };
        let (t, eps) = match &raw.text_config {
            Field::Absent => (None, d.text.rms_norm_eps_without_text_config),
            Field::Null => (None, d.text.rms_norm_eps),
            Field::Set(t) => (Some(t), d.text.rms_norm_eps),
        };
        let text = TextConfig::new(t, d.text, eps)?;
        Ok(Common {
            vision,
            text,
            image_token_id: raw.image_token_id.unwrap_or(d.image_token_id) as u32,
            tie_word_embeddings: raw.tie_word_embeddings.or(t.and_then(|t| t.tie_word_embeddings)).unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::idefics2::config::Idefics2Config;
    use crate::idefics3::config::Idefics3Config;

    #[test]
    fn a_value_of_the_wrong_type_is_an_error_naming_its_key() {
        let err = |v: Value| Idefics3Config::from_json(&v).unwrap_err().to_string();
        assert_eq!(
            err(json!({"text_config": {"rope_theta": "x"}})),
            "config.json: text_config.rope_theta: invalid type: string \"x\", expected f64"
        );
        assert_eq!(
            err(json!({"vision_config": {"patch_size": 14.5}})),
            "config.json: vision_config.patch_size: invalid type: floating point `14.5`, expected usize"
        );
        assert_eq!(
            err(json!({"text_config": {"rope_scaling": {"rope_type": "llama3", "factor": true}}})),
            "config.json: text_config.rope_scaling.factor: invalid type: boolean `true`, expected f64"
        );
        assert!(err(json!({"scale_factor": "2"})).starts_with("config.json: scale_factor: invalid type: string"));
        assert!(err(json!({"tie_word_embeddings": 1})).starts_with("config.json: tie_word_embeddings: invalid type"));
        assert!(err(json!({"text_config": {"sliding_window": -1}})).starts_with("config.json: text_config.sliding_window: invalid value"));
        let e = Idefics2Config::from_json(&json!({"perceiver_config": {"resampler_n_latents": "64"}})).unwrap_err();
        assert!(e.to_string().starts_with("config.json: perceiver_config.resampler_n_latents: invalid type: string"), "{e}");
    }

    /// The layouts of real checkpoints: SmolVLM as written by transformers 4.x (flat
    /// `rope_theta`, `torch_dtype`, untied), the same model as transformers 5 writes it
    /// (`rope_parameters`, `dtype`), and Idefics2-8B (a sparse Mistral `text_config` that leaves
    /// the sliding window and key/value heads to the defaults).
    #[test]
    fn real_world_layouts_give_the_same_values() {
        let smolvlm_text = |rope: Value| {
            let mut t = json!({"model_type": "llama", "vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": false});
            t.as_object_mut().unwrap().extend(rope.as_object().unwrap().clone());
            t
        };
        let vision = json!({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "image_size": 512, "patch_size": 16, "model_type": "idefics3_vision"});
        let old = json!({"model_type": "idefics3", "image_token_id": 49190, "scale_factor": 4, "torch_dtype": "bfloat16",
            "text_config": smolvlm_text(json!({"rope_theta": 100000, "rope_scaling": null})), "vision_config": vision});
        let new = json!({"model_type": "idefics3", "image_token_id": 49190, "scale_factor": 4, "dtype": "bfloat16",
            "text_config": smolvlm_text(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}})),
            "vision_config": vision});
        let want = Idefics3Config {
            vision: VisionConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                num_channels: 3,
                image_size: 512,
                patch_size: 16,
                hidden_act: "gelu_pytorch_tanh".into(),
                layer_norm_eps: 1e-6,
            },
            text: TextConfig {
                vocab_size: 49280,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope: Rope::Default { theta: 100000.0 },
                attention_bias: false,
                mlp_bias: false,
                hidden_act: "silu".into(),
                sliding_window: None,
            },
            scale_factor: 4,
            image_token_id: 49190,
            tie_word_embeddings: false,
        };
        assert_eq!(Idefics3Config::from_json(&old).unwrap(), want);
        assert_eq!(Idefics3Config::from_json(&new).unwrap(), want);
        assert_eq!(want.image_seq_len(), 64);
        // Llama 3 scaling written both ways (`type` next to `rope_type`), and ties in text_config.
        let mut v = new.clone();
        v["text_config"]["rope_scaling"] = json!({"type": "llama3", "rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192});
        v["text_config"]["rope_parameters"] = Value::Null;
        v["text_config"]["rope_theta"] = json!(500000.0);
        v["text_config"]["tie_word_embeddings"] = json!(true);
        let c = Idefics3Config::from_json(&v).unwrap();
        let rope = Rope::Llama3 { theta: 500000.0, factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max: 8192.0 };
        assert_eq!((c.text.rope, c.tie_word_embeddings), (rope, true));

        let idefics2 = json!({"model_type": "idefics2", "image_token_id": 32001, "tie_word_embeddings": false,
            "text_config": {"model_type": "mistral", "rms_norm_eps": 1e-5, "vocab_size": 32003},
            "perceiver_config": {"model_type": "idefics2_perceiver"},
            "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
                "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}});
        let c = Idefics2Config::from_json(&idefics2).unwrap();
        assert_eq!((c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.patch_size, c.vision.image_size), (1152, 27, 14, 980));
        let t = &c.text;
        assert_eq!((t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers), (32003, 4096, 14336, 32));
        assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rms_norm_eps), (32, 8, 128, 1e-5));
        assert_eq!((t.rope.clone(), t.sliding_window), (Rope::Default { theta: 10000.0 }, Some(4096)));
        let p = &c.perceiver;
        assert_eq!((p.hidden_size, p.rms_norm_eps, p.n_latents, p.depth, p.n_heads, p.head_dim, p.num_key_value_heads), (4096, 1e-6, 64, 3, 16, 96, 4));
        assert_eq!((c.image_token_id, c.tie_word_embeddings), (32001, false));
        // `sliding_window: null` is no window; without a text_config the eps is Idefics2Config's 1e-5.
        let c = Idefics2Config::from_json(&json!({"text_config": {"sliding_window": null}})).unwrap();
        assert_eq!((c.text.sliding_window, c.text.rms_norm_eps), (None, 1e-6));
        assert_eq!(Idefics2Config::from_json(&json!({})).unwrap().text.rms_norm_eps, 1e-5);
    }
}
