//! bf16 linear layers for x86-64 CPUs: the weight is rounded to bf16 once and packed in
//! 32-column panels laid out as AMX tiles; activations stay f32 outside the product and are
//! rounded to bf16 per product; every sum is accumulated in f32.
//!
//! Products of many rows (prefills, the vision encoder) run on AMX (`tdpbf16ps` on 16 × 32
//! bf16 tiles) when the CPU has it and Linux grants the tile state; one position per sequence
//! (decoding), and every product on an AVX-512 CPU without AMX, widens the same
//! packed panels to f32 and multiplies with f32 FMAs: memory-bound on half the bytes of f32
//! weights with one row, and twice `vdpbf16ps`'s rate with several (see `dot_panel`).
//!
//! Which kernel runs depends only on the CPU and on the caller's `decoding` flag, never on the
//! number of rows or the thread split, and every output element is summed in the same order
//! by either kernel whatever else is in the call: a row's result does not depend on the batch.
//!
//! [`Bf16Linear::new_q8`] holds the weight in int8 instead, with an f16 scale per output and
//! 32 inputs (the blocks of llama.cpp's `q8_0`): 1.0625 bytes a weight against bf16's 2, so
//! decoding, which streams every weight once per step, reads half the bytes. Decoding
//! widens the int8 values to f32 and multiplies them by their block's scale (exactly) before
//! the FMAs with the bf16-rounded inputs; AMX products dequantize each panel's k block to
//! bf16 tiles (value · scale, rounded once) just before multiplying it.
//!
//! [`Bf16Linear::new_q4`] holds it in 4 bits with the same blocks and scales (0.5625 bytes a
//! weight). Without AMX its products, decoding's included, quantize each row of inputs to
//! int8 in blocks of 32 too (a scale per row and block) and multiply with AVX512-VNNI's
//! `vpdpbusd`: exact integer sums per block, scaled and summed in f32, block after block.
//! Widening 4-bit values to f32 would cost more instructions than the memory saves; the
//! integer products keep decoding bound by the bytes it reads. AMX products dequantize to
//! bf16 tiles as for int8.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Output columns per panel (two 16-column AMX B tiles side by side).
const PANEL: usize = 32;
/// Inputs per k step (one AMX tile row of bf16: 64 bytes).
const KSTEP: usize = 32;
/// u16 elements of one panel's k step: two 16 × 32 bf16 tiles.
const STEP_ELEMS: usize = 2 * 16 * KSTEP;
/// How many k steps ahead the decoding kernel prefetches its weights.
const PREFETCH: usize = 4;
/// Bytes of one panel's k step in the int8 packing: 2 tiles × 32 k values × 16 columns of
/// int8, then the 32 columns' f16 scales (17 cache lines).
const Q8_STEP: usize = 1024 + 64;
/// Bytes of one panel's k step in the 4-bit packing: per 16-column tile four 64-byte units,
/// unit g holding k values 4g..4g+3 (low nibbles) and 16 + 4g..16 + 4g + 3 (high nibbles) of
/// each column side by side as `vpdpbusd` takes them, then the 32 columns' f16 scales (9 lines).
const Q4_STEP: usize = 512 + 64;
/// k steps per block of [`Bf16Linear`]'s AMX products (256 of k): a 32-row slice of the
/// inputs and a panel's slice are 16 KiB each.
const AMX_KBLOCK: usize = 8;

/// What the CPU offers for bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Isa {
    /// AMX tiles for products of many rows, AVX-512 FMAs on the widened weights for the rest.
    Amx,
    /// AVX-512 FMAs on the widened bf16 weights for every product (any AVX-512 CPU: the
    /// weights take half the memory and decoding, which streams them, about half the time).
    Avx512,
}

/// The bf16 kernels this CPU can run, or why it cannot run any (detected once; asks Linux
/// for the AMX tile state on the first call).
pub fn support() -> Result<Bf16Isa, String> {
    static S: OnceLock<Result<Bf16Isa, String>> = OnceLock::new();
    S.get_or_init(detect).clone()
}

/// The kernels for a CPU with these features: AMX needs AMX-BF16, AMX-TILE, AVX512-BF16 (the
/// AMX paths round their inputs with it) and the tile state from the OS (`tiles_granted`,
/// asked for only when the rest is there); every other AVX-512 CPU widens the weights to f32.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn choose(avx512f: bool, avx512bf16: bool, amx: bool, tiles_granted: impl FnOnce() -> bool) -> Result<Bf16Isa, String> {
    if !avx512f {
        return Err("bf16 on the CPU needs AVX-512 (AMX-BF16 for fast prefills); this CPU has neither: use --dtype f32".into());
    }
    if amx && avx512bf16 {
        if tiles_granted() {
            return Ok(Bf16Isa::Amx);
        }
        tracing::info!("the CPU has AMX but the kernel refused the tile state; bf16 products use AVX-512 FMAs");
    }
    Ok(Bf16Isa::Avx512)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Result<Bf16Isa, String> {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let edx = __cpuid_count(7, 0).edx;
    let amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
    choose(
        std::is_x86_feature_detected!("avx512f"),
        std::is_x86_feature_detected!("avx512bf16"),
        amx,
        request_tile_state,
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Result<Bf16Isa, String> {
    Err("bf16 on the CPU needs an x86-64 CPU with AVX-512 (AMX-BF16 for fast prefills): use --dtype f32".into())
}

/// Linux hands out the AMX tile data state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA), once per process (it covers every thread).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: arch_prctl with this code only changes the process's permitted xsave features.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// Round-to-nearest-even f32 → bf16 (NaN stays NaN).
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 → f32 (exact).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A u16 buffer whose usable part starts on a 64-byte boundary (whole cache lines per tile row).
struct Aligned {
    buf: Vec<u16>,
    off: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let mut a = Aligned { buf: Vec::new(), off: 0 };
        a.reset(len);
        a
    }

    /// Resizes to `len` usable elements, all zero.
    fn reset(&mut self, len: usize) {
        self.buf.clear();
        self.buf.resize(len + 32, 0);
        self.off = (64 - (self.buf.as_ptr() as usize % 64)) % 64 / 2;
    }

    /// Makes room for `len` usable elements without clearing them (grown space is zero,
    /// the rest holds what the last user left).
    fn fit(&mut self, len: usize) {
        if self.buf.len() < len + 32 {
            self.reset(len);
        }
    }

    fn as_ptr(&self) -> *const u16 {
        self.buf[self.off..].as_ptr()
    }

    /// Room for `len` f32 values (not cleared), 64-byte aligned.
    fn f32_fit(&mut self, len: usize) -> *mut f32 {
        self.fit(2 * len);
        self.as_mut_ptr() as *mut f32
    }

    fn as_mut_ptr(&mut self) -> *mut u16 {
        self.buf[self.off..].as_mut_ptr()
    }
}

thread_local! {
    /// Each thread's converted input rows (see [`Bf16Linear::forward_rows`]).
    static XB: std::cell::RefCell<Aligned> = std::cell::RefCell::new(Aligned::zeroed(0));
}

/// Where an AMX product's output (row r, panel p) goes: `ptr` + (r − `row0`) · `stride` +
/// (p − `panel0`) · 32 (f32 elements).
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: usize,
    row0: usize,
    panel0: usize,
}
// SAFETY: pool tasks write disjoint blocks through it, the buffer outliving par_for.
unsafe impl Sync for Out {}

/// The activation between the two products of [`Bf16Linear::mlp_rows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// SwiGLU: silu(gate) · up, the first product holding the gate then the up projection.
    SiluMul,
    /// `gelu_pytorch_tanh`, as [`crate::kernels::gelu_tanh_inplace`].
    GeluTanh,
}

/// How a [`Bf16Linear`] holds its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// bf16 panels ([`Bf16Linear::new`]).
    Bf16,
    /// int8 with block scales ([`Bf16Linear::new_q8`]).
    Q8,
    /// 4 bits with block scales ([`Bf16Linear::new_q4`]).
    Q4,
}

impl Packing {
    /// Bytes of one panel's k step.
    fn step_bytes(self) -> usize {
        match self {
            Packing::Bf16 => STEP_ELEMS * 2,
            Packing::Q8 => Q8_STEP,
            Packing::Q4 => Q4_STEP,
        }
    }
}

/// A linear layer's weight (n outputs × k inputs) in bf16 (or int8 or 4 bits with block
/// scales, see [`Bf16Linear::new_q8`] and [`Bf16Linear::new_q4`]), packed for the kernels,
/// with an f32 bias.
pub struct Bf16Linear {
    /// bf16 panels, or the bytes of the int8 or 4-bit packing.
    packed: Aligned,
    packing: Packing,
    bias: Option<Vec<f32>>,
    n: usize,
    k: usize,
    /// k rounded up to [`KSTEP`].
    kp: usize,
    isa: Bf16Isa,
}

/// A raw pointer handed to pool tasks that write disjoint parts of one buffer.
struct Shared<T>(*mut T);
// SAFETY: only used for disjoint writes from pool tasks, the buffer outliving par_for.
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

impl Bf16Linear {
    /// Packs the row-major (n, k) f32 weight `w` (rounded to nearest-even bf16) and `bias`.
    /// Fails with a message naming what the CPU lacks when it has no bf16 kernels.
    pub fn new(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Result<Bf16Linear, String> {
        let isa = support()?;
        assert!(w.len() >= n * k && bias.is_none_or(|b| b.len() >= n), "bf16 linear sizes");
        let kp = k.div_ceil(KSTEP) * KSTEP;
        let panels = n.div_ceil(PANEL);
        let steps = kp / KSTEP;
        let mut packed = Aligned::zeroed(panels * steps * STEP_ELEMS);
        let pp = Shared(packed.as_mut_ptr());
        // Panel p, step s, tile t, pair q, column c, half e holds w[p·32 + t·16 + c][s·32 + 2q + e].
        crate::par::par_for(panels, &|p| {
            // SAFETY: panel p owns elements [p·steps·STEP_ELEMS, (p+1)·steps·STEP_ELEMS).
            let dst = unsafe { std::slice::from_raw_parts_mut(pp.get().add(p * steps * STEP_ELEMS), steps * STEP_ELEMS) };
            for t in 0..2 {
                for c in 0..16 {
                    let o = p * PANEL + t * 16 + c;
                    if o >= n {
                        continue;
                    }
                    let row = &w[o * k..(o + 1) * k];
                    for (i, &v) in row.iter().enumerate() {
                        let (s, r) = (i / KSTEP, i % KSTEP);
                        dst[s * STEP_ELEMS + t * 512 + (r / 2) * 32 + c * 2 + r % 2] = to_bf16(v);
                    }
                }
            }
        });
        Ok(Bf16Linear { packed, packing: Packing::Bf16, bias: bias.map(|b| b[..n].to_vec()), n, k, kp, isa })
    }

    /// Packs the row-major (n, k) f32 weight `w` in int8 with a scale per output and block
    /// of 32 inputs: scale = the block's largest |w| / 127 as an f16, each weight the nearest
    /// integer to w / scale (|q| ≤ 127; see `quantize_block`). The products then run as with
    /// [`Self::new`]'s bf16 weights, on the values q · scale. Fails like [`Self::new`], and on
    /// a weight that is not finite or too large for an f16 scale (|w| > 8.3e6).
    pub fn new_q8(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Result<Bf16Linear, String> {
        let isa = support()?;
        assert!(w.len() >= n * k && bias.is_none_or(|b| b.len() >= n), "q8 linear sizes");
        if let Some(v) = w[..n * k].iter().find(|v| v.is_nan() || v.abs() > Q8_MAX) {
            return Err(format!("a weight of {v} is out of the int8 packing's range (|w| <= {Q8_MAX:e}); run without --quantize"));
        }
        let kp = k.div_ceil(KSTEP) * KSTEP;
        let panels = n.div_ceil(PANEL);
        let steps = kp / KSTEP;
        let mut packed = Aligned::zeroed(panels * steps * Q8_STEP / 2);
        let pp = Shared(packed.as_mut_ptr() as *mut u8);
        // Panel p, step s: byte t·512 + i·16 + c holds q of w[p·32 + t·16 + c][s·32 + i];
        // bytes 1024 + 2·(t·16 + c) that column's f16 scale.
        crate::par::par_for(panels, &|p| {
            // SAFETY: panel p owns bytes [p·steps·Q8_STEP, (p+1)·steps·Q8_STEP).
            let dst = unsafe { std::slice::from_raw_parts_mut(pp.get().add(p * steps * Q8_STEP), steps * Q8_STEP) };
            for col in 0..PANEL {
                let o = p * PANEL + col;
                if o >= n {
                    continue;
                }
                let (t, c) = (col / 16, col % 16);
                let row = &w[o * k..(o + 1) * k];
                for (s, block) in row.chunks(KSTEP).enumerate() {
                    let (scale, q) = quantize_block(block, 127.0);
                    let at = s * Q8_STEP;
                    dst[at + 1024 + 2 * col..at + 1026 + 2 * col].copy_from_slice(&scale.to_bits().to_le_bytes());
                    for (i, &v) in q.iter().enumerate().take(block.len()) {
                        dst[at + t * 512 + i * 16 + c] = v as u8;
                    }
                }
            }
        });
        Ok(Bf16Linear { packed, packing: Packing::Q8, bias: bias.map(|b| b[..n].to_vec()), n, k, kp, isa })
    }

    /// Packs the row-major (n, k) f32 weight `w` in 4 bits with a scale per output and block
    /// of 32 inputs: scale = the block's largest |w| / 7 as an f16 (rounded up), each weight
    /// the nearest integer to w / scale (|q| ≤ 7, stored as q + 8). Products without AMX run
    /// on int8 inputs with AVX512-VNNI (see the module doc). Fails like [`Self::new`], on a CPU
    /// without AVX512-VNNI, and on a weight that is not finite or too large for an f16 scale.
    pub fn new_q4(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Result<Bf16Linear, String> {
        let isa = support()?;
        if !vnni() {
            return Err("4-bit weights need AVX512-VNNI, which this CPU lacks; use --quantize q8".into());
        }
        assert!(w.len() >= n * k && bias.is_none_or(|b| b.len() >= n), "q4 linear sizes");
        if let Some(v) = w[..n * k].iter().find(|v| v.is_nan() || v.abs() > Q4_MAX) {
            return Err(format!("a weight of {v} is out of the 4-bit packing's range (|w| <= {Q4_MAX:e}); run without --quantize"));
        }
        let kp = k.div_ceil(KSTEP) * KSTEP;
        let panels = n.div_ceil(PANEL);
        let steps = kp / KSTEP;
        let mut packed = Aligned::zeroed(panels * steps * Q4_STEP / 2);
        let pp = Shared(packed.as_mut_ptr() as *mut u8);
        // Panel p, step s: byte t·256 + g·64 + c·4 + j holds, for column p·32 + t·16 + c,
        // q + 8 of k = s·32 + 4g + j in its low nibble and of k + 16 in its high one;
        // bytes 512 + 2·(t·16 + c) that column's f16 scale.
        crate::par::par_for(panels, &|p| {
            // SAFETY: panel p owns bytes [p·steps·Q4_STEP, (p+1)·steps·Q4_STEP).
            let dst = unsafe { std::slice::from_raw_parts_mut(pp.get().add(p * steps * Q4_STEP), steps * Q4_STEP) };
            // Zeros (q = 0, stored as 8) where there is no weight: k past the end and columns
            // past n, whose scales stay zero.
            for step in dst.chunks_exact_mut(Q4_STEP) {
                step[..512].fill(0x88);
            }
            for col in 0..PANEL {
                let o = p * PANEL + col;
                if o >= n {
                    continue;
                }
                let (t, c) = (col / 16, col % 16);
                let row = &w[o * k..(o + 1) * k];
                for (s, block) in row.chunks(KSTEP).enumerate() {
                    let (scale, q) = quantize_block(block, 7.0);
                    let at = s * Q4_STEP;
                    dst[at + 512 + 2 * col..at + 514 + 2 * col].copy_from_slice(&scale.to_bits().to_le_bytes());
                    for i in 0..16 {
                        dst[at + t * 256 + (i / 4) * 64 + c * 4 + i % 4] = (q[i] + 8) as u8 | ((q[i + 16] + 8) as u8) << 4;
                    }
                }
            }
        });
        Ok(Bf16Linear { packed, packing: Packing::Q4, bias: bias.map(|b| b[..n].to_vec()), n, k, kp, isa })
    }

    /// The values [`Self::new_q4`] holds for the row-major (n, k) weight `w`: each weight
    /// rounded to its block's 4-bit step (q · scale), for references that run unquantized
    /// products on them. The caller keeps `w` within the packing's range.
    pub fn q4_values(w: &[f32], k: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(w.len());
        for row in w.chunks_exact(k) {
            for block in row.chunks(KSTEP) {
                let (scale, q) = quantize_block(block, 7.0);
                out.extend(q[..block.len()].iter().map(|&q| q as f32 * scale.to_f32()));
            }
        }
        out
    }

    /// Whether the weight is held in int8 ([`Self::new_q8`]).
    pub fn is_q8(&self) -> bool {
        self.packing == Packing::Q8
    }

    /// How the weight is held.
    pub fn packing(&self) -> Packing {
        self.packing
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Bytes of packed weight (padding and int8 scales included).
    pub fn weight_bytes(&self) -> usize {
        self.n.div_ceil(PANEL) * (self.kp / KSTEP) * self.packing.step_bytes()
    }

    /// `dst` (rows, n) = `x` (rows, k) · Wᵀ + bias, plus the previous `dst` when `accumulate`.
    /// `decoding` (one position per sequence) picks the matrix-vector kernel; otherwise
    /// products run on AMX when the CPU has it. Split over the pool by output panels (and rows).
    pub fn forward_rows(&self, x: &[f32], rows: usize, dst: &mut [f32], accumulate: bool, decoding: bool) {
        assert!(x.len() >= rows * self.k && dst.len() >= rows * self.n, "bf16 linear sizes");
        if rows == 0 {
            return;
        }
        let amx = !decoding && self.isa == Bf16Isa::Amx;
        // Rows rounded up to two AMX tiles for AMX.
        let prow = if amx { rows.div_ceil(32) * 32 } else { rows };
        if !amx && self.packing == Packing::Q4 {
            thread_local! {
                static XQ: std::cell::RefCell<Int8Rows> = std::cell::RefCell::new(Int8Rows::default());
            }
            XQ.with_borrow_mut(|xq| {
                xq.quantize(x, rows, self.k, self.kp);
                let (xq, dp) = (&*xq, Shared(dst.as_mut_ptr()));
                let panels = self.n.div_ceil(PANEL);
                crate::par::par_for(panels.div_ceil(2), &|t| {
                    let p0 = t * 2;
                    // SAFETY: as below.
                    unsafe { self.dot_block(Rows::Int8(xq), p0, (p0 + 2).min(panels), rows, dp.get(), accumulate) };
                });
            });
            return;
        }
        if !amx {
            thread_local! {
                static XF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            XF.with_borrow_mut(|xf| {
                // The rows rounded to bf16 and back (the values the AMX kernel multiplies),
                // zero past k.
                xf.clear();
                xf.resize(rows * self.kp, 0.0);
                for (src, d) in x.chunks_exact(self.k).take(rows).zip(xf.chunks_exact_mut(self.kp)) {
                    for (d, &v) in d.iter_mut().zip(src) {
                        *d = from_bf16(to_bf16(v));
                    }
                }
                let (xf, dp) = (&*xf, Shared(dst.as_mut_ptr()));
                let panels = self.n.div_ceil(PANEL);
                // Two panels (64 outputs) per task.
                crate::par::par_for(panels.div_ceil(2), &|t| {
                    let p0 = t * 2;
                    // SAFETY: the task writes every row of the columns of panels p0, p0 + 1.
                    unsafe { self.dot_block(Rows::Bf16(xf.as_ptr()), p0, (p0 + 2).min(panels), rows, dp.get(), accumulate) };
                });
            });
            return;
        }
        XB.with_borrow_mut(|xb| {
            xb.fit(prow * self.kp);
            // AMX takes the rows tiled (see amx_block).
            convert_rows(x, rows, self.k, self.kp, xb.as_mut_ptr());
            let out = Out { ptr: dst.as_mut_ptr(), stride: self.n, row0: 0, panel0: 0 };
            // SAFETY: xb holds prow converted rows; dst holds rows × n.
            unsafe { self.amx_products(xb.as_ptr(), rows, out, accumulate) };
        });
    }

    /// The AMX product of `rows` rows already converted and tiled at `xb` (rows rounded up
    /// to 32, k to [`KSTEP`]) into `out`, over the pool.
    unsafe fn amx_products(&self, xb: *const u16, rows: usize, out: Out, accumulate: bool) {
        let prow = rows.div_ceil(32) * 32;
        let panels = self.n.div_ceil(PANEL);
        let xb = Shared(xb as *mut u16);
        // Tasks of up to 4 panels × 128 rows: the panel and the rows stay in L2 across the block.
        const TP: usize = 4;
        const TR: usize = 128;
        let (pt, rt) = (panels.div_ceil(TP), prow.div_ceil(TR));
        crate::par::par_for(pt * rt, &|t| {
            let (p0, r0) = ((t / rt) * TP, (t % rt) * TR);
            // SAFETY: the task writes rows r0..r0+TR (below `rows`) of columns of panels p0..p0+TP.
            unsafe { self.amx_block(xb.get(), p0, (p0 + TP).min(panels), r0, (r0 + TR).min(prow), rows, out, accumulate) };
        });
    }

    /// An MLP's two products on AMX with its activation between them: `second`(act(`first`(x)))
    /// for `rows` rows of `x`, into `dst` (rows × second's outputs; added to it when
    /// `accumulate`, as a residual). Each block of rows and columns of the first product goes
    /// through the activation and bf16 rounding as soon as it is done, straight into the
    /// tiled input of the second: the (rows × width) f32 activations, their activated copy
    /// and its conversion never exist. Every value is what the separate steps give, bit for
    /// bit. [`Act::SiluMul`] (SwiGLU: `first` stacks the gate and up projections, silu(gate) ·
    /// up) needs an intermediate width that is a multiple of 32. Returns false (and does
    /// nothing) where it does not apply: no AMX, or widths that do not fit.
    pub fn mlp_rows(first: &Bf16Linear, second: &Bf16Linear, act: Act, x: &[f32], rows: usize, dst: &mut [f32], accumulate: bool) -> bool {
        // Width of the activations (second's k) and the first product's panels that feed them.
        let i = second.k;
        let fits = first.isa == Bf16Isa::Amx
            && second.isa == Bf16Isa::Amx
            && match act {
                Act::SiluMul => first.n == 2 * i && i.is_multiple_of(PANEL),
                Act::GeluTanh => first.n == i,
            };
        if !fits || rows == 0 {
            return false;
        }
        assert!(x.len() >= rows * first.k && dst.len() >= rows * second.n, "mlp sizes");
        thread_local! {
            static MID: std::cell::RefCell<Aligned> = std::cell::RefCell::new(Aligned::zeroed(0));
        }
        let prow = rows.div_ceil(32) * 32;
        let (ip, panels) = (second.kp, i.div_ceil(PANEL));
        XB.with_borrow_mut(|xb| {
            MID.with_borrow_mut(|mid| {
                xb.fit(prow * first.kp);
                convert_rows(x, rows, first.k, first.kp, xb.as_mut_ptr());
                // Every element of `mid` (prow × ip) is written below: padding rows and the
                // columns past i as zeros.
                mid.fit(prow * ip);
                let (xp, mp) = (Shared(xb.as_mut_ptr()), Shared(mid.as_mut_ptr()));
                const TP: usize = 4;
                const TR: usize = 128;
                let (pt, rt) = (panels.div_ceil(TP), prow.div_ceil(TR));
                thread_local! {
                    static H: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                crate::par::par_for(pt * rt, &|t| {
                    let (p0, r0) = ((t / rt) * TP, (t % rt) * TR);
                    let (p1, r1) = ((p0 + TP).min(panels), (r0 + TR).min(prow));
                    let w = (p1 - p0) * PANEL;
                    H.with_borrow_mut(|h| {
                        h.resize(2 * (r1 - r0) * w, 0.0);
                        let (g, u) = h.split_at_mut((r1 - r0) * w);
                        // SAFETY: the task's rows and panels of the first product go to `g` (and,
                        // for SwiGLU, the up panels i/32 + p0.. to `u`); `mid` rows r0..r1 of
                        // steps p0..p1 are this task's.
                        unsafe {
                            first.amx_block(xp.get(), p0, p1, r0, r1, rows, Out { ptr: g.as_mut_ptr(), stride: w, row0: r0, panel0: p0 }, false);
                            if act == Act::SiluMul {
                                let up = Out { ptr: u.as_mut_ptr(), stride: w, row0: r0, panel0: panels + p0 };
                                first.amx_block(xp.get(), panels + p0, panels + p1, r0, r1, rows, up, false);
                            }
                            let mut a = [0f32; PANEL];
                            for r in r0..r1 {
                                for p in p0..p1 {
                                    // Step p of row r in the tiled layout of second's input.
                                    let at = mp.get().add((r / 32) * 32 * ip + p * 32 * KSTEP + (r % 32) * KSTEP);
                                    let cols = PANEL.min(i - p * PANEL);
                                    if r >= rows {
                                        std::ptr::write_bytes(at, 0, KSTEP);
                                        continue;
                                    }
                                    let o = (r - r0) * w + (p - p0) * PANEL;
                                    match act {
                                        Act::SiluMul => crate::kernels::silu_mul(&g[o..o + PANEL], &u[o..o + PANEL], &mut a),
                                        Act::GeluTanh => {
                                            a[..cols].copy_from_slice(&g[o..o + cols]);
                                            a[cols..].fill(0.0);
                                            crate::kernels::gelu_tanh_inplace(&mut a);
                                        }
                                    }
                                    convert_row(&a, at);
                                }
                            }
                        }
                    });
                });
                let out = Out { ptr: dst.as_mut_ptr(), stride: second.n, row0: 0, panel0: 0 };
                // SAFETY: `mid` holds prow tiled rows of ip values.
                unsafe { second.amx_products(mid.as_ptr(), rows, out, accumulate) };
            })
        });
        true
    }

    /// Base value of output (r, o): previous value when accumulating, plus the bias.
    #[inline]
    unsafe fn base(&self, dst: *const f32, r: usize, o: usize, accumulate: bool) -> f32 {
        let prev = if accumulate { unsafe { *dst.add(r * self.n + o) } } else { 0.0 };
        prev + self.bias.as_ref().map_or(0.0, |b| b[o])
    }

    /// Panels p0..p1 for rows 0..rows with [`dot_panel`] (or its int8 and 4-bit forms), eight
    /// or four rows at a time, then one (each row's sums are the same instructions in the
    /// same order whatever is beside it).
    unsafe fn dot_block(&self, x: Rows<'_>, p0: usize, p1: usize, rows: usize, dst: *mut f32, accumulate: bool) {
        let mut r = 0;
        while r < rows {
            let step = if r + 8 <= rows { 8 } else if r + 4 <= rows { 4 } else { 1 };
            for p in p0..p1 {
                let mut acc = [[0f32; PANEL]; 8];
                // SAFETY: the CPU has AVX-512 (and AVX512-VNNI for 4 bits; checked at
                // construction); offsets stay inside the packed panel and the rows.
                unsafe {
                    let q = self.packed.as_ptr() as *const u8;
                    match (self.packing, x) {
                        (Packing::Q4, Rows::Int8(xq)) => match step {
                            8 => dot_panel_q4::<8>(q, p, self.kp, xq, r, &mut acc),
                            4 => dot_panel_q4::<4>(q, p, self.kp, xq, r, &mut acc),
                            _ => dot_panel_q4::<1>(q, p, self.kp, xq, r, &mut acc),
                        },
                        (Packing::Q8, Rows::Bf16(xf)) => match step {
                            8 => dot_panel_q8::<8>(q, p, self.kp, xf, r, &mut acc),
                            4 => dot_panel_q8::<4>(q, p, self.kp, xf, r, &mut acc),
                            _ => dot_panel_q8::<1>(q, p, self.kp, xf, r, &mut acc),
                        },
                        (Packing::Bf16, Rows::Bf16(xf)) => match step {
                            8 => dot_panel::<8>(self.packed.as_ptr(), p, self.kp, xf, r, &mut acc),
                            4 => dot_panel::<4>(self.packed.as_ptr(), p, self.kp, xf, r, &mut acc),
                            _ => dot_panel::<1>(self.packed.as_ptr(), p, self.kp, xf, r, &mut acc),
                        },
                        _ => unreachable!("rows prepared for another packing"),
                    }
                }
                for (i, a) in acc.iter().enumerate().take(step) {
                    for (c, &v) in a.iter().enumerate() {
                        let o = p * PANEL + c;
                        if o < self.n {
                            // SAFETY: (r + i, o) is inside dst and belongs to this task.
                            unsafe { *dst.add((r + i) * self.n + o) = self.base(dst, r + i, o, accumulate) + v };
                        }
                    }
                }
            }
            r += step;
        }
    }

    /// Panels p0..p1 for padded rows r0..r1 (multiples of 32) on AMX, 32 × 32 outputs per
    /// inner block; rows at or past `rows` are padding and not written. `xb` holds the rows
    /// tiled: per block of 32 rows, k step by step, each step's 32 rows × 32 values in one
    /// piece (a tile load reads 1 KiB in a row instead of 64 bytes from each of 16 rows,
    /// which kept the loads waiting). k runs in blocks of
    /// [`AMX_KBLOCK`] steps, outermost: within one, a row block's slice of the inputs stays in
    /// L1 across the task's panels and each panel's slice across the row blocks, instead of
    /// both streaming from L2 for every 32 × 32 block (what bounded few-row products with wide
    /// k, e.g. Idefics2's perceiver). The partial sums wait in f32 between k blocks, stored
    /// and reloaded exactly, so the result is the one a single pass over k gives.
    #[allow(clippy::too_many_arguments)]
    unsafe fn amx_block(
        &self,
        xb: *const u16,
        p0: usize,
        p1: usize,
        r0: usize,
        r1: usize,
        rows: usize,
        out: Out,
        accumulate: bool,
    ) {
        thread_local! {
            // Aligned: a tile load or store of rows that straddle cache lines costs several
            // times an aligned one, and these are loaded and stored once per k block.
            static PARTIAL: std::cell::RefCell<Aligned> = std::cell::RefCell::new(Aligned::zeroed(0));
            /// The int8 packing's panels of one k block, dequantized to bf16 tiles.
            static DEQUANT: std::cell::RefCell<Aligned> = std::cell::RefCell::new(Aligned::zeroed(0));
        }
        let steps = self.kp / KSTEP;
        let row_blocks = (r1 - r0) / 32;
        PARTIAL.with_borrow_mut(|partial| DEQUANT.with_borrow_mut(|dq| {
            let c = partial.f32_fit((p1 - p0) * row_blocks * 1024);
            let quantized = self.packing != Packing::Bf16;
            if quantized {
                dq.fit((p1 - p0) * AMX_KBLOCK * STEP_ELEMS);
            }
            // SAFETY: the tile state was granted (support() returned Amx); loads stay inside the
            // packed panels (or their dequantized k block in `dq`), the padded rows and `partial` ((p1 − p0) × row_blocks blocks of
            // 32 × 32); the tiles are released before returning.
            unsafe {
                amx::configure();
                let mut s0 = 0;
                while s0 < steps {
                    let kn = AMX_KBLOCK.min(steps - s0);
                    if quantized {
                        // This k block of the task's panels, once for all its row blocks.
                        for p in p0..p1 {
                            let src = (self.packed.as_ptr() as *const u8).add((p * steps + s0) * self.packing.step_bytes());
                            let to = dq.as_mut_ptr().add((p - p0) * kn * STEP_ELEMS);
                            if self.packing == Packing::Q4 {
                                dequantize_steps_q4(src, kn, to);
                            } else {
                                dequantize_steps(src, kn, to);
                            }
                        }
                    }
                    for rb in 0..row_blocks {
                        let a = xb.add((r0 / 32 + rb) * 32 * self.kp + s0 * 32 * KSTEP);
                        for p in p0..p1 {
                            let b = if quantized {
                                dq.as_ptr().add((p - p0) * kn * STEP_ELEMS)
                            } else {
                                self.packed.as_ptr().add((p * steps + s0) * STEP_ELEMS)
                            };
                            let blk = c.add(((p - p0) * row_blocks + rb) * 1024);
                            // Few rows (a text prefill, the perceiver's latents): the weights
                            // stream from memory for the first row block and are hardly reused,
                            // so that block prefetches its panel two steps ahead (5–27% on such
                            // products); with more rows the panel comes from L2 again for the
                            // rest, and the prefetches only cost instructions. Either way the
                            // sums are the same.
                            if rb == 0 && row_blocks <= 3 && !quantized {
                                amx::block_32x32_acc::<true>(a, KSTEP * 2, 32 * KSTEP, b, kn, blk, 128, s0 > 0);
                            } else {
                                amx::block_32x32_acc::<false>(a, KSTEP * 2, 32 * KSTEP, b, kn, blk, 128, s0 > 0);
                            }
                        }
                    }
                    s0 += kn;
                }
                amx::release();
                for p in p0..p1 {
                    let cols = PANEL.min(self.n - p * PANEL);
                    let bias = self.bias.as_ref().map(|b| b[p * PANEL..p * PANEL + cols].as_ptr());
                    for rb in 0..row_blocks {
                        let r = r0 + rb * 32;
                        let blk = c.add(((p - p0) * row_blocks + rb) * 1024);
                        for i in 0..32.min(rows.saturating_sub(r)) {
                            let d = out.ptr.add((r + i - out.row0) * out.stride + (p - out.panel0) * PANEL);
                            store_row(blk.add(i * 32), d, cols, bias, accumulate);
                        }
                    }
                }
            }
        }));
    }
}

/// One block of the int8 (`qmax` 127) or 4-bit (`qmax` 7) packing: its f16 scale (the
/// block's largest |w| / `qmax`, rounded up to an f16, so that no weight lands past ±`qmax`;
/// zero for an all-zero block) and the weights divided by it, rounded to the nearest integer
/// (ties away from zero): each weight is off by at most half the scale. Values past the
/// block's length are zero. The caller keeps |w| within [`Q8_MAX`] or [`Q4_MAX`].
fn quantize_block(block: &[f32], qmax: f32) -> (half::f16, [i8; KSTEP]) {
    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
    let mut scale = half::f16::from_f32(amax / qmax);
    if scale.to_f32() < amax / qmax {
        // The next f16 up (a positive f16's bits count up with its value).
        scale = half::f16::from_bits(scale.to_bits() + 1);
    }
    let mut q = [0i8; KSTEP];
    let d = scale.to_f32();
    if d > 0.0 {
        for (q, &v) in q.iter_mut().zip(block) {
            *q = (v / d).round().clamp(-qmax, qmax) as i8;
        }
    }
    (scale, q)
}

/// The largest |weight| the int8 packing holds: 127 times the largest finite f16.
const Q8_MAX: f32 = 127.0 * 65504.0;
/// The largest |weight| the 4-bit packing holds: 7 times the largest finite f16.
const Q4_MAX: f32 = 7.0 * 65504.0;

/// Whether the CPU has the integer dot products of the 4-bit kernels (AVX512-VNNI, with
/// AVX512-BW for the nibble shifts).
pub(crate) fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows of inputs as the 4-bit kernels take them: each row's values rounded to bf16 (as
/// every kernel here rounds its inputs: a last-bit difference in an f32 input seldom moves
/// them, where it would move an int8 scale taken from the f32 values), then its blocks of 32
/// in int8 with a scale per block (the block's largest |x| / 127, in f32, so the scaled
/// values span ±127), and per block −8 times the sum of its int8 values, which takes the
/// weights' +8 offset back out of the integer sums.
#[derive(Default)]
struct Int8Rows {
    /// rows × kp values, zero past k.
    q: Vec<i8>,
    /// rows × kp/32 scales.
    scale: Vec<f32>,
    /// rows × kp/32 offsets' sums.
    offset: Vec<i32>,
}

impl Int8Rows {
    /// Quantizes `rows` rows of `k` values from `x`. A block holding a NaN or an infinity gets
    /// a NaN scale, so that its outputs are NaN as a float product's would be.
    fn quantize(&mut self, x: &[f32], rows: usize, k: usize, kp: usize) {
        let steps = kp / KSTEP;
        self.q.clear();
        self.q.resize(rows * kp, 0);
        self.scale.clear();
        self.scale.resize(rows * steps, 0.0);
        self.offset.clear();
        self.offset.resize(rows * steps, 0);
        for (r, row) in x.chunks_exact(k).take(rows).enumerate() {
            for (s, block) in row.chunks(KSTEP).enumerate() {
                let finite = block.iter().all(|v| v.is_finite());
                let mut b = [0f32; KSTEP];
                for (b, &v) in b.iter_mut().zip(block) {
                    *b = from_bf16(to_bf16(v));
                }
                let block = &b[..block.len()];
                let d = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                self.scale[r * steps + s] = if finite { d } else { f32::NAN };
                if !finite || d == 0.0 {
                    continue;
                }
                let q = &mut self.q[r * kp + s * KSTEP..r * kp + s * KSTEP + block.len()];
                let mut sum = 0i32;
                for (q, &v) in q.iter_mut().zip(block) {
                    *q = (v / d).round().clamp(-127.0, 127.0) as i8;
                    sum += *q as i32;
                }
                self.offset[r * steps + s] = -8 * sum;
            }
        }
    }
}

/// The inputs of [`Bf16Linear::dot_block`]: rows rounded to bf16 (kept in f32), or in int8.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Bf16(*const f32),
    Int8(&'a Int8Rows),
}

/// `kn` k steps of one panel in the int8 packing at `src` as bf16 tiles at `dst` (the layout
/// of [`Bf16Linear::new`]'s panels): each value q · scale (exact in f32: 8 by 11 significant
/// bits) rounded to bf16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dequantize_steps(src: *const u8, kn: usize, dst: *mut u16) {
    // cvtne2ps_pbh gives the even k values' 16 columns, then the odd ones'; a tile row wants
    // them paired per column.
    let pair = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
    );
    // SAFETY: the caller hands kn whole steps at src and room for kn · STEP_ELEMS at dst.
    unsafe {
        for s in 0..kn {
            let blk = src.add(s * Q8_STEP);
            for t in 0..2 {
                let scale = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(1024 + 32 * t) as *const __m256i));
                let widen = |i: usize| {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(t * 512 + i * 16) as *const __m128i));
                    _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale)
                };
                for q in 0..16 {
                    let (even, odd) = (widen(2 * q), widen(2 * q + 1));
                    let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
                    let row = _mm512_permutexvar_epi16(pair, halves);
                    _mm512_store_si512(dst.add(s * STEP_ELEMS + t * 512 + q * 32) as *mut __m512i, row);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dequantize_steps(_: *const u8, _: usize, _: *mut u16) {
    unreachable!("support() fails off x86-64")
}

/// [`dequantize_steps`] for the 4-bit packing: each value (q + 8 − 8) · scale, exact in f32,
/// rounded to bf16 into the bf16 panels' layout.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dequantize_steps_q4(src: *const u8, kn: usize, dst: *mut u16) {
    let pair = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
    );
    let (nibble, eight) = (_mm512_set1_epi32(0x0f), _mm512_set1_epi32(8));
    // SAFETY: the caller hands kn whole steps at src and room for kn · STEP_ELEMS at dst.
    unsafe {
        for s in 0..kn {
            let blk = src.add(s * Q4_STEP);
            for t in 0..2 {
                let scale = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(512 + 32 * t) as *const __m256i));
                // k value i of the tile's 16 columns: byte i % 4 of each column's 32-bit lane in
                // unit (i % 16) / 4, low nibble below 16, high from 16.
                let widen = |i: usize| {
                    let v = _mm512_loadu_si512(blk.add(t * 256 + ((i % 16) / 4) * 64) as *const _);
                    let shift = _mm_cvtsi32_si128((8 * (i % 4) + 4 * (i / 16)) as i32);
                    let q = _mm512_sub_epi32(_mm512_and_si512(_mm512_srl_epi32(v, shift), nibble), eight);
                    _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale)
                };
                for q in 0..16 {
                    let (even, odd) = (widen(2 * q), widen(2 * q + 1));
                    let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
                    let row = _mm512_permutexvar_epi16(pair, halves);
                    _mm512_store_si512(dst.add(s * STEP_ELEMS + t * 512 + q * 32) as *mut __m512i, row);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dequantize_steps_q4(_: *const u8, _: usize, _: *mut u16) {
    unreachable!("support() fails off x86-64")
}

/// `dst[j]` = `src[j]` + `bias[j]` (+ the previous `dst[j]` when `accumulate`) for j < `cols`
/// (≤ 32): one row of an AMX result block into the output, in the order the scalar form adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_row(src: *const f32, dst: *mut f32, cols: usize, bias: Option<*const f32>, accumulate: bool) {
    let full: u32 = if cols >= 32 { u32::MAX } else { (1u32 << cols) - 1 };
    let masks = [(full & 0xffff) as __mmask16, (full >> 16) as __mmask16];
    // SAFETY: masked loads/stores touch only the first `cols` elements of each row.
    unsafe {
        for (h, &k) in masks.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let o = h * 16;
            let mut base = if accumulate { _mm512_maskz_loadu_ps(k, dst.add(o)) } else { _mm512_setzero_ps() };
            if let Some(b) = bias {
                base = _mm512_add_ps(base, _mm512_maskz_loadu_ps(k, b.add(o)));
            }
            _mm512_mask_storeu_ps(dst.add(o), k, _mm512_add_ps(base, _mm512_loadu_ps(src.add(o))));
        }
    }
}

/// `rows` rows of `x` (k wide) rounded to bf16 into `xb` tiled as the AMX kernel takes them
/// (see `amx_block`; kp wide, zero beyond k), over the pool. Only the rows' kp values are
/// written: padding rows of a block keep what was there.
fn convert_rows(x: &[f32], rows: usize, k: usize, kp: usize, xb: *mut u16) {
    let xp = Shared(xb);
    // convert_row writes 16 values at a time (zero past k); a last k step with at most 16
    // real values has 16 more to clear.
    let gap = k.div_ceil(16) * 16;
    const CHUNK: usize = 16;
    crate::par::par_for(rows.div_ceil(CHUNK), &|t| {
        for r in t * CHUNK..((t + 1) * CHUNK).min(rows) {
            let src = &x[r * k..(r + 1) * k];
            // SAFETY: row r of xb (kp elements, tiled) belongs to this task; the CPU has
            // AVX512-BF16.
            unsafe {
                let (row, seg) = (xp.get().add((r / 32) * kp * 32 + (r % 32) * KSTEP), 32 * KSTEP);
                convert_row_strided(src, row, seg);
                if gap < kp {
                    std::ptr::write_bytes(row.add((gap / KSTEP) * seg + gap % KSTEP), 0, kp - gap);
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn convert_row(x: &[f32], dst: *mut u16) {
    unsafe { convert_row_strided(x, dst, KSTEP) }
}

/// [`convert_row`] with each 32-element k step of the row `seg` elements after the previous
/// one: `KSTEP` for a plain row, `32 · KSTEP` for row `i` of an AMX row block laid out step
/// by step (32 rows × 32 values per step, so a tile loads 1 KiB in one piece).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn convert_row_strided(x: &[f32], dst: *mut u16, seg: usize) {
    let k = x.len();
    let mut i = 0;
    while i < k {
        let m = if k - i >= 16 { 0xffff } else { ((1u32 << (k - i)) - 1) as __mmask16 };
        // SAFETY: masked load inside x; the store of 16 bf16 stays in the padded row or block
        // (kp ≥ i + 16).
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.add((i / KSTEP) * seg + i % KSTEP) as *mut __m256i, h);
        }
        i += 16;
    }
}

/// Sums of panel `p` (32 outputs) for rows r..r+R of `xf` (f32 rows, kp apart), into `acc`.
/// Each bf16 weight pair is widened to two f32 vectors (a bf16 is the top half of an f32) and
/// multiplied by f32 FMAs: per output one chain of FMAs over k in order, the same
/// instructions whatever R. On this CPU's cores `vdpbf16ps` retires one every two cycles
/// while FMAs go two a cycle, so with several rows (continuous batching's decode steps) the
/// widening pays: half the cycles per product of the pairing instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_panel<const R: usize>(packed: *const u16, p: usize, kp: usize, xf: *const f32, r: usize, acc: &mut [[f32; PANEL]; 8]) {
    let steps = kp / KSTEP;
    let b = unsafe { packed.add(p * steps * STEP_ELEMS) };
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let mut a = [[_mm512_setzero_ps(); 2]; R];
    for s in 0..steps {
        for q in 0..16 {
            // The weights stream from memory once per step: ask for the step PREFETCH ahead,
            // two of its 32 lines per pair, spread over the step (a burst of 32 prefetches
            // held the loads back: 14–22% slower with 4 and 8 rows).
            for l in 2 * q..2 * q + 2 {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((s + PREFETCH) * STEP_ELEMS + l * 32) as *const i8);
            }
            // SAFETY: offsets stay inside the panel (steps · STEP_ELEMS) and the rows (kp each).
            unsafe {
                // Tile t holds, per column, the pair (k = 2q, 2q + 1) as the low and high
                // halves of one 32-bit lane.
                let v0 = _mm512_loadu_si512(b.add(s * STEP_ELEMS + q * 32) as *const _);
                let v1 = _mm512_loadu_si512(b.add(s * STEP_ELEMS + 512 + q * 32) as *const _);
                let (w0e, w0o) = (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0)), _mm512_castsi512_ps(_mm512_and_si512(v0, high)));
                let (w1e, w1o) = (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1)), _mm512_castsi512_ps(_mm512_and_si512(v1, high)));
                for (i, ai) in a.iter_mut().enumerate() {
                    let x = xf.add((r + i) * kp + s * KSTEP + 2 * q);
                    let (x0, x1) = (_mm512_set1_ps(*x), _mm512_set1_ps(*x.add(1)));
                    ai[0] = _mm512_fmadd_ps(w0o, x1, _mm512_fmadd_ps(w0e, x0, ai[0]));
                    ai[1] = _mm512_fmadd_ps(w1o, x1, _mm512_fmadd_ps(w1e, x0, ai[1]));
                }
            }
        }
    }
    for i in 0..R {
        // SAFETY: acc[i] holds 32 f32.
        unsafe {
            _mm512_storeu_ps(acc[i].as_mut_ptr(), a[i][0]);
            _mm512_storeu_ps(acc[i].as_mut_ptr().add(16), a[i][1]);
        }
    }
}

/// [`dot_panel`] on the int8 packing: sums of panel `p` for rows r..r+R. Each int8 weight is
/// widened to f32 and multiplied by its block's scale (exact: 8 by 11 significant bits), then
/// multiplied with the rows' values by f32 FMAs: per output one chain over k in order, the
/// same instructions whatever R. The widening is shared by the R rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_panel_q8<const R: usize>(packed: *const u8, p: usize, kp: usize, xf: *const f32, r: usize, acc: &mut [[f32; PANEL]; 8]) {
    let steps = kp / KSTEP;
    let base = unsafe { packed.add(p * steps * Q8_STEP) };
    let mut a = [[_mm512_setzero_ps(); 2]; R];
    for s in 0..steps {
        let blk = base.wrapping_add(s * Q8_STEP);
        // SAFETY: the scales follow the step's 1,024 weight bytes, inside the panel.
        let (s0, s1) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(1024) as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(1056) as *const __m256i)),
            )
        };
        for i in 0..KSTEP {
            // The step PREFETCH ahead, one of its 17 lines per k value.
            if i < Q8_STEP / 64 {
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH * Q8_STEP + i * 64) as *const i8);
            }
            // SAFETY: offsets stay inside the panel (steps · Q8_STEP) and the rows (kp each).
            unsafe {
                let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(i * 16) as *const __m128i));
                let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(512 + i * 16) as *const __m128i));
                let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), s0);
                let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), s1);
                for (j, aj) in a.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*xf.add((r + j) * kp + s * KSTEP + i));
                    aj[0] = _mm512_fmadd_ps(w0, x, aj[0]);
                    aj[1] = _mm512_fmadd_ps(w1, x, aj[1]);
                }
            }
        }
    }
    for i in 0..R {
        // SAFETY: acc[i] holds 32 f32.
        unsafe {
            _mm512_storeu_ps(acc[i].as_mut_ptr(), a[i][0]);
            _mm512_storeu_ps(acc[i].as_mut_ptr().add(16), a[i][1]);
        }
    }
}

/// [`dot_panel`] on the 4-bit packing with int8 rows: sums of panel `p` for rows r..r+R.
/// Per step and 16-column tile, `vpdpbusd` multiplies the weights' q + 8 (unsigned nibbles)
/// by the rows' int8 values, four k values per column and instruction, into integer sums
/// started at the rows' −8 · Σx (exact: at most 32 · 15 · 127 in magnitude); each sum then
/// goes to f32 and adds (weight scale · row scale) times itself to the column's f32 chain,
/// step after step: the same instructions in the same order whatever R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_panel_q4<const R: usize>(packed: *const u8, p: usize, kp: usize, x: &Int8Rows, r: usize, acc: &mut [[f32; PANEL]; 8]) {
    let steps = kp / KSTEP;
    let base = unsafe { packed.add(p * steps * Q4_STEP) };
    let nibble = _mm512_set1_epi8(0x0f);
    let (xq, xs, xo) = (x.q.as_ptr(), x.scale.as_ptr(), x.offset.as_ptr());
    let mut f = [[_mm512_setzero_ps(); 2]; R];
    for s in 0..steps {
        let blk = base.wrapping_add(s * Q4_STEP);
        for l in 0..Q4_STEP / 64 {
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH * Q4_STEP + l * 64) as *const i8);
        }
        for t in 0..2 {
            // SAFETY: offsets stay inside the panel (steps · Q4_STEP) and the rows (kp values
            // and kp / 32 scales and offsets each).
            unsafe {
                let sw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(512 + 32 * t) as *const __m256i));
                // One integer sum per row: with R = 4 two per row (low and high nibbles apart)
                // and the unpacked weights held across the rows spilled to the stack.
                let mut sums = [_mm512_setzero_si512(); R];
                for (j, l) in sums.iter_mut().enumerate() {
                    *l = _mm512_set1_epi32(*xo.add((r + j) * steps + s));
                }
                for g in 0..4 {
                    let v = _mm512_loadu_si512(blk.add(t * 256 + g * 64) as *const _);
                    let (wl, wh) = (_mm512_and_si512(v, nibble), _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble));
                    for (j, sum) in sums.iter_mut().enumerate() {
                        let row = xq.add((r + j) * kp + s * KSTEP);
                        let xl = _mm512_set1_epi32((row.add(4 * g) as *const i32).read_unaligned());
                        let xh = _mm512_set1_epi32((row.add(16 + 4 * g) as *const i32).read_unaligned());
                        *sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*sum, wl, xl), wh, xh);
                    }
                }
                for (j, fj) in f.iter_mut().enumerate() {
                    let sum = _mm512_cvtepi32_ps(sums[j]);
                    let scale = _mm512_mul_ps(sw, _mm512_set1_ps(*xs.add((r + j) * steps + s)));
                    fj[t] = _mm512_fmadd_ps(sum, scale, fj[t]);
                }
            }
        }
    }
    for i in 0..R {
        // SAFETY: acc[i] holds 32 f32.
        unsafe {
            _mm512_storeu_ps(acc[i].as_mut_ptr(), f[i][0]);
            _mm512_storeu_ps(acc[i].as_mut_ptr().add(16), f[i][1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_panel_q4<const R: usize>(_: *const u8, _: usize, _: usize, _: &Int8Rows, _: usize, _: &mut [[f32; PANEL]; 8]) {
    unreachable!("support() fails off x86-64")
}

/// One head's keys and values (columns `kcol`.. and `vcol`.. of `rows`, `hd` wide, `w` apart)
/// rounded to bf16 into the panels of `sc`: keys as the B operand of Q·Kᵀ (columns: keys, k:
/// the head's dims), values as that of P·V (columns: the head's dims, k: keys), both in
/// [`Bf16Linear`]'s panel layout, where a tile row holds for 16 columns one pair of
/// consecutive k values each. Values: two keys' rows interleaved give a tile row directly.
/// Keys: 16 keys' rows at a time go to `keys16`, and each pair of dims is gathered across
/// them into a tile row. Padding (keys past `seq`, dims past `hd`) is written as zeros.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn pack_keys_values(rows: &[f32], w: usize, kcol: usize, vcol: usize, seq: usize, hd: usize, sc: &mut AttnScratch) {
    let hdp = hd.div_ceil(KSTEP) * KSTEP;
    let seqp = seq.div_ceil(PANEL) * PANEL;
    let (hsteps, ssteps) = (hdp / KSTEP, seqp / KSTEP);
    let (kp, vp) = (sc.keys.as_mut_ptr(), sc.values.as_mut_ptr());
    let pairs = hdp / 2;
    let k16 = sc.keys16.as_mut_ptr();
    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(pairs as i32));
    // SAFETY (all blocks): reads stay inside the rows (masked past hd); `keys16` holds 16 rows
    // of `pairs` u32, its values past hd zero since the shape was set (convert_row clears up to
    // the next 16, nothing writes further); every panel store is a 64-byte tile row inside
    // the panels.
    unsafe {
        let mut c0 = 0;
        while c0 < seq {
            let n = 16.min(seq - c0);
            for l in 0..n {
                let r = (c0 + l) * w + kcol;
                convert_row(&rows[r..r + hd], k16.add(l * pairs) as *mut u16);
            }
            let live = ((1u32 << n) - 1) as __mmask16;
            let (panel, half) = (c0 / PANEL, c0 % PANEL / 16);
            for i in 0..pairs {
                let t = _mm512_mask_i32gather_epi32::<4>(_mm512_setzero_si512(), live, idx, k16.add(i) as *const i32);
                let at = (panel * hsteps + i / 16) * STEP_ELEMS + half * 512 + (i % 16) * 32;
                _mm512_store_si512(kp.add(at) as *mut _, t);
            }
            c0 += 16;
        }
        let bf = |j: usize, d: usize| -> __m512i {
            if j >= seq {
                return _mm512_setzero_si512();
            }
            let m = if hd - d >= 16 { 0xffff } else { ((1u32 << (hd - d)) - 1) as __mmask16 };
            let v = _mm512_maskz_loadu_ps(m, rows.as_ptr().add(j * w + vcol + d));
            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)))
        };
        for j in (0..seq).step_by(2) {
            let (s, rr) = (j / KSTEP, j % KSTEP);
            for d in (0..hd).step_by(16) {
                let t = _mm512_or_si512(bf(j, d), _mm512_slli_epi32::<16>(bf(j + 1, d)));
                let at = ((d / PANEL) * ssteps + s) * STEP_ELEMS + (d % PANEL / 16) * 512 + (rr / 2) * 32;
                _mm512_store_si512(vp.add(at) as *mut _, t);
            }
        }
    }
}

/// Multi-head self-attention over `tiles` sequences of `seq` rows on AMX (the caller checks
/// [`support`] is [`Bf16Isa::Amx`]): `qkv` holds each row's stacked projections (3 · heads ·
/// head_dim wide: queries, keys, values, head after head), `o` receives each row's heads side by
/// side (heads · head_dim wide). `mask` is an additive key mask per tile (tiles · seq).
///
/// Per (tile, head) task: the keys and the transposed values are rounded to bf16 and packed
/// once as B panels; then per block of 32 queries the scores come from `tdpbf16ps` (f32 sums),
/// the softmax runs in f32, the probabilities are rounded to bf16 and multiplied with the
/// values on the tiles again. The scores of one block (32 × seq) are all that is materialised.
pub fn attention_amx(qkv: &[f32], o: &mut [f32], tiles: usize, seq: usize, heads: usize, hd: usize, mask: Option<&[f32]>, scale: f32) {
    assert_eq!(support(), Ok(Bf16Isa::Amx), "attention_amx needs AMX");
    let e = heads * hd;
    assert!(qkv.len() >= tiles * seq * 3 * e && o.len() >= tiles * seq * e, "attention sizes");
    assert!(mask.is_none_or(|m| m.len() >= tiles * seq), "attention mask size");
    let op = Shared(o.as_mut_ptr());
    thread_local! {
        static SCRATCH: std::cell::RefCell<AttnScratch> = std::cell::RefCell::new(AttnScratch::default());
    }
    crate::par::par_for(tiles * heads, &|t| {
        let (tile, head) = (t / heads, t % heads);
        let rows = &qkv[tile * seq * 3 * e..(tile + 1) * seq * 3 * e];
        let tmask = mask.map(|m| &m[tile * seq..(tile + 1) * seq]);
        SCRATCH.with_borrow_mut(|sc| {
            // SAFETY: the task writes only its head's columns of its tile's rows of `o`, which
            // outlives par_for; the tile state was granted (support() is Amx).
            unsafe { attention_head(rows, op.get().add(tile * seq * e), seq, e, head * hd, hd, tmask, scale, sc) }
        });
    });
}

/// One thread's buffers for [`attention_amx`], kept between tasks of the same shape so that
/// their padding (zero) is written once.
#[derive(Default)]
struct AttnScratch {
    shape: (usize, usize),
    keys: Aligned,
    values: Aligned,
    queries: Aligned,
    probs: Aligned,
    keys16: Vec<u32>,
    scores: Aligned,
    block: Aligned,
}

impl Default for Aligned {
    fn default() -> Self {
        Aligned::zeroed(0)
    }
}

/// Attention of one head of one sequence: `rows` (seq × 3e) as in [`attention_amx`], the head's
/// columns starting at `col` (queries), e + `col` (keys), 2e + `col` (values); output rows
/// (e wide) from `out`, columns `col`..`col` + hd.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_head(
    rows: &[f32],
    out: *mut f32,
    seq: usize,
    e: usize,
    col: usize,
    hd: usize,
    mask: Option<&[f32]>,
    scale: f32,
    sc: &mut AttnScratch,
) {
    let hdp = hd.div_ceil(KSTEP) * KSTEP;
    let seqp = seq.div_ceil(PANEL) * PANEL;
    let (hsteps, ssteps) = (hdp / KSTEP, seqp / KSTEP);
    let (kpanels, vpanels) = (seqp / PANEL, hdp / PANEL);
    // Row strides of the scores (f32) and probabilities (bf16) one cache line longer than the
    // rows: at seqp's multiples of 1 or 2 KiB a tile's 16 rows would all fall in one or two
    // L1 sets and evict each other (7% of the attention's time at 1,024 keys).
    let (ss, ps) = (seqp + 16, seqp + 32);
    if sc.shape != (seq, hd) {
        sc.shape = (seq, hd);
        sc.keys.reset(kpanels * hsteps * STEP_ELEMS);
        sc.values.reset(vpanels * ssteps * STEP_ELEMS);
        sc.queries.reset(32 * hdp);
        sc.probs.reset(32 * ps);
        sc.keys16 = vec![0u32; 16 * hdp / 2];
    }
    let w = 3 * e;
    // Keys as the B operand of Q·Kᵀ (columns: keys, k: the head's dims); values as the B
    // operand of P·V (columns: the head's dims, k: keys). Same layout as Bf16Linear's panels.
    // SAFETY: the panels hold seqp keys × hdp dims and hdp dims × seqp keys; `keys16` 16 rows
    // of hdp; the tile state was granted, so the CPU has AVX512-BF16.
    unsafe { pack_keys_values(rows, w, e + col, 2 * e + col, seq, hd, sc) };
    let (qp, pp) = (sc.queries.as_mut_ptr(), sc.probs.as_mut_ptr());
    // The 32 × 32 result of P·V (aligned, as the scores: a tile store of rows straddling
    // cache lines costs several times an aligned one).
    let c = sc.block.f32_fit(32 * 32);
    // The scores of one block of 32 queries (rows ss apart).
    let srow = sc.scores.f32_fit(32 * ss);
    let mut q0 = 0;
    // SAFETY (the loop): tile loads read 32 rows of the query/probability buffers (32 rows
    // each) and whole panels; writes stay inside the scores and this head's output columns.
    unsafe {
        amx::configure();
        while q0 < seq {
            let m = 32.min(seq - q0);
            for i in 0..m {
                let r = (q0 + i) * w + col;
                convert_row(&rows[r..r + hd], qp.add(i * hdp));
            }
            // Scores straight into their rows (stride ss), then per row the scaled, masked
            // exponentials rounded to bf16 (the softmax's numerators) and 1 / their sum.
            for p in 0..kpanels {
                amx::block_32x32_to(qp, hdp * 2, sc.keys.as_ptr().add(p * hsteps * STEP_ELEMS), hsteps, srow.add(p * PANEL), ss * 4);
            }
            let mut inv = [0f32; 32];
            for (i, inv) in inv.iter_mut().enumerate().take(m) {
                *inv = exp_row_bf16(srow.add(i * ss), seq, scale, mask, pp.add(i * ps));
            }
            for p in 0..vpanels {
                amx::block_32x32(pp, ps * 2, sc.values.as_ptr().add(p * ssteps * STEP_ELEMS), ssteps, c);
                for (i, &inv) in inv.iter().enumerate().take(m) {
                    let dst = out.add((q0 + i) * e + col + p * PANEL);
                    for j in 0..PANEL.min(hd - p * PANEL) {
                        *dst.add(j) = *c.add(i * 32 + j) * inv;
                    }
                }
            }
            q0 += 32;
        }
        amx::release();
    }
}

/// 2^f on [−½, ½] to 5.3e-6 relative error (a degree-4 fit weighted by 1/2^f): ~370 times
/// finer than the bf16 rounding the probabilities get next, with 5 multiply-adds instead of
/// the 7 and the range reduction of the f32 `exp` (`kernels::avx512::exp16`).
const EXP2_POLY: [f32; 5] = [0.999_999_46, 0.693_128_05, 0.240_246_97, 0.055_870_377, 0.009_554_11];

/// One score row (`n` values at `s`) → `p` = bf16(e^(s·scale + mask − max)) (zero past `n` up
/// to the next 16), returning 1 / the sum of those exponentials (summed in f32 before rounding).
/// Works in base 2 (scores times scale·log2 e, then 2^x by [`EXP2_POLY`]); a masked score
/// (mask ≤ −2^126 or so) gives exactly 0. `s` is overwritten with the base-2 scores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl,fma")]
unsafe fn exp_row_bf16(s: *mut f32, n: usize, scale: f32, mask: Option<&[f32]>, p: *mut u16) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let full = n / 16 * 16;
    let tail = ((1u32 << (n - full)) - 1) as __mmask16;
    let sc = _mm512_set1_ps(scale * LOG2E);
    let (l2e, lowest) = (_mm512_set1_ps(LOG2E), _mm512_set1_ps(f32::MIN));
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    // SAFETY (all blocks): offsets stay below n (masked tails) and the bf16 row has room for
    // n rounded up to 16.
    unsafe {
        let mut i = 0;
        while i < n {
            let k = if i < full { 0xffff } else { tail };
            let mut v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s.add(i)), sc);
            if let Some(m) = mask {
                // f32::MIN · log2 e would be −∞ (and a fully masked row NaN): kept finite.
                let mb = _mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, m.as_ptr().add(i)), l2e), lowest);
                v = _mm512_add_ps(v, mb);
            }
            _mm512_mask_storeu_ps(s.add(i), k, v);
            mx = _mm512_mask_max_ps(mx, k, mx, v);
            i += 16;
        }
        let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let floor = _mm512_set1_ps(-126.0);
        let c = EXP2_POLY.map(|v| _mm512_set1_ps(v));
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = if i < full { 0xffff } else { tail };
            let t = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, s.add(i)), m);
            // Below 2^−126 (normal f32's end), and past the row: 0.
            let live = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(k, t, floor);
            let t = _mm512_max_ps(t, floor);
            let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, whole);
            let mut q = _mm512_fmadd_ps(c[4], f, c[3]);
            q = _mm512_fmadd_ps(q, f, c[2]);
            q = _mm512_fmadd_ps(q, f, c[1]);
            q = _mm512_fmadd_ps(q, f, c[0]);
            let e = _mm512_maskz_scalef_ps(live, q, whole);
            sum = _mm512_add_ps(sum, e);
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(p.add(i) as *mut __m256i, h);
            i += 16;
        }
        1.0 / _mm512_reduce_add_ps(sum)
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_head(_: &[f32], _: *mut f32, _: usize, _: usize, _: usize, _: usize, _: Option<&[f32]>, _: f32, _: &mut AttnScratch) {
    unreachable!("support() is never Amx off x86-64")
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    /// Palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Loads the tile configuration (tmm0..tmm7 all 16 × 64 bytes) on this thread.
    pub unsafe fn configure() {
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        // SAFETY: the caller holds the tile permission; the config is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
    }

    /// Gives the tile state back (so the thread's context switches stay cheap).
    pub unsafe fn release() {
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `c` (32 × 32 f32, row-major) = rows a..a+32 (bf16, `a_stride` bytes apart) times the
    /// panel `b` (`steps` k steps of two 16 × 32 bf16 tiles in pair-interleaved layout).
    /// tmm0..3 accumulate, tmm4/5 hold the two row tiles, tmm6/7 the two column tiles.
    pub unsafe fn block_32x32(a: *const u16, a_stride: usize, b: *const u16, steps: usize, c: *mut f32) {
        unsafe { block_32x32_to(a, a_stride, b, steps, c, 128) }
    }

    /// [`block_32x32`] storing the 32 × 32 result with rows `c_stride` bytes apart. For the
    /// attention, whose keys and values stream from L2: it prefetches the panel two steps ahead.
    pub unsafe fn block_32x32_to(a: *const u16, a_stride: usize, b: *const u16, steps: usize, c: *mut f32, c_stride: usize) {
        unsafe { block_32x32_acc::<true>(a, a_stride, super::KSTEP, b, steps, c, c_stride, false) }
    }

    /// [`block_32x32_to`] with the rows' k steps `a_step` elements apart (`KSTEP` in plain
    /// rows, more when the rows are tiled), adding to the 32 × 32 f32 block already at `c`
    /// when `add` (the tiles start from it instead of zero, so the sums go on exactly as in
    /// one pass).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block_32x32_acc<const PF: bool>(
        a: *const u16,
        a_stride: usize,
        a_step: usize,
        b: *const u16,
        steps: usize,
        c: *mut f32,
        c_stride: usize,
        add: bool,
    ) {
        // SAFETY (all blocks): the caller configured the tiles; every load reads 16 rows of 64
        // bytes inside the buffers described by the caller.
        unsafe {
            // The result's rows 16..32, where tmm2 and tmm3 load and store.
            let c1 = c.add(16 * c_stride / 4);
            if add {
                asm!(
                    "tileloadd tmm0, [{c0} + {sc}*1]",
                    "tileloadd tmm1, [{c0h} + {sc}*1]",
                    "tileloadd tmm2, [{c1} + {sc}*1]",
                    "tileloadd tmm3, [{c1h} + {sc}*1]",
                    c0 = in(reg) c,
                    c0h = in(reg) c.add(16),
                    c1 = in(reg) c1,
                    c1h = in(reg) c1.add(16),
                    sc = in(reg) c_stride,
                    options(nostack, readonly)
                );
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
            for s in 0..steps {
                if PF {
                    // The panel's step two ahead into L1 (32 lines), for operands that stream
                    // from L2 (the attention's keys and values).
                    let ahead = b.wrapping_add((s + 2) * super::STEP_ELEMS) as *const i8;
                    for l in 0..32 {
                        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ahead.wrapping_add(l * 64));
                    }
                }
                let a0 = a.add(s * a_step);
                let a1 = a0.add(16 * a_stride / 2);
                let b0 = b.add(s * super::STEP_ELEMS);
                let b1 = b0.add(512);
                // Each operand is loaded just before its first product (rather than all four
                // loads first): a load then overlaps the products already issued, about 10%
                // faster on a loop of loads and products from L1 (Sapphire Rapids).
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c0h} + {sc}*1], tmm1",
                "tilestored [{c1} + {sc}*1], tmm2",
                "tilestored [{c1h} + {sc}*1], tmm3",
                c0 = in(reg) c,
                c0h = in(reg) c.add(16),
                c1 = in(reg) c1,
                c1h = in(reg) c1.add(16),
                sc = in(reg) c_stride,
                options(nostack)
            );
        }
    }
}

/// [`Bf16Linear::new`] or [`Bf16Linear::new_q8`] (tests).
#[cfg(test)]
type Pack = fn(&[f32], usize, usize, Option<&[f32]>) -> Result<Bf16Linear, String>;

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) * 1e-3).collect()
    }

    /// f64 reference on the bf16-rounded operands: the kernels' only other error is f32 summation.
    fn reference(x: &[f32], w: &[f32], bias: &[f32], rows: usize, n: usize, k: usize) -> Vec<f64> {
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        let mut y = vec![0f64; rows * n];
        for i in 0..rows {
            for o in 0..n {
                y[i * n + o] = bias[o] as f64 + (0..k).map(|j| r(x[i * k + j]) * r(w[o * k + j])).sum::<f64>();
            }
        }
        y
    }

    /// Which CPUs get which kernels: AVX-512 is enough (the weights widened to f32), AMX
    /// needs AVX512-BF16 and the tile state too, and the tile state is asked for only then.
    #[test]
    fn bf16_kernels_by_cpu_features() {
        let never = || -> bool { panic!("asked for the tile state") };
        assert!(choose(false, false, false, never).unwrap_err().contains("--dtype f32"));
        assert!(choose(false, true, true, never).is_err());
        // Skylake-SP to Ice Lake, Zen 4: AVX-512 without AMX.
        assert_eq!(choose(true, false, false, never), Ok(Bf16Isa::Avx512));
        assert_eq!(choose(true, true, false, never), Ok(Bf16Isa::Avx512));
        assert_eq!(choose(true, false, true, never), Ok(Bf16Isa::Avx512));
        // Sapphire Rapids and later, with and without the OS granting the tiles.
        assert_eq!(choose(true, true, true, || true), Ok(Bf16Isa::Amx));
        assert_eq!(choose(true, true, true, || false), Ok(Bf16Isa::Avx512));
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.0.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }

    /// Both kernels on shapes that are not multiples of the tiles, against the f64 sum of the
    /// bf16-rounded operands (f32 accumulation over k ≤ 1000 terms of size ≤ 1: well under 1e-3),
    /// and against the plain f32 product within the bf16 rounding bound.
    #[test]
    fn bf16_products_match_reference_on_awkward_shapes() {
        let Ok(isa) = support() else {
            eprintln!("skipped: {}", support().unwrap_err());
            return;
        };
        for (rows, n, k) in [(1, 1, 1), (3, 33, 35), (37, 70, 100), (65, 31, 577), (5, 130, 1000), (70, 96, 600)] {
            let (x, w, bias) = (data(rows * k, 1), data(n * k, 2), data(n, 3));
            let lin = Bf16Linear::new(&w, n, k, Some(&bias)).unwrap();
            let want = reference(&x, &w, &bias, rows, n, k);
            for decoding in [false, true] {
                let mut y = vec![0f32; rows * n];
                lin.forward_rows(&x, rows, &mut y, false, decoding);
                for (i, (&g, &e)) in y.iter().zip(&want).enumerate() {
                    assert!((g as f64 - e).abs() < 1e-3, "{isa:?} decoding={decoding} {rows}x{n}x{k} [{i}]: {g} vs {e}");
                    // bf16 keeps 8 bits: each operand is off by ≤ 2^-9 relative.
                    let exact: f64 = bias[i % n] as f64
                        + (0..k).map(|j| x[(i / n) * k + j] as f64 * w[(i % n) * k + j] as f64).sum::<f64>();
                    let bound: f64 = (0..k).map(|j| (x[(i / n) * k + j] * w[(i % n) * k + j]).abs() as f64).sum::<f64>();
                    assert!((g as f64 - exact).abs() <= bound / 128.0 + 1e-3, "{rows}x{n}x{k}: {g} vs exact {exact}");
                }
                let mut acc = vec![1f32; rows * n];
                lin.forward_rows(&x, rows, &mut acc, true, decoding);
                for (a, b) in acc.iter().zip(&y) {
                    assert!((a - 1.0 - b).abs() < 1e-5 * (1.0 + b.abs()), "accumulate adds to dst: {a} vs 1 + {b}");
                }
            }
        }
    }

    /// The int8 packing's products, both kernels, on shapes that are not multiples of the
    /// tiles: against the f64 sum over the dequantized weights (q · scale) and the
    /// bf16-rounded inputs (the AMX kernel also rounds q · scale to bf16: 2^-9 relative), and
    /// against the unquantized product within the quantization bound (each weight off by at
    /// most half its block's step, the block's largest |w| / 254, plus the f16 rounding of the
    /// step). It takes 1,088 bytes per 1,024 weights, against bf16's 2,048.
    #[test]
    fn q8_products_match_reference_on_awkward_shapes() {
        if support().is_err() {
            eprintln!("skipped: {}", support().unwrap_err());
            return;
        }
        for (rows, n, k) in [(1, 1, 1), (3, 33, 35), (37, 70, 100), (65, 31, 577), (5, 130, 1000), (70, 96, 600)] {
            let (x, mut w, bias) = (data(rows * k, 1), data(n * k, 2), data(n, 3));
            // An all-zero block and a block with one large weight beside small ones.
            w[..k.min(32)].fill(0.0);
            if n > 1 {
                w[k] = 3.0;
            }
            let lin = Bf16Linear::new_q8(&w, n, k, Some(&bias)).unwrap();
            assert!(lin.is_q8());
            assert_eq!(lin.weight_bytes(), n.div_ceil(32) * k.div_ceil(32) * 1088);
            // The dequantized weights and each block's largest |w|.
            let mut dq = vec![0f64; n * k];
            let mut amax = vec![0f64; n * k];
            for o in 0..n {
                for (b, block) in w[o * k..(o + 1) * k].chunks(32).enumerate() {
                    let (scale, q) = quantize_block(block, 127.0);
                    let m = block.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    for j in 0..block.len() {
                        dq[o * k + b * 32 + j] = q[j] as f64 * scale.to_f64();
                        amax[o * k + b * 32 + j] = m;
                    }
                }
            }
            let r = |v: f32| from_bf16(to_bf16(v)) as f64;
            for decoding in [false, true] {
                let mut y = vec![0f32; rows * n];
                lin.forward_rows(&x, rows, &mut y, false, decoding);
                for (i, &g) in y.iter().enumerate() {
                    let (row, o) = (i / n, i % n);
                    let xs = &x[row * k..(row + 1) * k];
                    let want: f64 = bias[o] as f64 + (0..k).map(|j| r(xs[j]) * dq[o * k + j]).sum::<f64>();
                    let mag: f64 = (0..k).map(|j| (r(xs[j]) * dq[o * k + j]).abs()).sum::<f64>();
                    assert!(
                        (g as f64 - want).abs() <= mag / 256.0 + 1e-3,
                        "decoding={decoding} {rows}x{n}x{k} [{i}]: {g} vs {want}"
                    );
                    let exact: f64 = bias[o] as f64 + (0..k).map(|j| xs[j] as f64 * w[o * k + j] as f64).sum::<f64>();
                    let bound: f64 = (0..k)
                        .map(|j| xs[j].abs() as f64 * (amax[o * k + j] / 254.0 * 1.01 + (w[o * k + j].abs() as f64) / 128.0))
                        .sum::<f64>();
                    assert!((g as f64 - exact).abs() <= bound + 1e-3, "{rows}x{n}x{k} [{i}]: {g} vs exact {exact}");
                }
                if decoding {
                    // The decoding kernel's only error besides the weights' is f32 summation.
                    for (i, &g) in y.iter().enumerate() {
                        let (row, o) = (i / n, i % n);
                        let want: f64 = bias[o] as f64 + (0..k).map(|j| r(x[row * k + j]) * dq[o * k + j]).sum::<f64>();
                        assert!((g as f64 - want).abs() < 1e-3, "{rows}x{n}x{k} [{i}]: {g} vs {want}");
                    }
                }
            }
        }
        // The large weight is kept, its block's small ones lose precision but stay bounded.
        let (scale, q) = quantize_block(&[3.0, 0.01, -0.02, 0.0], 127.0);
        assert_eq!(q[0], 127);
        assert!((q[0] as f32 * scale.to_f32() - 3.0).abs() < 3.0 / 1000.0);
        assert_eq!(quantize_block(&[0.0; 32], 127.0).1, [0i8; 32]);
        // Tiny weights get a subnormal f16 scale, rounded up: none is clamped, each is off by at
        // most half the scale.
        let tiny: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 3e-7).collect();
        let (scale, q) = quantize_block(&tiny, 127.0);
        assert!(scale.to_f32() >= 15.5 * 3e-7 / 127.0 && q.iter().all(|&v| v != i8::MIN));
        for (v, q) in tiny.iter().zip(q) {
            assert!((q as f32 * scale.to_f32() - v).abs() <= scale.to_f32() / 2.0 * 1.0001, "{v} -> {q}");
        }
        let err = Bf16Linear::new_q8(&[1.0, f32::NAN], 1, 2, None).err().unwrap();
        assert!(err.contains("out of the int8 packing's range"), "{err}");
    }

    /// `pack`'s k blocks (`qmax` as it quantizes) dequantized by `dequant` to bf16 tiles equal,
    /// bit for bit, [`Bf16Linear::new`]'s panels of the dequantized weights (q · scale, exact
    /// in f32, rounded to nearest-even bf16), on awkward shapes.
    fn assert_dequantized_tiles_are_bf16_panels(pack: Pack, qmax: f32, dequant: unsafe fn(*const u8, usize, *mut u16)) {
        for (n, k) in [(1, 1), (33, 35), (70, 100), (96, 600)] {
            let w = data(n * k, 7);
            let lin = pack(&w, n, k, None).unwrap();
            let mut dq = vec![0f32; n * k];
            for o in 0..n {
                for (b, block) in w[o * k..(o + 1) * k].chunks(32).enumerate() {
                    let (scale, q) = quantize_block(block, qmax);
                    for j in 0..block.len() {
                        dq[o * k + b * 32 + j] = q[j] as f32 * scale.to_f32();
                    }
                }
            }
            let want = Bf16Linear::new(&dq, n, k, None).unwrap();
            let (panels, steps, step_bytes) = (n.div_ceil(PANEL), lin.kp / KSTEP, lin.packing.step_bytes());
            let mut got = Aligned::zeroed(panels * steps * STEP_ELEMS);
            for p in 0..panels {
                // In two calls, as the AMX products' k blocks would: the first step, then the rest.
                for (s0, kn) in [(0, 1), (1, steps - 1)] {
                    // SAFETY: whole steps of panel p; room for kn steps at the destination.
                    unsafe {
                        let src = (lin.packed.as_ptr() as *const u8).add((p * steps + s0) * step_bytes);
                        dequant(src, kn, got.as_mut_ptr().add((p * steps + s0) * STEP_ELEMS));
                    }
                }
            }
            let len = panels * steps * STEP_ELEMS;
            // SAFETY: both buffers hold len elements.
            let (g, e) = unsafe { (std::slice::from_raw_parts(got.as_ptr(), len), std::slice::from_raw_parts(want.packed.as_ptr(), len)) };
            for (i, (a, b)) in g.iter().zip(e).enumerate() {
                assert_eq!(a, b, "{:?} {n}x{k} element {i}: dequantized {:e} vs {:e}", lin.packing, from_bf16(*a), from_bf16(*b));
            }
        }
    }

    /// What the AMX products multiply for an int8 layer: each k block dequantized to bf16
    /// tiles equals, bit for bit, the bf16 panels of its values. Runs wherever AVX512-BF16
    /// does, AMX or not.
    #[test]
    fn q8_dequantizes_to_the_bf16_panels_of_its_values() {
        if support().is_err() || !std::arch::is_x86_feature_detected!("avx512bf16") {
            eprintln!("skipped: no AVX512-BF16 here");
            return;
        }
        assert_dequantized_tiles_are_bf16_panels(Bf16Linear::new_q8, 127.0, dequantize_steps);
    }

    /// The 4-bit packing's products against references on awkward shapes. Where they run
    /// on the integer kernel (decoding, and everything without AMX) the only error besides
    /// the two quantizations is f32 summation, so they match an f64 product of the
    /// dequantized weights and the int8 rows within a few f32 roundings; with AMX (many rows)
    /// they match the bf16 product of the dequantized weights. Either way they stay within
    /// what the quantizations can move the exact product.
    #[test]
    fn q4_products_match_reference_on_awkward_shapes() {
        if support().is_err() || !vnni() {
            eprintln!("skipped: no AVX512-VNNI here");
            assert!(support().is_err() || Bf16Linear::new_q4(&[1.0], 1, 1, None).err().unwrap().contains("AVX512-VNNI"));
            return;
        }
        for (rows, n, k) in [(1, 1, 1), (3, 33, 35), (37, 70, 100), (65, 31, 577), (5, 130, 1000), (70, 96, 600)] {
            let (mut x, mut w, bias) = (data(rows * k, 1), data(n * k, 2), data(n, 3));
            // An all-zero block of weights, a large weight beside small ones, and a row block
            // with one large input.
            w[..k.min(32)].fill(0.0);
            if n > 1 {
                w[k] = 3.0;
            }
            x[k / 2] = -4.0;
            let lin = Bf16Linear::new_q4(&w, n, k, Some(&bias)).unwrap();
            assert_eq!(lin.packing(), Packing::Q4);
            assert_eq!(lin.weight_bytes(), n.div_ceil(32) * k.div_ceil(32) * 576);
            // Dequantized weights, their scales, and the rows as the integer kernel takes them.
            let (mut dq, mut sw) = (vec![0f64; n * k], vec![0f64; n * k]);
            for o in 0..n {
                for (b, block) in w[o * k..(o + 1) * k].chunks(32).enumerate() {
                    let (scale, q) = quantize_block(block, 7.0);
                    assert!(q.iter().all(|v| v.abs() <= 7));
                    for j in 0..block.len() {
                        dq[o * k + b * 32 + j] = q[j] as f64 * scale.to_f64();
                        sw[o * k + b * 32 + j] = scale.to_f64();
                    }
                }
            }
            let mut xq = Int8Rows::default();
            xq.quantize(&x, rows, k, lin.kp);
            let steps = lin.kp / 32;
            let xv = |row: usize, j: usize| xq.q[row * lin.kp + j] as f64 * xq.scale[row * steps + j / 32] as f64;
            let r = |v: f32| from_bf16(to_bf16(v)) as f64;
            for decoding in [false, true] {
                let integer = decoding || lin.isa != Bf16Isa::Amx;
                let mut y = vec![0f32; rows * n];
                lin.forward_rows(&x, rows, &mut y, false, decoding);
                for (i, &g) in y.iter().enumerate() {
                    let (row, o) = (i / n, i % n);
                    let xs = &x[row * k..(row + 1) * k];
                    let term = |j: usize| if integer { xv(row, j) * dq[o * k + j] } else { r(xs[j]) * dq[o * k + j] };
                    let want: f64 = bias[o] as f64 + (0..k).map(term).sum::<f64>();
                    let mag: f64 = bias[o].abs() as f64 + (0..k).map(|j| term(j).abs()).sum::<f64>();
                    let tol = if integer { mag * (steps + 3) as f64 * 1.2e-7 + 1e-6 } else { mag / 256.0 + 1e-3 };
                    assert!((g as f64 - want).abs() <= tol, "decoding={decoding} {rows}x{n}x{k} [{i}]: {g} vs {want}");
                    // What the quantizations can move the exact product: half a weight step
                    // times |x|, plus |ŵ| times the input's rounding (bf16's, 2^-9 relative,
                    // with a generous factor 2, then half an int8 step), plus their product.
                    let exact: f64 = bias[o] as f64 + (0..k).map(|j| xs[j] as f64 * w[o * k + j] as f64).sum::<f64>();
                    let bound: f64 = (0..k)
                        .map(|j| {
                            let bf16 = xs[j].abs() as f64 / 256.0;
                            let dx = if integer { xq.scale[row * steps + j / 32] as f64 / 2.0 + bf16 } else { bf16 };
                            xs[j].abs() as f64 * sw[o * k + j] / 2.0 + dq[o * k + j].abs() * dx + sw[o * k + j] * dx / 2.0
                        })
                        .sum::<f64>();
                    assert!((g as f64 - exact).abs() <= bound * 1.001 + 1e-4, "{rows}x{n}x{k} [{i}]: {g} vs exact {exact} (bound {bound})");
                }
            }
        }
        // 4 bits: the large weight is kept, and every weight is off by at most half the scale.
        let (scale, q) = quantize_block(&[3.0, 0.01, -0.02, -1.0], 7.0);
        assert_eq!(&q[..4], &[7, 0, 0, -2]);
        assert!(scale.to_f32() >= 3.0 / 7.0 && scale.to_f32() < 3.0 / 7.0 * 1.001);
        let tiny: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 3e-7).collect();
        let (scale, q) = quantize_block(&tiny, 7.0);
        for (v, q) in tiny.iter().zip(q) {
            assert!(q.abs() <= 7 && (q as f32 * scale.to_f32() - v).abs() <= scale.to_f32() / 2.0 * 1.0001, "{v} -> {q}");
        }
        let err = Bf16Linear::new_q4(&[1.0, 1e6], 1, 2, None).err().unwrap();
        assert!(err.contains("out of the 4-bit packing's range"), "{err}");
        // A NaN or an infinity among the inputs makes its row's outputs NaN, not a number.
        let lin = Bf16Linear::new_q4(&data(3 * 40, 4), 3, 40, None).unwrap();
        let mut x = data(2 * 40, 5);
        x[45] = f32::INFINITY;
        let mut y = vec![0f32; 6];
        lin.forward_rows(&x, 2, &mut y, false, true);
        assert!(y[..3].iter().all(|v| v.is_finite()) && y[3..].iter().all(|v| v.is_nan()), "{y:?}");
    }

    /// What the AMX products multiply for a 4-bit layer: as for int8, each k block
    /// dequantized to bf16 tiles equals the bf16 panels of q · scale, bit for bit.
    #[test]
    fn q4_dequantizes_to_the_bf16_panels_of_its_values() {
        if support().is_err() || !vnni() || !std::arch::is_x86_feature_detected!("avx512bf16") {
            eprintln!("skipped: no AVX512-BF16 and AVX512-VNNI here");
            return;
        }
        assert_dequantized_tiles_are_bf16_panels(Bf16Linear::new_q4, 7.0, dequantize_steps_q4);
    }

    /// The AMX attention against an f64 softmax attention on awkward shapes (sequence and head
    /// width not multiples of 32, two tiles, a key mask that hides the second tile's last keys):
    /// bf16 operands keep 8 bits, so outputs (weighted means of values of size <= 1) stay within 2e-2.
    #[test]
    fn amx_attention_matches_f64_softmax_attention() {
        if support() != Ok(Bf16Isa::Amx) {
            eprintln!("skipped: no AMX here");
            return;
        }
        for (tiles, seq, heads, hd) in [(1, 1, 1, 8), (2, 45, 3, 72), (1, 70, 2, 64), (2, 33, 2, 40)] {
            let e = heads * hd;
            let qkv = data(tiles * seq * 3 * e, 7);
            let mut mask = vec![0f32; tiles * seq];
            if tiles > 1 && seq > 4 {
                for m in &mut mask[tiles * seq - 3..] {
                    *m = f32::MIN;
                }
            }
            // Peaked rows (scores of a few units), so that a misplaced key or value shows.
            let scale = 1.0;
            let mut o = vec![f32::NAN; tiles * seq * e];
            let mut largest = 0f64;
            attention_amx(&qkv, &mut o, tiles, seq, heads, hd, Some(&mask), scale);
            for t in 0..tiles {
                for h in 0..heads {
                    for i in 0..seq {
                        let row = |j: usize, part: usize, d: usize| qkv[(t * seq + j) * 3 * e + part * e + h * hd + d] as f64;
                        let mut s: Vec<f64> = (0..seq)
                            .map(|j| (0..hd).map(|d| row(i, 0, d) * row(j, 1, d)).sum::<f64>() * scale as f64 + mask[t * seq + j] as f64)
                            .collect();
                        let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                        s.iter_mut().for_each(|v| *v = (*v - mx).exp());
                        let sum: f64 = s.iter().sum();
                        for d in 0..hd {
                            let want = (0..seq).map(|j| s[j] / sum * row(j, 2, d)).sum::<f64>();
                            let got = o[(t * seq + i) * e + h * hd + d];
                            largest = largest.max(want.abs());
                            assert!((got as f64 - want).abs() < 2e-2, "{tiles}x{seq} heads {heads} hd {hd}: [{t},{h},{i},{d}] {got} vs {want}");
                        }
                    }
                }
            }
            assert!(seq == 1 || largest > 0.3, "{tiles}x{seq}: outputs too flat to test ({largest})");
        }
    }

    /// The fused SwiGLU gives what its three steps give separately (gate/up product, silu · up,
    /// down product), bit for bit, on shapes with edge blocks: rows past one 128-row task and
    /// not a multiple of 32, an intermediate width of 5 panels (a partial panel group), k and
    /// outputs off the tiles, biases on both layers; and it declines widths it cannot tile.
    #[test]
    fn fused_swiglu_matches_the_separate_steps() {
        if support() != Ok(Bf16Isa::Amx) {
            eprintln!("skipped: no AMX here");
            return;
        }
        // bf16 weights, and the int8 and 4-bit packings as `--quantize q8|q4` build the text
        // model's MLPs.
        for ((rows, k, i, n), pack) in [(1, 40, 32, 8), (45, 100, 64, 70), (150, 70, 160, 33)]
            .into_iter()
            .flat_map(|s| [(s, Bf16Linear::new as Pack), (s, Bf16Linear::new_q8 as Pack), (s, Bf16Linear::new_q4 as Pack)])
        {
            let (x, wgu, wd) = (data(rows * k, 11), data(2 * i * k, 12), data(n * i, 13));
            let (bgu, bd) = (data(2 * i, 14), data(n, 15));
            let gu = pack(&wgu, 2 * i, k, Some(&bgu)).unwrap();
            let down = pack(&wd, n, i, Some(&bd)).unwrap();
            let mut h = vec![0f32; rows * 2 * i];
            gu.forward_rows(&x, rows, &mut h, false, false);
            let mut mid = vec![0f32; rows * i];
            for r in 0..rows {
                let row = &h[r * 2 * i..(r + 1) * 2 * i];
                crate::kernels::silu_mul(&row[..i], &row[i..], &mut mid[r * i..(r + 1) * i]);
            }
            let mut want = vec![0f32; rows * n];
            down.forward_rows(&mid, rows, &mut want, false, false);
            let mut got = vec![f32::NAN; rows * n];
            assert!(Bf16Linear::mlp_rows(&gu, &down, Act::SiluMul, &x, rows, &mut got, false), "{rows}x{k}x{i}x{n} declined");
            for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{rows}x{k}x{i}x{n} [{j}]: fused {a} vs separate {b}");
            }
        }
        let (gu, down) = (Bf16Linear::new(&data(40 * 8, 1), 40, 8, None).unwrap(), Bf16Linear::new(&data(4 * 20, 2), 4, 20, None).unwrap());
        assert!(!Bf16Linear::mlp_rows(&gu, &down, Act::SiluMul, &data(3 * 8, 3), 3, &mut [0f32; 12], false), "an intermediate of 20 is not tiled");
    }

    /// The fused GELU MLP as the vision encoder runs it (second product added to a residual)
    /// gives what fc1, gelu and fc2 give separately, bit for bit, including a width that is
    /// not a multiple of 32 (Idefics2's SigLIP: 4,304), whose last panel is partly padding.
    #[test]
    fn fused_gelu_mlp_matches_the_separate_steps() {
        if support() != Ok(Bf16Isa::Amx) {
            eprintln!("skipped: no AMX here");
            return;
        }
        for (rows, k, i, n) in [(3, 40, 32, 8), (150, 70, 100, 33), (45, 64, 144, 64)] {
            let (x, w1, w2) = (data(rows * k, 21), data(i * k, 22), data(n * i, 23));
            let fc1 = Bf16Linear::new(&w1, i, k, Some(&data(i, 24))).unwrap();
            let fc2 = Bf16Linear::new(&w2, n, i, Some(&data(n, 25))).unwrap();
            let mut h = vec![0f32; rows * i];
            fc1.forward_rows(&x, rows, &mut h, false, false);
            crate::kernels::gelu_tanh_inplace(&mut h);
            let residual = data(rows * n, 26);
            let mut want = residual.clone();
            fc2.forward_rows(&h, rows, &mut want, true, false);
            let mut got = residual.clone();
            assert!(Bf16Linear::mlp_rows(&fc1, &fc2, Act::GeluTanh, &x, rows, &mut got, true), "{rows}x{k}x{i}x{n} declined");
            for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{rows}x{k}x{i}x{n} [{j}]: fused {a} vs separate {b}");
            }
        }
    }

    /// A row's outputs are bit-identical whether it is computed alone or among others.
    #[test]
    fn bf16_rows_do_not_depend_on_the_batch() {
        if support().is_err() {
            return;
        }
        let (rows, n, k) = (45, 97, 200);
        let (x, w) = (data(rows * k, 4), data(n * k, 5));
        // 45 rows: the kernels take them eight, four and one at a time.
        let mut lins = vec![Bf16Linear::new(&w, n, k, None).unwrap(), Bf16Linear::new_q8(&w, n, k, None).unwrap()];
        if vnni() {
            lins.push(Bf16Linear::new_q4(&w, n, k, None).unwrap());
        }
        for lin in lins {
            for decoding in [false, true] {
                let mut all = vec![0f32; rows * n];
                lin.forward_rows(&x, rows, &mut all, false, decoding);
                for r in [0, 3, 31, 32, 44] {
                    let mut one = vec![0f32; n];
                    lin.forward_rows(&x[r * k..(r + 1) * k], 1, &mut one, false, decoding);
                    let same = one.iter().zip(&all[r * n..(r + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "row {r} differs alone (decoding={decoding}, {:?})", lin.packing);
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    /// The decoding kernel with 1, 4 and 8 rows over SmolVLM-256M MLP-sized layers, bf16 and
    /// int8 packings taking turns: 300 layers (1 GiB in bf16, 0.53 GiB in int8, well over the
    /// last-level cache, so the weights stream from memory as in a decode step over a large
    /// model), best of 5 per packing and row count.
    #[test]
    #[ignore]
    fn bf16_decode_rows() {
        if super::support().is_err() {
            return;
        }
        let (k, n) = (576, 3072);
        let layers: usize = std::env::var("QUIRE_DECODE_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
        let mut packs: Vec<(&str, super::Pack)> = vec![("bf16", super::Bf16Linear::new), ("q8", super::Bf16Linear::new_q8)];
        if super::vnni() {
            packs.push(("q4", super::Bf16Linear::new_q4));
        }
        let all: Vec<(&str, Vec<super::Bf16Linear>)> =
            packs.iter().map(|(name, p)| (*name, (0..layers).map(|_| p(&w, n, k, None).unwrap()).collect())).collect();
        for rows in [1usize, 4, 8] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let mut d = vec![0f32; rows * n];
            let mut best = vec![f64::MAX; all.len()];
            for _ in 0..5 {
                for (b, (_, lins)) in best.iter_mut().zip(&all) {
                    let t = std::time::Instant::now();
                    for l in lins {
                        l.forward_rows(&x, rows, &mut d, false, true);
                    }
                    *b = b.min(t.elapsed().as_secs_f64());
                }
            }
            for (b, (name, lins)) in best.iter().zip(&all) {
                let bytes = (layers * lins[0].weight_bytes()) as f64;
                println!("decode {name} {rows} rows x {layers} layers of {k}->{n}: {:.2} ms, {:.1} GB/s of weights", b * 1e3, bytes / b / 1e9);
            }
        }
    }

    /// The AMX attention's throughput on SmolVLM's (1,024 patches, 12 heads of 64) and
    /// Idefics2's (4,900 patches, 16 heads of 72) vision shapes, one tile (best of 5).
    #[test]
    #[ignore]
    fn amx_attention_gflops() {
        if super::support() != Ok(super::Bf16Isa::Amx) {
            return;
        }
        for (seq, heads, hd) in [(1024, 12, 64), (4900, 16, 72)] {
            let e = heads * hd;
            let qkv: Vec<f32> = (0..seq * 3 * e).map(|i| ((i % 29) as f32 - 14.0) * 0.01).collect();
            let mut o = vec![0f32; seq * e];
            let best = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    super::attention_amx(&qkv, &mut o, 1, seq, heads, hd, None, 0.125);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            let flop = 4.0 * (seq * seq * hd * heads) as f64;
            println!("attention {seq} x {heads} heads x {hd}: {:.1} ms, {:.0} GFLOP/s", best * 1e3, flop / best / 1e9);
        }
    }

    /// bf16 against f32 throughput on the vision encoder's and a text prefill's product shapes
    /// (run with --release --ignored --nocapture; best of 5, pool threads as set by RAYON_NUM_THREADS).
    #[test]
    #[ignore]
    fn bf16_gemm_gflops() {
        if super::support().is_err() {
            return;
        }
        // SigLIP-B/16 (SmolVLM), a SmolVLM text prefill, Idefics2's perceiver MLP (64 latents)
        // and modality projection (918 patches); QUIRE_GEMM_SHAPES="m,k,n;..." picks others.
        let mut shapes = vec![
            (1024, 768, 3072),
            (1024, 3072, 768),
            (1024, 768, 2304),
            (87, 576, 3072),
            (64, 4096, 16384),
            (64, 16384, 4096),
            (918, 1152, 28672),
            (918, 14336, 4096),
        ];
        if let Ok(v) = std::env::var("QUIRE_GEMM_SHAPES") {
            shapes = v
                .split(';')
                .map(|s| {
                    let d: Vec<usize> = s.split(',').map(|d| d.trim().parse().expect("QUIRE_GEMM_SHAPES: m,k,n;...")).collect();
                    (d[0], d[1], d[2])
                })
                .collect();
        }
        for (m, k, n) in shapes {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
            // With a bias, as every encoder and connector product has one.
            let bias: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.1).collect();
            let lin = super::Bf16Linear::new(&w, n, k, Some(&bias)).unwrap();
            let mut d = vec![0f32; m * n];
            let best = |f: &mut dyn FnMut()| {
                (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min)
            };
            let gf = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
            let f32s = best(&mut || crate::kernels::matmul_wt_cols(&x, &w, &mut d, m, k, n, false));
            let amx = best(&mut || lin.forward_rows(&x, m, &mut d, false, false));
            let dot = best(&mut || lin.forward_rows(&x, m, &mut d, false, true));
            println!(
                "{m}x{k}x{n}: f32 {:.0} GFLOP/s, bf16 {:?} {:.0} GFLOP/s ({:.1}x), bf16 without AMX (widened, FMA) {:.0} GFLOP/s",
                gf(f32s),
                lin.isa,
                gf(amx),
                f32s / amx,
                gf(dot)
            );
        }
    }
}
