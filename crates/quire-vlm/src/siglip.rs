//! `model.vision_model` of both families: a SigLIP-style encoder reading images of any
//! size, with NaViT position bucketing and a key mask over padded patches. The families
//! differ only in which patches of a zero-padded image count as real
//! (see [`crate::frames::PatchRule`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{layer_norm, linear, Embedding, LayerNorm, VarBuilder};

use crate::config::VisionConfig;
use crate::linear::ParLinear;
use crate::profile::{enter, span, Part, Stage, Work};

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
    /// q_proj, k_proj and v_proj stacked by output features.
    qkv_proj: ParLinear,
    out_proj: ParLinear,
    layer_norm2: LayerNorm,
    fc1: ParLinear,
    fc2: ParLinear,
}

/// The layer's product: candle's for an f32 (or other device/dtype) layer, the bf16 kernels
/// for a bf16-packed one.
fn project(p: &ParLinear, x: &Tensor) -> Result<Tensor> {
    match p.linear() {
        Some(l) => l.forward(x),
        None => p.forward(x),
    }
}

pub struct VisionModel {
    patch_weight: Tensor, // (embed, C*p*p)
    patch_bias: Tensor,
    /// The patch embedding packed for bf16 products when the linear layers are bf16 (CPU).
    patch_bf16: Option<ParLinear>,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionModel {
    /// `linears`: the dtype of the linear layers' products (see [`crate::engine::linear_dtype`]).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, linears: DType) -> Result<Self> {
        let (e, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let patch_weight = emb.get((e, c, p, p), "patch_embedding.weight")?.reshape((e, c * p * p))?;
        let patch_bias = emb.get(e, "patch_embedding.bias")?;
        let patch_bf16 = if linears == DType::BF16 && patch_weight.device().is_cpu() {
            Some(ParLinear::with_dtype(candle_nn::Linear::new(patch_weight.clone(), Some(patch_bias.clone())), linears)?)
        } else {
            None
        };
        let side = cfg.image_size / p;
        let position_embedding = candle_nn::embedding(side * side, e, emb.pp("position_embedding"))?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            let qkv = [linear(e, e, a.pp("q_proj"))?, linear(e, e, a.pp("k_proj"))?, linear(e, e, a.pp("v_proj"))?];
            let inter = cfg.intermediate_size;
            layers.push(EncoderLayer {
                layer_norm1: layer_norm(e, cfg.layer_norm_eps, l.pp("layer_norm1"))?,
                qkv_proj: ParLinear::fused_with_dtype(&qkv, linears)?,
                out_proj: ParLinear::with_dtype(linear(e, e, a.pp("out_proj"))?, linears)?,
                layer_norm2: layer_norm(e, cfg.layer_norm_eps, l.pp("layer_norm2"))?,
                fc1: ParLinear::with_dtype(linear(e, inter, l.pp("mlp.fc1"))?, linears)?,
                fc2: ParLinear::with_dtype(linear(inter, e, l.pp("mlp.fc2"))?, linears)?,
            });
        }
        let post_layernorm = layer_norm(e, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        match cfg.hidden_act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu" | "quick_gelu" => {}
            other => candle_core::bail!("vision hidden_act {other:?} is not supported"),
        }
        Ok(VisionModel { patch_weight, patch_bias, patch_bf16, position_embedding, layers, post_layernorm, cfg: cfg.clone() })
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
        self.forward_with(pixels, valid, true)
    }

    /// [`Self::forward`]; `fused`: whether CPU f32 may take the fused kernels (tests compare
    /// them with candle's ops).
    fn forward_with(&self, pixels: &Tensor, valid: &[(usize, usize)], fused: bool) -> Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (ph, pw) = (h / p, w / p);
        let _stage = enter(Stage::Vision, Work { seqs: n, rows: n * ph * pw, pairs: n * (ph * pw).pow(2) });
        let pixels = pixels.narrow(2, 0, ph * p)?.narrow(3, 0, pw * p)?;
        // Patch embedding as a matmul over flattened (C, p, p) patches, same as the strided conv.
        let patches = pixels
            .reshape((n, c, ph, p, pw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, ph * pw, c * p * p))?;
        let x = match &self.patch_bf16 {
            Some(l) => l.forward(&patches)?,
            None => patches.broadcast_matmul(&self.patch_weight.t()?)?.broadcast_add(&self.patch_bias)?,
        };
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
            Some(m)
        } else {
            None
        };
        // The fused CPU path's activation is the tanh form (quick_gelu and the erf gelu go through candle).
        let tanh_gelu = matches!(self.cfg.hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast");
        if fused && x.device().is_cpu() && x.dtype() == DType::F32 && tanh_gelu {
            return self.forward_cpu_f32(&x, mask.as_deref());
        }
        let mask = match mask {
            Some(m) => Some(Tensor::from_vec(m, (n, 1, 1, ph * pw), x.device())?),
            None => None,
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
            let qkv = project(&l.qkv_proj, &y)?;
            let e = heads * hd;
            let q = split(qkv.narrow(2, 0, e)?)?;
            let k = split(qkv.narrow(2, e, e)?)?;
            let v = split(qkv.narrow(2, 2 * e, e)?)?;
            let o = attention(&q, &k, &v, mask.as_ref(), scale)?.transpose(1, 2)?.reshape((n, seq, heads * hd))?;
            let x2 = (r + project(&l.out_proj, &o)?)?;
            let y = l.layer_norm2.forward(&x2)?;
            let y = project(&l.fc2, &self.act(&project(&l.fc1, &y)?)?)?;
            x = (x2 + y)?;
        }
        self.post_layernorm.forward(&x)
    }
}

impl VisionModel {
    /// The encoder on CPU f32 buffers: fused kernels, no per-op temporaries. `x` (n, seq,
    /// hidden) are the embeddings, `mask` the additive key mask per tile (n·seq) when padded.
    /// Every (tile, head, query block) is computed the same way whatever the number of tiles.
    fn forward_cpu_f32(&self, x: &Tensor, mask: Option<&[f32]>) -> Result<Tensor> {
        let (n, seq, e) = x.dims3()?;
        let rows = n * seq;
        let inter = self.cfg.intermediate_size;
        let threads = candle_core::utils::get_num_threads().max(1);
        let eps = self.cfg.layer_norm_eps;
        let mut x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; rows * e];
        let mut qkv = vec![0f32; rows * 3 * e];
        let mut o = vec![0f32; rows * e];
        let mut h = vec![0f32; rows * inter];
        for l in &self.layers {
            layer_norm_rows(&x, &mut y, e, &l.layer_norm1, eps)?;
            let timer = span(Part::Proj);
            linear_rows(&y, &l.qkv_proj, &mut qkv, rows, false, threads)?;
            drop(timer);
            let timer = span(Part::Attention);
            if l.qkv_proj.bf16().is_some() && crate::bf16::support() == Ok(crate::bf16::Bf16Isa::Amx) {
                // bf16 layers: the attention's two products on the tiles too.
                let heads = self.cfg.num_attention_heads;
                let hd = e / heads;
                let scale = (1.0 / (hd as f64).sqrt()) as f32;
                crate::bf16::attention_amx(&qkv, &mut o, n, seq, heads, hd, mask, scale);
            } else {
                self.attention_cpu(&qkv, &mut o, n, seq, mask);
            }
            drop(timer);
            let timer = span(Part::Proj);
            // x += out_proj(o): bias first, then the product accumulated in place
            linear_rows(&o, &l.out_proj, &mut x, rows, true, threads)?;
            drop(timer);
            layer_norm_rows(&x, &mut y, e, &l.layer_norm2, eps)?;
            let timer = span(Part::Mlp);
            if let (Some(fc1), Some(fc2)) = (l.fc1.bf16(), l.fc2.bf16()) {
                // bf16 on AMX: fc1, the activation and fc2 in one pass (x += fc2(gelu(fc1(y)))).
                if crate::bf16::Bf16Linear::mlp_rows(fc1, fc2, crate::bf16::Act::GeluTanh, &y, rows, &mut x, true) {
                    continue;
                }
            }
            linear_rows(&y, &l.fc1, &mut h, rows, false, threads)?;
            drop(timer);
            let timer = span(Part::Act);
            const CHUNK: usize = 1 << 16;
            let hp = SendPtr(h.as_mut_ptr());
            let len = h.len();
            crate::par::par_for(len.div_ceil(CHUNK), &|i| {
                let (a, b) = (i * CHUNK, ((i + 1) * CHUNK).min(len));
                // SAFETY: tasks cover disjoint ranges of `h`, which outlives par_for.
                let s = unsafe { std::slice::from_raw_parts_mut(hp.get().add(a), b - a) };
                crate::kernels::gelu_tanh_inplace(s);
            });
            drop(timer);
            let timer = span(Part::Mlp);
            linear_rows(&h, &l.fc2, &mut x, rows, true, threads)?;
            drop(timer);
        }
        layer_norm_rows(&x, &mut y, e, &self.post_layernorm, eps)?;
        Tensor::from_vec(y, (n, seq, e), &candle_core::Device::Cpu)
    }

    /// Multi-head attention from the stacked projections `qkv` (n·seq, 3·hidden) into `o`
    /// (n·seq, hidden): per (tile, head, block of queries) one score product, a fused
    /// scale/mask/softmax, and one product with the values, all on one thread.
    fn attention_cpu(&self, qkv: &[f32], o: &mut [f32], n: usize, seq: usize, mask: Option<&[f32]>) {
        const QB: usize = 128;
        let heads = self.cfg.num_attention_heads;
        let e = self.cfg.hidden_size;
        let hd = e / heads;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let qblocks = seq.div_ceil(QB);
        let op = SendPtr(o.as_mut_ptr());
        thread_local! {
            static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let task = |t: usize| {
            let (tile, rest) = (t / (heads * qblocks), t % (heads * qblocks));
            let (head, qb) = (rest / qblocks, rest % qblocks);
            let q0 = qb * QB;
            let m = QB.min(seq - q0);
            let base = tile * seq * 3 * e;
            let q = &qkv[base + q0 * 3 * e + head * hd..];
            let k = &qkv[base + e + head * hd..];
            let v = &qkv[base + 2 * e + head * hd..];
            let tmask = mask.map(|mk| &mk[tile * seq..(tile + 1) * seq]);
            SCORES.with_borrow_mut(|sc| {
                // SAFETY: the strides address rows of `qkv` (3·hidden wide) inside the tile, and
                // the output block (rows q0.., columns of this head) is written by this task
                // only; `o` outlives par_for.
                unsafe {
                    crate::kernels::attention_block(
                        q.as_ptr(), 3 * e, k.as_ptr(), v.as_ptr(), 3 * e,
                        op.get().add((tile * seq + q0) * e + head * hd), e,
                        (m, seq, hd), scale, |_| tmask, sc,
                    )
                }
            });
        };
        crate::par::par_for(n * heads * qblocks, &task);
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint parts of one buffer to pool tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}
impl SendPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Contiguous f32 data of a CPU tensor.
fn cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(d)) = &*s else {
        candle_core::bail!("expected an f32 CPU tensor");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(f(&d[a..b]))
}

/// `dst` = LayerNorm(`src`) row by row (rows of `width`), split over the pool.
fn layer_norm_rows(src: &[f32], dst: &mut [f32], width: usize, ln: &LayerNorm, eps: f64) -> Result<()> {
    let w = ln.weight();
    let b = ln.bias().ok_or_else(|| candle_core::Error::Msg("layer norm without bias".into()))?;
    let eps = eps as f32;
    const ROWS: usize = 32;
    let rows = src.len() / width;
    let dp = SendPtr(dst.as_mut_ptr());
    cpu_f32(w, |w| {
        cpu_f32(b, |b| {
            crate::par::par_for(rows.div_ceil(ROWS), &|t| {
                for r in t * ROWS..((t + 1) * ROWS).min(rows) {
                    // SAFETY: each task writes its own rows of `dst`, which outlives par_for.
                    let d = unsafe { std::slice::from_raw_parts_mut(dp.get().add(r * width), width) };
                    crate::kernels::layer_norm_row(&src[r * width..(r + 1) * width], d, w, b, eps);
                }
            })
        })
    })?
}

/// `dst` (rows, out) = `x`·Wᵀ + bias, or `dst` += that when `accumulate`.
fn linear_rows(x: &[f32], p: &ParLinear, dst: &mut [f32], rows: usize, accumulate: bool, threads: usize) -> Result<()> {
    let lin = match (p.linear(), p.bf16()) {
        (_, Some(b)) => {
            b.forward_rows(x, rows, dst, accumulate, false);
            return Ok(());
        }
        (Some(l), None) => l,
        (None, None) => candle_core::bail!("a linear layer with neither an f32 nor a bf16 weight"),
    };
    let (out, k) = lin.weight().dims2()?;
    match lin.bias() {
        Some(b) => cpu_f32(b, |b| {
            for row in dst[..rows * out].chunks_exact_mut(out) {
                if accumulate {
                    row.iter_mut().zip(b).for_each(|(d, b)| *d += b);
                } else {
                    row.copy_from_slice(b);
                }
            }
        })?,
        None if !accumulate => dst[..rows * out].fill(0.0),
        None => {}
    }
    cpu_f32(lin.weight(), |w| crate::kernels::matmul_wt(x, w, dst, rows, k, out, true, threads))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A two-layer encoder with random weights under `act`.
    fn tiny(act: &str, dtype: DType) -> VisionModel {
        // dtype: of the weights and of the linear layers' products.
        let (e, inter, c, p, side) = (32usize, 48usize, 3usize, 4usize, 4usize);
        let cfg = VisionConfig {
            hidden_size: e,
            intermediate_size: inter,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_channels: c,
            image_size: side * p,
            patch_size: p,
            hidden_act: act.into(),
            layer_norm_eps: 1e-6,
        };
        let mut seed = 0usize;
        let mut t = |shape: &[usize], scale: f32| {
            seed += 1;
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((((i + 1) * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0) * scale).collect();
            Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
        };
        let mut w: HashMap<String, Tensor> = HashMap::new();
        w.insert("embeddings.patch_embedding.weight".into(), t(&[e, c, p, p], 0.2));
        w.insert("embeddings.patch_embedding.bias".into(), t(&[e], 0.1));
        w.insert("embeddings.position_embedding.weight".into(), t(&[side * side, e], 0.5));
        for l in 0..2 {
            let pre = format!("encoder.layers.{l}.");
            for norm in ["layer_norm1", "layer_norm2"] {
                w.insert(format!("{pre}{norm}.weight"), (t(&[e], 0.1) + 1.0).unwrap());
                w.insert(format!("{pre}{norm}.bias"), t(&[e], 0.1));
            }
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                w.insert(format!("{pre}self_attn.{proj}.weight"), t(&[e, e], 0.3));
                w.insert(format!("{pre}self_attn.{proj}.bias"), t(&[e], 0.1));
            }
            w.insert(format!("{pre}mlp.fc1.weight"), t(&[inter, e], 0.3));
            w.insert(format!("{pre}mlp.fc1.bias"), t(&[inter], 0.1));
            w.insert(format!("{pre}mlp.fc2.weight"), t(&[e, inter], 0.3));
            w.insert(format!("{pre}mlp.fc2.bias"), t(&[e], 0.1));
        }
        w.insert("post_layernorm.weight".into(), (t(&[e], 0.1) + 1.0).unwrap());
        w.insert("post_layernorm.bias".into(), t(&[e], 0.1));
        let vb = VarBuilder::from_tensors(w, dtype, &candle_core::Device::Cpu);
        VisionModel::new(&cfg, vb, dtype).unwrap()
    }

    /// The encoder's fused CPU f32 path against candle's ops on the same weights, for each activation
    /// a checkpoint may name, with a padded tile (key mask): the fused path must apply the
    /// checkpoint's own activation (it once ran the tanh GELU for `quick_gelu` too).
    #[test]
    fn cpu_f32_encoder_matches_candle_ops_for_each_activation() {
        let pixels: Vec<f32> = (0..2 * 3 * 16 * 16).map(|i| ((i * 31 % 97) as f32 / 48.5) - 1.0).collect();
        let pixels = Tensor::from_vec(pixels, (2, 3, 16, 16), &candle_core::Device::Cpu).unwrap();
        let valid = [(4, 4), (3, 2)];
        for act in ["gelu_pytorch_tanh", "quick_gelu", "gelu"] {
            let model = tiny(act, DType::F32);
            let fast = model.forward(&pixels, &valid).unwrap();
            let ops = model.forward_with(&pixels, &valid, false).unwrap();
            let diff = (fast - ops).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{act}: the CPU f32 encoder is {diff} off candle's ops");
        }
    }
}
