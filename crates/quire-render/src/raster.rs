//! Images to RGB: one frame per page for TIFF, the first frame for GIF, one page otherwise.
//! Dimensions are read from the header and checked against `max_pixels` before any pixel
//! buffer is allocated.

use std::fs::File;
use std::io::{BufReader, Seek};
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Instant;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};

use crate::error::io_error;
use quire_core::{ErrorKind, InputError};
use crate::{check_units, open_checked, InputKind, Limits, Page};

/// Decodes `frames` (1-based, inclusive) of the image at `path` to RGB, transparency composited
/// on white, EXIF orientation applied (JPEG/PNG/WebP/TIFF). Every TIFF frame is a page; GIF and
/// the other formats have exactly one (GIF: the first frame of an animation). The outer error
/// is about the file; each frame then succeeds or fails on its own.
pub fn decode_image(
    path: &Path,
    frames: RangeInclusive<u32>,
    limits: &Limits,
) -> Result<Vec<Result<Page, InputError>>, InputError> {
    let (kind, _) = open_checked(path, limits)?;
    match kind {
        InputKind::Pdf => Err(InputError::new(
            ErrorKind::Unsupported,
            format!("{}: a PDF, not an image (use PdfRenderer)", path.display()),
        )),
        InputKind::Tiff => decode_tiff(path, frames, limits),
        _ => {
            check_units(path, "frames", 1, &frames)?;
            Ok(vec![decode_single(path, kind, limits)])
        }
    }
}

/// Decodes an image held in memory (an archive member; `name` is used in messages) to RGB like
/// [`decode_image`]: its kind from its bytes, pixels checked from the header before decoding,
/// EXIF orientation applied. A TIFF gives its first frame.
pub fn decode_image_bytes(name: &str, data: &[u8], limits: &Limits) -> Result<Page, InputError> {
    let path = Path::new(name);
    if data.is_empty() {
        return Err(InputError::new(ErrorKind::Empty, format!("{name}: empty (0 bytes)")));
    }
    if data.len() as u64 > limits.max_file_bytes {
        return Err(InputError::new(
            ErrorKind::TooLarge,
            format!("{name}: {} bytes, more than the limit of {}", data.len(), limits.max_file_bytes),
        ));
    }
    let kind = match crate::sniff(data) {
        Some(k) if k.is_image() => k,
        Some(_) => {
            return Err(InputError::new(
                ErrorKind::Unsupported,
                format!("{name}: a PDF named like an image; only images are read from archives and image groups"),
            ))
        }
        None => {
            return Err(InputError::new(
                ErrorKind::Unsupported,
                format!("{name}: not a supported image (JPEG, PNG, WebP, TIFF, BMP, GIF) by its first bytes"),
            ))
        }
    };
    let t0 = Instant::now();
    let mut r = ImageReader::with_format(std::io::Cursor::new(data), image_format(kind));
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    r.limits(l);
    let mut dec = r.into_decoder().map_err(|e| image_error(path, e))?;
    let (w, h) = dec.dimensions();
    if let Some(e) = too_many_pixels(path, None, w.into(), h.into(), limits) {
        return Err(e);
    }
    let orientation = dec.orientation().ok();
    let mut img = DynamicImage::from_decoder(dec).map_err(|e| image_error(path, e))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(single_page(img, t0))
}

/// Number of frames (pages) of a TIFF; 1 for any other image. Reads only the directories.
pub fn frame_count(path: &Path) -> Result<u32, InputError> {
    let (kind, _) = open_checked(
        path,
        &Limits {
            max_file_bytes: u64::MAX,
            ..Limits::default()
        },
    )?;
    if kind != InputKind::Tiff {
        return Ok(1);
    }
    let mut dec = open_tiff(path)?;
    let mut n = 1u32;
    while dec.more_images() {
        dec.next_image().map_err(|e| tiff_error(path, None, e))?;
        n += 1;
        if n > 1_000_000 {
            return Err(InputError::new(
                ErrorKind::Corrupt,
                format!("{}: TIFF directory loop", path.display()),
            ));
        }
    }
    Ok(n)
}

fn image_format(kind: InputKind) -> ImageFormat {
    match kind {
        InputKind::Jpeg => ImageFormat::Jpeg,
        InputKind::Png => ImageFormat::Png,
        InputKind::Webp => ImageFormat::WebP,
        InputKind::Tiff => ImageFormat::Tiff,
        InputKind::Bmp => ImageFormat::Bmp,
        InputKind::Gif => ImageFormat::Gif,
        InputKind::Pdf => unreachable!("PDFs are not decoded as images"),
    }
}

fn reader(
    path: &Path,
    kind: InputKind,
    limits: &Limits,
) -> Result<ImageReader<BufReader<File>>, InputError> {
    let f = File::open(path).map_err(|e| io_error(path, "cannot open", e))?;
    let mut r = ImageReader::with_format(BufReader::new(f), image_format(kind));
    let mut l = image::Limits::default();
    // Second line of defence behind the explicit pixel check: 16-bit RGBA is 8 bytes a pixel.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    r.limits(l);
    Ok(r)
}

fn too_many_pixels(
    path: &Path,
    frame: Option<u32>,
    w: u64,
    h: u64,
    limits: &Limits,
) -> Option<InputError> {
    (w.saturating_mul(h) > limits.max_pixels).then(|| {
        let at = frame.map(|f| format!(" frame {f}")).unwrap_or_default();
        InputError::new(
            ErrorKind::TooManyPixels,
            format!(
                "{}{at}: {w} x {h} px is more than the limit of {} pixels (not decoded)",
                path.display(),
                limits.max_pixels
            ),
        )
    })
}

/// Header-only dimension check for single-frame images (used by `probe`).
pub(crate) fn check_header_pixels(
    path: &Path,
    kind: InputKind,
    limits: &Limits,
) -> Result<(), InputError> {
    let dec = reader(path, kind, limits)?
        .into_decoder()
        .map_err(|e| image_error(path, e))?;
    let (w, h) = dec.dimensions();
    match too_many_pixels(path, None, w.into(), h.into(), limits) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn decode_single(path: &Path, kind: InputKind, limits: &Limits) -> Result<Page, InputError> {
    let t0 = Instant::now();
    let mut dec = reader(path, kind, limits)?
        .into_decoder()
        .map_err(|e| image_error(path, e))?;
    let (w, h) = dec.dimensions();
    if let Some(e) = too_many_pixels(path, None, w.into(), h.into(), limits) {
        return Err(e);
    }
    if kind == InputKind::Jpeg && !jpeg_has_end(path) {
        // The decoder would fill the missing part with grey and call it a picture.
        return Err(InputError::new(
            ErrorKind::Truncated,
            format!("{}: the JPEG ends before its end-of-image marker (the file is cut short)", path.display()),
        ));
    }
    let orientation = dec.orientation().ok();
    let mut img = DynamicImage::from_decoder(dec).map_err(|e| image_error(path, e))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(single_page(img, t0))
}

/// Whether a JPEG file has its end-of-image marker (FF D9) in its last 64 KiB: a cut-off
/// file lacks it, while padding or trailing data after a complete image keep it in view.
fn jpeg_has_end(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else { return true };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let tail = len.min(64 << 10);
    let mut buf = Vec::with_capacity(tail as usize);
    if f.seek(SeekFrom::Start(len - tail)).is_err() || f.read_to_end(&mut buf).is_err() {
        return true;
    }
    buf.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// A single-image page: RGB on white, plus the RGBA pixels when the image has alpha.
fn single_page(img: DynamicImage, t0: Instant) -> Page {
    let alpha = img.color().has_alpha().then(|| img.to_rgba8());
    image_page(1, to_rgb_on_white(img), alpha, t0)
}

/// Page `page` of decoded pixels (`alpha`: the RGBA pixels when the image has alpha), decoded
/// since `t0`.
fn image_page(page: u32, rgb: RgbImage, alpha: Option<image::RgbaImage>, t0: Instant) -> Page {
    Page {
        page,
        width: rgb.width(),
        height: rgb.height(),
        image: Some(rgb),
        alpha,
        text: None,
        render_ms: t0.elapsed().as_secs_f64() * 1e3,
    }
}

/// RGB with any alpha composited over white (dropping alpha would turn transparent pixels,
/// often stored as black, into black).
pub(crate) fn to_rgb_on_white(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for p in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(p[3]);
        for &c in &p[..3] {
            // c*a/255 + 255*(255-a)/255, rounded
            out.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("sized")
}

fn image_error(path: &Path, e: ImageError) -> InputError {
    let p = path.display();
    match e {
        ImageError::IoError(e) => io_error(path, "cannot read", e),
        ImageError::Limits(e) => InputError::new(ErrorKind::TooManyPixels, format!("{p}: {e}")),
        ImageError::Unsupported(e) => InputError::new(ErrorKind::Unsupported, format!("{p}: {e}")),
        ImageError::Decoding(e) => {
            let msg = e.to_string();
            let kind = if is_eof_message(&msg) {
                ErrorKind::Truncated
            } else {
                ErrorKind::Corrupt
            };
            InputError::new(kind, format!("{p}: {msg}"))
        }
        e => InputError::new(ErrorKind::Corrupt, format!("{p}: {e}")),
    }
}

fn is_eof_message(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("eof")
        || m.contains("end of file")
        || m.contains("unexpected end")
        || m.contains("truncated")
}

// ---- TIFF (every frame a page) ----

fn open_tiff(path: &Path) -> Result<tiff::decoder::Decoder<BufReader<File>>, InputError> {
    let f = File::open(path).map_err(|e| io_error(path, "cannot open", e))?;
    tiff::decoder::Decoder::new(BufReader::new(f)).map_err(|e| tiff_error(path, None, e))
}

fn tiff_error(path: &Path, frame: Option<u32>, e: tiff::TiffError) -> InputError {
    let at = frame.map(|f| format!(" frame {f}")).unwrap_or_default();
    let msg = format!("{}{at}: {e}", path.display());
    let kind = match &e {
        tiff::TiffError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ErrorKind::Truncated
        }
        tiff::TiffError::IoError(_) => ErrorKind::Io,
        tiff::TiffError::UnsupportedError(_) => ErrorKind::Unsupported,
        tiff::TiffError::LimitsExceeded => ErrorKind::TooManyPixels,
        _ if is_eof_message(&e.to_string()) => ErrorKind::Truncated,
        _ => ErrorKind::Corrupt,
    };
    InputError::new(kind, msg)
}

fn decode_tiff(
    path: &Path,
    frames: RangeInclusive<u32>,
    limits: &Limits,
) -> Result<Vec<Result<Page, InputError>>, InputError> {
    let count = frame_count(path)?;
    if count > limits.max_pages {
        return Err(InputError::new(
            ErrorKind::TooManyPages,
            format!(
                "{}: {count} frames, more than the limit of {}",
                path.display(),
                limits.max_pages
            ),
        ));
    }
    check_units(path, "frames", count, &frames)?;
    let mut dec = open_tiff(path)?;
    let mut tl = tiff::decoder::Limits::default();
    tl.decoding_buffer_size =
        usize::try_from(limits.max_pixels.saturating_mul(8)).unwrap_or(usize::MAX);
    tl.intermediate_buffer_size = tl.decoding_buffer_size;
    dec = dec.with_limits(tl);
    let mut out = Vec::new();
    for f in frames {
        let t0 = Instant::now();
        let r = decode_tiff_frame(&mut dec, path, f, limits).map(|(rgb, alpha)| image_page(f, rgb, alpha, t0));
        out.push(r);
    }
    Ok(out)
}

fn decode_tiff_frame<R: std::io::Read + Seek>(
    dec: &mut tiff::decoder::Decoder<R>,
    path: &Path,
    frame: u32,
    limits: &Limits,
) -> Result<(RgbImage, Option<image::RgbaImage>), InputError> {
    use tiff::decoder::DecodingResult as D;
    use tiff::ColorType as C;
    let terr = |e| tiff_error(path, Some(frame), e);
    dec.seek_to_image(frame as usize - 1).map_err(terr)?;
    let (w, h) = dec.dimensions().map_err(terr)?;
    if let Some(e) = too_many_pixels(path, Some(frame), w.into(), h.into(), limits) {
        return Err(e);
    }
    let color = dec.colortype().map_err(terr)?;
    let data = dec.read_image().map_err(terr)?;
    let n = w as usize * h as usize;
    let unsupported = || {
        InputError::new(
            ErrorKind::Unsupported,
            format!(
                "{} frame {frame}: TIFF colour type {color:?} is not supported",
                path.display()
            ),
        )
    };
    let short = || {
        InputError::new(
            ErrorKind::Truncated,
            format!("{} frame {frame}: pixel data ends early", path.display()),
        )
    };
    let img: DynamicImage = match (color, data) {
        (C::Gray(1), D::U8(v)) => {
            // Packed bits, rows padded to a byte; the tiff crate has already mapped
            // WhiteIsZero so that 1 = white.
            let row = (w as usize).div_ceil(8);
            if v.len() < row * h as usize {
                return Err(short());
            }
            let mut g = Vec::with_capacity(n);
            for y in 0..h as usize {
                let r = &v[y * row..(y + 1) * row];
                for x in 0..w as usize {
                    g.push(if r[x / 8] & (0x80 >> (x % 8)) != 0 {
                        255
                    } else {
                        0
                    });
                }
            }
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, g).ok_or_else(short)?)
        }
        (C::Gray(8), D::U8(v)) => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, v).ok_or_else(short)?)
        }
        (C::Gray(16), D::U16(v)) => {
            DynamicImage::ImageLuma16(image::ImageBuffer::from_raw(w, h, v).ok_or_else(short)?)
        }
        (C::GrayA(8), D::U8(v)) => {
            DynamicImage::ImageLumaA8(image::ImageBuffer::from_raw(w, h, v).ok_or_else(short)?)
        }
        (C::RGB(8), D::U8(v)) => {
            DynamicImage::ImageRgb8(image::ImageBuffer::from_raw(w, h, v).ok_or_else(short)?)
        }
        (C::RGB(16), D::U16(v)) => {
            DynamicImage::ImageRgb16(image::ImageBuffer::from_raw(w, h, v).ok_or_else(short)?)
        }
        (C::RGBA(8), D::U8(v)) => {
            DynamicImage::ImageRgba8(image::ImageBuffer::from_raw(w, h, v).ok_or_else(short)?)
        }
        (C::RGBA(16), D::U16(v)) => {
            DynamicImage::ImageRgba16(image::ImageBuffer::from_raw(w, h, v).ok_or_else(short)?)
        }
        (C::CMYK(8), D::U8(v)) => {
            if v.len() < n * 4 {
                return Err(short());
            }
            let rgb = v
                .chunks_exact(4)
                .take(n)
                .flat_map(|p| {
                    let k = 255 - u32::from(p[3]);
                    [0, 1, 2].map(|i| ((255 - u32::from(p[i])) * k / 255) as u8)
                })
                .collect();
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, rgb).ok_or_else(short)?)
        }
        _ => return Err(unsupported()),
    };
    let alpha = img.color().has_alpha().then(|| img.to_rgba8());
    Ok((to_rgb_on_white(img), alpha))
}
