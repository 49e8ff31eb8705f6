//! Benchmark helper for `benches/vlm/bench.sh`: prefill ms per image and decode tokens/s.
//! usage: bench CHECKPOINT_DIR IMAGE NEW_TOKENS   (CPU, f32; prints one JSON line)

use std::time::Instant;

use quire_vlm::{LoadOptions, Request, Vlm};

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, image, new) = (&args[1], &args[2], args[3].parse::<usize>()?);
    let mut vlm = Vlm::load(std::path::Path::new(dir), &LoadOptions::default())?;
    let img = image::open(image)?;
    let req = |n| Request { image: img.clone(), prompt: "Convert this page to docling.".into(), max_new_tokens: Some(n) };
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
    let (tn, made, tin) = run(new)?;
    println!(
        "{}",
        serde_json::json!({"impl": "quire", "prefill_ms": t1 * 1e3, "decode_tok_s": (made - 1) as f64 / (tn - t1),
            "tokens_in": tin, "tokens_out": made, "peak_rss_mb": peak_rss_mb()})
    );
    Ok(())
}
