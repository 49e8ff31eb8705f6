//! What both families' image processors hand the vision encoder: frames (tiles or crops)
//! as rescaled and normalised channel-first f32 values, zero-padded bottom/right to the
//! largest frame of a batch, with the patch grid each frame really covers.

use candle_core::{DType, Device, Result, Tensor};
use image::RgbImage;

/// One processed frame.
#[derive(Clone, Debug)]
pub struct Tile {
    pub height: usize,
    pub width: usize,
    /// Channel-first values, 3 × height × width.
    pub data: Vec<f32>,
}

/// Rescale and normalise settings of an image processor.
#[derive(Clone, Copy, Debug)]
pub struct Normalize {
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Normalize {
    /// Rescale (in f64, stored as f32 like numpy) and normalize (in f32).
    pub fn tile(&self, img: &RgbImage) -> Tile {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        let raw = img.as_raw();
        for c in 0..3 {
            let (m, s) = (self.image_mean[c], self.image_std[c]);
            for i in 0..h * w {
                let px = raw[i * 3 + c];
                let mut v = if self.do_rescale { (px as f64 * self.rescale_factor) as f32 } else { px as f32 };
                if self.do_normalize {
                    v = (v - m) / s;
                }
                data[c * h * w + i] = v;
            }
        }
        Tile { height: h, width: w, data }
    }
}

/// Which patches of a zero-padded frame are real: the family's one difference in the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchRule {
    /// Idefics3: a patch is real when any of its pixels is.
    AnyPixel,
    /// Idefics2: a patch is real only when all of its pixels are (the pixel mask unfolded
    /// into patches and summed to patch_size²).
    AllPixels,
}

impl PatchRule {
    /// Real (patch rows, patch columns) of a `height` × `width` frame.
    pub fn grid(self, height: usize, width: usize, patch: usize) -> (usize, usize) {
        match self {
            PatchRule::AnyPixel => (height.div_ceil(patch), width.div_ceil(patch)),
            PatchRule::AllPixels => (height / patch, width / patch),
        }
    }
}

/// Frames stacked into (n, 3, H, W), zero-padded bottom/right to `(H, W)` (at least the
/// largest frame), and the real patch grid of each.
pub fn pad_frames(
    frames: &[&Tile],
    patch: usize,
    rule: PatchRule,
    (mh, mw): (usize, usize),
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Vec<(usize, usize)>)> {
    let mut data = Vec::with_capacity(frames.len() * 3 * mh * mw);
    let mut valid = Vec::with_capacity(frames.len());
    for t in frames {
        if t.height > mh || t.width > mw {
            candle_core::bail!("frame {}x{} is larger than the padded size {mh}x{mw}", t.height, t.width);
        }
        for c in 0..3 {
            for y in 0..mh {
                if y < t.height {
                    let row = &t.data[c * t.height * t.width + y * t.width..][..t.width];
                    data.extend_from_slice(row);
                    data.extend(std::iter::repeat_n(0f32, mw - t.width));
                } else {
                    data.extend(std::iter::repeat_n(0f32, mw));
                }
            }
        }
        valid.push(rule.grid(t.height, t.width, patch));
    }
    let px = Tensor::from_vec(data, (frames.len(), 3, mh, mw), device)?.to_dtype(dtype)?;
    Ok((px, valid))
}
