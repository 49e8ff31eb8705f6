//! Resolving and loading `--model`.

use crate::cli::{BatchingArg, DtypeArg, ModelOpts, OnLoopArg, QuantizeArg};
use quire_pipeline::stage::infer::{BatchObserver, BatchOptions, EngineObserver};
use quire_pipeline::stage::vlm::{EngineOptions, VlmGenerator};
use quire_pipeline::InferenceHandle;
use std::time::Instant;

/// Resolves the model reference `local` (a folder or hub id) to a local
/// folder, loads it under the name `spec`, and starts the inference thread.
/// Returns the handle and the long side the model's processor wants pages
/// rendered at.
pub fn load(
    spec: &str,
    local: &str,
    args: &ModelOpts,
    observe: Option<BatchObserver>,
    engine_observe: Option<EngineObserver>,
) -> anyhow::Result<(InferenceHandle, Option<u32>)> {
    let dtype = match args.dtype {
        DtypeArg::F32 => "f32",
        DtypeArg::Bf16 => "bf16",
        DtypeArg::F16 => "f16",
    };
    let t0 = Instant::now();
    let dir = quire_vlm::resolve_model_dir(local)?;
    let engine = EngineOptions {
        static_batches: args.batching == BatchingArg::Static,
        kv_cache_mb: args.kv_cache_mb,
        max_sequences: args.max_sequences.map(|n| n as usize),
        loops: quire_vlm::LoopOptions {
            on_loop: match args.on_loop {
                OnLoopArg::Stop => quire_vlm::OnLoop::Stop,
                OnLoopArg::Retry => quire_vlm::OnLoop::Retry,
                OnLoopArg::Off => quire_vlm::OnLoop::Off,
            },
            max_period: args.loop_max_period as usize,
            min_tokens: args.loop_min_tokens as usize,
            retry_penalty: args.loop_retry_penalty,
        },
    };
    let quantize = match args.quantize {
        QuantizeArg::None => quire_vlm::Quantize::None,
        QuantizeArg::Q8 => quire_vlm::Quantize::Q8,
        QuantizeArg::Q4 => quire_vlm::Quantize::Q4,
    };
    let model = VlmGenerator::load(spec, &dir, &args.device, dtype, quantize, engine)?;
    let long_side = model.input_long_side();
    tracing::info!("loaded model {spec} in {:.1}s", t0.elapsed().as_secs_f64());
    let opts = BatchOptions { max_batch: args.batch_size as usize, ..BatchOptions::default() };
    Ok((InferenceHandle::start_with(Box::new(model), opts, observe, engine_observe), long_side))
}
