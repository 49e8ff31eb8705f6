//! The Idefics-family models of `quire-vlm` as a pipeline [`Generator`].

use crate::stage::infer::EngineStats;
use crate::stage::infer::GenOutput;
use crate::stage::infer::GenRequest;
use crate::stage::infer::Generator;
use crate::stage::infer::Stepper;
use anyhow::{bail, Context};
use quire_core::{FinishReason, TaskKind};
use quire_vlm::batcher::{Batcher, BatcherOptions};
use quire_vlm::engine::KvBudget;
use quire_vlm::{LoadOptions, LoopOptions, Task, Vlm};

/// `max_new_tokens` of a job that leaves the length to the checkpoint's generation config
/// (`max_new_tokens`, else `max_length`, else quire-vlm's default; see
/// [`quire_vlm::generation`]). `quire run` and the coordinator use it when `--max-new-tokens`
/// is not given, so it is also what goes into task ids then.
pub const MODEL_DEFAULT_MAX_NEW_TOKENS: usize = 0;

pub struct VlmGenerator {
    engine: Engine,
    long_side: Option<u32>,
    /// The model reference as the user gave it, written into records.
    spec: String,
    /// The checkpoint's tokenizer has the DocTags vocabulary.
    doctags: bool,
}

/// How the model's requests are batched.
#[allow(clippy::large_enum_variant)] // one per loaded model
enum Engine {
    /// Static batches through `Vlm::generate` (the inference thread gathers them).
    Static(Vlm),
    /// Continuous batching: sequences join and leave between decode steps.
    Continuous(Batcher),
}

/// Continuous-batching settings of a loaded model; `None` fields are worked out from the
/// device (see [`EngineOptions::resolve`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    /// Static batches instead of continuous batching.
    pub static_batches: bool,
    /// KV-cache budget in MiB for all sequences in flight.
    pub kv_cache_mb: Option<u64>,
    /// Sequences in flight at most.
    pub max_sequences: Option<usize>,
    /// What decoding does with pages whose output loops (`--on-loop` and its limits).
    pub loops: LoopOptions,
}

impl EngineOptions {
    /// The budget in force on `device`: given values as they are; otherwise on a GPU 70% of
    /// the device memory free after loading the model and up to 512 sequences, on the CPU a
    /// quarter of the available memory (at most 8 GiB) and up to 16 sequences (beyond that
    /// a decode step no longer reads the weights for noticeably more sequences at once).
    pub fn resolve(&self, device: &quire_vlm::Device) -> KvBudget {
        let (auto_bytes, auto_seqs) = if device.is_cpu() {
            let avail = available_memory_bytes().unwrap_or(4 << 30);
            ((avail / 4).min(8 << 30), 16)
        } else {
            (quire_vlm::device_free_memory(device).map(|f| f / 10 * 7).unwrap_or(8 << 30), 512)
        };
        KvBudget {
            bytes: self.kv_cache_mb.map(|m| m << 20).unwrap_or(auto_bytes),
            max_sequences: self.max_sequences.unwrap_or(auto_seqs).max(1),
        }
    }
}

/// `MemAvailable` of /proc/meminfo.
fn available_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<quire_vlm::Device> {
    match s {
        "cpu" => Ok(quire_vlm::Device::Cpu),
        "cuda" => Ok(LoadOptions::cuda(0)?),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Ok(LoadOptions::cuda(n)?),
            None => bail!("unknown device {s:?}; use cpu, cuda or cuda:N"),
        },
    }
}

impl VlmGenerator {
    /// Loads the checkpoint at `dir` (already resolved to a local folder).
    pub fn load(
        spec: &str,
        dir: &std::path::Path,
        device: &str,
        dtype: &str,
        quantize: quire_vlm::Quantize,
        engine: EngineOptions,
    ) -> anyhow::Result<Self> {
        let opts = LoadOptions { device: parse_device(device)?, dtype: LoadOptions::parse_dtype(dtype)?, quantize };
        let mut vlm = Vlm::load(dir, &opts).with_context(|| format!("loading model {spec}"))?;
        vlm.set_loop_options(engine.loops)?;
        let engine = if engine.static_batches {
            Engine::Static(vlm)
        } else {
            let kv = engine.resolve(&opts.device);
            tracing::info!(
                "continuous batching: KV-cache budget {} MiB, up to {} sequences in flight",
                kv.bytes >> 20,
                kv.max_sequences
            );
            Engine::Continuous(Batcher::new(vlm, batcher_options(kv, &opts.device)))
        };
        let ck = quire_vlm::Checkpoint::open(dir)?;
        let long_side = ck.image_processor.pointer("/size/longest_edge").and_then(|v| v.as_u64()).map(|v| v as u32);
        let doctags = crate::stage::doctags::has_doctags_vocabulary(dir);
        if doctags {
            tracing::info!("{spec} writes DocTags: its pages get markdown and layout blocks");
        }
        Ok(VlmGenerator { engine, long_side, spec: spec.to_string(), doctags })
    }

    fn vlm(&self) -> &Vlm {
        match &self.engine {
            Engine::Static(v) => v,
            Engine::Continuous(b) => b.vlm(),
        }
    }

    /// The long side, in pixels, the model's processor resizes images to.
    pub fn input_long_side(&self) -> Option<u32> {
        self.long_side
    }
}

impl Generator for VlmGenerator {
    fn model_name(&self) -> String {
        self.spec.clone()
    }

    fn emits_doctags(&self) -> bool {
        self.doctags
    }

    fn default_prompt(&self, task: TaskKind) -> String {
        self.vlm().default_prompt(match task {
            TaskKind::Ocr => Task::Ocr,
            TaskKind::Caption => Task::Caption,
        })
    }

    fn generate(&mut self, reqs: &[GenRequest]) -> anyhow::Result<Vec<GenOutput>> {
        let reqs: Vec<quire_vlm::Request> = reqs.iter().map(vlm_request).collect();
        let out = match &mut self.engine {
            Engine::Static(v) => v.generate(&reqs)?,
            Engine::Continuous(b) => {
                for (i, r) in reqs.into_iter().enumerate() {
                    b.submit(i as u64, r);
                }
                let mut done: Vec<(u64, quire_vlm::Generation)> = Vec::new();
                while b.outstanding() > 0 {
                    for (id, g) in b.step() {
                        done.push((id, g.map_err(anyhow::Error::msg)?));
                    }
                }
                done.sort_by_key(|d| d.0);
                done.into_iter().map(|d| d.1).collect()
            }
        };
        Ok(out.into_iter().map(gen_output).collect())
    }

    fn stepper(&mut self) -> Option<&mut dyn Stepper> {
        match self.engine {
            Engine::Static(_) => None,
            Engine::Continuous(_) => Some(self),
        }
    }
}

/// Requests admitted per continuous-batching step at most: enough to fill the device
/// quickly (their images share one vision pass), few enough that the sequences already
/// decoding wait for only a few prefills.
const PREFILL_PER_STEP: usize = 8;

/// Prompt positions prefilled per step at most (chunked prefill) on a GPU: about nine
/// 13-tile pages, so one step's prefill stays in the tens of milliseconds.
const GPU_PREFILL_TOKENS: usize = 8192;

/// The same on the CPU, where a 13-tile page's prefill takes seconds: the sequences in
/// flight take a decode step after every 512 prompt positions.
const CPU_PREFILL_TOKENS: usize = 512;

/// Continuous batching's settings for `device`: requests are prepared (resized, tiled,
/// tokenized) on threads of their own ahead of the model, half the cores (at most 8) next
/// to a GPU, one on the CPU, where the model itself keeps the cores busy.
fn batcher_options(kv: KvBudget, device: &quire_vlm::Device) -> BatcherOptions {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (prefill_tokens, prep_threads) =
        if device.is_cpu() { (CPU_PREFILL_TOKENS, 1) } else { (GPU_PREFILL_TOKENS, (cores / 2).clamp(1, 8)) };
    BatcherOptions { kv, prefill_per_step: PREFILL_PER_STEP, prefill_tokens, prep_threads }
}

fn vlm_request(r: &GenRequest) -> quire_vlm::Request {
    quire_vlm::Request {
        image: match &r.alpha {
            Some(a) => image::DynamicImage::ImageRgba8(a.clone()),
            None => image::DynamicImage::ImageRgb8(r.image.clone()),
        },
        prompt: r.prompt.clone(),
        max_new_tokens: (r.max_new_tokens != MODEL_DEFAULT_MAX_NEW_TOKENS).then_some(r.max_new_tokens),
    }
}

fn gen_output(g: quire_vlm::Generation) -> GenOutput {
    GenOutput {
        text: g.text,
        tokens_in: g.tokens_in as u64,
        tokens_out: g.tokens_out as u64,
        finish: match g.finish_reason {
            quire_vlm::FinishReason::Stop => FinishReason::Stop,
            quire_vlm::FinishReason::Length => FinishReason::Length,
            quire_vlm::FinishReason::Loop => FinishReason::Loop,
        },
        device_ms: g.device_ms,
        loop_info: g.loop_report.map(|l| quire_core::LoopInfo {
            period: l.period as u32,
            attempts: l.attempts.iter().map(|&n| n as u64).collect(),
            tokens_saved: l.tokens_saved as u64,
        }),
    }
}

impl Stepper for VlmGenerator {
    fn submit(&mut self, id: u64, req: GenRequest) {
        if let Engine::Continuous(b) = &mut self.engine {
            b.submit(id, vlm_request(&req));
        }
    }

    fn step(&mut self) -> Vec<(u64, Result<GenOutput, String>)> {
        match &mut self.engine {
            Engine::Continuous(b) => b.step().into_iter().map(|(id, g)| (id, g.map(gen_output))).collect(),
            Engine::Static(_) => Vec::new(),
        }
    }

    fn outstanding(&mut self) -> usize {
        match &mut self.engine {
            Engine::Continuous(b) => b.outstanding(),
            Engine::Static(_) => 0,
        }
    }

    fn stats(&mut self) -> EngineStats {
        match &mut self.engine {
            Engine::Continuous(b) => {
                let (used, budget) = b.kv_usage();
                let in_flight = b.in_flight();
                EngineStats { in_flight, waiting: b.outstanding() - in_flight, kv_used_bytes: used, kv_budget_bytes: budget }
            }
            Engine::Static(_) => EngineStats::default(),
        }
    }
}
