//! Benchmark helper for `benches/vlm/bench.sh` and `benches/gpu/check.sh`.
//!
//! usage: bench CHECKPOINT_DIR IMAGE NEW_TOKENS [--device cpu|cuda] [--dtype f32|bf16|f16]
//!        [--quantize none|q8|q4] [--batch N] [--gemm DTYPES|none]
//!
//! Without `--batch` (what `benches/vlm/bench.sh` runs): one request at a time, prints one JSON
//! line with prefill ms per image and decode tokens/s. On the CPU the line also holds where the
//! time went and how close it came to the machine's limit:
//! - `phases`: the NEW_TOKENS run timed by [`quire_vlm::profile`] (image preparation, vision
//!   encoder, connector, text prefill, decode steps, each split into attention projections,
//!   attention, MLP, activation, `lm_head`, sampling and the rest), with each part's FLOPs
//!   counted from the model's config and the token counts of the run;
//! - `gemm`: a microbenchmark of the engine's own products on the engine's shapes for this
//!   checkpoint and image (vision encoder layers at its patch count, connector, text prefill at
//!   the prompt length, decode matrix-vector products and `lm_head`), each a linear layer built
//!   as the engine builds it ([`ParLinear::with_linears`]) for each dtype in DTYPES (default
//!   `f32,bf16`; `q8` and `q4` are the packings of `--quantize q8|q4`; a dtype the layer cannot run is
//!   reported with its error), plus the encoder's own product
//!   ([`quire_vlm::kernels::matmul_wt`]) on the vision shapes;
//! - `machine`: threads, the clock (from a dependent-FMA loop, and `/proc/cpuinfo`), the FMA
//!   peak measured with independent AVX-512 FMA chains, and the theoretical peak.
//!
//! `peak_rss_mb` is read before the microbenchmark, whose buffers would count otherwise.
//!
//! With `--batch N`: N copies of the page in one `generate` call, NEW_TOKENS each (the
//! checkpoint must force the length, e.g. `min_new_tokens` in its generation config, or rows
//! may stop early; `tokens_out_min` shows it). After a warm-up of 2 tokens, it times a 1-token
//! call (prefill, preprocessing included) and then the full call, and prints one JSON line:
//! seconds, pages/s and new tokens/s of the full call. Everything from the image to the token
//! ids is inside the timed region; loading the checkpoint is not.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use quire_vlm::linear::{Linears, ParLinear};
use quire_vlm::profile::{self, FlopModel, Part, Stage, StageTimes};
use quire_vlm::{FamilyModel, LoadOptions, Quantize, Request, Vlm};
use serde_json::{json, Value};

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Args {
    dir: String,
    image: String,
    new: usize,
    device: String,
    dtype: String,
    quantize: String,
    batch: Option<usize>,
    gemm: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut pos = Vec::new();
    let (mut device, mut dtype, mut batch, mut gemm) = ("cpu".to_string(), "f32".to_string(), None, "f32,bf16".to_string());
    let mut quantize = "none".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--device" => device = val()?,
            "--dtype" => dtype = val()?,
            "--quantize" => quantize = val()?,
            "--batch" => batch = Some(val()?.parse()?),
            "--gemm" => gemm = val()?,
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => pos.push(a),
        }
    }
    if pos.len() != 3 {
        bail!("usage: bench CHECKPOINT_DIR IMAGE NEW_TOKENS [--device cpu|cuda] [--dtype f32|bf16|f16] [--quantize none|q8|q4] [--batch N] [--gemm DTYPES|none]");
    }
    let gemm = if gemm == "none" { Vec::new() } else { gemm.split(',').map(str::to_string).collect() };
    Ok(Args { dir: pos[0].clone(), image: pos[1].clone(), new: pos[2].parse()?, device, dtype, quantize, batch, gemm })
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => LoadOptions::cuda(0)?,
        d => bail!("unknown device {d:?}; use cpu or cuda"),
    };
    let opts = LoadOptions { device, dtype: LoadOptions::parse_dtype(&a.dtype)?, quantize: Quantize::parse(&a.quantize)? };
    let t = Instant::now();
    let mut vlm = Vlm::load(std::path::Path::new(&a.dir), &opts)?;
    let load_s = t.elapsed().as_secs_f64();
    let img = image::open(&a.image)?;
    let req = |n| Request { image: img.clone(), prompt: "Convert this page to docling.".into(), max_new_tokens: Some(n) };
    let Some(b) = a.batch else {
        let mut run = |n| -> anyhow::Result<(f64, usize, usize)> {
            let t = Instant::now();
            let g = vlm.generate(&[req(n)])?.remove(0);
            Ok((t.elapsed().as_secs_f64(), g.tokens_out, g.tokens_in))
        };
        run(2)?; // warm-up
        let mut t1 = f64::MAX;
        for _ in 0..3 {
            t1 = t1.min(run(1)?.0);
        }
        // The full run is the profiled one (the timers cost a few clock reads per layer).
        let cpu = a.device == "cpu";
        profile::reset();
        profile::set_enabled(cpu);
        let (tn, made, tin) = run(a.new)?;
        profile::set_enabled(false);
        let stages = profile::snapshot();
        let rss = peak_rss_mb();
        // Decode rate: the decode steps' own time (the profile's step timers, each from a
        // step's embedding to its sampled token) where they ran, else the full run less the
        // best prefill. That difference of two large times swings with the prefill's noise:
        // with Idefics2's widths a 2 s prefill against 15 steps of ~15 ms.
        let wall = (made - 1) as f64 / (tn - t1);
        let steps = stages.iter().find(|s| s.stage == profile::Stage::Decode && s.calls > 0);
        let decode = steps.map_or(wall, |s| s.calls as f64 / s.seconds);
        let mut out = json!({"impl": "quire", "prefill_ms": t1 * 1e3, "decode_tok_s": decode, "decode_tok_s_wall": wall,
            "tokens_in": tin, "tokens_out": made, "peak_rss_mb": rss});
        if cpu {
            let model = flop_model(&mut vlm)?;
            let threads = candle_core::utils::get_num_threads().max(1);
            out["machine"] = machine(threads);
            out["phases"] = phases(&model, &stages, weight_bytes(&opts));
            let shapes = gemm_shapes(&model, &stages);
            drop(vlm);
            out["gemm"] = Value::Array(gemm_bench(&shapes, &a.gemm, threads));
        }
        println!("{out}");
        return Ok(());
    };
    let reqs = |n| (0..b).map(|_| req(n)).collect::<Vec<_>>();
    let t = Instant::now();
    vlm.generate(&reqs(2))?; // warm-up: kernels, cuBLAS handles, allocator
    let warm_s = t.elapsed().as_secs_f64();
    // Image preprocessing alone (CPU; part of prefill_s and seconds below).
    let t = Instant::now();
    if let Some(m) = vlm.as_idefics3() {
        m.prepare_all(&reqs(1))?;
    } else {
        vlm.as_idefics2().context("neither an Idefics3 nor an Idefics2 model")?.prepare_all(&reqs(1))?;
    }
    let prepare_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    vlm.generate(&reqs(1))?;
    let prefill_s = t.elapsed().as_secs_f64();
    // The batch's run is the profiled one on the CPU: its phases split a decode step of b
    // sequences as the one-sequence run splits one of one.
    let cpu = a.device == "cpu";
    profile::reset();
    profile::set_enabled(cpu);
    let t = Instant::now();
    let out = vlm.generate(&reqs(a.new))?;
    let secs = t.elapsed().as_secs_f64();
    profile::set_enabled(false);
    let stages = profile::snapshot();
    let made: usize = out.iter().map(|g| g.tokens_out).sum();
    let min_out = out.iter().map(|g| g.tokens_out).min().unwrap_or(0);
    let mut line = json!({"impl": "quire", "device": a.device, "dtype": a.dtype, "quantize": a.quantize, "batch": b, "new": a.new,
        "seconds": secs, "prepare_s": prepare_s, "pages_s": b as f64 / secs, "new_tok_s": made as f64 / secs,
        "prefill_s": prefill_s, "warmup_s": warm_s, "load_s": load_s,
        "tokens_in": out[0].tokens_in, "tokens_out_min": min_out, "peak_rss_mb": peak_rss_mb()});
    if cpu {
        let model = flop_model(&mut vlm)?;
        line["phases"] = phases(&model, &stages, weight_bytes(&opts));
    }
    println!("{line}");
    Ok(())
}

/// Bytes per weight of the text model's layers, which a decode step streams.
fn weight_bytes(opts: &LoadOptions) -> f64 {
    match opts.quantize {
        Quantize::Q8 => Q8_BYTES,
        Quantize::Q4 => Q4_BYTES,
        Quantize::None => opts.dtype.size_in_bytes() as f64,
    }
}

fn flop_model(vlm: &mut Vlm) -> anyhow::Result<FlopModel> {
    if let Some(m) = vlm.as_idefics3() {
        return Ok(FlopModel::idefics3(&m.config));
    }
    Ok(FlopModel::idefics2(&vlm.as_idefics2().context("neither an Idefics3 nor an Idefics2 model")?.config))
}

/// Each stage that ran: seconds, entries, FLOPs, and the same per part (plus the rest).
/// `weight_bytes`: bytes per weight as the engine holds them (the keys and values cached
/// are f32 in every dtype on the CPU).
fn phases(model: &FlopModel, stages: &[StageTimes], weight_bytes: f64) -> Value {
    let mut out = Vec::new();
    for st in stages.iter().filter(|s| s.calls > 0) {
        let f = model.flops(st.stage, &st.work);
        let mut parts = serde_json::Map::new();
        for p in Part::ALL {
            let (s, fl) = (st.parts[p as usize], f.get(p));
            if s > 0.0 || fl > 0.0 {
                parts.insert(p.name().into(), json!({"ms": s * 1e3, "gflop": fl * 1e-9}));
            }
        }
        parts.insert("rest".into(), json!({"ms": st.rest() * 1e3, "gflop": f.other * 1e-9}));
        let mut v = json!({"stage": st.stage.name(), "ms": st.seconds * 1e3, "calls": st.calls,
            "seqs": st.work.seqs, "rows": st.work.rows, "pairs": st.work.pairs, "gflop": f.total() * 1e-9, "parts": parts});
        if st.stage == Stage::Decode {
            // Bytes a step streams: every weight once, plus the keys and values it attends to.
            let bytes = model.decode_weight_elems() * st.calls as f64 * weight_bytes + model.kv_elems(&st.work) * 4.0;
            v["gbytes"] = json!(bytes * 1e-9);
        }
        out.push(v);
    }
    Value::Array(out)
}

/// One product of the microbenchmark: `rows` rows of `k` inputs to `n` outputs.
struct Shape {
    name: String,
    rows: usize,
    k: usize,
    n: usize,
    /// The vision encoder's own product (gemm threaded by gemm) is timed too.
    encoder: bool,
}

/// The engine's products for this model at the sizes of this run: rows per vision-encoder and
/// connector call and per prefill from the profile, one row per decode product.
fn gemm_shapes(m: &FlopModel, stages: &[StageTimes]) -> Vec<Shape> {
    let per_call = |s: Stage| {
        stages.iter().find(|x| x.stage == s && x.calls > 0).map(|x| x.work.rows / x.calls as usize)
    };
    let (v, t) = (&m.vision, &m.text);
    let (e, vi) = (v.hidden_size, v.intermediate_size);
    let (h, ti) = (t.hidden_size, t.intermediate_size);
    let qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim;
    let q = t.num_attention_heads * t.head_dim;
    let sh = |name: &str, rows, k, n, encoder| Shape { name: name.into(), rows, k, n, encoder };
    let mut out = Vec::new();
    if let Some(r) = per_call(Stage::Vision) {
        out.push(sh("vision qkv", r, e, 3 * e, true));
        out.push(sh("vision out", r, e, e, true));
        out.push(sh("vision fc1", r, e, vi, true));
        out.push(sh("vision fc2", r, vi, e, true));
    }
    if let Some(r) = per_call(Stage::Connector) {
        match &m.connector {
            profile::ConnectorShape::PixelShuffle { scale } => {
                out.push(sh("connector proj", r / (scale * scale), e * scale * scale, h, false))
            }
            profile::ConnectorShape::Perceiver { intermediate, .. } => {
                out.push(sh("modality gate_up", r, e, 2 * intermediate, false));
                out.push(sh("modality down", r, *intermediate, h, false));
            }
        }
    }
    if let Some(r) = per_call(Stage::Prefill) {
        out.push(sh("prefill qkv", r, h, qkv, false));
        out.push(sh("prefill o", r, q, h, false));
        out.push(sh("prefill gate_up", r, h, 2 * ti, false));
        out.push(sh("prefill down", r, ti, h, false));
    }
    out.push(sh("decode qkv", 1, h, qkv, false));
    out.push(sh("decode o", 1, q, h, false));
    out.push(sh("decode gate_up", 1, h, 2 * ti, false));
    out.push(sh("decode down", 1, ti, h, false));
    out.push(sh("decode lm_head", 1, h, t.vocab_size, false));
    out
}

/// Deterministic values in [-0.5, 0.5).
fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Best and median seconds of `f`, after one warm-up call, over at least 3 calls and 0.3 s
/// (at most 1000 calls).
fn time(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(f64, f64)> {
    f()?;
    let start = Instant::now();
    let mut ts = Vec::new();
    while ts.len() < 3 || (start.elapsed().as_secs_f64() < 0.3 && ts.len() < 1000) {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok((ts[0], ts[ts.len() / 2]))
}

fn row(kernel: &str, dtype: &str, s: &Shape, timed: anyhow::Result<(f64, f64)>, wbytes: f64) -> Value {
    let mut v = json!({"shape": s.name, "kernel": kernel, "dtype": dtype, "m": s.rows, "k": s.k, "n": s.n});
    match timed {
        Ok((best, median)) => {
            let flop = 2.0 * (s.rows * s.k * s.n) as f64;
            v["ms"] = json!(median * 1e3);
            v["gflop_s"] = json!(flop / best * 1e-9);
            v["gflop_s_median"] = json!(flop / median * 1e-9);
            // Weights streamed once per call (what bounds a matrix-vector product).
            v["gb_s"] = json!((s.n * s.k) as f64 * wbytes / best * 1e-9);
        }
        Err(e) => v["error"] = json!(format!("{e:#}")),
    }
    v
}

/// Bytes of weights a matrix-vector row of the microbenchmark streams per round: over 3× the
/// 300 MiB last-level cache some hosts report, so that the rows measure memory, as a decode
/// step over a whole model does, and not a cache holding one layer between calls.
const STREAM_BYTES: usize = 1 << 30;

/// Bytes per weight of the int8 packing (`--quantize q8`): one, plus an f16 scale per 32.
const Q8_BYTES: f64 = 1.0625;
/// Bytes per weight of the 4-bit packing (`--quantize q4`): a half, plus an f16 scale per 32.
const Q4_BYTES: f64 = 0.5625;

/// A linear layer of `dtype` as the engine builds it ([`ParLinear::with_linears`] over the
/// checkpoint's f32 weight: at bf16 on the CPU the weight is packed once in bf16, at "q8" ("q4") in
/// int8 (4 bits) with block scales) and calls it, on f32 activations. One row (a decode product):
/// enough copies of the layer to fill [`STREAM_BYTES`], called in turn, the time being per call.
fn bench_par_linear(s: &Shape, dtype: &str) -> Value {
    let linears = match dtype {
        "q8" => Ok(Linears::Q8),
        "q4" => Ok(Linears::Q4),
        _ => LoadOptions::parse_dtype(dtype).map(Linears::Dtype),
    };
    let bytes = match &linears {
        Ok(Linears::Q8) => Q8_BYTES,
        Ok(Linears::Q4) => Q4_BYTES,
        Ok(Linears::Dtype(d)) => d.size_in_bytes() as f64,
        Err(_) => 4.0,
    };
    let timed = (|| -> anyhow::Result<(f64, f64)> {
        let linears = linears?;
        let w = Tensor::from_vec(fill(s.n * s.k, 1), (s.n, s.k), &Device::Cpu)?;
        let copies = if s.rows == 1 { (STREAM_BYTES as f64 / ((s.n * s.k) as f64 * bytes)).ceil() as usize } else { 1 };
        // Each copy in memory of its own (an f32 layer keeps the tensor it is given).
        let lins = (0..copies)
            .map(|_| ParLinear::with_linears(Linear::new(w.copy()?, None), linears))
            .collect::<candle_core::Result<Vec<_>>>()?;
        drop(w);
        let x = Tensor::from_vec(fill(s.rows * s.k, 2), (1, s.rows, s.k), &Device::Cpu)?;
        let (best, median) = time(|| {
            for lin in &lins {
                lin.forward(&x)?;
            }
            Ok(())
        })?;
        Ok((best / copies as f64, median / copies as f64))
    })();
    row("ParLinear", dtype, s, timed, bytes)
}

/// The vision encoder's product: [`quire_vlm::kernels::matmul_wt`] on `threads` threads.
fn bench_encoder(s: &Shape, threads: usize) -> Value {
    let (x, w) = (fill(s.rows * s.k, 2), fill(s.n * s.k, 1));
    let mut d = vec![0f32; s.rows * s.n];
    let timed = time(|| {
        quire_vlm::kernels::matmul_wt(&x, &w, &mut d, s.rows, s.k, s.n, true, threads);
        Ok(())
    });
    row("encoder matmul_wt", "f32", s, timed, 4.0)
}

fn gemm_bench(shapes: &[Shape], dtypes: &[String], threads: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for s in shapes {
        if s.encoder && !dtypes.is_empty() {
            out.push(bench_encoder(s, threads));
        }
        for d in dtypes {
            out.push(bench_par_linear(s, d));
        }
    }
    out
}

/// Threads, clock and FMA peaks of this machine.
fn machine(threads: usize) -> Value {
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_string());
    let mut v = json!({"threads": threads, "cpuinfo_mhz": mhz, "cpu": model});
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        let ghz = fma::clock_ghz();
        let one = fma::peak_gflops(1);
        let all = fma::peak_gflops(threads);
        // 2 FMA units × 16 f32 lanes × 2 FLOPs per cycle and core.
        v["clock_ghz"] = json!(ghz);
        v["fma_gflops_1_thread"] = json!(one);
        v["fma_gflops"] = json!(all);
        v["flop_per_cycle_1_thread"] = json!(one / ghz);
        v["theoretical_gflops"] = json!(threads as f64 * ghz * 64.0);
        v["stream_gb_s"] = json!(fma::read_gb_s(threads, STREAM_BYTES));
    }
    if let Ok(isa) = quire_vlm::bf16::support() {
        v["bf16_isa"] = json!(format!("{isa:?}"));
        if let (quire_vlm::bf16::Bf16Isa::Amx, Some(ghz)) = (isa, v["clock_ghz"].as_f64()) {
            // tdpbf16ps: 16 × 16 outputs × 32 products × 2 FLOPs every 16 cycles per core.
            v["amx_theoretical_gflops"] = json!(threads as f64 * ghz * 1024.0);
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;
    use std::time::Instant;

    /// `iters` rounds of `CHAINS` independent AVX-512 FMA chains (CHAINS = 1: one dependent chain).
    #[target_feature(enable = "avx512f")]
    unsafe fn chains<const CHAINS: usize>(iters: u64) -> f32 {
        // Opaque inputs: the loop must run, not be folded at compile time.
        let mut acc = [_mm512_set1_ps(std::hint::black_box(1.0)); CHAINS];
        let (a, b) = (_mm512_set1_ps(std::hint::black_box(0.999_999)), _mm512_set1_ps(std::hint::black_box(1e-7)));
        for _ in 0..std::hint::black_box(iters) {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for r in acc {
            s = _mm512_add_ps(s, r);
        }
        _mm512_reduce_add_ps(s)
    }

    fn best_of(runs: usize, f: impl Fn() -> f32) -> f64 {
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }

    /// Clock in GHz from one dependent FMA chain (4 cycles of latency per FMA on Intel cores
    /// since Skylake).
    pub fn clock_ghz() -> f64 {
        const N: u64 = 50_000_000;
        // SAFETY: called only where avx512f is detected.
        let s = best_of(3, || unsafe { chains::<1>(N) });
        N as f64 * 4.0 / s * 1e-9
    }

    /// Sum of `x` with 8 independent AVX-512 accumulators (a read of every line, nothing else).
    #[target_feature(enable = "avx512f")]
    unsafe fn sum(x: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 8];
        let chunks = x.chunks_exact(128);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: c holds 128 values, j * 16 + 16 <= 128.
                *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(c.as_ptr().add(j * 16)) });
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s) + tail
    }

    /// GB/s of `threads` threads reading their share of `bytes` of memory at once (best of 3):
    /// the bandwidth a decode step, which streams every weight once, is bounded by.
    pub fn read_gb_s(threads: usize, bytes: usize) -> f64 {
        let buf = vec![1f32; bytes / 4];
        let share = buf.len().div_ceil(threads);
        let s = best_of(3, || {
            std::thread::scope(|sc| {
                // SAFETY: called only where avx512f is detected.
                let hs: Vec<_> = buf.chunks(share).map(|c| sc.spawn(move || unsafe { sum(c) })).collect();
                hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            })
        });
        bytes as f64 / s * 1e-9
    }

    /// f32 GFLOP/s of 16 independent FMA chains on each of `threads` threads at once.
    pub fn peak_gflops(threads: usize) -> f64 {
        const N: u64 = 10_000_000;
        let s = best_of(3, || {
            std::thread::scope(|sc| {
                // SAFETY: called only where avx512f is detected.
                let hs: Vec<_> = (0..threads).map(|_| sc.spawn(|| unsafe { chains::<16>(N) })).collect();
                hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            })
        });
        (threads as u64 * N * 16 * 16 * 2) as f64 / s * 1e-9
    }
}
