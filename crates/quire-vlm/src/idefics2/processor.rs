//! Idefics2 image processor and prompt expansion, mirroring `Idefics2ImageProcessorPil`
//! and `Idefics2Processor` in `transformers`.
//!
//! Per image: RGB conversion (alpha dropped) → (splitting) the four quarter crops of the image as given,
//! then the image itself → each resized so its longest side is at most `longest_edge`
//! (aspect kept, truncating), then each side raised to at least `shortest_edge` → rescale
//! → normalise. Frames keep their own sizes: the batch pads them to the largest with a
//! pixel mask ([`crate::frames`]). Each `<image>` of the prompt becomes
//! `<fake_token_around_image>` + `image_seq_len` × `<image>` + `<fake_token_around_image>`
//! (five times with splitting), with adjacent fake tokens collapsed into one.

use crate::error::bail;
use crate::Result;
use image::{DynamicImage, RgbImage};
use serde_json::Value;

use crate::frames::{Normalize, Tile};
use crate::idefics3::processor::triple;
use crate::pil::{self, Resample};

pub const FAKE_TOKEN: &str = "<fake_token_around_image>";
pub const IMAGE_TOKEN: &str = "<image>";

/// `size` of the image processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Longest side capped at `longest`, then each side raised to `shortest`.
    Edges { shortest: usize, longest: usize },
    Exact { height: usize, width: usize },
}

/// Image processor settings (`preprocessor_config.json` or `processor_config.json["image_processor"]`).
#[derive(Clone, Debug)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: Size,
    pub resample: Resample,
    pub normalize: Normalize,
    pub do_image_splitting: bool,
}

impl ImageProcessorConfig {
    /// Reads the settings, filling what is omitted with `Idefics2ImageProcessor`'s defaults.
    pub fn from_json(v: &Value) -> Result<Self> {
        let b = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let n = |s: &Value, k: &str| s.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let size = match v.get("size") {
            None | Some(Value::Null) => Size::Edges { shortest: 378, longest: 980 },
            Some(s) => match (n(s, "shortest_edge"), n(s, "longest_edge"), n(s, "height"), n(s, "width")) {
                (Some(shortest), Some(longest), _, _) if shortest > 0 && longest > 0 => {
                    Size::Edges { shortest, longest }
                }
                (_, _, Some(height), Some(width)) if height > 0 && width > 0 => Size::Exact { height, width },
                _ => bail!(
                    Processor,
                    "image processor size {s} is not supported: Idefics2 needs shortest_edge and longest_edge, or height and width"
                ),
            },
        };
        let resample = v.get("resample").and_then(Value::as_i64).map(Resample::from_pil).unwrap_or(Resample::Bilinear);
        Ok(ImageProcessorConfig {
            do_resize: b("do_resize", true),
            size,
            resample,
            normalize: Normalize {
                do_rescale: b("do_rescale", true),
                rescale_factor: v.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0),
                do_normalize: b("do_normalize", true),
                image_mean: triple(v.get("image_mean"), [0.5; 3]),
                image_std: triple(v.get("image_std"), [0.5; 3]),
            },
            do_image_splitting: b("do_image_splitting", false),
        })
    }

    /// Frames of one image: the image, or with splitting its four quarters then itself.
    pub fn process(&self, image: &DynamicImage) -> Result<Vec<Tile>> {
        // Idefics2Processor hands every image through `load_image`, i.e. Pillow's
        // `convert("RGB")`, before the image processor sees it: an alpha channel is dropped
        // (not composited onto white as the image processor's own RGB conversion would).
        let img = image.to_rgb8();
        let (w, h) = (img.width(), img.height());
        let mut frames = Vec::with_capacity(5);
        if self.do_image_splitting {
            let (mw, mh) = (w / 2, h / 2);
            if mw == 0 || mh == 0 {
                bail!(Processor, "a {w}x{h} image is too small to split into quarters");
            }
            for (x, y, cw, ch) in [(0, 0, mw, mh), (mw, 0, w - mw, mh), (0, mh, mw, h - mh), (mw, mh, w - mw, h - mh)] {
                frames.push(image::imageops::crop_imm(&img, x, y, cw, ch).to_image());
            }
        }
        frames.push(img);
        if self.do_resize {
            for f in &mut frames {
                let (th, tw) = self.target_size(f.height() as usize, f.width() as usize);
                *f = pil::resize(f, tw as u32, th as u32, self.resample);
            }
        }
        Ok(frames.iter().map(|f: &RgbImage| self.normalize.tile(f)).collect())
    }

    /// (height, width) after `resize`.
    pub fn target_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.size {
            Size::Exact { height, width } => (height, width),
            Size::Edges { shortest, longest } => {
                let aspect = width as f64 / height as f64;
                let (mut h, mut w) = (height, width);
                if width >= height && width > longest {
                    w = longest;
                    h = (w as f64 / aspect) as usize;
                } else if height > width && height > longest {
                    h = longest;
                    w = (h as f64 * aspect) as usize;
                }
                (h.max(shortest), w.max(shortest))
            }
        }
    }
}

/// Python's `\s` for a str pattern: Unicode whitespace plus the ASCII separators 0x1c–0x1f.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Replaces each `<image>` of `text` by the image's token string, collapses adjacent fake
/// tokens, and separates a closing fake token from a word glued to it, as the reference
/// processor does. `frames`: 5 with splitting, else 1.
pub fn expand_prompt(text: &str, image_seq_len: usize, frames: usize) -> String {
    let one = format!("{FAKE_TOKEN}{}{FAKE_TOKEN}", IMAGE_TOKEN.repeat(image_seq_len));
    let s = text.replace(IMAGE_TOKEN, &one.repeat(frames));
    let s = s.replace(&format!("{FAKE_TOKEN}{FAKE_TOKEN}"), FAKE_TOKEN);
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s.as_str();
    while let Some(i) = rest.find(FAKE_TOKEN) {
        let end = i + FAKE_TOKEN.len();
        out.push_str(&rest[..end]);
        rest = &rest[end..];
        if rest.chars().next().is_some_and(|c| !py_space(c) && c != '<') {
            out.push(' ');
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_expansion_collapses_fake_tokens_and_spaces_glued_words() {
        let f = FAKE_TOKEN;
        assert_eq!(expand_prompt("User:<image>Hi", 2, 1), format!("User:{f}<image><image>{f} Hi"));
        assert_eq!(
            expand_prompt("<image><image>\n", 1, 1),
            format!("{f}<image>{f}<image>{f}\n"),
            "adjacent images share one fake token"
        );
        assert_eq!(expand_prompt("<image>", 1, 2), format!("{f}<image>{f}<image>{f}"));
    }

    #[test]
    fn resize_caps_the_longest_side_then_raises_short_sides() {
        let p = ImageProcessorConfig::from_json(&serde_json::json!({"size": {"shortest_edge": 20, "longest_edge": 64}}))
            .unwrap();
        assert_eq!(p.target_size(37, 45), (37, 45));
        assert_eq!(p.target_size(33, 120), (20, 64)); // 64 / (120/33) = 17.6 -> 17 -> raised to 20
        assert_eq!(p.target_size(90, 25), (64, 20));
    }
}
