//! `model.text_model` of both families: the Llama (Idefics3) or Mistral (Idefics2) decoder
//! (RMSNorm, RoPE, grouped-query attention, SiLU MLP) with a per-row KV cache so left-padded
//! batches decode like separate runs. Mistral's sliding window lives in the attention masks
//! the caller passes ([`crate::engine`]).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear_b, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

use crate::par::ParLinear;

use crate::config::{Rope, TextConfig};

/// Inverse RoPE frequencies, computed in f32 like the reference.
pub fn inv_freq(cfg: &TextConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let theta = match cfg.rope {
        Rope::Default { theta } | Rope::Linear { theta, .. } | Rope::Llama3 { theta, .. } => theta,
    };
    let base = (0..dim)
        .step_by(2)
        .map(|i| 1.0f32 / (theta as f32).powf(i as f32 / dim as f32))
        .collect::<Vec<_>>();
    match cfg.rope {
        Rope::Default { .. } => base,
        Rope::Linear { factor, .. } => base.iter().map(|f| f / factor as f32).collect(),
        Rope::Llama3 { factor, low_freq_factor, high_freq_factor, original_max, .. } => {
            let (factor, lo, hi, old) =
                (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max as f32);
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// Per-layer key/value cache, preallocated along the sequence axis and written in place.
/// `k`/`v` have shape (batch, kv_heads, capacity, head_dim); the first `len` positions are valid.
struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    /// Appends `k`/`v` (batch, kv_heads, t, head_dim), growing the buffers when `capacity` is exceeded,
    /// and returns views of all cached positions.
    fn append(cache: &mut Option<KvCache>, k: &Tensor, v: &Tensor, capacity: usize) -> Result<(Tensor, Tensor)> {
        let (b, kvh, t, d) = k.dims4()?;
        let need = cache.as_ref().map_or(0, |c| c.len) + t;
        let cap = cache.as_ref().map_or(0, |c| c.k.dim(2).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(capacity).max(cap * 2);
            let nk = Tensor::zeros((b, kvh, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, kvh, new_cap, d), v.dtype(), v.device())?;
            let len = match cache.take() {
                Some(old) => {
                    if old.len > 0 {
                        nk.slice_set(&old.k.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                        nv.slice_set(&old.v.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                    }
                    old.len
                }
                None => 0,
            };
            *cache = Some(KvCache { k: nk, v: nv, len });
        }
        let c = cache.as_mut().expect("cache allocated above");
        c.k.slice_set(&k.contiguous()?, 2, c.len)?;
        c.v.slice_set(&v.contiguous()?, 2, c.len)?;
        c.len += t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

struct Attention {
    /// q_proj, k_proj and v_proj stacked: one product per step.
    qkv_proj: ParLinear,
    o_proj: ParLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cache: Option<KvCache>,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let bias = cfg.attention_bias;
        Ok(Attention {
            qkv_proj: ParLinear::fused(&[
                linear_b(cfg.hidden_size, h * d, bias, vb.pp("q_proj"))?,
                linear_b(cfg.hidden_size, kv * d, bias, vb.pp("k_proj"))?,
                linear_b(cfg.hidden_size, kv * d, bias, vb.pp("v_proj"))?,
            ])?,
            o_proj: ParLinear::new(linear_b(h * d, cfg.hidden_size, bias, vb.pp("o_proj"))?)?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            cache: None,
        })
    }

    /// `capacity`: cache length to preallocate when the cache is (re)allocated.
    fn forward(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        capacity: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = self.qkv_proj.forward(x)?;
        let q = qkv.narrow(2, 0, h * d)?.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
        let k = qkv.narrow(2, h * d, kvh * d)?.reshape((b, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let v = qkv.narrow(2, (h + kvh) * d, kvh * d)?.reshape((b, t, kvh, d))?.transpose(1, 2)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = KvCache::append(&mut self.cache, &k, &v, capacity)?;
        if t == 1 && q.device().is_cpu() && q.dtype() == DType::F32 {
            let out = self.decode_attention(&q, mask)?;
            return self.o_proj.forward(&out);
        }
        let s = k.dim(2)?;
        // Grouped-query attention without repeating K/V: the n_rep query heads that share a
        // KV head are consecutive, so (b, h, t, d) views as (b, kv_heads, n_rep * t, d).
        let n_rep = h / kvh;
        let q = q.reshape((b, kvh, n_rep * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.reshape((b, h, t, s))?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.reshape((b, kvh, n_rep * t, s))?.matmul(&v)?;
        let out = out.reshape((b, h, t, d))?.transpose(1, 2)?.reshape((b, t, h * d))?;
        self.o_proj.forward(&out)
    }
}

impl Attention {
    /// Attention of one new position per sequence (CPU f32) straight on the cache buffers:
    /// `q` (b, heads, 1, head_dim) after RoPE, `mask` (b, 1, 1, cached) or None. Returns
    /// (b, 1, heads·head_dim). Each (row, head) is computed on its own, whatever the batch.
    fn decode_attention(&self, q: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, _, d) = q.dims4()?;
        let kvh = self.kv_heads;
        let n_rep = h / kvh;
        let c = self.cache.as_ref().expect("cache appended before attention");
        let (cap, len) = (c.k.dim(2)?, c.len);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let mask = match mask {
            Some(m) => Some(m.to_dtype(DType::F32)?.broadcast_as((b, 1, 1, len))?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let mut out = vec![0f32; b * h * d];
        let op = OutPtr(out.as_mut_ptr());
        let (kg, kl) = c.k.storage_and_layout();
        let (vg, vl) = c.v.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(ks)), candle_core::Storage::Cpu(candle_core::CpuStorage::F32(vs))) = (&*kg, &*vg) else {
            candle_core::bail!("decode attention: f32 CPU cache expected");
        };
        let (Some((k0, _)), Some((v0, _))) = (kl.contiguous_offsets(), vl.contiguous_offsets()) else {
            candle_core::bail!("decode attention: contiguous cache expected");
        };
        let (ks, vs) = (&ks[k0..], &vs[v0..]);
        crate::par::par_for(b * h, &|task| {
            let (bi, hh) = (task / h, task % h);
            let base = (bi * kvh + hh / n_rep) * cap * d;
            let qv = &q[task * d..(task + 1) * d];
            let mut scores: Vec<f32> =
                (0..len).map(|j| crate::kernels::dot(qv, &ks[base + j * d..base + (j + 1) * d])).collect();
            crate::kernels::softmax_row(&mut scores, scale, mask.as_ref().map(|m| &m[bi * len..(bi + 1) * len]));
            // SAFETY: each task writes its own head's d outputs; `out` outlives par_for.
            let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(task * d), d) };
            for (j, &p) in scores.iter().enumerate() {
                let vr = &vs[base + j * d..base + (j + 1) * d];
                o.iter_mut().zip(vr).for_each(|(o, &v)| *o += p * v);
            }
        });
        drop((kg, vg));
        Tensor::from_vec(out, (b, 1, h * d), &Device::Cpu)
    }
}

struct OutPtr(*mut f32);
// SAFETY: hands disjoint parts of one buffer to pool tasks.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

struct Mlp {
    /// gate_proj and up_proj stacked.
    gate_up_proj: ParLinear,
    down_proj: ParLinear,
    intermediate: usize,
}

impl Mlp {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_up_proj: ParLinear::fused(&[linear_b(h, i, b, vb.pp("gate_proj"))?, linear_b(h, i, b, vb.pp("up_proj"))?])?,
            down_proj: ParLinear::new(linear_b(i, h, b, vb.pp("down_proj"))?)?,
            intermediate: i,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up_proj.forward(x)?;
        let i = self.intermediate;
        let last = gu.rank() - 1;
        let g = candle_nn::ops::silu(&gu.narrow(last, 0, i)?)?;
        self.down_proj.forward(&(g * gu.narrow(last, i, i)?)?)
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The decoder plus `lm_head` (tied to the embeddings when the checkpoint has none).
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: ParLinear,
    inv_freq: Vec<f32>,
    /// KV cache length preallocated per layer on the next prefill.
    cache_capacity: usize,
    dtype: DType,
    device: Device,
}

impl TextModel {
    /// `vb` points at the text model (`model.text_model`), `head` at `lm_head` (or None when tied).
    pub fn new(cfg: &TextConfig, vb: VarBuilder, head: Option<VarBuilder>) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            candle_core::bail!("text hidden_act {:?} is not supported (only silu)", cfg.hidden_act);
        }
        let embed_w = vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        let embed_tokens = Embedding::new(embed_w.clone(), cfg.hidden_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("layers.{i}"));
            layers.push(Layer {
                input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, l.pp("input_layernorm"))?,
                self_attn: Attention::new(cfg, l.pp("self_attn"))?,
                post_attention_layernorm: rms_norm(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    l.pp("post_attention_layernorm"),
                )?,
                mlp: Mlp::new(cfg, l.pp("mlp"))?,
            });
        }
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?;
        let lm_head = ParLinear::new(match head {
            Some(h) => linear_no_bias(cfg.hidden_size, cfg.vocab_size, h)?,
            None => Linear::new(embed_w, None),
        })?;
        Ok(TextModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq: inv_freq(cfg),
            cache_capacity: 0,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Preallocates this many positions (prompt + new tokens) when the next prefill starts a cache.
    pub fn set_cache_capacity(&mut self, n: usize) {
        self.cache_capacity = n;
    }

    pub fn clear_cache(&mut self) {
        for l in &mut self.layers {
            l.self_attn.cache = None;
        }
    }

    /// cos/sin tables of shape (batch, seq, head_dim/2) for per-row position ids.
    fn rope_tables(&self, positions: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        let (b, t, half) = (positions.len(), positions[0].len(), self.inv_freq.len());
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &p in row {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Runs `embeds` (batch, seq, hidden) through the decoder, appending to the KV cache, and
    /// returns logits (batch, vocab) of the last position as f32.
    /// `mask` is an additive f32 mask (batch, 1, seq, cached+seq) or None when nothing is masked
    /// beyond causality of a single new token.
    pub fn forward_last(&mut self, embeds: &Tensor, positions: &[Vec<i64>], mask: Option<&Tensor>) -> Result<Tensor> {
        let (cos, sin) = self.rope_tables(positions)?;
        let mut h = embeds.clone();
        for l in &mut self.layers {
            let r = h.clone();
            let x = l.input_layernorm.forward(&h)?;
            let x = l.self_attn.forward(&x, &cos, &sin, mask, self.cache_capacity)?;
            let h2 = (r + x)?;
            let x = l.post_attention_layernorm.forward(&h2)?;
            h = (&h2 + l.mlp.forward(&x)?)?;
        }
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?;
        let last = self.norm.forward(&last)?;
        self.lm_head.forward(&last)?.squeeze(1)?.to_dtype(DType::F32)
    }
}
