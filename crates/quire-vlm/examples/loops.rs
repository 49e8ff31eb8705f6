//! Benchmark helper for `benches/vlm/loops.sh`: one workload of pages, some of whose outputs
//! loop, decoded with continuous batching under `--on-loop off` and under `stop`, in the same
//! process on the same loaded model, for several rounds (the modes take turns in every round,
//! so drift on a shared machine hits them alike).
//!
//! usage: loops CHECKPOINT_DIR IMAGE... [--prompts P1|P2|...] [--requests N] [--max-new N]
//!        [--batch N] [--rounds N] [--modes off,stop,retry] [--min-tokens N]
//!
//! Request i takes image i mod #images and prompt (i / #images) mod #prompts, so every
//! (image, prompt) pair comes up. Prints one JSON line per round and mode (seconds, pages/s,
//! tokens generated, pages stopped as loops, budget saved), then a summary line per mode with
//! the median and range of pages/s and tokens, and the ratios of the medians against `off`.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use quire_vlm::batcher::{Batcher, BatcherOptions};
use quire_vlm::engine::KvBudget;
use quire_vlm::{FinishReason, LoadOptions, LoopOptions, OnLoop, Request, Vlm};

struct Args {
    dir: String,
    images: Vec<String>,
    prompts: Vec<String>,
    requests: usize,
    max_new: usize,
    batch: usize,
    rounds: usize,
    modes: Vec<String>,
    min_tokens: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut pos = Vec::new();
    let mut a = Args {
        dir: String::new(),
        images: Vec::new(),
        prompts: vec!["Describe this image in one sentence.".into()],
        requests: 16,
        max_new: 1024,
        batch: 4,
        rounds: 3,
        modes: vec!["off".into(), "stop".into()],
        min_tokens: quire_vlm::loops::DEFAULT_LOOP_MIN_TOKENS,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--prompts" => a.prompts = val()?.split('|').map(String::from).collect(),
            "--requests" => a.requests = val()?.parse()?,
            "--max-new" => a.max_new = val()?.parse()?,
            "--batch" => a.batch = val()?.parse()?,
            "--rounds" => a.rounds = val()?.parse()?,
            "--modes" => a.modes = val()?.split(',').map(String::from).collect(),
            "--min-tokens" => a.min_tokens = val()?.parse()?,
            _ if arg.starts_with("--") => bail!("unknown option {arg}"),
            _ => pos.push(arg),
        }
    }
    if pos.len() < 2 || a.batch == 0 || a.rounds == 0 {
        bail!("usage: loops CHECKPOINT_DIR IMAGE... [--prompts P1|P2] [--requests N] [--max-new N] [--batch N] [--rounds N]");
    }
    a.dir = pos.remove(0);
    a.images = pos;
    Ok(a)
}

/// What one run of the workload did.
struct Outcome {
    seconds: f64,
    /// Tokens decoded, every attempt counted (a stopped page's cut tail included).
    generated: usize,
    looped: usize,
    saved: usize,
}

fn run(vlm: Vlm, reqs: &[Request], a: &Args) -> anyhow::Result<(Outcome, Vlm)> {
    let kv = KvBudget { bytes: 64 << 30, max_sequences: a.batch };
    let mut b = Batcher::new(vlm, BatcherOptions { kv, prefill_per_step: a.batch, prefill_tokens: 0, prep_threads: 0 });
    let t = Instant::now();
    for (i, r) in reqs.iter().enumerate() {
        b.submit(i as u64, r.clone());
    }
    let mut o = Outcome { seconds: 0.0, generated: 0, looped: 0, saved: 0 };
    while b.outstanding() > 0 {
        for (id, g) in b.step() {
            let g = g.map_err(|e| anyhow::anyhow!("request {id}: {e}"))?;
            match &g.loop_report {
                Some(r) => {
                    o.generated += r.attempts.iter().sum::<usize>();
                    o.saved += r.tokens_saved;
                }
                None => o.generated += g.tokens_out,
            }
            o.looped += usize::from(g.finish_reason == FinishReason::Loop);
        }
    }
    o.seconds = t.elapsed().as_secs_f64();
    Ok((o, b.into_inner()))
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let mut vlm = Vlm::load(std::path::Path::new(&a.dir), &LoadOptions { device: Device::Cpu, ..LoadOptions::default() })?;
    let images: Vec<image::DynamicImage> = a.images.iter().map(image::open).collect::<Result<_, _>>()?;
    let reqs: Vec<Request> = (0..a.requests)
        .map(|i| Request {
            image: images[i % images.len()].clone(),
            prompt: a.prompts[(i / images.len()) % a.prompts.len()].clone(),
            max_new_tokens: Some(a.max_new),
        })
        .collect();
    let options = |mode: &str| -> anyhow::Result<LoopOptions> {
        Ok(LoopOptions { on_loop: OnLoop::parse(mode)?, min_tokens: a.min_tokens, ..LoopOptions::default() })
    };
    // Warm-up: each mode once on two requests with a short budget.
    let warm: Vec<Request> = reqs.iter().take(2).map(|r| Request { max_new_tokens: Some(4), ..r.clone() }).collect();
    for m in &a.modes {
        vlm.set_loop_options(options(m)?)?;
        vlm = run(vlm, &warm, &a)?.1;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); a.modes.len()];
    let mut tokens: Vec<Vec<f64>> = vec![Vec::new(); a.modes.len()];
    for round in 0..a.rounds {
        for (k, m) in a.modes.iter().enumerate() {
            vlm.set_loop_options(options(m)?)?;
            let (o, back) = run(vlm, &reqs, &a)?;
            vlm = back;
            let rate = reqs.len() as f64 / o.seconds;
            rates[k].push(rate);
            tokens[k].push(o.generated as f64);
            println!(
                "{{\"round\":{round},\"on_loop\":\"{m}\",\"pages\":{},\"seconds\":{:.3},\"pages_per_s\":{rate:.3},\
                 \"tokens_generated\":{},\"pages_looped\":{},\"tokens_saved\":{}}}",
                reqs.len(),
                o.seconds,
                o.generated,
                o.looped,
                o.saved
            );
        }
    }
    let (base_rate, _, _) = stats(&rates[0]);
    let (base_tokens, _, _) = stats(&tokens[0]);
    for (k, m) in a.modes.iter().enumerate() {
        let (r, rlo, rhi) = stats(&rates[k]);
        let (t, tlo, thi) = stats(&tokens[k]);
        println!(
            "summary on_loop={m}: pages/s median {r:.3} (range {rlo:.3}-{rhi:.3}), x{:.2} of {}; tokens generated median {t:.0} (range {tlo:.0}-{thi:.0}), x{:.2} of {}",
            r / base_rate,
            a.modes[0],
            t / base_tokens,
            a.modes[0]
        );
    }
    Ok(())
}
