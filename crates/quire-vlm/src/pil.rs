//! Pillow-compatible pixel operations: RGB conversion (alpha composited on white) and
//! the 8-bit separable resampling of `Image.resize`.
//!
//! The reference image processors hand uint8 images to Pillow, so matching them means
//! matching Pillow's integer arithmetic: filter weights are normalised per output pixel,
//! converted to 22-bit fixed point, and the image is resampled in two passes with an 8-bit
//! intermediate, in Pillow's order (see [`vertical_first`]). Doing the same here gives
//! bit-identical pixels (libm `sin`/`cos` differences could move a weight by one fixed-point
//! unit, which in practice never changes a rounded byte; `tests/pil_resize.rs` checks
//! byte equality against Pillow).

use image::{DynamicImage, RgbImage};

/// Pillow's resampling filters, numbered like `PIL.Image.Resampling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    /// Maps the integer stored in `preprocessor_config.json` (`resample`).
    pub fn from_pil(code: i64) -> Resample {
        match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => Resample::Bilinear,
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Nearest | Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Resample::Nearest | Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Resample::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Converts any decoded image to 8-bit RGB the way `transformers.image_transforms.convert_to_rgb`
/// does with Pillow: images with an alpha channel are alpha-composited onto opaque white,
/// grayscale is replicated into three channels.
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = if a == 0 { 255 } else { composite_on_white(src[c] as u32, a) };
        }
    }
    out
}

/// Pillow's `alpha_composite(white, src)` for one channel (integer math with 7 extra bits).
fn composite_on_white(s: u32, a: u32) -> u8 {
    const PB: u32 = 7;
    // Background alpha is 255, so outa255 == 255*255 and the coefficients simplify exactly.
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PB) / outa255;
    let coef2 = 255 * (1 << PB) - coef1;
    let tmp = s * coef1 + 255 * coef2 + (0x80 << PB);
    ((((tmp >> 8) + tmp) >> 8) >> PB) as u8
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

fn precompute(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut pre = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, p) in pre.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *p = w;
            ww += w;
        }
        for x in 0..ksize {
            let mut v = if x < n { pre[x] } else { 0.0 };
            if x < n && ww != 0.0 {
                v /= ww;
            }
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, k }
}

#[inline]
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((width, height), resample)` for an 8-bit RGB image.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (width, height) {
        return img.clone();
    }
    if filter == Resample::Nearest {
        return resize_nearest(img, width, height);
    }
    let (iw, ih, ow, oh) = (iw as usize, ih as usize, width as usize, height as usize);
    let horiz = precompute(iw, ow, filter);
    let vert = precompute(ih, oh, filter);
    let src = img.as_raw();

    // Pass order of Pillow's `ImagingResampleInner` (src/libImaging/Resample.c, Pillow >= 7):
    // the vertical pass runs first when the height shrinks by more than twice as many pixels
    // as the width does, `(ih - oh) > 0 && (ih - oh) > 2 * (iw - ow)` in signed ints (so a
    // growing width with any shrinking height counts too). Otherwise horizontal first, over
    // only the source rows the vertical pass reads. The 8-bit intermediate makes the order
    // visible in the output.
    if ow != iw && oh != ih && vertical_first(iw, ih, ow, oh) {
        let tmp = vertical_pass(src, iw, &vert, 0, oh);
        return horizontal_pass(tmp.as_raw(), iw, ow, &horiz, 0, oh);
    }
    if ow == iw {
        return vertical_pass(src, iw, &vert, 0, oh);
    }
    // Horizontal pass over the rows the vertical pass will read, then the vertical pass.
    let first = vert.bounds[0].0;
    let last = vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1;
    let tmp = horizontal_pass(src, iw, ow, &horiz, first, last - first);
    if oh == ih {
        return tmp;
    }
    vertical_pass(tmp.as_raw(), ow, &vert, first, oh)
}

/// Whether Pillow resamples vertically before horizontally for this size change.
pub fn vertical_first(iw: usize, ih: usize, ow: usize, oh: usize) -> bool {
    let (dw, dh) = (iw as i64 - ow as i64, ih as i64 - oh as i64);
    dh > 0 && dh > 2 * dw
}

fn horizontal_pass(src: &[u8], iw: usize, ow: usize, horiz: &Coeffs, first: usize, rows: usize) -> RgbImage {
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut tmp = vec![0u8; rows * ow * 3];
    for y in 0..rows {
        let srow = &src[(y + first) * iw * 3..(y + first + 1) * iw * 3];
        for xx in 0..ow {
            let (xmin, n) = horiz.bounds[xx];
            let k = &horiz.k[xx * horiz.ksize..xx * horiz.ksize + n];
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (x, &w) in k.iter().enumerate() {
                let p = (xmin + x) * 3;
                s0 += srow[p] as i64 * w as i64;
                s1 += srow[p + 1] as i64 * w as i64;
                s2 += srow[p + 2] as i64 * w as i64;
            }
            let o = (y * ow + xx) * 3;
            tmp[o] = clip8(s0);
            tmp[o + 1] = clip8(s1);
            tmp[o + 2] = clip8(s2);
        }
    }
    RgbImage::from_raw(ow as u32, rows as u32, tmp).expect("buffer size")
}

/// Vertical pass over `src` (width `w`), whose first row is source row `row0`.
fn vertical_pass(src: &[u8], w: usize, vert: &Coeffs, row0: usize, oh: usize) -> RgbImage {
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; oh * w * 3];
    for yy in 0..oh {
        let (ymin, n) = vert.bounds[yy];
        let ymin = ymin - row0;
        let k = &vert.k[yy * vert.ksize..yy * vert.ksize + n];
        for xx in 0..w * 3 {
            let mut s = half;
            for (y, &wt) in k.iter().enumerate() {
                s += src[(ymin + y) * w * 3 + xx] as i64 * wt as i64;
            }
            out[yy * w * 3 + xx] = clip8(s);
        }
    }
    RgbImage::from_raw(w as u32, oh as u32, out).expect("buffer size")
}

fn resize_nearest(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    let sx = iw as f64 / width as f64;
    let sy = ih as f64 / height as f64;
    RgbImage::from_fn(width, height, |x, y| {
        let xi = (((x as f64 + 0.5) * sx) as u32).min(iw - 1);
        let yi = (((y as f64 + 0.5) * sy) as u32).min(ih - 1);
        *img.get_pixel(xi, yi)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_extremes() {
        assert_eq!(composite_on_white(10, 255), 10);
        assert_eq!(composite_on_white(0, 0), 255);
    }

    #[test]
    fn identity_resize_is_copy() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize(&img, 5, 3, Resample::Lanczos), img);
    }
}
