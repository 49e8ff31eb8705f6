//! `model.connector` of Idefics2: `modality_projection` (a SwiGLU MLP from the vision
//! width through the text model's intermediate width to its hidden width), then the
//! `perceiver_resampler`, which pools each frame's patches into `resampler_n_latents` rows.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{linear_no_bias, rms_norm, RmsNorm, VarBuilder};

use super::config::PerceiverConfig;
use crate::linear::ParLinear;
use crate::profile::{enter, span, Part, Stage, Work};

/// `down_proj(silu(gate_proj(x)) * up_proj(x))`, no biases.
struct SwiGlu {
    /// gate_proj and up_proj stacked.
    gate_up: ParLinear,
    down: ParLinear,
    intermediate: usize,
}

impl SwiGlu {
    fn new(input: usize, intermediate: usize, output: usize, vb: VarBuilder, linears: DType) -> Result<Self> {
        let gate_up =
            [linear_no_bias(input, intermediate, vb.pp("gate_proj"))?, linear_no_bias(input, intermediate, vb.pp("up_proj"))?];
        Ok(SwiGlu {
            gate_up: ParLinear::fused_with_dtype(&gate_up, linears)?,
            down: ParLinear::with_dtype(linear_no_bias(intermediate, output, vb.pp("down_proj"))?, linears)?,
            intermediate,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = span(Part::Mlp);
        if let Some(y) = crate::linear::swiglu_bf16(&self.gate_up, &self.down, x)? {
            return Ok(y);
        }
        let gu = self.gate_up.forward(x)?;
        let (i, last) = (self.intermediate, gu.rank() - 1);
        if gu.device().is_cpu() && gu.dtype() == candle_core::DType::F32 && gu.is_contiguous() {
            return self.down.forward(&crate::text_model::silu_mul_cpu(&gu, i)?);
        }
        let g = candle_nn::ops::silu(&gu.narrow(last, 0, i)?)?;
        self.down.forward(&(g * gu.narrow(last, i, i)?)?)
    }
}

/// One resampler block: the latents attend (grouped-query heads, no rotary) over the
/// normalised context followed by the normalised latents, then an MLP 4× wide.
struct PerceiverLayer {
    input_latents_norm: RmsNorm,
    input_context_norm: RmsNorm,
    q_proj: ParLinear,
    /// k_proj and v_proj stacked.
    kv_proj: ParLinear,
    o_proj: ParLinear,
    post_attention_layernorm: RmsNorm,
    mlp: SwiGlu,
}

struct Resampler {
    latents: Tensor,
    layers: Vec<PerceiverLayer>,
    norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

pub struct Connector {
    modality_projection: SwiGlu,
    resampler: Resampler,
}

impl Connector {
    /// `vb` points at `model.connector`; `linears`: the dtype of the linear layers' products
    /// (see [`crate::engine::linear_dtype`]).
    pub fn new(
        vision_hidden: usize,
        text_intermediate: usize,
        p: &PerceiverConfig,
        vb: VarBuilder,
        linears: DType,
    ) -> Result<Self> {
        let h = p.hidden_size;
        let modality_projection = SwiGlu::new(vision_hidden, text_intermediate, h, vb.pp("modality_projection"), linears)?;
        let r = vb.pp("perceiver_resampler");
        let (heads, kv, d) = (p.n_heads, p.num_key_value_heads, p.head_dim);
        let mut layers = Vec::with_capacity(p.depth);
        for i in 0..p.depth {
            let l = r.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(PerceiverLayer {
                input_latents_norm: rms_norm(h, p.rms_norm_eps, l.pp("input_latents_norm"))?,
                input_context_norm: rms_norm(h, p.rms_norm_eps, l.pp("input_context_norm"))?,
                q_proj: ParLinear::with_dtype(linear_no_bias(h, heads * d, a.pp("q_proj"))?, linears)?,
                kv_proj: ParLinear::fused_with_dtype(
                    &[linear_no_bias(h, kv * d, a.pp("k_proj"))?, linear_no_bias(h, kv * d, a.pp("v_proj"))?],
                    linears,
                )?,
                o_proj: ParLinear::with_dtype(linear_no_bias(heads * d, h, a.pp("o_proj"))?, linears)?,
                post_attention_layernorm: rms_norm(h, p.rms_norm_eps, l.pp("post_attention_layernorm"))?,
                mlp: SwiGlu::new(h, 4 * h, h, l.pp("mlp"), linears)?,
            });
        }
        let resampler = Resampler {
            latents: r.get((p.n_latents, h), "latents")?,
            layers,
            norm: rms_norm(h, p.rms_norm_eps, r.pp("norm"))?,
            heads,
            kv_heads: kv,
            head_dim: d,
        };
        Ok(Connector { modality_projection, resampler })
    }

    /// `x`: encoder output (n, patches, vision hidden); `valid`: real (rows, cols) of each
    /// frame's `rows_total` × `cols_total` patch grid. Returns (n, latents, text hidden).
    pub fn forward(&self, x: &Tensor, valid: &[(usize, usize)], cols_total: usize) -> Result<Tensor> {
        let (frames, patches, _) = x.dims3()?;
        let lat = self.resampler.latents.dim(0)?;
        let work = Work { seqs: frames, rows: frames * patches, pairs: frames * lat * (patches + lat) };
        let _stage = enter(Stage::Connector, work);
        let context = self.modality_projection.forward(x)?;
        let (n, seq, _) = context.dims3()?;
        // Key mask: the frame's real patches, then every latent.
        let masked = valid.iter().any(|&(vh, vw)| vh * vw < seq || vw < cols_total);
        let mask = if masked {
            let lat = self.resampler.latents.dim(0)?;
            let mut m = Vec::with_capacity(n * (seq + lat));
            for &(vh, vw) in valid {
                m.extend((0..seq).map(|i| if i / cols_total < vh && i % cols_total < vw { 0f32 } else { f32::MIN }));
                m.extend(std::iter::repeat_n(0f32, lat));
            }
            Some(Tensor::from_vec(m, (n, 1, 1, seq + lat), x.device())?)
        } else {
            None
        };
        self.resampler.forward(&context, mask.as_ref())
    }
}

impl Resampler {
    fn forward(&self, context: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (n, seq, h) = context.dims3()?;
        let lat = self.latents.dim(0)?;
        let (heads, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let n_rep = heads / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        let mut latents = self.latents.unsqueeze(0)?.broadcast_as((n, lat, h))?.contiguous()?;
        for l in &self.layers {
            let residual = latents.clone();
            let q_in = l.input_latents_norm.forward(&latents)?;
            let ctx = l.input_context_norm.forward(context)?;
            let kv_in = Tensor::cat(&[&ctx, &q_in], 1)?; // (n, seq + lat, h)
            let timer = span(Part::Proj);
            let q = l.q_proj.forward(&q_in)?.reshape((n, lat, heads, d))?.transpose(1, 2)?.contiguous()?;
            let kv = l.kv_proj.forward(&kv_in)?;
            drop(timer);
            let timer = span(Part::Attention);
            let s = seq + lat;
            let k = kv.narrow(2, 0, kvh * d)?.reshape((n, s, kvh, d))?.transpose(1, 2)?.contiguous()?;
            let v = kv.narrow(2, kvh * d, kvh * d)?.reshape((n, s, kvh, d))?.transpose(1, 2)?.contiguous()?;
            // Grouped-query heads without repeating K/V: the n_rep query heads sharing a KV
            // head are consecutive, so (n, heads, lat, d) views as (n, kv_heads, n_rep·lat, d).
            let q = q.reshape((n, kvh, n_rep * lat, d))?;
            let o = if q.device().is_cpu() && q.dtype() == DType::F32 {
                // On the CPU in f32: one attention block (score product, masked softmax, product
                // with the values) per (frame, KV head) on the pool.
                let (qs, ks, vs) = (q.flatten_all()?.to_vec1::<f32>()?, k.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
                let mask = mask.map(|m| m.flatten_all()?.to_vec1::<f32>()).transpose()?;
                let mask_of = |g: usize| mask.as_deref().map(|m| &m[(g / kvh) * s..(g / kvh + 1) * s]);
                let o = crate::kernels::grouped_attention(&qs, &ks, &vs, (n * kvh, n_rep * lat, d), scale as f32, &|g| g * s..(g + 1) * s, &mask_of);
                Tensor::from_vec(o, (n, heads, lat, d), q.device())?
            } else {
                let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
                let scores = match mask {
                    Some(m) => scores.broadcast_add(m)?,
                    None => scores,
                };
                let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
                probs.matmul(&v)?.reshape((n, heads, lat, d))?
            };
            let o = o.transpose(1, 2)?.reshape((n, lat, heads * d))?;
            drop(timer);
            let timer = span(Part::Proj);
            let latents2 = (residual + l.o_proj.forward(&o)?)?;
            drop(timer);
            let y = l.mlp.forward(&l.post_attention_layernorm.forward(&latents2)?)?;
            latents = (latents2 + y)?;
        }
        self.norm.forward(&latents)
    }
}
