//! `model.vision_model` (SigLIP-style encoder with NaViT position bucketing) and
//! `model.connector` (pixel shuffle + `modality_projection`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};

use super::config::VisionConfig;

/// Position ids of one tile's patches: fractional patch coordinates bucketed into the
/// `num_patches_per_side` grid (the current reference formulation, in f32).
/// `valid_h`/`valid_w` are the numbers of unpadded patch rows/columns; padded patches get 0.
pub fn bucket_position_ids(side: usize, rows: usize, cols: usize, valid_h: usize, valid_w: usize) -> Vec<u32> {
    // torch.arange(1/side, 1.0, 1/side) in float32, with its element count and values from doubles.
    let step = 1.0f64 / side as f64;
    let n = ((1.0 - step) / step).ceil().max(0.0) as usize;
    let boundaries: Vec<f32> = (0..n).map(|i| (step + step * i as f64) as f32).collect();
    let bucket = |i: usize, valid: usize| -> u32 {
        let step = 1.0f32 / valid as f32;
        let x = (i as f32 * step).min(1.0f32 - 1e-6);
        // bucketize(right=True): number of boundaries <= x
        boundaries.iter().take_while(|&&b| b <= x).count() as u32
    };
    let mut ids = vec![0u32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            if r < valid_h && c < valid_w {
                ids[r * cols + c] = bucket(r, valid_h) * side as u32 + bucket(c, valid_w);
            }
        }
    }
    ids
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct VisionModel {
    patch_weight: Tensor, // (embed, C*p*p)
    patch_bias: Tensor,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionModel {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (e, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let patch_weight = emb.get((e, c, p, p), "patch_embedding.weight")?.reshape((e, c * p * p))?;
        let patch_bias = emb.get(e, "patch_embedding.bias")?;
        let side = cfg.image_size / p;
        let position_embedding = candle_nn::embedding(side * side, e, emb.pp("position_embedding"))?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(EncoderLayer {
                layer_norm1: layer_norm(e, cfg.layer_norm_eps, l.pp("layer_norm1"))?,
                q_proj: linear(e, e, a.pp("q_proj"))?,
                k_proj: linear(e, e, a.pp("k_proj"))?,
                v_proj: linear(e, e, a.pp("v_proj"))?,
                out_proj: linear(e, e, a.pp("out_proj"))?,
                layer_norm2: layer_norm(e, cfg.layer_norm_eps, l.pp("layer_norm2"))?,
                fc1: linear(e, cfg.intermediate_size, l.pp("mlp.fc1"))?,
                fc2: linear(cfg.intermediate_size, e, l.pp("mlp.fc2"))?,
            });
        }
        let post_layernorm = layer_norm(e, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        match cfg.hidden_act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu" | "quick_gelu" => {}
            other => candle_core::bail!("vision hidden_act {other:?} is not supported"),
        }
        Ok(VisionModel { patch_weight, patch_bias, position_embedding, layers, post_layernorm, cfg: cfg.clone() })
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.hidden_act.as_str() {
            "gelu" => x.gelu_erf(),
            "quick_gelu" => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            _ => x.gelu(),
        }
    }

    /// `pixels`: (n, C, H, W); `valid`: unpadded (patch rows, patch cols) per tile.
    /// Returns the post-layernorm hidden states (n, patches, hidden).
    pub fn forward(&self, pixels: &Tensor, valid: &[(usize, usize)]) -> Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (ph, pw) = (h / p, w / p);
        let pixels = pixels.narrow(2, 0, ph * p)?.narrow(3, 0, pw * p)?;
        // Patch embedding as a matmul over flattened (C, p, p) patches, same as the strided conv.
        let patches = pixels
            .reshape((n, c, ph, p, pw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, ph * pw, c * p * p))?;
        let x = patches.broadcast_matmul(&self.patch_weight.t()?)?.broadcast_add(&self.patch_bias)?;
        let side = self.cfg.image_size / p;
        let mut ids = Vec::with_capacity(n * ph * pw);
        let mut padded = false;
        for &(vh, vw) in valid {
            padded |= vh < ph || vw < pw;
            ids.extend(bucket_position_ids(side, ph, pw, vh, vw));
        }
        let ids = Tensor::from_vec(ids, (n, ph * pw), x.device())?;
        let mut x = (x + self.position_embedding.forward(&ids)?)?;
        // Key mask only when some tile has padded patches.
        let mask = if padded {
            let mut m = Vec::with_capacity(n * ph * pw);
            for &(vh, vw) in valid {
                for r in 0..ph {
                    for cc in 0..pw {
                        m.push(if r < vh && cc < vw { 0f32 } else { f32::MIN });
                    }
                }
            }
            Some(Tensor::from_vec(m, (n, 1, 1, ph * pw), x.device())?)
        } else {
            None
        };
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let seq = ph * pw;
        for l in &self.layers {
            let r = x.clone();
            let y = l.layer_norm1.forward(&x)?;
            let split = |t: Tensor| -> Result<Tensor> { t.reshape((n, seq, heads, hd))?.transpose(1, 2)?.contiguous() };
            let q = split(l.q_proj.forward(&y)?)?;
            let k = split(l.k_proj.forward(&y)?)?;
            let v = split(l.v_proj.forward(&y)?)?;
            let s = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
            let s = match &mask {
                Some(m) => s.broadcast_add(m)?,
                None => s,
            };
            let a = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(v.dtype())?;
            let o = a.matmul(&v)?.transpose(1, 2)?.reshape((n, seq, heads * hd))?;
            let x2 = (r + l.out_proj.forward(&o)?)?;
            let y = l.layer_norm2.forward(&x2)?;
            let y = l.fc2.forward(&self.act(&l.fc1.forward(&y)?)?)?;
            x = (x2 + y)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// `model.connector`: pixel shuffle by `scale_factor`, then `modality_projection.proj`.
pub struct Connector {
    proj: Linear,
    scale_factor: usize,
}

impl Connector {
    pub fn new(vision_hidden: usize, text_hidden: usize, scale_factor: usize, vb: VarBuilder) -> Result<Self> {
        let proj = linear_no_bias(
            vision_hidden * scale_factor * scale_factor,
            text_hidden,
            vb.pp("modality_projection.proj"),
        )?;
        Ok(Connector { proj, scale_factor })
    }

    /// Reproduces the reference's sequence of views and permutes exactly.
    fn pixel_shuffle(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.scale_factor;
        let (b, seq, d) = x.dims3()?;
        let side = (seq as f64).sqrt() as usize;
        if side * side != seq || side % s != 0 {
            candle_core::bail!("pixel shuffle needs a square patch grid divisible by {s}, got {seq} patches");
        }
        let x = x.reshape((b, side, side / s, d * s))?;
        let x = x.transpose(1, 2)?.contiguous()?;
        let x = x.reshape((b, side / s, side / s, d * s * s))?;
        let x = x.transpose(1, 2)?.contiguous()?;
        x.reshape((b, seq / (s * s), d * s * s))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.pixel_shuffle(x)?)
    }
}
