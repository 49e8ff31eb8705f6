//! Benchmark helper for `benches/vlm/bench.sh` and `benches/gpu/check.sh`.
//!
//! usage: bench CHECKPOINT_DIR IMAGE NEW_TOKENS [--device cpu|cuda] [--dtype f32|bf16|f16] [--batch N]
//!
//! Without `--batch` (what `benches/vlm/bench.sh` runs): one request at a time, prints one JSON
//! line with prefill ms per image and decode tokens/s.
//!
//! With `--batch N`: N copies of the page in one `generate` call, NEW_TOKENS each (the
//! checkpoint must force the length, e.g. `min_new_tokens` in its generation config, or rows
//! may stop early; `tokens_out_min` shows it). After a warm-up of 2 tokens, it times a 1-token
//! call (prefill, preprocessing included) and then the full call, and prints one JSON line:
//! seconds, pages/s and new tokens/s of the full call. Everything from the image to the token
//! ids is inside the timed region; loading the checkpoint is not.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use quire_vlm::{FamilyModel, LoadOptions, Request, Vlm};

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
    batch: Option<usize>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut pos = Vec::new();
    let (mut device, mut dtype, mut batch) = ("cpu".to_string(), "f32".to_string(), None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--device" => device = val()?,
            "--dtype" => dtype = val()?,
            "--batch" => batch = Some(val()?.parse()?),
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => pos.push(a),
        }
    }
    if pos.len() != 3 {
        bail!("usage: bench CHECKPOINT_DIR IMAGE NEW_TOKENS [--device cpu|cuda] [--dtype f32|bf16|f16] [--batch N]");
    }
    Ok(Args { dir: pos[0].clone(), image: pos[1].clone(), new: pos[2].parse()?, device, dtype, batch })
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => LoadOptions::cuda(0)?,
        d => bail!("unknown device {d:?}; use cpu or cuda"),
    };
    let opts = LoadOptions { device, dtype: LoadOptions::parse_dtype(&a.dtype)? };
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
        let (tn, made, tin) = run(a.new)?;
        println!(
            "{}",
            serde_json::json!({"impl": "quire", "prefill_ms": t1 * 1e3, "decode_tok_s": (made - 1) as f64 / (tn - t1),
                "tokens_in": tin, "tokens_out": made, "peak_rss_mb": peak_rss_mb()})
        );
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
    let t = Instant::now();
    let out = vlm.generate(&reqs(a.new))?;
    let secs = t.elapsed().as_secs_f64();
    let made: usize = out.iter().map(|g| g.tokens_out).sum();
    let min_out = out.iter().map(|g| g.tokens_out).min().unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({"impl": "quire", "device": a.device, "dtype": a.dtype, "batch": b, "new": a.new,
            "seconds": secs, "prepare_s": prepare_s, "pages_s": b as f64 / secs, "new_tok_s": made as f64 / secs,
            "prefill_s": prefill_s, "warmup_s": warm_s, "load_s": load_s,
            "tokens_in": out[0].tokens_in, "tokens_out_min": min_out, "peak_rss_mb": peak_rss_mb()})
    );
    Ok(())
}
