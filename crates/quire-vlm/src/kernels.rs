//! Small f32 CPU kernels for the hot spots candle leaves scalar or allocating: `exp` (for
//! softmax and the tanh-GELU), row softmax with the score scale and additive mask fused in, and
//! a multi-row dot-product kernel for matrix-vector products with (out, in) row-major weights.
//!
//! Each kernel has an AVX-512 body picked at run time (`is_x86_feature_detected!`) and a
//! portable fallback. Results depend only on the data of one row/output, never on how many
//! rows are processed in one call or how the work is split over threads.

/// Which code path the CPU supports; detected once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                Isa::Avx512
            } else {
                Isa::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Portable
    }
}

// exp(x) = 2^n · e^r with n = round(x·log2 e), r = x − n·ln 2 (ln 2 split in two for an exact
// first step), e^r from a degree-7 polynomial (Cephes' expf coefficients, ~1 ulp on |r| ≤ ln2/2).
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Above ln(f32::MAX) the result overflows to infinity (scalef), as with libm.
const EXP_HI: f32 = 89.0;
/// Below this, e^x is 0 in f32 (the result would be subnormal; flushed like a masked score).
const EXP_LO: f32 = -87.336_55;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
// Cephes writes 5.0000001e-1, which is 0.5 in f32.
const P5: f32 = 0.5;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    pub fn exp16(x: __m512) -> __m512 {
        let zero_mask = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_LO));
        let x = _mm512_min_ps(x, _mm512_set1_ps(EXP_HI));
        let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_LO));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(LOG2E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
        let r2 = _mm512_mul_ps(r, r);
        p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_maskz_mov_ps(zero_mask, _mm512_scalef_ps(p, n))
    }

    #[inline]
    fn tail_mask(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    /// In place: row = softmax(row · scale + mask).
    #[target_feature(enable = "avx512f,fma")]
    pub fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let full = n / 16 * 16;
        let tm = tail_mask(n - full);
        let sc = _mm512_set1_ps(scale);
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        // SAFETY (all blocks): offsets stay below n, the tails use masked loads/stores.
        unsafe {
            let mut i = 0;
            while i < n {
                let k = if i < full { 0xffff } else { tm };
                let mut v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), sc);
                if let Some(m) = mask {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m.as_ptr().add(i)));
                }
                _mm512_mask_storeu_ps(p.add(i), k, v);
                mx = _mm512_mask_max_ps(mx, k, mx, v);
                i += 16;
            }
            let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            let mut s0 = _mm512_setzero_ps();
            let mut i = 0;
            while i < n {
                let k = if i < full { 0xffff } else { tm };
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), m));
                let e = _mm512_maskz_mov_ps(k, e);
                _mm512_mask_storeu_ps(p.add(i), k, e);
                s0 = _mm512_add_ps(s0, e);
                i += 16;
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(s0));
            let mut i = 0;
            while i < n {
                let k = if i < full { 0xffff } else { tm };
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), inv);
                _mm512_mask_storeu_ps(p.add(i), k, v);
                i += 16;
            }
        }
    }

    /// `src` and `dst` may be the same buffer (each element is read before it is written).
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn gelu_tanh(src: *const f32, dst: *mut f32, n: usize) {
        let full = n / 16 * 16;
        let tm = tail_mask(n - full);
        let c = _mm512_set1_ps(-2.0 * 0.797_884_6);
        let c3 = _mm512_set1_ps(0.044715);
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        // SAFETY: offsets stay below n, the tail uses masked loads/stores.
        unsafe {
            while i < n {
                let k = if i < full { 0xffff } else { tm };
                let v = _mm512_maskz_loadu_ps(k, src.add(i));
                // -2u = -2·sqrt(2/pi)·v·(1 + 0.044715·v²)
                let u = _mm512_mul_ps(_mm512_mul_ps(c, v), _mm512_fmadd_ps(_mm512_mul_ps(c3, v), v, one));
                let y = _mm512_div_ps(v, _mm512_add_ps(one, exp16(u)));
                _mm512_mask_storeu_ps(dst.add(i), k, y);
                i += 16;
            }
        }
    }

    /// `dst[i]` = silu(`gate[i]`) · `up[i]` for i < n.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn silu_mul(gate: *const f32, up: *const f32, dst: *mut f32, n: usize) {
        let full = n / 16 * 16;
        let tm = tail_mask(n - full);
        let one = _mm512_set1_ps(1.0);
        let neg = _mm512_set1_ps(-1.0);
        let mut i = 0;
        // SAFETY: offsets stay below n, the tail uses masked loads/stores.
        unsafe {
            while i < n {
                let k = if i < full { 0xffff } else { tm };
                let g = _mm512_maskz_loadu_ps(k, gate.add(i));
                let u = _mm512_maskz_loadu_ps(k, up.add(i));
                let y = _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(one, exp16(_mm512_mul_ps(neg, g))));
                _mm512_mask_storeu_ps(dst.add(i), k, y);
                i += 16;
            }
        }
    }

    /// Dot products of R consecutive weight rows with one input row; two accumulators per
    /// output (even and odd 16-lane blocks), then a masked tail, summed in a fixed order.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn dot_block<const R: usize>(w: *const f32, k: usize, x: *const f32, out: &mut [f32; R]) {
        let mut a = [_mm512_setzero_ps(); R];
        let mut b = [_mm512_setzero_ps(); R];
        let full2 = k / 32 * 32;
        let mut i = 0;
        while i < full2 {
            let x0 = _mm512_loadu_ps(x.add(i));
            let x1 = _mm512_loadu_ps(x.add(i + 16));
            for r in 0..R {
                a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(r * k + i)), x0, a[r]);
                b[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(r * k + i + 16)), x1, b[r]);
            }
            i += 32;
        }
        if i + 16 <= k {
            let x0 = _mm512_loadu_ps(x.add(i));
            for (r, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(r * k + i)), x0, *a);
            }
            i += 16;
        }
        if i < k {
            let m = tail_mask(k - i);
            let x0 = _mm512_maskz_loadu_ps(m, x.add(i));
            for (r, b) in b.iter_mut().enumerate() {
                *b = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w.add(r * k + i)), x0, *b);
            }
        }
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
        }
    }

    /// [`dot_block`] for two input rows at once: each weight load serves both rows, and each
    /// (row, output) keeps the same two accumulators filled in the same order, so the sums are
    /// bit-identical to [`dot_block`] on one row.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn dot_block2<const R: usize>(w: *const f32, k: usize, x0: *const f32, x1: *const f32, out0: &mut [f32; R], out1: &mut [f32; R]) {
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut b0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let mut b1 = [_mm512_setzero_ps(); R];
        let full2 = k / 32 * 32;
        let mut i = 0;
        while i < full2 {
            let (x00, x01) = (_mm512_loadu_ps(x0.add(i)), _mm512_loadu_ps(x0.add(i + 16)));
            let (x10, x11) = (_mm512_loadu_ps(x1.add(i)), _mm512_loadu_ps(x1.add(i + 16)));
            for r in 0..R {
                let w0 = _mm512_loadu_ps(w.add(r * k + i));
                let w1 = _mm512_loadu_ps(w.add(r * k + i + 16));
                a0[r] = _mm512_fmadd_ps(w0, x00, a0[r]);
                b0[r] = _mm512_fmadd_ps(w1, x01, b0[r]);
                a1[r] = _mm512_fmadd_ps(w0, x10, a1[r]);
                b1[r] = _mm512_fmadd_ps(w1, x11, b1[r]);
            }
            i += 32;
        }
        if i + 16 <= k {
            let (x00, x10) = (_mm512_loadu_ps(x0.add(i)), _mm512_loadu_ps(x1.add(i)));
            for r in 0..R {
                let w0 = _mm512_loadu_ps(w.add(r * k + i));
                a0[r] = _mm512_fmadd_ps(w0, x00, a0[r]);
                a1[r] = _mm512_fmadd_ps(w0, x10, a1[r]);
            }
            i += 16;
        }
        if i < k {
            let m = tail_mask(k - i);
            let (x00, x10) = (_mm512_maskz_loadu_ps(m, x0.add(i)), _mm512_maskz_loadu_ps(m, x1.add(i)));
            for r in 0..R {
                let w0 = _mm512_maskz_loadu_ps(m, w.add(r * k + i));
                b0[r] = _mm512_fmadd_ps(w0, x00, b0[r]);
                b1[r] = _mm512_fmadd_ps(w0, x10, b1[r]);
            }
        }
        for r in 0..R {
            out0[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], b0[r]));
            out1[r] = _mm512_reduce_add_ps(_mm512_add_ps(a1[r], b1[r]));
        }
    }

    /// See [`super::matvec_rows`].
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn matvec_rows(
        w: &[f32],
        k: usize,
        bias: Option<&[f32]>,
        x: &[f32],
        rows: usize,
        n: usize,
        o0: usize,
        o1: usize,
        y: *mut f32,
    ) {
        let mut o = o0;
        while o < o1 {
            let step = if o + 4 <= o1 { 4 } else { 1 };
            let mut r = 0;
            // Two rows at a time share the weight loads (same sums as one row alone).
            while step == 4 && r + 2 <= rows {
                let (mut t0, mut t1) = ([0f32; 4], [0f32; 4]);
                dot_block2::<4>(w.as_ptr().add(o * k), k, x.as_ptr().add(r * k), x.as_ptr().add((r + 1) * k), &mut t0, &mut t1);
                for (i, t) in [t0, t1].iter().enumerate() {
                    let yr = y.add((r + i) * n + o);
                    for j in 0..4 {
                        *yr.add(j) = t[j] + bias.map_or(0.0, |b| b[o + j]);
                    }
                }
                r += 2;
            }
            for r in r..rows {
                let xr = x.as_ptr().add(r * k);
                let yr = y.add(r * n + o);
                if step == 4 {
                    let mut t = [0f32; 4];
                    dot_block::<4>(w.as_ptr().add(o * k), k, xr, &mut t);
                    for j in 0..4 {
                        *yr.add(j) = t[j] + bias.map_or(0.0, |b| b[o + j]);
                    }
                } else {
                    let mut t = [0f32; 1];
                    dot_block::<1>(w.as_ptr().add(o * k), k, xr, &mut t);
                    *yr = t[0] + bias.map_or(0.0, |b| b[o]);
                }
            }
            o += step;
        }
    }
}

mod portable {
    /// Same structure as the AVX-512 body, in plain lanes (the compiler vectorises what it can).
    pub fn dot(w: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let mut wc = w.chunks_exact(16);
        let mut xc = x.chunks_exact(16);
        for (a, b) in (&mut wc).zip(&mut xc) {
            for l in 0..16 {
                acc[l] += a[l] * b[l];
            }
        }
        for (l, (a, b)) in wc.remainder().iter().zip(xc.remainder()).enumerate() {
            acc[l] += a * b;
        }
        acc.iter().sum()
    }

    pub fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
        let mut mx = f32::NEG_INFINITY;
        for (i, v) in row.iter_mut().enumerate() {
            *v = *v * scale + mask.map_or(0.0, |m| m[i]);
            mx = mx.max(*v);
        }
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// e^x for each element of `v`, in place (used by tests and small callers).
pub fn exp_inplace(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        use std::arch::x86_64::*;
        // SAFETY: the CPU has AVX-512F and FMA (checked by `isa`); the tail is masked.
        unsafe {
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn run(v: &mut [f32]) {
                let n = v.len();
                let mut i = 0;
                while i < n {
                    let len = (n - i).min(16);
                    let k = ((1u32 << len) - 1) as __mmask16;
                    let e = avx512::exp16(_mm512_maskz_loadu_ps(k, v.as_ptr().add(i)));
                    _mm512_mask_storeu_ps(v.as_mut_ptr().add(i), k, e);
                    i += 16;
                }
            }
            run(v);
        }
        return;
    }
    for x in v {
        *x = x.exp();
    }
}

/// In place: `row` = softmax(`row` · `scale` + `mask`) (additive mask of the same length).
pub fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    if let Some(m) = mask {
        assert_eq!(m.len(), row.len(), "softmax mask length");
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F and FMA (checked by `isa`).
        unsafe { avx512::softmax_row(row, scale, mask) };
        return;
    }
    portable::softmax_row(row, scale, mask)
}

/// `dst[i]` = gelu_tanh(`src[i]`) = x / (1 + e^(−2u)), u = √(2/π)·x·(1 + 0.044715·x²)
/// (equal to 0.5·x·(1 + tanh u)).
pub fn gelu_tanh(src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "gelu lengths");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F and FMA (checked by `isa`).
        unsafe { avx512::gelu_tanh(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
        return;
    }
    for (o, &v) in dst.iter_mut().zip(src) {
        const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
        let u = SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v);
        *o = v / (1.0 + (-2.0 * u).exp());
    }
}

/// `dst[i]` = silu(`gate[i]`) · `up[i]` = gate · up / (1 + e^(−gate)): the gated MLP's
/// activation in one pass (no temporaries).
pub fn silu_mul(gate: &[f32], up: &[f32], dst: &mut [f32]) {
    assert!(gate.len() == dst.len() && up.len() == dst.len(), "silu_mul lengths");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F and FMA (checked by `isa`); all three hold dst.len().
        unsafe { avx512::silu_mul(gate.as_ptr(), up.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        return;
    }
    for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
        *o = g * u / (1.0 + (-g).exp());
    }
}

/// gelu_tanh in place.
pub fn gelu_tanh_inplace(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512F and FMA; `gelu_tanh` reads element i before writing it.
        unsafe { avx512::gelu_tanh(v.as_ptr(), v.as_mut_ptr(), v.len()) };
        return;
    }
    for x in v {
        const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
        let u = SQRT_TWO_OVER_PI * *x * (1.0 + 0.044715 * *x * *x);
        *x /= 1.0 + (-2.0 * u).exp();
    }
}

/// Outputs `o0..o1` of `rows` products with a row-major (n, k) weight `w`:
/// `y[r·n + o] = dot(x[r·k ..][..k], w[o·k ..][..k]) + bias[o]`.
/// Each output is computed the same way whatever `rows`, `o0` and `o1` are.
///
/// # Safety
/// `y` must be valid for writes at `r·n + o` for every `r < rows`, `o0 <= o < o1`, and no other
/// thread may access those elements meanwhile. `w` holds at least `o1·k` values, `x` at least
/// `rows·k`, `bias` (when given) at least `o1`.
pub unsafe fn matvec_rows(
    w: &[f32],
    k: usize,
    bias: Option<&[f32]>,
    x: &[f32],
    rows: usize,
    n: usize,
    o0: usize,
    o1: usize,
    y: *mut f32,
) {
    assert!(w.len() >= o1 * k && x.len() >= rows * k && o1 <= n && bias.is_none_or(|b| b.len() >= o1));
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        avx512::matvec_rows(w, k, bias, x, rows, n, o0, o1, y);
        return;
    }
    for o in o0..o1 {
        for r in 0..rows {
            let d = portable::dot(&w[o * k..(o + 1) * k], &x[r * k..(r + 1) * k]);
            *y.add(r * n + o) = d + bias.map_or(0.0, |b| b[o]);
        }
    }
}

/// Layer normalisation of one row: `dst = (src − mean) / sqrt(var + eps) · w + b`, with the
/// mean and the (two-pass) variance summed in 16 lanes.
pub fn layer_norm_row(src: &[f32], dst: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = src.len();
    assert!(dst.len() == n && w.len() == n && b.len() == n, "layer norm lengths");
    let lanes_sum = |f: &dyn Fn(f32) -> f32| -> f32 {
        let mut acc = [0f32; 16];
        let mut c = src.chunks_exact(16);
        for ch in &mut c {
            for l in 0..16 {
                acc[l] += f(ch[l]);
            }
        }
        for (l, &v) in c.remainder().iter().enumerate() {
            acc[l] += f(v);
        }
        acc.iter().sum()
    };
    let mean = lanes_sum(&|v| v) / n as f32;
    let var = lanes_sum(&|v| (v - mean) * (v - mean)) / n as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for i in 0..n {
        dst[i] = (src[i] - mean) * inv * w[i] + b[i];
    }
}

/// One block of softmax attention on the calling thread: `m` query rows at `q` (`q_stride`
/// apart) against `len` keys at `k` and values at `v` (both `kv_stride` apart), head width
/// `d`. Each score row is scaled, `mask(i)` (query row i's additive key mask, if any) added and
/// softmaxed; the `m` result rows go to `out` (`out_stride` apart). `scores` is scratch.
///
/// # Safety
/// The pointers must be valid for those rows (d values each) and no other thread may touch
/// the output rows meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_block<'a>(
    q: *const f32,
    q_stride: usize,
    k: *const f32,
    v: *const f32,
    kv_stride: usize,
    out: *mut f32,
    out_stride: usize,
    (m, len, d): (usize, usize, usize),
    scale: f32,
    mask: impl Fn(usize) -> Option<&'a [f32]>,
    scores: &mut Vec<f32>,
) {
    scores.resize(m * len, 0.0);
    // SAFETY: the caller vouches for the rows; the scores are m × len.
    unsafe {
        gemm::gemm(
            m, len, d,
            scores.as_mut_ptr(), 1, len as isize, false,
            q, 1, q_stride as isize,
            k, kv_stride as isize, 1,
            0.0, 1.0, false, false, false, gemm::Parallelism::None,
        );
    }
    for (i, row) in scores[..m * len].chunks_exact_mut(len).enumerate() {
        softmax_row(row, scale, mask(i));
    }
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            m, d, len,
            out, 1, out_stride as isize, false,
            scores.as_ptr(), 1, len as isize,
            v, 1, kv_stride as isize,
            0.0, 1.0, false, false, false, gemm::Parallelism::None,
        );
    }
}

/// Softmax attention of `groups` independent blocks over the pool, each one
/// [`attention_block`]: group g's `m` query rows at `q[g·m·d..]` attend to the key and value
/// rows `keys(g)` of `k` and `v` (rows d apart) with the additive key mask `mask(g)` for every
/// query row; its output rows go to `out[g·m·d..]`. Returns `out`. A group's result depends
/// only on its own rows, whatever the other groups are.
pub fn grouped_attention<'a>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (groups, m, d): (usize, usize, usize),
    scale: f32,
    keys: &(dyn Fn(usize) -> std::ops::Range<usize> + Sync),
    mask: &(dyn Fn(usize) -> Option<&'a [f32]> + Sync),
) -> Vec<f32> {
    assert!(q.len() >= groups * m * d && k.len() == v.len(), "attention sizes");
    struct P(*mut f32);
    // SAFETY: tasks write disjoint groups of rows.
    unsafe impl Sync for P {}
    impl P {
        fn get(&self) -> *mut f32 {
            self.0
        }
    }
    thread_local! {
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut out = vec![0f32; groups * m * d];
    let op = P(out.as_mut_ptr());
    crate::par::par_for(groups, &|g| {
        let r = keys(g);
        assert!(!r.is_empty() && r.end * d <= k.len(), "attention keys {r:?} outside the {} rows", k.len() / d);
        let mk = mask(g);
        assert!(mk.is_none_or(|mk| mk.len() == r.len()), "attention mask length");
        SCORES.with_borrow_mut(|sc| {
            // SAFETY: group g's query rows and key/value rows are inside q, k, v (asserted
            // above) and its output rows belong to this task.
            unsafe {
                attention_block(
                    q[g * m * d..].as_ptr(), d, k[r.start * d..].as_ptr(), v[r.start * d..].as_ptr(), d,
                    op.get().add(g * m * d), d, (m, r.len(), d), scale, |_| mk, sc,
                )
            }
        });
    });
    out
}

/// [`matmul_wt`] split over the pool by blocks of output features (columns of `dst`), each
/// block one single-threaded product: gemm's own threading loses to one thread on products
/// with few rows and outputs (a text prefill), while the column split keeps both busy and
/// packs every weight once.
pub fn matmul_wt_cols(x: &[f32], w: &[f32], dst: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    const COL_BLOCK: usize = 192;
    assert!(x.len() >= m * k && w.len() >= n * k && dst.len() >= m * n, "matmul sizes");
    struct P(*mut f32);
    // SAFETY: tasks write disjoint column blocks.
    unsafe impl Sync for P {}
    impl P {
        fn get(&self) -> *mut f32 {
            self.0
        }
    }
    let dp = P(dst.as_mut_ptr());
    crate::par::par_for(n.div_ceil(COL_BLOCK), &|t| {
        let c0 = t * COL_BLOCK;
        let cols = COL_BLOCK.min(n - c0);
        // SAFETY: columns c0..c0+cols of the m × n `dst` (row stride n) belong to this task.
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                dp.get().add(c0),
                1,
                n as isize,
                accumulate,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr().add(c0 * k),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
}

/// `dst` = `x`·`wᵀ` (+ `dst` when `accumulate`), `x` (m, k) and `w` (n, k) row-major, `dst`
/// (m, n) row-major, on gemm's kernels with `threads` threads.
pub fn matmul_wt(x: &[f32], w: &[f32], dst: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool, threads: usize) {
    assert!(x.len() >= m * k && w.len() >= n * k && dst.len() >= m * n, "matmul sizes");
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the strides describe the slices checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm() {
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0443).collect();
        xs.extend([-1e30, -100.0, -87.5, -87.0, 0.0, 88.0, 88.7, 89.5, 1e30, f32::MIN]);
        let mut e = xs.clone();
        exp_inplace(&mut e);
        for (&x, &g) in xs.iter().zip(&e) {
            let want = x.exp();
            if want.is_infinite() {
                assert!(g.is_infinite(), "exp({x}) = {g}");
            } else if want < 1e-37 {
                assert!(g <= 1e-37, "exp({x}) = {g}, want {want}");
            } else {
                let rel = ((g - want) / want).abs();
                assert!(rel < 4e-7, "exp({x}) = {g}, want {want} (rel {rel})");
            }
        }
    }

    #[test]
    fn softmax_and_gelu_match_reference_forms() {
        for n in [1, 7, 16, 33, 1024, 1030] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173).collect();
            let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 3 { f32::MIN } else { 0.0 }).collect();
            let mut got = row.clone();
            softmax_row(&mut got, 0.125, Some(&mask));
            let z: Vec<f64> = row.iter().zip(&mask).map(|(&v, &m)| v as f64 * 0.125 + m as f64).collect();
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = z.iter().map(|v| (v - mx).exp()).sum();
            for (g, v) in got.iter().zip(&z) {
                assert!((*g as f64 - (v - mx).exp() / s).abs() < 1e-6, "softmax n={n}");
            }
            let mut g = vec![0f32; n];
            gelu_tanh(&row, &mut g);
            for (&x, &y) in row.iter().zip(&g) {
                let x = x as f64;
                let want = 0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh());
                assert!((y as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "gelu({x}) = {y}, want {want}");
            }
        }
    }

    #[test]
    fn matvec_rows_is_split_invariant() {
        for (n, k) in [(9, 576), (13, 35), (6, 1536)] {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
            let x: Vec<f32> = (0..3 * k).map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-3).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let mut all = vec![0f32; 3 * n];
            unsafe { matvec_rows(&w, k, Some(&bias), &x, 3, n, 0, n, all.as_mut_ptr()) };
            for r in 0..3 {
                for o in 0..n {
                    let mut one = vec![0f32; n];
                    unsafe { matvec_rows(&w, k, Some(&bias), &x[r * k..], 1, n, o, o + 1, one.as_mut_ptr()) };
                    assert_eq!(one[o].to_bits(), all[r * n + o].to_bits());
                    let want: f64 = (0..k).map(|i| w[o * k + i] as f64 * x[r * k + i] as f64).sum::<f64>() + bias[o] as f64;
                    assert!((all[r * n + o] as f64 - want).abs() < 1e-4);
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    /// gemm throughput on a vision-MLP-sized product (run with --release --ignored --nocapture).
    #[test]
    #[ignore]
    fn gemm_gflops() {
        for (m, k, n) in [(1024, 768, 3072), (87, 576, 3072), (87, 1536, 576), (87, 576, 960)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut d = vec![0f32; m * n];
        for threads in [1, 2] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                super::matmul_wt(&x, &w, &mut d, m, k, n, false, threads);
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("gemm {m}x{k}x{n} {threads} threads: {:.0} GFLOP/s", 2.0 * (m * k * n) as f64 / best / 1e9);
        }
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            super::matmul_wt_cols(&x, &w, &mut d, m, k, n, false);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("gemm {m}x{k}x{n} column split: {:.0} GFLOP/s", 2.0 * (m * k * n) as f64 / best / 1e9);
        }
    }
}
