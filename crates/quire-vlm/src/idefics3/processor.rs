//! Idefics3 image processor and prompt expansion, mirroring `Idefics3ImageProcessor`
//! (Pillow backend) and `Idefics3Processor` in `transformers`.
//!
//! Pipeline per image: RGB conversion → resize longest edge to `size.longest_edge` →
//! (splitting) resize up to multiples of `max_image_size.longest_edge`, crop rows×cols tiles
//! and append the whole image resized to one tile, or (no splitting) resize to one square
//! tile → rescale → normalize. The prompt's `<image>` is then replaced by the tile markers
//! and `image_seq_len` `<image>` tokens per tile.

use crate::error::bail;
use crate::Result;
use image::{DynamicImage, RgbImage};
use serde_json::Value;

pub use crate::frames::Tile;
use crate::frames::Normalize;
use crate::pil::{self, Resample};

/// Longest edge the reference clamps any resized image to.
const MAX_IMAGE_SIZE: usize = 4096;

/// Image processor settings (`preprocessor_config.json` or `processor_config.json["image_processor"]`).
#[derive(Clone, Debug)]
pub struct ImageProcessorConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    /// `size.longest_edge`, or an explicit (height, width).
    pub size: Size,
    pub resample: Resample,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub do_pad: bool,
    pub do_image_splitting: bool,
    pub max_image_size: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    LongestEdge(usize),
    Exact { height: usize, width: usize },
}

pub(crate) fn triple(v: Option<&Value>, default: [f32; 3]) -> [f32; 3] {
    match v {
        Some(Value::Array(a)) if a.len() == 3 => {
            let f = |i: usize| a[i].as_f64().map(|x| x as f32).unwrap_or(default[i]);
            [f(0), f(1), f(2)]
        }
        Some(Value::Number(n)) => [n.as_f64().unwrap_or(0.5) as f32; 3],
        _ => default,
    }
}

impl ImageProcessorConfig {
    /// Reads the settings, filling what is omitted with the reference class defaults.
    pub fn from_json(v: &Value) -> Result<Self> {
        let b = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let size = match v.get("size") {
            Some(s) if s.get("longest_edge").is_some() => {
                Size::LongestEdge(s["longest_edge"].as_u64().unwrap_or(1456) as usize)
            }
            Some(s) if s.get("height").is_some() && s.get("width").is_some() => Size::Exact {
                height: s["height"].as_u64().unwrap_or(1456) as usize,
                width: s["width"].as_u64().unwrap_or(1456) as usize,
            },
            None | Some(Value::Null) => Size::LongestEdge(4 * 364),
            Some(other) => bail!(Processor, "unsupported image processor size {other}"),
        };
        let max_image_size = v
            .get("max_image_size")
            .and_then(|m| m.get("longest_edge"))
            .and_then(Value::as_u64)
            .unwrap_or(364) as usize;
        let resample = v.get("resample").and_then(Value::as_i64).map(Resample::from_pil).unwrap_or(Resample::Lanczos);
        Ok(ImageProcessorConfig {
            do_convert_rgb: b("do_convert_rgb", true),
            do_resize: b("do_resize", true),
            size,
            resample,
            do_rescale: b("do_rescale", true),
            rescale_factor: v.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0),
            do_normalize: b("do_normalize", true),
            image_mean: triple(v.get("image_mean"), [0.5; 3]),
            image_std: triple(v.get("image_std"), [0.5; 3]),
            do_pad: b("do_pad", true),
            do_image_splitting: b("do_image_splitting", true),
            max_image_size,
        })
    }
}

/// One image after processing: its tiles (row-major, global image last) and grid.
#[derive(Clone, Debug)]
pub struct ProcessedImage {
    /// Split rows and columns; (0, 0) when the image is a single tile.
    pub rows: usize,
    pub cols: usize,
    /// Tiles as (height, width, CHW f32 values).
    pub tiles: Vec<Tile>,
}

fn rescale_longest(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w);
    if width >= height {
        w = max_len;
        h = (w as f64 / aspect) as usize;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = max_len;
        w = (h as f64 * aspect) as usize;
        if w % 2 != 0 {
            w += 1;
        }
    }
    (h.max(1), w.max(1))
}

fn scale_below(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if width >= height && width > max_len {
        w = max_len;
        h = (w as f64 / aspect) as usize;
    } else if height > width && height > max_len {
        h = max_len;
        w = (h as f64 * aspect) as usize;
    }
    (h.max(1), w.max(1))
}

/// Output size of the processor's `resize` for a given `size` setting.
fn target_size(height: usize, width: usize, size: Size) -> (usize, usize) {
    match size {
        Size::LongestEdge(l) => {
            let (h, w) = rescale_longest(height, width, l);
            scale_below(h, w, MAX_IMAGE_SIZE)
        }
        Size::Exact { height, width } => (height, width),
    }
}

/// Size `resize_for_vision_encoder` produces: each side rounded up to a multiple of `tile`.
fn vision_encoder_size(height: usize, width: usize, tile: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let up = |x: f64| (x / tile as f64).ceil() as usize * tile;
    if width >= height {
        let w = up(width as f64);
        let h = (w as f64 / aspect) as usize;
        (up(h as f64), w)
    } else {
        let h = up(height as f64);
        let w = (h as f64 * aspect) as usize;
        (h, up(w as f64))
    }
}

fn resize_to(img: &RgbImage, height: usize, width: usize, f: Resample) -> RgbImage {
    pil::resize(img, width as u32, height as u32, f)
}

fn crop(img: &RgbImage, x: usize, y: usize, w: usize, h: usize) -> RgbImage {
    image::imageops::crop_imm(img, x as u32, y as u32, w as u32, h as u32).to_image()
}

impl ImageProcessorConfig {
    /// Runs the full per-image pipeline.
    pub fn process(&self, image: &DynamicImage) -> Result<ProcessedImage> {
        let mut img = if self.do_convert_rgb { pil::to_rgb8(image) } else { image.to_rgb8() };
        let f = self.resample;
        if self.do_resize {
            let (h, w) = target_size(img.height() as usize, img.width() as usize, self.size);
            img = resize_to(&img, h, w, f);
        }
        let tile = self.max_image_size;
        let (mut rows, mut cols) = (0, 0);
        let mut frames = Vec::new();
        if self.do_image_splitting {
            let (h, w) = vision_encoder_size(img.height() as usize, img.width() as usize, tile);
            img = resize_to(&img, h, w, f);
            let (h, w) = (img.height() as usize, img.width() as usize);
            if h > tile || w > tile {
                rows = (h - tile) / tile + 1;
                cols = (w - tile) / tile + 1;
                for r in 0..rows {
                    for c in 0..cols {
                        frames.push(crop(&img, c * tile, r * tile, tile, tile));
                    }
                }
                frames.push(resize_to(&img, tile, tile, f));
            } else {
                frames.push(img);
            }
        } else {
            frames.push(resize_to(&img, tile, tile, f));
        }
        let norm = self.normalize();
        let tiles = frames.iter().map(|fr| norm.tile(fr)).collect();
        Ok(ProcessedImage { rows, cols, tiles })
    }

    fn normalize(&self) -> Normalize {
        Normalize {
            do_rescale: self.do_rescale,
            rescale_factor: self.rescale_factor,
            do_normalize: self.do_normalize,
            image_mean: self.image_mean,
            image_std: self.image_std,
        }
    }
}

/// The text that replaces one `<image>` in the prompt for a tile grid.
pub fn image_prompt(rows: usize, cols: usize, image_seq_len: usize) -> String {
    const FAKE: &str = "<fake_token_around_image>";
    let image_tokens = "<image>".repeat(image_seq_len);
    let global = format!("{FAKE}<global-img>{image_tokens}{FAKE}");
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut s = String::new();
    for r in 0..rows {
        for c in 0..cols {
            s.push_str(FAKE);
            s.push_str(&format!("<row_{}_col_{}>", r + 1, c + 1));
            s.push_str(&image_tokens);
        }
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&global);
    s
}

/// Replaces each `<image>` in `text`, in order, by the expansion for the matching image grid.
pub fn expand_prompt(text: &str, grids: &[(usize, usize)], image_seq_len: usize) -> Result<String> {
    let parts: Vec<&str> = text.split("<image>").collect();
    if parts.len() - 1 != grids.len() {
        bail!(Processor, "prompt has {} <image> tokens but {} images were given", parts.len() - 1, grids.len());
    }
    let mut out = String::from(parts[0]);
    for (part, &(r, c)) in parts[1..].iter().zip(grids) {
        out.push_str(&image_prompt(r, c, image_seq_len));
        out.push_str(part);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_reference_rounding() {
        assert_eq!(rescale_longest(37, 45, 64), (52, 64));
        assert_eq!(vision_encoder_size(52, 64, 32), (64, 64));
        assert_eq!(vision_encoder_size(90, 25, 32), (96, 32));
    }

    #[test]
    fn single_tile_prompt() {
        let s = image_prompt(0, 0, 2);
        assert_eq!(s, "<fake_token_around_image><global-img><image><image><fake_token_around_image>");
    }
}
