//! A linear layer for CPU inference on the thread pool of [`crate::par`]: decoding products
//! (one new token per sequence) split by output features, each a dot product computed by
//! [`crate::kernels::matvec_rows`] the same way whatever the batch size or split; prefills
//! with gemm split by output features. Built with [`ParLinear::with_dtype`] at bf16 on the
//! CPU, the weight is packed once in bf16 and products run on [`crate::bf16`]'s kernels;
//! built with [`Linears::Q8`] or [`Linears::Q4`], it is packed in int8 or 4 bits with block
//! scales for the same module's kernels.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::Linear;

use crate::bf16::{Act, Bf16Linear};
use crate::par::par_for;

/// A linear layer on the pool: decoding products (one new token per sequence) with
/// [`crate::kernels::matvec_rows`], others (CPU f32) with gemm split by output features
/// ([`crate::kernels::matmul_wt_cols`]); bf16-packed layers (CPU) with [`Bf16Linear`]; other
/// devices and dtypes go to candle's matmul.
pub struct ParLinear {
    /// The f32 or candle layer; None when the weight lives only in `bf16`.
    full: Option<Linear>,
    /// The weight as a contiguous f32 CPU slice source, when the kernel path applies.
    cpu: Option<(Tensor, Option<Tensor>)>,
    /// The weight packed in bf16 (CPU), when built at bf16.
    bf16: Option<Bf16Linear>,
    out: usize,
    inp: usize,
}

/// How a model's linear layers hold their weights and run their products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linears {
    /// Products in this dtype; on the CPU, bf16 packs the weights in bf16 for
    /// [`crate::bf16`]'s kernels.
    Dtype(DType),
    /// CPU only: weights in int8 with an f16 scale per output and 32 inputs
    /// ([`Bf16Linear::new_q8`]), products on the bf16 kernels (inputs rounded to bf16, f32 sums).
    Q8,
    /// CPU only: weights in 4 bits with an f16 scale per output and 32 inputs
    /// ([`Bf16Linear::new_q4`]); products without AMX on int8 inputs with AVX512-VNNI.
    Q4,
}

/// Outputs per task: a few hundred KiB of weights for the widest inputs here.
const TASK_OUTPUTS: usize = 64;

impl ParLinear {
    pub fn new(inner: Linear) -> Result<Self> {
        let w = inner.weight();
        let (out, inp) = w.dims2()?;
        let cpu = if w.device().is_cpu() && w.dtype() == candle_core::DType::F32 {
            let b = match inner.bias() {
                Some(b) if b.dtype() == candle_core::DType::F32 => Some(b.contiguous()?),
                Some(_) => return Ok(ParLinear { full: Some(inner), cpu: None, bf16: None, out, inp }),
                None => None,
            };
            Some((w.contiguous()?, b))
        } else {
            None
        };
        Ok(ParLinear { full: Some(inner), cpu, bf16: None, out, inp })
    }

    /// The layer with its products in `dtype`: at bf16 with a CPU weight, the weight (and an
    /// f32 bias) packed once for [`Bf16Linear`] and the f32 copy dropped; activations stay f32
    /// between layers. Fails when the CPU has no bf16 kernels. Otherwise as [`ParLinear::new`].
    pub fn with_dtype(inner: Linear, dtype: DType) -> Result<Self> {
        Self::with_linears(inner, Linears::Dtype(dtype))
    }

    /// The layer as `linears` asks: [`ParLinear::with_dtype`] for a dtype; for
    /// [`Linears::Q8`] and [`Linears::Q4`] the weight packed in int8 or 4 bits (CPU; fails on
    /// another device or a CPU without their kernels) and the f32 copy dropped.
    pub fn with_linears(inner: Linear, linears: Linears) -> Result<Self> {
        let w = inner.weight();
        let quantized = matches!(linears, Linears::Q8 | Linears::Q4);
        if quantized && !w.device().is_cpu() {
            candle_core::bail!("quantized weights (q8, q4) run on the CPU only");
        }
        if !quantized && (linears != Linears::Dtype(DType::BF16) || !w.device().is_cpu()) {
            return Self::new(inner);
        }
        let (out, inp) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let b = match inner.bias() {
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let pack = match linears {
            Linears::Q8 => Bf16Linear::new_q8,
            Linears::Q4 => Bf16Linear::new_q4,
            Linears::Dtype(_) => Bf16Linear::new,
        };
        let packed = with_f32(&w, |ws| match &b {
            Some(b) => with_f32(b, |bs| pack(ws, out, inp, Some(bs))),
            None => Ok(pack(ws, out, inp, None)),
        })??
        .map_err(candle_core::Error::Msg)?;
        Ok(ParLinear { full: None, cpu: None, bf16: Some(packed), out, inp })
    }

    /// One layer computing `parts` side by side (weights stacked by output features); the
    /// output is their outputs concatenated along the last dimension.
    pub fn fused(parts: &[Linear]) -> Result<Self> {
        Self::fused_with_dtype(parts, DType::F32)
    }

    /// [`ParLinear::fused`] with its products in `dtype` (see [`ParLinear::with_dtype`]).
    pub fn fused_with_dtype(parts: &[Linear], dtype: DType) -> Result<Self> {
        Self::fused_with_linears(parts, Linears::Dtype(dtype))
    }

    /// [`ParLinear::fused`] as `linears` asks (see [`ParLinear::with_linears`]).
    pub fn fused_with_linears(parts: &[Linear], linears: Linears) -> Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
        let w = Tensor::cat(&ws, 0)?;
        let bias = if parts.iter().all(|l| l.bias().is_some()) {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else if parts.iter().all(|l| l.bias().is_none()) {
            None
        } else {
            let mut bs = Vec::new();
            for l in parts {
                bs.push(match l.bias() {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(l.weight().dim(0)?, l.weight().dtype(), l.weight().device())?,
                });
            }
            Some(Tensor::cat(&bs, 0)?)
        };
        Self::with_linears(Linear::new(w, bias), linears)
    }

    /// The f32 (or other device/dtype) layer; None for a bf16-packed one.
    pub fn linear(&self) -> Option<&Linear> {
        self.full.as_ref()
    }

    /// The packed weight (bf16, int8 or 4 bits), when built at bf16, q8 or q4 on the CPU.
    pub fn bf16(&self) -> Option<&Bf16Linear> {
        self.bf16.as_ref()
    }
}

/// `down`(silu(gate) · up) of a SwiGLU MLP whose gate and up projections are stacked in
/// `gate_up`, through [`Bf16Linear::mlp_rows`] when both layers are bf16-packed, the CPU has
/// AMX and `x` holds more than one position per sequence; None where that does not apply (the
/// caller then runs the three steps).
pub fn swiglu_bf16(gate_up: &ParLinear, down: &ParLinear, x: &Tensor) -> Result<Option<Tensor>> {
    let (Some(gu), Some(dn)) = (gate_up.bf16(), down.bf16()) else {
        return Ok(None);
    };
    let dims = x.dims();
    if dims.len() < 2 || dims[dims.len() - 2] == 1 || x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let rows = x.elem_count() / gu.in_features();
    let mut y = vec![0f32; rows * dn.out_features()];
    if !with_f32(&x, |xs| Bf16Linear::mlp_rows(gu, dn, Act::SiluMul, xs, rows, &mut y, false))? {
        return Ok(None);
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 2") = dn.out_features();
    Ok(Some(Tensor::from_vec(y, shape, x.device())?))
}

/// Raw f32 data of a contiguous CPU tensor, handed to `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*s else {
        candle_core::bail!("expected an f32 CPU tensor");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(f(&data[a..b]))
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl Module for ParLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        // One position per sequence: (.., 1, in) or a single (in) / (1, in) row.
        let decoding = match dims.len() {
            0 => false,
            1 => true,
            r => dims[r - 2] == 1,
        };
        if let Some(p) = &self.bf16 {
            let x = x.to_dtype(DType::F32)?.contiguous()?;
            let rows = x.elem_count() / self.inp;
            let mut shape = dims.to_vec();
            *shape.last_mut().expect("rank >= 1") = self.out;
            let mut y = vec![0f32; rows * self.out];
            with_f32(&x, |xs| p.forward_rows(xs, rows, &mut y, false, decoding))?;
            return Tensor::from_vec(y, shape, x.device());
        }
        let full = self.full.as_ref().expect("a layer that is not bf16-packed keeps its Linear");
        let Some((w, bias)) = self.cpu.as_ref().filter(|_| x.dtype() == candle_core::DType::F32 && x.device().is_cpu()) else {
            return full.forward(x);
        };
        let x = x.contiguous()?;
        let rows = x.elem_count() / self.inp;
        let (n, k) = (self.out, self.inp);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = n;
        if !decoding {
            // Several positions per sequence (a prefill): gemm, split by output features.
            let mut y = match bias {
                Some(b) => with_f32(b, |b| b.repeat(rows))?,
                None => vec![0f32; rows * n],
            };
            with_f32(&x, |xs| with_f32(w, |ws| crate::kernels::matmul_wt_cols(xs, ws, &mut y, rows, k, n, bias.is_some())))??;
            return Tensor::from_vec(y, shape, x.device());
        }
        let mut y = vec![0f32; rows * n];
        let yp = SendPtr(y.as_mut_ptr());
        with_f32(&x, |xs| {
            with_f32(w, |ws| {
                let run = |bs: Option<&[f32]>| {
                    let tasks = n.div_ceil(TASK_OUTPUTS);
                    let yp = &yp;
                    par_for(tasks, &|t| {
                        let o0 = t * TASK_OUTPUTS;
                        let o1 = (o0 + TASK_OUTPUTS).min(n);
                        // SAFETY: tasks write disjoint output columns of `y`, which outlives par_for.
                        unsafe { crate::kernels::matvec_rows(ws, k, bs, xs, rows, n, o0, o1, yp.0) };
                    });
                };
                match bias {
                    Some(b) => with_f32(b, |bs| run(Some(bs))),
                    None => {
                        run(None);
                        Ok(())
                    }
                }
            })
        })???;
        Tensor::from_vec(y, shape, x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Weight-streaming rate of the decoding product (run with --release --ignored --nocapture).
    #[test]
    #[ignore]
    fn matvec_bandwidth() {
        let (n, k) = (1 << 16, 1024);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32).collect();
        let lin = ParLinear::new(Linear::new(Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap(), None)).unwrap();
        let x = Tensor::ones((1, 1, k), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            lin.forward(&x).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("matvec: {:.1} GB/s (best of 20)", (n * k * 4) as f64 / best / 1e9);
    }
}
