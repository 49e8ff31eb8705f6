//! What a model family is to the rest of the crate. A family implements [`FamilyProcessor`]
//! (its host-side processing) and [`FamilyModel`] (its vision path: image features for
//! prepared requests), and gets from them what every family does the same way: preparing
//! requests on the CPU cores, encoding them for the shared decoder, first-step logits.
//! [`crate::Vlm`] holds any family as a `dyn` [`AnyFamily`], so its façade is written once.

use std::any::Any;

use candle_core::Tensor;

use crate::engine::Decoder;
use crate::generation::GenerationConfig;
use crate::{Error, Prepared, Processor, Request, Result};

/// A request after a family's processing: what every family's prepared input tells.
pub trait PreparedInput: Clone + Send + Sync + 'static {
    /// Prompt token ids, image tokens included.
    fn input_ids(&self) -> &[u32];
    /// Bytes of pixel data it holds (tiles or frames, f32).
    fn pixel_bytes(&self) -> usize;
    /// As the crate-wide [`Prepared`].
    fn into_any(self) -> Prepared;
    /// This family's own input out of a crate-wide [`Prepared`] (None: another family's).
    fn from_any(p: &Prepared) -> Option<&Self>;
}

/// A family's host-side processing (resize, tile, prompt, tokenize), detached from the model
/// so that other threads can prepare requests while the device works.
pub trait FamilyProcessor: Clone + Send + Sync + 'static {
    type Prepared: PreparedInput;

    /// The chat-templated prompt for one user turn with the image first, then `text`.
    fn render_prompt(&self, text: &str) -> Result<String>;

    /// Processor output for one request: pixels, expanded prompt and token ids.
    fn prepare(&self, image: &image::DynamicImage, text: &str) -> Result<Self::Prepared>;

    /// As the crate-wide [`Processor`].
    fn into_any(self) -> Processor;
}

/// The prepared input of a family model.
pub type PreparedOf<M> = <<M as FamilyModel>::Processor as FamilyProcessor>::Prepared;

/// A loaded model of one family: its processor, its vision path and the shared decoder.
pub trait FamilyModel: Send + Sized + 'static {
    type Processor: FamilyProcessor;

    /// The family's processing (the model keeps one; [`Self::processor`] clones it).
    fn processing(&self) -> &Self::Processor;

    fn decoder(&self) -> &Decoder;

    fn decoder_mut(&mut self) -> &mut Decoder;

    /// Image features (rows of text hidden size) for each prepared request, the images of all
    /// of them through the vision encoder together.
    fn image_features(&self, preps: &[&PreparedOf<Self>]) -> Result<Vec<Tensor>>;

    /// The host-side processing, to run on other threads.
    fn processor(&self) -> Self::Processor {
        self.processing().clone()
    }

    /// The chat-templated prompt for one user turn with the image first, then `text`.
    fn render_prompt(&self, text: &str) -> Result<String> {
        self.processing().render_prompt(text)
    }

    /// Processor output for one request.
    fn prepare(&self, image: &image::DynamicImage, text: &str) -> Result<PreparedOf<Self>> {
        self.processing().prepare(image, text)
    }

    /// [`Self::prepare`] for every request, spread over the CPU cores (resizing and tiling
    /// large pages is CPU work that would otherwise keep the device waiting).
    fn prepare_all(&self, reqs: &[Request]) -> Result<Vec<PreparedOf<Self>>> {
        let _stage = crate::profile::enter(crate::profile::Stage::Prepare, crate::profile::Work::default());
        let p = self.processing();
        crate::engine::par_map(reqs, |r| p.prepare(&r.image, &r.prompt))
    }

    /// The checkpoint's generation settings as applied by [`crate::Vlm::generate`].
    fn generation_config(&self) -> &GenerationConfig {
        self.decoder().generation_config()
    }

    /// Prompt token ids and image features of each request: what [`Decoder::admit`] takes.
    fn encode(&self, reqs: &[Request]) -> Result<Vec<(Vec<u32>, Tensor)>> {
        let preps = self.prepare_all(reqs)?;
        self.encode_prepared(&preps.iter().collect::<Vec<_>>())
    }

    /// [`Self::encode`] of requests prepared already (by [`FamilyProcessor::prepare`]).
    fn encode_prepared(&self, preps: &[&PreparedOf<Self>]) -> Result<Vec<(Vec<u32>, Tensor)>> {
        let feats = self.image_features(preps)?;
        Ok(preps.iter().map(|p| p.input_ids().to_vec()).zip(feats).collect())
    }

    /// First-step logits (f32, vocab) for each request; used by the parity tests.
    fn prefill_logits(&mut self, reqs: &[Request]) -> Result<Vec<Vec<f32>>> {
        let (ids, feats): (Vec<_>, Vec<_>) = self.encode(reqs)?.into_iter().unzip();
        self.decoder_mut().prefill_logits(&ids, &feats)
    }
}

/// Any family's model behind one object-safe interface (implemented for every
/// [`FamilyModel`]): what [`crate::Vlm`] calls.
pub trait AnyFamily: Send {
    fn generation_config(&self) -> &GenerationConfig;
    fn encode(&self, reqs: &[Request]) -> Result<Vec<(Vec<u32>, Tensor)>>;
    /// Fails on a request prepared by another family.
    fn encode_prepared(&self, preps: &[&Prepared]) -> Result<Vec<(Vec<u32>, Tensor)>>;
    fn processor(&self) -> Processor;
    fn decoder_mut(&mut self) -> &mut Decoder;
    fn prefill_logits(&mut self, reqs: &[Request]) -> Result<Vec<Vec<f32>>>;
    /// For downcasts to the family's own type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<M: FamilyModel> AnyFamily for M {
    fn generation_config(&self) -> &GenerationConfig {
        FamilyModel::generation_config(self)
    }

    fn encode(&self, reqs: &[Request]) -> Result<Vec<(Vec<u32>, Tensor)>> {
        FamilyModel::encode(self, reqs)
    }

    fn encode_prepared(&self, preps: &[&Prepared]) -> Result<Vec<(Vec<u32>, Tensor)>> {
        let own = preps
            .iter()
            .map(|p| PreparedOf::<M>::from_any(p).ok_or_else(|| Error::Invalid("a request prepared for another model family".into())))
            .collect::<Result<Vec<_>>>()?;
        FamilyModel::encode_prepared(self, &own)
    }

    fn processor(&self) -> Processor {
        FamilyModel::processor(self).into_any()
    }

    fn decoder_mut(&mut self) -> &mut Decoder {
        FamilyModel::decoder_mut(self)
    }

    fn prefill_logits(&mut self, reqs: &[Request]) -> Result<Vec<Vec<f32>>> {
        FamilyModel::prefill_logits(self, reqs)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
