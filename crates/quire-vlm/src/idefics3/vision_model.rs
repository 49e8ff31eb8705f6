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

/// Tanh-approximated GELU (`gelu_pytorch_tanh`) split over threads: candle runs unary ops on
/// one thread, and the encoder's MLP activation is large (patches × intermediate per layer).
/// Uses the identity 0.5·(1 + tanh(u)) = 1 / (1 + e^(-2u)), one `expf` instead of `tanhf`
/// (which costs an `expm1f` plus more); the result differs from the tanh form by a few f32 ulps,
/// the same order as the reference's own vectorised tanh.
struct ParallelGeluTanh;

#[inline]
fn gelu_tanh(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v);
    v / (1.0 + (-2.0 * u).exp())
}

impl candle_core::CustomOp1 for ParallelGeluTanh {
    fn name(&self) -> &'static str {
        "parallel-gelu-tanh"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(all) = storage else {
            candle_core::bail!("parallel-gelu-tanh: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("parallel-gelu-tanh: contiguous input only");
        };
        let src = &all[start..end];
        let mut dst = vec![0f32; src.len()];
        let threads = candle_core::utils::get_num_threads().max(1);
        let chunk = src.len().div_ceil(threads).max(4096);
        std::thread::scope(|sc| {
            for (s, d) in src.chunks(chunk).zip(dst.chunks_mut(chunk)) {
                sc.spawn(move || {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = gelu_tanh(v);
                    }
                });
            }
        });
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
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
            _ if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() => {
                x.apply_op1_no_bwd(&ParallelGeluTanh)
            }
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
        // per (tile, head) key mask rows, (n * heads, 1, seq)
        let mask = match mask {
            Some(m) => Some(m.broadcast_as((n, heads, 1, ph * pw))?.reshape((n * heads, 1, ph * pw))?),
            None => None,
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let seq = ph * pw;
        for l in &self.layers {
            let r = x.clone();
            let y = l.layer_norm1.forward(&x)?;
            let split = |t: Tensor| -> Result<Tensor> { t.reshape((n, seq, heads, hd))?.transpose(1, 2)?.contiguous() };
            let q = split(l.q_proj.forward(&y)?)?;
            let k = split(l.k_proj.forward(&y)?)?;
            let v = split(l.v_proj.forward(&y)?)?;
            let o = attention(&q, &k, &v, mask.as_ref(), scale)?.transpose(1, 2)?.reshape((n, seq, heads * hd))?;
            let x2 = (r + l.out_proj.forward(&o)?)?;
            let y = l.layer_norm2.forward(&x2)?;
            let y = l.fc2.forward(&self.act(&l.fc1.forward(&y)?)?)?;
            x = (x2 + y)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// Score-matrix elements computed at once (16 MiB of f32): big enough for the matmuls, small
/// enough for the allocator to recycle the buffers (see `crate::tune_allocator`) instead of
/// mapping and page-faulting a fresh 48 MiB per layer and tile.
const ATTN_CHUNK_ELEMS: usize = 4 << 20;

/// Softmax attention of `q`, `k`, `v` (n, heads, seq, head_dim), a few (tile, head) pairs at a
/// time; `mask` is additive, (n * heads, 1, seq). Returns (n, heads, seq, head_dim).
/// Each pair is computed exactly as in one batched call (same matmuls, same row softmax).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (n, heads, seq, hd) = q.dims4()?;
    let bh = n * heads;
    // Scaling q instead of the scores is exact when the scale is a power of two (head_dim 64, 256, ...).
    let exact_on_q = scale.log2().fract() == 0.0;
    let q = if exact_on_q { (q * scale)? } else { q.clone() };
    let (q, k, v) = (q.reshape((bh, seq, hd))?, k.reshape((bh, seq, hd))?, v.reshape((bh, seq, hd))?);
    let group = (ATTN_CHUNK_ELEMS / (seq * seq)).clamp(1, bh);
    let mut outs = Vec::with_capacity(bh.div_ceil(group));
    let mut i = 0;
    while i < bh {
        let g = group.min(bh - i);
        let qi = q.narrow(0, i, g)?;
        let s = qi.matmul(&k.narrow(0, i, g)?.t()?)?;
        let s = if exact_on_q { s } else { (s * scale)? }.to_dtype(DType::F32)?;
        let s = match mask {
            Some(m) => s.broadcast_add(&m.narrow(0, i, g)?)?,
            None => s,
        };
        let a = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(v.dtype())?;
        outs.push(a.matmul(&v.narrow(0, i, g)?)?);
        i += g;
    }
    let o = if outs.len() == 1 { outs.pop().expect("one chunk") } else { Tensor::cat(&outs, 0)? };
    o.reshape((n, heads, seq, hd))
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
