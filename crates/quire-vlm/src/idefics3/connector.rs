//! `model.connector` of Idefics3: pixel shuffle, then `modality_projection.proj`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{linear_no_bias, VarBuilder};

/// `model.connector`: pixel shuffle by `scale_factor`, then `modality_projection.proj`.
pub struct Connector {
    /// On CPU f32 split over the pool by output features (few rows per tile, wide input).
    proj: crate::linear::ParLinear,
    scale_factor: usize,
}

impl Connector {
    /// `linears`: the dtype of the projection's products (see [`crate::engine::linear_dtype`]).
    pub fn new(vision_hidden: usize, text_hidden: usize, scale_factor: usize, vb: VarBuilder, linears: DType) -> Result<Self> {
        let proj = crate::linear::ParLinear::with_dtype(
            linear_no_bias(vision_hidden * scale_factor * scale_factor, text_hidden, vb.pp("modality_projection.proj"))?,
            linears,
        )?;
        Ok(Connector { proj, scale_factor })
    }

    /// Reproduces the reference's sequence of views and permutes exactly.
    fn pixel_shuffle(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.scale_factor;
        let (b, seq, d) = x.dims3()?;
        let side = (seq as f64).sqrt() as usize;
        if side * side != seq || !side.is_multiple_of(s) {
            candle_core::bail!("pixel shuffle needs a square patch grid divisible by {s}, got {seq} patches");
        }
        let x = x.reshape((b, side, side / s, d * s))?;
        let x = x.transpose(1, 2)?.contiguous()?;
        let x = x.reshape((b, side / s, side / s, d * s * s))?;
        let x = x.transpose(1, 2)?.contiguous()?;
        x.reshape((b, seq / (s * s), d * s * s))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use crate::profile::{enter, span, Part, Stage, Work};
        let (b, seq, _) = x.dims3()?;
        let _stage = enter(Stage::Connector, Work { seqs: b, rows: b * seq, pairs: 0 });
        let x = self.pixel_shuffle(x)?;
        let _timer = span(Part::Proj);
        self.proj.forward(&x)
    }
}
