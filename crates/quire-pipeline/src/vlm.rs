//! The Idefics-family models of `quire-vlm` as a pipeline [`Generator`].

use crate::infer::{GenOutput, GenRequest, Generator};
use anyhow::{bail, Context};
use quire_core::{FinishReason, TaskKind};
use quire_vlm::{LoadOptions, Task, Vlm};

/// `max_new_tokens` of a job that leaves the length to the checkpoint's generation config
/// (`max_new_tokens`, else `max_length`, else quire-vlm's default; see
/// [`quire_vlm::generation`]). `quire run` and the coordinator use it when `--max-new-tokens`
/// is not given, so it is also what goes into task ids then.
pub const MODEL_DEFAULT_MAX_NEW_TOKENS: usize = 0;

pub struct VlmGenerator {
    vlm: Vlm,
    long_side: Option<u32>,
    /// The model reference as the user gave it, written into records.
    spec: String,
    /// The checkpoint's tokenizer has the DocTags vocabulary.
    doctags: bool,
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<quire_vlm::Device> {
    match s {
        "cpu" => Ok(quire_vlm::Device::Cpu),
        "cuda" => LoadOptions::cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => LoadOptions::cuda(n),
            None => bail!("unknown device {s:?}; use cpu, cuda or cuda:N"),
        },
    }
}

impl VlmGenerator {
    /// Loads the checkpoint at `dir` (already resolved to a local folder).
    pub fn load(spec: &str, dir: &std::path::Path, device: &str, dtype: &str) -> anyhow::Result<Self> {
        let opts = LoadOptions { device: parse_device(device)?, dtype: LoadOptions::parse_dtype(dtype)? };
        let vlm = Vlm::load(dir, &opts).with_context(|| format!("loading model {spec}"))?;
        let ck = quire_vlm::Checkpoint::open(dir)?;
        let long_side = ck.image_processor.pointer("/size/longest_edge").and_then(|v| v.as_u64()).map(|v| v as u32);
        let doctags = crate::doctags::has_doctags_vocabulary(dir);
        if doctags {
            tracing::info!("{spec} writes DocTags: its pages get markdown and layout blocks");
        }
        Ok(VlmGenerator { vlm, long_side, spec: spec.to_string(), doctags })
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
        self.vlm.default_prompt(match task {
            TaskKind::Ocr => Task::Ocr,
            TaskKind::Caption => Task::Caption,
        })
    }

    fn generate(&mut self, reqs: &[GenRequest]) -> anyhow::Result<Vec<GenOutput>> {
        let reqs: Vec<quire_vlm::Request> = reqs
            .iter()
            .map(|r| quire_vlm::Request {
                image: image::DynamicImage::ImageRgb8(r.image.clone()),
                prompt: r.prompt.clone(),
                max_new_tokens: (r.max_new_tokens != MODEL_DEFAULT_MAX_NEW_TOKENS).then_some(r.max_new_tokens),
            })
            .collect();
        Ok(self
            .vlm
            .generate(&reqs)?
            .into_iter()
            .map(|g| GenOutput {
                text: g.text,
                tokens_in: g.tokens_in as u64,
                tokens_out: g.tokens_out as u64,
                finish: match g.finish_reason {
                    quire_vlm::FinishReason::Stop => FinishReason::Stop,
                    quire_vlm::FinishReason::Length => FinishReason::Length,
                },
            })
            .collect())
    }
}
