//! quire-vlm: vision-language models on candle, token-exact against Hugging Face `transformers`.
//!
//! Loads a local Hugging Face checkpoint folder ([`Vlm::load`]) and turns (image, prompt)
//! requests into text with batched greedy decoding ([`Vlm::generate`]). The family is picked
//! from `config.json` (`model_type` / `architectures`): Idefics3 (SmolVLM, SmolDocling,
//! Granite-Docling, Idefics3-8B) or Idefics2 (Idefics2-8B and its -base and -chatty
//! variants). The families share the SigLIP encoder ([`siglip`]), the Llama/Mistral decoder
//! ([`text_model`]) and the generation loop ([`engine`]); each family module holds only its
//! processor, patch rule and connector ([`family::FamilyModel`]). A new family is a module
//! next to [`idefics3`] implementing [`family`]'s traits, plus one arm in [`Vlm::load`] and
//! in the [`Processor`] and [`Prepared`] enums.
//!
//! Model locations: [`resolve_model_dir`] takes a local folder or a hub id; `s3://` prefixes
//! are downloaded by the caller. Failures are [`Error`]s, by where they happened.

// The CPU kernels and model layers take their shapes and buffers as plain arguments, as the
// math they mirror does; bundling them into structs would only rename them.
#![allow(clippy::too_many_arguments)]

pub mod batcher;
pub mod bf16;
pub mod checkpoint;
pub mod config;
pub mod engine;
mod error;
pub mod family;
pub mod frames;
pub mod generation;
pub mod idefics2;
pub mod idefics3;
pub mod kernels;
pub mod linear;
pub mod loops;
pub mod par;
pub mod pil;
pub mod profile;
pub mod prompt;
pub mod siglip;
pub mod text_model;
pub mod weights;

use std::path::Path;

use error::bail;
pub use error::{Error, Result};
pub use candle_core::{DType, Device};

/// Bytes of memory free on a GPU `device` now (None on the CPU or when unknown).
pub fn device_free_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        d.cuda_stream().context().bind_to_thread().ok()?;
        return mem_get_info().ok().map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

pub use checkpoint::{resolve_model_dir, Checkpoint};
pub use family::{FamilyModel, FamilyProcessor, PreparedInput};
use family::AnyFamily;
pub use generation::{GenerationConfig, DEFAULT_MAX_NEW_TOKENS};
pub use loops::{LoopOptions, LoopReport, OnLoop};

/// Where and in which precision to run the model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// The text model's linear layers in int8 or 4 bits ([`Quantize`], CPU) or as `dtype`.
    pub quantize: Quantize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, dtype: DType::F32, quantize: Quantize::None }
    }
}

/// Weight quantization (`--quantize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quantize {
    /// Every weight in the model's dtype.
    #[default]
    None,
    /// The text model's linear layers (`lm_head` included) in int8 with an f16 scale per
    /// output and 32 inputs (llama.cpp's `q8_0` blocks), quantized at load; CPU only. Their
    /// products run on the bf16 kernels ([`crate::bf16`]); decoding, which reads every weight
    /// once per token, reads about half the bytes of bf16.
    Q8,
    /// The same layers in 4 bits with the same blocks and scales (0.56 bytes a weight; like
    /// llama.cpp's `q4_0` but with 15 levels, ±7 steps, and the scale rounded up so nothing
    /// clamps); CPU with AVX512-VNNI only. Without AMX their products quantize the inputs to
    /// int8 per row and block of 32 and run on integer dot products.
    Q4,
}

impl Quantize {
    /// Parses "none", "q8" (also "q8_0") or "q4" (also "q4_0").
    pub fn parse(s: &str) -> Result<Quantize> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" | "" => Quantize::None,
            "q8" | "q8_0" | "int8" => Quantize::Q8,
            "q4" | "q4_0" | "int4" => Quantize::Q4,
            other => bail!(Invalid, "unknown quantization {other:?}; use none, q8 or q4"),
        })
    }
}

impl LoadOptions {
    /// Parses "f32", "bf16" or "f16".
    pub fn parse_dtype(s: &str) -> Result<DType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => bail!(Invalid, "unknown dtype {other:?}; use f32, bf16 or f16"),
        })
    }

    /// CUDA device `ordinal` when built with the `cuda` feature, else an error.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        if cfg!(feature = "cuda") {
            Device::new_cuda(ordinal).map_err(|e| Error::Invalid(cuda_open_error(ordinal, &e)))
        } else {
            bail!(Invalid, "quire-vlm was built without the `cuda` feature; rebuild with --features cuda or use the CPU")
        }
    }
}

/// What a worker prints when it cannot open GPU `ordinal`: candle's error without its
/// backtrace, what it means and what to check. The usual causes on a cluster are a Pod
/// without the NVIDIA container toolkit's mounts (no libcuda.so.1, or the build's stub
/// library in its place) and a driver older than the CUDA version quire was built for.
fn cuda_open_error(ordinal: usize, e: &candle_core::Error) -> String {
    let cause = match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.to_string(),
        other => other.to_string(),
    };
    let hint = if cause.contains("CUDA_ERROR_STUB_LIBRARY") {
        "the libcuda.so.1 this process loaded is a stub library, not the NVIDIA driver's: \
         run on a GPU node whose container runtime mounts the driver (NVIDIA container toolkit)"
    } else if cause.contains("CUDA_ERROR_NO_DEVICE") || cause.contains("CUDA_ERROR_INVALID_DEVICE") {
        "no such GPU is visible to this process: check NVIDIA_VISIBLE_DEVICES or the Pod's \
         nvidia.com/gpu request, and the ordinal in --device"
    } else if cause.contains("CUDA_ERROR_INSUFFICIENT_DRIVER") || cause.contains("CUDA_ERROR_COMPAT") {
        "the node's NVIDIA driver is older than the CUDA version quire was built for \
         (CUDA 13.0 needs driver 580 or later)"
    } else {
        "check that the NVIDIA driver is loaded on this node (nvidia-smi) and visible in the container"
    };
    format!("cuda:{ordinal}: cannot open the GPU ({cause}): {hint}; or run on the CPU with --device cpu")
}

/// Makes glibc's malloc keep freed tensor buffers for reuse (CPU inference allocates and frees
/// same-sized multi-MiB buffers for every op): allocations up to 32 MiB come from the heap
/// instead of fresh `mmap`s, and the heap is not trimmed below 512 MiB of free space. Without
/// this, page faults on new buffers cost ~15% of a CPU prefill. Called by [`Vlm::load`] for
/// CPU devices; process-wide and idempotent; a no-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only adjusts allocator tunables; called once, before heavy allocation.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 512 << 20);
            }
        });
    }
}

/// Model family, with the checkpoint's product name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Family {
    /// Idefics3 architecture; the string is e.g. "SmolVLM", "SmolDocling", "Granite-Docling", "Idefics3".
    Idefics3(String),
    /// Idefics2 architecture (Idefics2-8B, -base, -chatty); the string is "Idefics2".
    Idefics2(String),
}

impl Family {
    pub fn variant(&self) -> &str {
        match self {
            Family::Idefics3(v) | Family::Idefics2(v) => v,
        }
    }
}

/// What a default prompt asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Ocr,
    Caption,
}

/// One image with its instruction.
#[derive(Clone, Debug)]
pub struct Request {
    pub image: image::DynamicImage,
    pub prompt: String,
    /// Most new tokens; `None`: the checkpoint's generation config decides (`max_new_tokens`,
    /// else `max_length` minus the prompt, else [`DEFAULT_MAX_NEW_TOKENS`]).
    pub max_new_tokens: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id was produced (it is the last of `token_ids`).
    Stop,
    /// The length limit was reached (`max_new_tokens` or the generation config's default).
    Length,
    /// The newest tokens repeated one period past the loop limits (see [`loops`]); the
    /// repeated tail is cut to one period.
    Loop,
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// Decoded new tokens, special tokens skipped.
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Prompt tokens including image tokens.
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub finish_reason: FinishReason,
    /// This request's share of the model's busy time, in ms: its batch's time divided by
    /// the batch's requests, or under continuous batching its encoding and prefill plus
    /// each decode step's time divided by that step's sequences.
    pub device_ms: f64,
    /// Set when a loop was found in this page's decoding (also when a retry then ended
    /// without one).
    pub loop_report: Option<LoopReport>,
}

impl Generation {
    /// The page's result after a retry: `second` (decoded with a repetition penalty because
    /// `first` looped) when it did not loop or kept fewer tokens, else `first`; the report
    /// lists both attempts.
    pub fn after_retry(first: Generation, second: Generation) -> Generation {
        let first_report = first.loop_report.clone().unwrap_or_else(|| LoopReport {
            period: 0,
            attempts: vec![first.tokens_out],
            tokens_saved: 0,
            looped: false,
        });
        let second_attempt = second.loop_report.as_ref().map_or(second.tokens_out, |r| r.attempts[0]);
        let second_saved = second.loop_report.as_ref().map_or(0, |r| r.tokens_saved);
        let keep_second = second.finish_reason != FinishReason::Loop || second.tokens_out < first.tokens_out;
        let mut kept = if keep_second { second } else { first };
        let looped = kept.finish_reason == FinishReason::Loop;
        let period = kept.loop_report.as_ref().map_or(first_report.period, |r| r.period);
        kept.loop_report = Some(LoopReport {
            period,
            attempts: vec![first_report.attempts[0], second_attempt],
            tokens_saved: first_report.tokens_saved + second_saved,
            looped,
        });
        kept
    }
}

/// A model's host-side processing (resize, tile, normalise, prompt, tokenize), apart from
/// the model: cheap to clone and `Send`, so threads can prepare requests ahead of the device.
#[derive(Clone)]
pub enum Processor {
    Idefics3(idefics3::Idefics3Processor),
    Idefics2(idefics2::Idefics2Processor),
}

/// A request after host-side processing: the model's input but its image features.
#[derive(Clone, Debug)]
pub enum Prepared {
    Idefics3(idefics3::Prepared),
    Idefics2(idefics2::Prepared),
}

impl Processor {
    pub fn prepare(&self, req: &Request) -> Result<Prepared> {
        fn run<P: FamilyProcessor>(p: &P, req: &Request) -> Result<Prepared> {
            Ok(p.prepare(&req.image, &req.prompt)?.into_any())
        }
        match self {
            Processor::Idefics3(p) => run(p, req),
            Processor::Idefics2(p) => run(p, req),
        }
    }
}

impl Prepared {
    /// Prompt token ids, image tokens included.
    pub fn input_ids(&self) -> &[u32] {
        match self {
            Prepared::Idefics3(p) => p.input_ids(),
            Prepared::Idefics2(p) => p.input_ids(),
        }
    }

    /// Bytes of pixel data it holds (tiles or frames, f32).
    pub fn pixel_bytes(&self) -> usize {
        match self {
            Prepared::Idefics3(p) => p.pixel_bytes(),
            Prepared::Idefics2(p) => p.pixel_bytes(),
        }
    }
}

/// A loaded vision-language model.
pub struct Vlm {
    model: Box<dyn AnyFamily>,
    family: Family,
    name: String,
}

fn idefics3_variant(name: &str) -> String {
    let n = name.to_ascii_lowercase();
    if n.contains("granite") && n.contains("docling") {
        "Granite-Docling".into()
    } else if n.contains("docling") {
        "SmolDocling".into()
    } else if n.contains("smolvlm") {
        "SmolVLM".into()
    } else {
        "Idefics3".into()
    }
}

impl Vlm {
    /// Loads a checkpoint folder, dispatching on `config.json`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Vlm> {
        let ck = Checkpoint::open(dir)?;
        if opts.device.is_cpu() {
            tune_allocator();
        }
        let (model_type, arch) = ck.model_type();
        let name = ck.model_name();
        match (model_type.as_str(), arch.as_str()) {
            ("idefics3", _) | (_, "Idefics3ForConditionalGeneration") => {
                let m = idefics3::Idefics3::load(&ck, &opts.device, opts.dtype, opts.quantize)?;
                Ok(Vlm { model: Box::new(m), family: Family::Idefics3(idefics3_variant(&name)), name })
            }
            ("idefics2", _) | (_, "Idefics2ForConditionalGeneration") => {
                let m = idefics2::Idefics2::load(&ck, &opts.device, opts.dtype, opts.quantize)?;
                Ok(Vlm { model: Box::new(m), family: Family::Idefics2("Idefics2".into()), name })
            }
            _ => bail!(
                Checkpoint,
                "{}: unsupported model (model_type {model_type:?}, architecture {arch:?}); quire-vlm runs Idefics3- and Idefics2-family checkpoints",
                dir.display()
            ),
        }
    }

    pub fn family(&self) -> Family {
        self.family.clone()
    }

    pub fn model_name(&self) -> String {
        self.name.clone()
    }

    pub fn default_prompt(&self, task: Task) -> String {
        let docling = self.family.variant().contains("Docling");
        match (task, docling) {
            (Task::Ocr, true) => "Convert this page to docling.".into(),
            (Task::Ocr, false) => "Transcribe all the text in this image, preserving the reading order.".into(),
            (Task::Caption, _) => "Describe this image in detail.".into(),
        }
    }

    /// Sets what decoding does with pages that loop (see [`loops`]); refuses settings that cannot work.
    pub fn set_loop_options(&mut self, opts: LoopOptions) -> Result<()> {
        self.decoder_mut().set_loop_options(opts)
    }

    /// The checkpoint's generation settings (`generation_config.json`), as `generate` applies them.
    pub fn generation_config(&self) -> &GenerationConfig {
        self.model.generation_config()
    }

    /// Batched greedy generation with the checkpoint's generation config; results are in request order.
    pub fn generate(&mut self, reqs: &[Request]) -> Result<Vec<Generation>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let t = std::time::Instant::now();
        let (ids, feats): (Vec<_>, Vec<_>) = self.encode(reqs)?.into_iter().unzip();
        let max_new: Vec<Option<usize>> = reqs.iter().map(|r| r.max_new_tokens).collect();
        let mut out = self.decoder_mut().generate(&ids, &feats, &max_new)?;
        let loops = self.decoder_mut().loop_options();
        let again: Vec<usize> = (0..out.len()).filter(|&i| out[i].finish_reason == FinishReason::Loop).collect();
        if loops.on_loop == OnLoop::Retry && !again.is_empty() {
            fn pick<T: Clone>(v: &[T], at: &[usize]) -> Vec<T> {
                at.iter().map(|&i| v[i].clone()).collect()
            }
            let (ids2, feats2, max_new2) = (pick(&ids, &again), pick(&feats, &again), pick(&max_new, &again));
            let second = self.decoder_mut().generate_with(&ids2, &feats2, &max_new2, Some(loops.retry_penalty))?;
            for (&i, g) in again.iter().zip(second) {
                out[i] = Generation::after_retry(out[i].clone(), g);
            }
        }
        let share = t.elapsed().as_secs_f64() * 1e3 / out.len().max(1) as f64;
        for g in &mut out {
            g.device_ms = share;
        }
        Ok(out)
    }

    /// Prompt token ids and image features of each request (vision encoder over all of
    /// them at once), for [`engine::Decoder::admit`].
    pub fn encode(&self, reqs: &[Request]) -> Result<Vec<(Vec<u32>, candle_core::Tensor)>> {
        self.model.encode(reqs)
    }

    /// The host-side processing of this model, for other threads.
    pub fn processor(&self) -> Processor {
        self.model.processor()
    }

    /// [`Self::encode`] of requests prepared already by this model's [`Processor`].
    pub fn encode_prepared(&self, preps: &[&Prepared]) -> Result<Vec<(Vec<u32>, candle_core::Tensor)>> {
        self.model.encode_prepared(preps)
    }

    /// First-step logits (f32, vocab) for each request; used by the parity tests.
    pub fn prefill_logits(&mut self, reqs: &[Request]) -> Result<Vec<Vec<f32>>> {
        self.model.prefill_logits(reqs)
    }

    /// The text decoder, which holds the sequences of continuous batching.
    pub fn decoder_mut(&mut self) -> &mut engine::Decoder {
        self.model.decoder_mut()
    }

    /// The Idefics3 model, for processor-level access (tile grid, input ids, pixel values).
    pub fn as_idefics3(&mut self) -> Option<&mut idefics3::Idefics3> {
        self.model.as_any_mut().downcast_mut()
    }

    /// The Idefics2 model, for processor-level access (frames, input ids, pixel values).
    pub fn as_idefics2(&mut self) -> Option<&mut idefics2::Idefics2> {
        self.model.as_any_mut().downcast_mut()
    }
}

#[cfg(test)]
mod tests {
    fn assert_send<T: Send>() {}

    #[test]
    fn vlm_is_send() {
        assert_send::<super::Vlm>();
    }

    #[test]
    fn a_gpu_that_cannot_be_opened_is_explained_without_a_backtrace() {
        // What candle returns when libcuda.so.1 is the build's stub (the CUDA image run
        // without the NVIDIA container toolkit's mounts), backtrace captured or not.
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
        let driver = |text: &str| candle_core::Error::Cuda(text.to_string().into()).bt();
        let stub = super::cuda_open_error(0, &driver("DriverError(CUDA_ERROR_STUB_LIBRARY, \"\")"));
        assert!(stub.starts_with("cuda:0: cannot open the GPU (DriverError(CUDA_ERROR_STUB_LIBRARY"), "{stub}");
        assert!(stub.contains("stub library, not the NVIDIA driver's"), "{stub}");
        assert!(stub.contains("--device cpu"), "{stub}");
        assert!(!stub.contains('\n'), "a backtrace leaked into the message: {stub}");
        let old = super::cuda_open_error(1, &driver("DriverError(CUDA_ERROR_INSUFFICIENT_DRIVER, \"\")"));
        assert!(old.starts_with("cuda:1: ") && old.contains("driver 580 or later"), "{old}");
        let other = super::cuda_open_error(0, &driver("DriverError(CUDA_ERROR_UNKNOWN, \"\")"));
        assert!(other.contains("nvidia-smi"), "{other}");
    }

    fn generation(tokens: usize, looped: Option<(usize, usize)>) -> super::Generation {
        super::Generation {
            text: String::new(),
            token_ids: vec![7; tokens],
            tokens_in: 3,
            tokens_out: tokens,
            finish_reason: if looped.is_some() { super::FinishReason::Loop } else { super::FinishReason::Stop },
            device_ms: 0.0,
            loop_report: looped.map(|(generated, saved)| super::LoopReport {
                period: 5,
                attempts: vec![generated],
                tokens_saved: saved,
                looped: true,
            }),
        }
    }

    #[test]
    fn a_retry_without_a_loop_wins_else_the_attempt_keeping_fewer_tokens() {
        use super::{FinishReason, Generation};
        // the retry did not loop: kept, whatever its length; both attempts reported
        let g = Generation::after_retry(generation(40, Some((300, 700))), generation(90, None));
        assert_eq!((g.tokens_out, g.finish_reason), (90, FinishReason::Stop));
        let r = g.loop_report.unwrap();
        assert_eq!((r.attempts, r.tokens_saved, r.looped, r.period), (vec![300, 90], 700, false, 5));
        // both looped: the one keeping fewer tokens
        let g = Generation::after_retry(generation(40, Some((300, 700))), generation(25, Some((280, 720))));
        assert_eq!(g.tokens_out, 25);
        assert_eq!(g.loop_report.unwrap().attempts, vec![300, 280]);
        let g = Generation::after_retry(generation(40, Some((300, 700))), generation(60, Some((320, 680))));
        assert_eq!((g.tokens_out, g.finish_reason), (40, FinishReason::Loop));
        let r = g.loop_report.unwrap();
        assert_eq!((r.attempts, r.tokens_saved, r.looped), (vec![300, 320], 1380, true));
    }
}
