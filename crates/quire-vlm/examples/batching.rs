//! Benchmark helper for `benches/vlm/batching.sh` and `benches/gpu/check.sh`: one workload
//! of images with different output lengths, run one request at a time, in static batches
//! and with continuous batching, in the same process and on the same loaded model, for
//! several rounds (the modes take turns in every round, so drift on a shared machine hits
//! them alike).
//!
//! usage: batching CHECKPOINT_DIR IMAGE... [--device cpu|cuda] [--dtype f32|bf16|f16] [--quantize none|q8|q4]
//!        [--new 8,64,24,...] [--requests N] [--batch N] [--rounds N] [--modes one,static,continuous]
//!        [--prefill-tokens N] [--prep-threads N] [--decode-new N]
//!
//! Request i takes image i mod #images and `--new` value i mod #values as its length (the
//! checkpoint must never stop early, e.g. an EOS id the model never produces; `tokens_out`
//! shows what was generated). Static batches take `--batch` requests in order; continuous
//! batching keeps at most `--batch` sequences in flight, prefills at most `--prefill-tokens`
//! prompt positions per step (0: whole prompts) and prepares images on `--prep-threads`
//! threads ahead of the model (0: when needed, on the stepping thread). Prints one JSON line per round and
//! mode (seconds, pages/s, new tokens/s), then one summary line with each mode's median
//! pages/s and the ratios of the medians.
//!
//! `--decode-new N` (N > 0) adds the decode rate: per round, one request and then `--batch`
//! requests (the images in turn), all N new tokens, submitted at once to the continuous engine;
//! the phase timers give the decode steps' seconds and the tokens they made, so prefills and
//! image preparation are left out. Prints new tokens/s in decode for 1 and for `--batch`
//! sequences in flight (mean in flight per step beside it), their medians and the ratio.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use quire_vlm::batcher::{Batcher, BatcherOptions};
use quire_vlm::engine::KvBudget;
use quire_vlm::{LoadOptions, Quantize, Request, Vlm};

struct Args {
    dir: String,
    images: Vec<String>,
    device: String,
    dtype: String,
    quantize: String,
    new: Vec<usize>,
    requests: usize,
    batch: usize,
    rounds: usize,
    modes: Vec<String>,
    prefill_tokens: usize,
    prep_threads: usize,
    decode_new: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut pos = Vec::new();
    let mut a = Args {
        dir: String::new(),
        images: Vec::new(),
        device: "cpu".into(),
        dtype: "f32".into(),
        quantize: "none".into(),
        new: vec![8, 64, 24, 96, 16, 48],
        requests: 12,
        batch: 8,
        rounds: 3,
        modes: vec!["one".into(), "static".into(), "continuous".into()],
        prefill_tokens: 0,
        prep_threads: 0,
        decode_new: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--device" => a.device = val()?,
            "--dtype" => a.dtype = val()?,
            "--quantize" => a.quantize = val()?,
            "--new" => a.new = val()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--requests" => a.requests = val()?.parse()?,
            "--batch" => a.batch = val()?.parse()?,
            "--rounds" => a.rounds = val()?.parse()?,
            "--modes" => a.modes = val()?.split(',').map(String::from).collect(),
            "--prefill-tokens" => a.prefill_tokens = val()?.parse()?,
            "--prep-threads" => a.prep_threads = val()?.parse()?,
            "--decode-new" => a.decode_new = val()?.parse()?,
            _ if arg.starts_with("--") => bail!("unknown option {arg}"),
            _ => pos.push(arg),
        }
    }
    if pos.len() < 2 || a.new.is_empty() || a.batch == 0 {
        bail!("usage: batching CHECKPOINT_DIR IMAGE... [--new 8,64,...] [--requests N] [--batch N] [--rounds N]");
    }
    a.dir = pos.remove(0);
    a.images = pos;
    Ok(a)
}

/// Runs `reqs` in `mode`; returns (seconds, new tokens) and the model back.
fn run(vlm: Vlm, mode: &str, reqs: &[Request], a: &Args) -> anyhow::Result<(f64, usize, Vlm)> {
    run_batch(vlm, mode, reqs, a, a.batch)
}

/// [`run`] with at most `batch` sequences together.
fn run_batch(vlm: Vlm, mode: &str, reqs: &[Request], a: &Args, batch: usize) -> anyhow::Result<(f64, usize, Vlm)> {
    let t = Instant::now();
    let (tokens, vlm) = match mode {
        "one" | "static" => {
            let mut vlm = vlm;
            let n = if mode == "one" { 1 } else { batch };
            let mut tokens = 0;
            for chunk in reqs.chunks(n) {
                tokens += vlm.generate(chunk)?.iter().map(|g| g.tokens_out).sum::<usize>();
            }
            (tokens, vlm)
        }
        "continuous" => {
            let kv = KvBudget { bytes: 64 << 30, max_sequences: batch };
            let opts = BatcherOptions { kv, prefill_per_step: batch, prefill_tokens: a.prefill_tokens, prep_threads: a.prep_threads };
            let mut b = Batcher::new(vlm, opts);
            for (i, r) in reqs.iter().enumerate() {
                b.submit(i as u64, r.clone());
            }
            let mut tokens = 0;
            while b.outstanding() > 0 {
                for (id, g) in b.step() {
                    tokens += g.map_err(|e| anyhow::anyhow!("request {id}: {e}"))?.tokens_out;
                }
            }
            (tokens, b.into_inner())
        }
        m => bail!("unknown mode {m:?}"),
    };
    Ok((t.elapsed().as_secs_f64(), tokens, vlm))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => LoadOptions::cuda(0)?,
        d => bail!("unknown device {d:?}; use cpu or cuda"),
    };
    let opts = LoadOptions { device, dtype: LoadOptions::parse_dtype(&a.dtype)?, quantize: Quantize::parse(&a.quantize)? };
    let mut vlm = Vlm::load(std::path::Path::new(&a.dir), &opts)?;
    let images: Vec<image::DynamicImage> = a.images.iter().map(image::open).collect::<Result<_, _>>()?;
    let reqs: Vec<Request> = (0..a.requests)
        .map(|i| Request {
            image: images[i % images.len()].clone(),
            prompt: "Convert this page to docling.".into(),
            max_new_tokens: Some(a.new[i % a.new.len()]),
        })
        .collect();
    // Warm-up: every mode once on the last two requests (small images in the PAGES=1 mix),
    // two new tokens each.
    let warm: Vec<Request> = reqs.iter().rev().take(2).map(|r| Request { max_new_tokens: Some(2), ..r.clone() }).collect();
    for m in &a.modes {
        vlm = run(vlm, m, &warm, &a)?.2;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); a.modes.len()];
    for round in 0..a.rounds {
        for (k, m) in a.modes.iter().enumerate() {
            let (s, tokens, back) = run(vlm, m, &reqs, &a)?;
            vlm = back;
            rates[k].push(reqs.len() as f64 / s);
            println!(
                "{{\"round\":{round},\"mode\":\"{m}\",\"batch\":{},\"requests\":{},\"seconds\":{s:.3},\"pages_per_s\":{:.4},\"new_tokens\":{tokens},\"new_tokens_per_s\":{:.1}}}",
                a.batch,
                reqs.len(),
                reqs.len() as f64 / s,
                tokens as f64 / s
            );
        }
    }
    let meds: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    let spread: Vec<String> = rates
        .iter()
        .zip(&a.modes)
        .map(|(r, m)| format!("\"{m}\":[{:.4},{:.4}]", r.first().unwrap(), r.last().unwrap()))
        .collect();
    let med: Vec<String> = meds.iter().zip(&a.modes).map(|(v, m)| format!("\"{m}\":{v:.4}")).collect();
    let base = meds[0];
    let ratio: Vec<String> = meds.iter().zip(&a.modes).map(|(v, m)| format!("\"{m}\":{:.2}", v / base)).collect();
    println!(
        "{{\"summary\":true,\"median_pages_per_s\":{{{}}},\"min_max\":{{{}}},\"ratio_to_{}\":{{{}}}}}",
        med.join(","),
        spread.join(","),
        a.modes[0],
        ratio.join(",")
    );
    if a.decode_new > 0 {
        decode_rates(vlm, &images, &a)?;
    }
    Ok(())
}

/// The `--decode-new` figures: decode new tokens/s with one sequence and with `--batch` in flight.
fn decode_rates(mut vlm: Vlm, images: &[image::DynamicImage], a: &Args) -> anyhow::Result<()> {
    use quire_vlm::profile::{self, Stage};
    let sizes = [1, a.batch];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    for round in 0..a.rounds {
        for (k, &n) in sizes.iter().enumerate() {
            let reqs: Vec<Request> = (0..n)
                .map(|i| Request {
                    image: images[i % images.len()].clone(),
                    prompt: "Convert this page to docling.".into(),
                    max_new_tokens: Some(a.decode_new),
                })
                .collect();
            profile::reset();
            profile::set_enabled(true);
            let (_, tokens, back) = run_batch(vlm, "continuous", &reqs, a, n)?;
            profile::set_enabled(false);
            vlm = back;
            let d = profile::snapshot().into_iter().find(|t| t.stage == Stage::Decode).context("no decode stage timed")?;
            let rate = d.work.seqs as f64 / d.seconds;
            rates[k].push(rate);
            println!(
                "{{\"round\":{round},\"decode_in_flight\":{n},\"new_tokens\":{tokens},\"decode_steps\":{},\"mean_in_flight\":{:.2},\"decode_seconds\":{:.3},\"decode_new_tokens_per_s\":{rate:.1}}}",
                d.calls,
                d.work.seqs as f64 / d.calls.max(1) as f64,
                d.seconds
            );
        }
    }
    let ranges: Vec<(f64, f64)> = rates.iter().map(|r| (r.iter().cloned().fold(f64::MAX, f64::min), r.iter().cloned().fold(0.0, f64::max))).collect();
    let meds: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    println!(
        "{{\"summary\":\"decode\",\"median_new_tokens_per_s\":{{\"1\":{:.1},\"{}\":{:.1}}},\"min_max\":{{\"1\":[{:.1},{:.1}],\"{}\":[{:.1},{:.1}]}},\"ratio\":{:.2}}}",
        meds[0], a.batch, meds[1], ranges[0].0, ranges[0].1, a.batch, ranges[1].0, ranges[1].1, meds[1] / meds[0]
    );
    Ok(())
}
