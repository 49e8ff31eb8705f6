//! `model.text_model` of both families: the Llama (Idefics3) or Mistral (Idefics2) decoder
//! (RMSNorm, RoPE, grouped-query attention, SiLU MLP) with a per-row KV cache so left-padded
//! batches decode like separate runs. Mistral's sliding window lives in the attention masks
//! the caller passes ([`crate::engine`]).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear_b, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

use crate::linear::{Linears, ParLinear};
use crate::profile::{span, Part};

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
                    // transformers: not below high_wavelen and not above low_wavelen (wavelen is never NaN).
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
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
    /// Continuous batching's cache: key and value buffers of shape (slots, kv_heads,
    /// positions, head_dim), the sequence in flight number i in slot i.
    shared: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder, linears: Linears) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let bias = cfg.attention_bias;
        Ok(Attention {
            qkv_proj: ParLinear::fused_with_linears(
                &[
                    linear_b(cfg.hidden_size, h * d, bias, vb.pp("q_proj"))?,
                    linear_b(cfg.hidden_size, kv * d, bias, vb.pp("k_proj"))?,
                    linear_b(cfg.hidden_size, kv * d, bias, vb.pp("v_proj"))?,
                ],
                linears,
            )?,
            o_proj: ParLinear::with_linears(linear_b(h * d, cfg.hidden_size, bias, vb.pp("o_proj"))?, linears)?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            cache: None,
            shared: None,
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
        let timer = span(Part::Proj);
        let qkv = self.qkv_proj.forward(x)?;
        drop(timer);
        let timer = span(Part::Attention);
        let q = qkv.narrow(2, 0, h * d)?.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
        let k = qkv.narrow(2, h * d, kvh * d)?.reshape((b, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let v = qkv.narrow(2, (h + kvh) * d, kvh * d)?.reshape((b, t, kvh, d))?.transpose(1, 2)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = KvCache::append(&mut self.cache, &k, &v, capacity)?;
        if t == 1 && q.device().is_cpu() && q.dtype() == DType::F32 {
            let out = self.decode_attention(&q, mask)?;
            drop(timer);
            let _timer = span(Part::Proj);
            return self.o_proj.forward(&out);
        }
        if let (true, Some(m)) = (q.device().is_cpu() && q.dtype() == DType::F32, mask) {
            let out = self.prefill_attention_cpu(&q, m)?;
            drop(timer);
            let _timer = span(Part::Proj);
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
        drop(timer);
        let _timer = span(Part::Proj);
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
        let c = self.cache.as_ref().expect("cache appended before attention");
        let (cap, len) = (c.k.dim(2)?, c.len);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let mask = match mask {
            Some(m) => Some(m.to_dtype(DType::F32)?.broadcast_as((b, 1, 1, len))?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let (kg, kl) = c.k.storage_and_layout();
        let (vg, vl) = c.v.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(ks)), candle_core::Storage::Cpu(candle_core::CpuStorage::F32(vs))) = (&*kg, &*vg) else {
            candle_core::bail!("decode attention: f32 CPU cache expected");
        };
        let (Some((k0, _)), Some((v0, _))) = (kl.contiguous_offsets(), vl.contiguous_offsets()) else {
            candle_core::bail!("decode attention: contiguous cache expected");
        };
        let (ks, vs) = (&ks[k0..], &vs[v0..]);
        let out = decode_attention_groups(&q, ks, vs, (b, h, kvh, d, cap), scale, &|_| 0..len, &|bi| {
            mask.as_ref().map(|m| &m[bi * len..(bi + 1) * len])
        });
        drop((kg, vg));
        Tensor::from_vec(out, (b, 1, h * d), &Device::Cpu)
    }
}

impl Attention {
    /// Attention of `t` new positions per sequence (CPU f32) on the cache buffers: `q` (b, heads,
    /// t, head_dim) after RoPE, `mask` the additive (b, 1, t, cached) f32 mask. Returns (b, t,
    /// heads·head_dim). Per (row, head, block of queries) one score product, the fused
    /// scale/mask/softmax per row, and one product with the values, on one thread.
    fn prefill_attention_cpu(&self, q: &Tensor, mask: &Tensor) -> Result<Tensor> {
        const QB: usize = 64;
        let (b, h, t, d) = q.dims4()?;
        let kvh = self.kv_heads;
        let n_rep = h / kvh;
        let c = self.cache.as_ref().expect("cache appended before attention");
        let (cap, len) = (c.k.dim(2)?, c.len);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let q = q.contiguous()?;
        let (qg, ql) = q.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(qs)) = &*qg else {
            candle_core::bail!("prefill attention: f32 CPU queries expected");
        };
        let qs = &qs[ql.start_offset()..];
        let mask = mask.to_dtype(DType::F32)?.broadcast_as((b, 1, t, len))?.contiguous()?;
        let mask = mask.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; b * t * h * d];
        let op = OutPtr(out.as_mut_ptr());
        let (kg, kl) = c.k.storage_and_layout();
        let (vg, vl) = c.v.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(ks)), candle_core::Storage::Cpu(candle_core::CpuStorage::F32(vs))) = (&*kg, &*vg) else {
            candle_core::bail!("prefill attention: f32 CPU cache expected");
        };
        let (Some((k0, _)), Some((v0, _))) = (kl.contiguous_offsets(), vl.contiguous_offsets()) else {
            candle_core::bail!("prefill attention: contiguous cache expected");
        };
        let (ks, vs) = (&ks[k0..], &vs[v0..]);
        let qblocks = t.div_ceil(QB);
        crate::par::par_for(b * h * qblocks, &|task| {
            let (bh, qb) = (task / qblocks, task % qblocks);
            let (bi, hh) = (bh / h, bh % h);
            let (i0, m) = (qb * QB, QB.min(t - qb * QB));
            let base = (bi * kvh + hh / n_rep) * cap * d;
            let qrows = &qs[(bh * t + i0) * d..];
            SCORES.with_borrow_mut(|sc| {
                // SAFETY: q rows (m × d), the cache block of this KV head (len × d) are inside
                // their buffers; the output block (rows i0.. of sequence bi, this head's
                // columns) is written by this task only.
                unsafe {
                    crate::kernels::attention_block(
                        qrows.as_ptr(), d, ks[base..].as_ptr(), vs[base..].as_ptr(), d,
                        op.get().add((bi * t + i0) * h * d + hh * d), h * d,
                        (m, len, d), scale,
                        |i| Some(&mask[(bi * t + i0 + i) * len..(bi * t + i0 + i + 1) * len]),
                        sc,
                    )
                }
            });
        });
        drop((kg, vg, qg));
        Tensor::from_vec(out, (b, t, h * d), &Device::Cpu)
    }
}

/// One decode step of continuous batching, as every layer sees it: the sequences in flight
/// are rows 0..b, each in the cache slot of its row.
pub struct SlotStep<'a> {
    /// Keys cached per row before this step (the new key goes there).
    pub lens: &'a [usize],
    /// (b, kv_heads, 1, head_dim) u32, row i filled with `lens[i]`: where scatter writes.
    pub index: &'a Tensor,
    /// Off the CPU f32 path: (b, 1, 1, keys) additive f32 mask over the longest row.
    pub mask: Option<&'a Tensor>,
    /// Mistral's sliding window.
    pub window: Option<usize>,
}

impl Attention {
    /// One new position for each sequence in flight (`x` (b, 1, hidden), row i in slot i).
    /// The projections run once for all rows; the new keys and values are written in place
    /// into the shared cache, and attention reads each row's own keys there, so a row gives
    /// what its sequence gives alone.
    fn forward_slots(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor, st: &SlotStep) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if t != 1 || b != st.lens.len() {
            candle_core::bail!("forward_slots: one new position per sequence in flight expected");
        }
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let timer = span(Part::Proj);
        let qkv = self.qkv_proj.forward(x)?;
        drop(timer);
        let timer = span(Part::Attention);
        let q = qkv.narrow(2, 0, h * d)?.reshape((b, 1, h, d))?.transpose(1, 2)?.contiguous()?;
        let k = qkv.narrow(2, h * d, kvh * d)?.reshape((b, 1, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let v = qkv.narrow(2, (h + kvh) * d, kvh * d)?.reshape((b, 1, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (ck, cv) = self.shared.as_ref().ok_or_else(|| candle_core::Error::Msg("no continuous-batching cache".into()))?;
        let cap = ck.dim(2)?;
        if st.lens.iter().any(|&l| l >= cap) {
            candle_core::bail!("a sequence outgrew the {cap} positions of its cache slot");
        }
        ck.narrow(0, 0, b)?.scatter_set(st.index, &k, 2)?;
        cv.narrow(0, 0, b)?.scatter_set(st.index, &v, 2)?;
        let out = if q.device().is_cpu() && q.dtype() == DType::F32 {
            self.slot_attention_cpu(&q, st.lens, st.window)?
        } else {
            let keys = st.lens.iter().max().map_or(0, |l| l + 1);
            let n_rep = h / kvh;
            let kc = ck.narrow(0, 0, b)?.narrow(2, 0, keys)?;
            let vc = cv.narrow(0, 0, b)?.narrow(2, 0, keys)?;
            let qg = q.reshape((b, kvh, n_rep, d))?;
            let scale = 1.0 / (d as f64).sqrt();
            let scores = (qg.matmul(&kc.t()?)? * scale)?.to_dtype(DType::F32)?;
            let scores = match st.mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vc.dtype())?;
            probs.matmul(&vc)?.reshape((b, 1, h * d))?
        };
        drop(timer);
        let _timer = span(Part::Proj);
        self.o_proj.forward(&out)
    }

    /// [`Self::forward_slots`]'s attention on the CPU in f32, straight on the cache buffers:
    /// row i reads keys 0..=lens[i] of slot i (the last `window` of them with a window).
    fn slot_attention_cpu(&self, q: &Tensor, lens: &[usize], window: Option<usize>) -> Result<Tensor> {
        let (b, h, _, d) = q.dims4()?;
        let kvh = self.kv_heads;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let (ck, cv) = self.shared.as_ref().expect("checked by forward_slots");
        let cap = ck.dim(2)?;
        let (kg, kl) = ck.storage_and_layout();
        let (vg, vl) = cv.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(ks)), candle_core::Storage::Cpu(candle_core::CpuStorage::F32(vs))) = (&*kg, &*vg) else {
            candle_core::bail!("slot attention: f32 CPU cache expected");
        };
        let (Some((k0, _)), Some((v0, _))) = (kl.contiguous_offsets(), vl.contiguous_offsets()) else {
            candle_core::bail!("slot attention: contiguous cache expected");
        };
        let (ks, vs) = (&ks[k0..], &vs[v0..]);
        let keys = |bi: usize| {
            let len = lens[bi] + 1;
            window.map_or(0, |w| len.saturating_sub(w))..len
        };
        let out = decode_attention_groups(&q, ks, vs, (b, h, kvh, d, cap), scale, &keys, &|_| None);
        drop((kg, vg));
        Tensor::from_vec(out, (b, 1, h * d), &Device::Cpu)
    }
}

/// `t` in a contiguous buffer of its own (`contiguous` alone returns a view of a tensor that
/// is contiguous already, e.g. a narrowed cache slot with one KV head).
fn owned_copy(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        t.copy()
    } else {
        t.contiguous()
    }
}

thread_local! {
    /// Score rows of the CPU attention blocks, kept per pool thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Attention of one new position per sequence (CPU f32) on the cache buffers `ks`, `vs`
/// ((b, kv_heads, cap, d) each), a KV head's `n_rep` query heads at a time, so its keys and
/// values are read once for the group: `q` is (b, h, d), sequence `bi` attends to its cached
/// positions `keys(bi)` with the additive `mask(bi)` over them. Returns (b, h, d). Each
/// (sequence, KV head) is one attention block of the same shape whatever the batch, so a
/// sequence decodes the same alone as beside others.
fn decode_attention_groups<'m>(
    q: &[f32],
    ks: &[f32],
    vs: &[f32],
    (b, h, kvh, d, cap): (usize, usize, usize, usize, usize),
    scale: f32,
    keys: &(dyn Fn(usize) -> std::ops::Range<usize> + Sync),
    mask: &(dyn Fn(usize) -> Option<&'m [f32]> + Sync),
) -> Vec<f32> {
    // Group g = (sequence g / kvh, KV head g % kvh): its query heads are rows g·n_rep.. of q.
    let rows = |g: usize| {
        let r = keys(g / kvh);
        assert!(r.end <= cap, "decode attention keys {r:?} outside the {cap} cached");
        g * cap + r.start..g * cap + r.end
    };
    crate::kernels::grouped_attention(q, ks, vs, (b * kvh, h / kvh, d), scale, &rows, &|g| mask(g / kvh))
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
    fn new(cfg: &TextConfig, vb: VarBuilder, linears: Linears) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gate_up = [linear_b(h, i, b, vb.pp("gate_proj"))?, linear_b(h, i, b, vb.pp("up_proj"))?];
        Ok(Mlp {
            gate_up_proj: ParLinear::fused_with_linears(&gate_up, linears)?,
            down_proj: ParLinear::with_linears(linear_b(i, h, b, vb.pp("down_proj"))?, linears)?,
            intermediate: i,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = span(Part::Mlp);
        if let Some(y) = crate::linear::swiglu_bf16(&self.gate_up_proj, &self.down_proj, x)? {
            return Ok(y);
        }
        let gu = self.gate_up_proj.forward(x)?;
        let i = self.intermediate;
        if gu.device().is_cpu() && gu.dtype() == DType::F32 && gu.is_contiguous() {
            return self.down_proj.forward(&silu_mul_cpu(&gu, i)?);
        }
        let last = gu.rank() - 1;
        let g = candle_nn::ops::silu(&gu.narrow(last, 0, i)?)?;
        self.down_proj.forward(&(g * gu.narrow(last, i, i)?)?)
    }
}

/// silu(gate) · up from the stacked (…, 2·i) gate/up product of a contiguous CPU f32 tensor,
/// row by row over the pool, into a (…, i) tensor.
pub(crate) fn silu_mul_cpu(gu: &Tensor, i: usize) -> Result<Tensor> {
    let mut dims = gu.dims().to_vec();
    let rows = gu.elem_count() / (2 * i);
    *dims.last_mut().expect("rank >= 1") = i;
    let (g, l) = gu.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(src)) = &*g else {
        candle_core::bail!("silu_mul: f32 CPU tensor expected");
    };
    let Some((a, _)) = l.contiguous_offsets() else {
        candle_core::bail!("silu_mul: contiguous tensor expected");
    };
    let src = &src[a..a + rows * 2 * i];
    let mut out = vec![0f32; rows * i];
    let op = OutPtr(out.as_mut_ptr());
    // About 16K outputs per task: one task for a decode step, a few per prefill.
    let per = (16384 / i).max(1);
    crate::par::par_for(rows.div_ceil(per), &|t| {
        for r in t * per..((t + 1) * per).min(rows) {
            // SAFETY: each task writes its own rows of `out`, which outlives par_for.
            let d = unsafe { std::slice::from_raw_parts_mut(op.get().add(r * i), i) };
            let row = &src[r * 2 * i..(r + 1) * 2 * i];
            crate::kernels::silu_mul(&row[..i], &row[i..], d);
        }
    });
    drop(g);
    Tensor::from_vec(out, dims, &Device::Cpu)
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
    /// `inv_freq` on the device, (1, head_dim/2), made at the first use.
    inv_freq_t: std::sync::OnceLock<Result<Tensor>>,
    /// KV cache length preallocated per layer on the next prefill.
    cache_capacity: usize,
    dtype: DType,
    device: Device,
}

impl TextModel {
    /// `vb` points at the text model (`model.text_model`), `head` at `lm_head` (or None when tied);
    /// `linears`: how the linear layers (`lm_head` included) hold their weights and run their
    /// products (see [`crate::engine::text_linears`]).
    pub fn new(cfg: &TextConfig, vb: VarBuilder, head: Option<VarBuilder>, linears: Linears) -> Result<Self> {
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
                self_attn: Attention::new(cfg, l.pp("self_attn"), linears)?,
                post_attention_layernorm: rms_norm(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    l.pp("post_attention_layernorm"),
                )?,
                mlp: Mlp::new(cfg, l.pp("mlp"), linears)?,
            });
        }
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?;
        let lm_head = ParLinear::with_linears(
            match head {
                Some(h) => linear_no_bias(cfg.hidden_size, cfg.vocab_size, h)?,
                None => Linear::new(embed_w, None),
            },
            linears,
        )?;
        Ok(TextModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq: inv_freq(cfg),
            inv_freq_t: std::sync::OnceLock::new(),
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

    /// (slots, positions) of the continuous-batching cache (0, 0 before the first use).
    pub fn slot_shape(&self) -> (usize, usize) {
        match &self.layers[0].self_attn.shared {
            Some((k, _)) => (k.dim(0).unwrap_or(0), k.dim(2).unwrap_or(0)),
            None => (0, 0),
        }
    }

    /// Gives the continuous-batching cache `slots` slots of `positions` positions each,
    /// keeping what the first `keep` slots hold (their first `keep_positions` positions).
    pub fn resize_slots(&mut self, slots: usize, positions: usize, keep: usize, keep_positions: usize) -> Result<()> {
        for l in &mut self.layers {
            let a = &mut l.self_attn;
            let shape = (slots, a.kv_heads, positions, a.head_dim);
            let (nk, nv) = (Tensor::zeros(shape, self.dtype, &self.device)?, Tensor::zeros(shape, self.dtype, &self.device)?);
            if let Some((ok, ov)) = a.shared.take() {
                if keep > 0 && keep_positions > 0 {
                    let ok = ok.narrow(0, 0, keep)?.narrow(2, 0, keep_positions)?.contiguous()?;
                    let ov = ov.narrow(0, 0, keep)?.narrow(2, 0, keep_positions)?.contiguous()?;
                    nk.narrow(0, 0, keep)?.slice_set(&ok, 2, 0)?;
                    nv.narrow(0, 0, keep)?.slice_set(&ov, 2, 0)?;
                }
            }
            a.shared = Some((nk, nv));
        }
        Ok(())
    }

    /// One chunk of a sequence's prefill (`embeds` (1, chunk, hidden) at `positions`, `mask`
    /// (1, 1, chunk, cached + chunk)) into this model's own cache, which holds the chunks
    /// before it (call [`Self::clear_cache`] before the first; `capacity`: the whole prompt).
    /// Returns the chunk's last logits (1, vocab); [`Self::commit_prefill`] then moves the
    /// keys and values into a slot of the continuous-batching cache.
    pub fn prefill_chunk(&mut self, embeds: &Tensor, positions: &[Vec<i64>], mask: Option<&Tensor>, capacity: usize) -> Result<Tensor> {
        let saved = std::mem::replace(&mut self.cache_capacity, capacity);
        let out = self.forward_last(embeds, positions, mask);
        self.cache_capacity = saved;
        out
    }

    /// Moves the prefilled keys and values of this model's own cache into cache slot `slot`.
    pub fn commit_prefill(&mut self, slot: usize) -> Result<()> {
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            let c = a.cache.take().ok_or_else(|| candle_core::Error::Msg("nothing prefilled".into()))?;
            let (ck, cv) = a.shared.as_ref().ok_or_else(|| candle_core::Error::Msg("no continuous-batching cache".into()))?;
            ck.narrow(0, slot, 1)?.slice_set(&c.k.narrow(2, 0, c.len)?.contiguous()?, 2, 0)?;
            cv.narrow(0, slot, 1)?.slice_set(&c.v.narrow(2, 0, c.len)?.contiguous()?, 2, 0)?;
        }
        Ok(())
    }

    /// Copies the first `len` positions of slot `from` into slot `to` (keeping the sequences
    /// in flight in the first slots when one leaves).
    pub fn move_slot(&mut self, from: usize, to: usize, len: usize) -> Result<()> {
        for layer in &mut self.layers {
            if let Some((ck, cv)) = &layer.self_attn.shared {
                let k = owned_copy(&ck.narrow(0, from, 1)?.narrow(2, 0, len)?)?;
                let v = owned_copy(&cv.narrow(0, from, 1)?.narrow(2, 0, len)?)?;
                ck.narrow(0, to, 1)?.slice_set(&k, 2, 0)?;
                cv.narrow(0, to, 1)?.slice_set(&v, 2, 0)?;
            }
        }
        Ok(())
    }

    /// One decode step of the sequences in flight (row i of `embeds` (b, 1, hidden) is the
    /// newest token of the sequence in slot i, at position `positions[i]`); logits (b, vocab) as f32.
    pub fn forward_slots(&mut self, embeds: &Tensor, positions: &Tensor, st: &SlotStep) -> Result<Tensor> {
        let (cos, sin) = self.rope_tables_on_device(positions)?;
        let mut h = embeds.clone();
        for l in &mut self.layers {
            let r = h.clone();
            let x = l.input_layernorm.forward(&h)?;
            let x = l.self_attn.forward_slots(&x, &cos, &sin, st)?;
            let h2 = (r + x)?;
            let x = l.post_attention_layernorm.forward(&h2)?;
            h = (&h2 + l.mlp.forward(&x)?)?;
        }
        let _timer = span(Part::LmHead);
        let h = self.norm.forward(&h)?;
        self.lm_head.forward(&h)?.squeeze(1)?.to_dtype(DType::F32)
    }

    /// Whether decode attention runs on the CPU f32 kernel (no mask needed).
    pub fn cpu_f32(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    pub fn kv_heads_and_dim(&self) -> (usize, usize) {
        let a = &self.layers[0].self_attn;
        (a.kv_heads, a.head_dim)
    }

    /// Bytes of key/value cache one position takes in this model.
    pub fn kv_bytes_per_position(&self) -> usize {
        let a = &self.layers[0].self_attn;
        self.layers.len() * 2 * a.kv_heads * a.head_dim * self.dtype.size_in_bytes()
    }

    /// [`Self::rope_tables`] for one position per row, `positions` (b,) u32 on the device:
    /// the angles are position × inverse frequency in f32 as on the host, computed where the
    /// positions already are.
    fn rope_tables_on_device(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = positions.dim(0)?;
        let half = self.inv_freq.len();
        let inv = self.inv_freq_t.get_or_init(|| Tensor::from_slice(&self.inv_freq, (1, half), &self.device));
        let inv = inv.as_ref().map_err(|e| candle_core::Error::Msg(format!("{e}")))?;
        let angles = positions.to_dtype(DType::F32)?.reshape((b, 1))?.broadcast_mul(inv)?;
        let cos = angles.cos()?.to_dtype(self.dtype)?.reshape((b, 1, half))?;
        let sin = angles.sin()?.to_dtype(self.dtype)?.reshape((b, 1, half))?;
        Ok((cos, sin))
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
        let _timer = span(Part::LmHead);
        let last = self.norm.forward(&last)?;
        self.lm_head.forward(&last)?.squeeze(1)?.to_dtype(DType::F32)
    }
}
