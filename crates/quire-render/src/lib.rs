//! quire-render turns input files into what a vision-language model reads: RGB pixels, and
//! for PDFs also the text layer.
//!
//! * PDFs go through [pdfium](https://pdfium.googlesource.com/pdfium/) (`pdfium-render`,
//!   libpdfium loaded at run time) on a dedicated thread owned by [`PdfRenderer`]; pdfium is
//!   not thread-safe, so every call is marshalled to that one thread.
//!   For parallelism and crash isolation, [`PdfRenderer::start_processes`] runs pdfium in
//!   worker processes instead (the executable calls [`run_worker_if_requested`] in `main`).
//! * Images (JPEG, PNG, WebP, TIFF incl. multi-page, BMP, GIF) are decoded by [`decode_image`]
//!   with the `image`/`tiff` crates, on the caller's thread.
//! * What a file *is* comes from its first bytes ([`sniff`]), never from its name.
//! * [`Limits`] are checked before any large allocation: file size before reading, page count
//!   before rendering, pixel count from the header (image) or the page box (PDF) before
//!   decoding or rendering, so a decompression bomb costs a few hundred bytes of reading.
//! * Every failure is a [`quire_core::InputError`]: a kind from quire-core's one list,
//!   [`quire_core::ErrorKind`], and a message.
//!
//! Everything here blocks; call it from `spawn_blocking` or a thread of your own.
//!
//! libpdfium is looked up in this order: `$QUIRE_PDFIUM` (the `.so` or its folder), the folder
//! of the running executable, the system library path. `scripts/setup-pdfium.sh` installs it.

mod error;
mod pdf;
mod procs;
mod raster;

use std::fmt;
use std::io::Read;
use std::path::Path;

use quire_core::{ErrorKind, InputError};

pub use pdf::{find_pdfium, PageStream, PdfRenderer, PDFIUM_ENV};
pub use procs::{run_worker_if_requested, WORKER_ENV};
pub use raster::{decode_image, decode_image_bytes, frame_count};

/// The kind of an input, decided from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    Pdf,
    Jpeg,
    Png,
    Webp,
    Tiff,
    Bmp,
    Gif,
}

impl InputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InputKind::Pdf => "pdf",
            InputKind::Jpeg => "jpeg",
            InputKind::Png => "png",
            InputKind::Webp => "webp",
            InputKind::Tiff => "tiff",
            InputKind::Bmp => "bmp",
            InputKind::Gif => "gif",
        }
    }

    /// True for everything [`decode_image`] handles.
    pub fn is_image(self) -> bool {
        self != InputKind::Pdf
    }
}

/// How many bytes [`sniff`] wants to see (a PDF header may sit anywhere in the first 1 KiB,
/// as in Acrobat and pdfium).
pub const SNIFF_LEN: usize = 1024;

/// Decides the kind of an input from its first bytes (pass up to [`SNIFF_LEN`] of them).
/// `None` means unsupported.
pub fn sniff(head: &[u8]) -> Option<InputKind> {
    if head.starts_with(b"\xFF\xD8\xFF") {
        return Some(InputKind::Jpeg);
    }
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some(InputKind::Png);
    }
    if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        return Some(InputKind::Gif);
    }
    if head.len() >= 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        return Some(InputKind::Webp);
    }
    // Classic TIFF (42) and BigTIFF (43), both byte orders.
    if head.starts_with(b"II*\0")
        || head.starts_with(b"MM\0*")
        || head.starts_with(b"II+\0")
        || head.starts_with(b"MM\0+")
    {
        return Some(InputKind::Tiff);
    }
    // "BM" alone is too weak (a text file may start with it): also require a known DIB header size.
    if head.len() >= 18 && head.starts_with(b"BM") {
        let dib = u32::from_le_bytes([head[14], head[15], head[16], head[17]]);
        if matches!(dib, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124) {
            return Some(InputKind::Bmp);
        }
    }
    let window = &head[..head.len().min(SNIFF_LEN)];
    if window.windows(5).any(|w| w == b"%PDF-") {
        return Some(InputKind::Pdf);
    }
    None
}

pub use quire_core::{Limits, RenderSize};

/// What to produce for each PDF page.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RenderOptions {
    pub size: RenderSize,
    /// Render pixels (false: only sizes and/or text, no rasterisation).
    pub want_image: bool,
    /// Extract the text layer.
    pub want_text: bool,
    pub limits: Limits,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            size: RenderSize::LongSide(quire_core::DEFAULT_LONG_SIDE),
            want_image: true,
            want_text: true,
            limits: Limits::default(),
        }
    }
}

/// One rendered PDF page or one decoded image frame.
#[derive(Clone)]
pub struct Page {
    /// 1-based page (PDF) or frame (TIFF) number; 1 for single images.
    pub page: u32,
    /// RGB pixels (white background under transparency), when asked for.
    pub image: Option<image::RgbImage>,
    /// The pixels with their alpha, when the source image has an alpha channel: models
    /// flatten transparency in their own ways (Idefics3's processor composites on white,
    /// Idefics2's drops the alpha), so the model gets these instead of `image`.
    pub alpha: Option<image::RgbaImage>,
    /// Pixel size of `image` (or the size it would have had, when no image was asked for).
    pub width: u32,
    pub height: u32,
    /// The PDF text layer in pdfium's order, `\n` line ends, trailing spaces trimmed.
    /// `None` for images or when not asked for; `Some("")` for a page without text.
    pub text: Option<String>,
    /// Wall time spent on this page (load + render + text), milliseconds.
    pub render_ms: f64,
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("page", &self.page)
            .field("image", &self.image.as_ref().map(|i| i.dimensions()))
            .field("width", &self.width)
            .field("height", &self.height)
            .field("text", &self.text.as_ref().map(|t| t.len()))
            .field("render_ms", &self.render_ms)
            .finish()
    }
}

/// What [`probe`] learns about an input without rendering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub kind: InputKind,
    /// Pages (PDF), frames (TIFF) or 1.
    pub unit_count: u32,
    pub bytes: u64,
}

/// Checks an input against `limits` and counts its units: size first, then magic bytes, then
/// pages (PDF, via pdfium) or frames (TIFF). For single images the header dimensions are
/// checked against `max_pixels` too (cheap, and it fails bombs at planning time).
pub fn probe(path: &Path, limits: &Limits, pdf: &PdfRenderer) -> Result<Probe, InputError> {
    let (kind, bytes) = open_checked(path, limits)?;
    let unit_count = match kind {
        InputKind::Pdf => pdf.page_count(path)?,
        InputKind::Tiff => raster::frame_count(path)?,
        _ => {
            raster::check_header_pixels(path, kind, limits)?;
            1
        }
    };
    if unit_count == 0 {
        return Err(InputError::new(
            ErrorKind::Empty,
            format!("{}: no pages", path.display()),
        ));
    }
    if unit_count > limits.max_pages {
        return Err(InputError::new(
            ErrorKind::TooManyPages,
            format!(
                "{}: {unit_count} pages, more than the limit of {}",
                path.display(),
                limits.max_pages
            ),
        ));
    }
    Ok(Probe {
        kind,
        unit_count,
        bytes,
    })
}

/// Size checks, then sniffing. Shared by every entry point.
pub(crate) fn open_checked(path: &Path, limits: &Limits) -> Result<(InputKind, u64), InputError> {
    let meta = std::fs::metadata(path).map_err(|e| error::io_error(path, "cannot stat", e))?;
    if !meta.is_file() {
        return Err(InputError::new(
            ErrorKind::Unsupported,
            format!("{}: not a regular file", path.display()),
        ));
    }
    let bytes = meta.len();
    if bytes == 0 {
        return Err(InputError::new(
            ErrorKind::Empty,
            format!("{}: empty file", path.display()),
        ));
    }
    if bytes > limits.max_file_bytes {
        return Err(InputError::new(
            ErrorKind::TooLarge,
            format!(
                "{}: {bytes} bytes, more than the limit of {}",
                path.display(),
                limits.max_file_bytes
            ),
        ));
    }
    let mut head = Vec::with_capacity(SNIFF_LEN);
    std::fs::File::open(path)
        .and_then(|f| f.take(SNIFF_LEN as u64).read_to_end(&mut head))
        .map_err(|e| error::io_error(path, "cannot read", e))?;
    match sniff(&head) {
        Some(kind) => Ok((kind, bytes)),
        None => Err(InputError::new(
            ErrorKind::Unsupported,
            format!(
                "{}: not a PDF or a supported image (JPEG, PNG, WebP, TIFF, BMP, GIF) by its first bytes",
                path.display()
            ),
        )),
    }
}

pub(crate) fn check_units(
    path: &Path,
    what: &str,
    count: u32,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<(), InputError> {
    if *range.start() < 1 || range.start() > range.end() || *range.end() > count {
        return Err(InputError::new(
            ErrorKind::BadRange,
            format!(
                "{}: {what} {}..={} asked for, the file has {count}",
                path.display(),
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_side_is_exact() {
        assert_eq!(
            RenderSize::LongSide(1288).pixels_for(612.0, 792.0),
            (995, 1288)
        );
        assert_eq!(
            RenderSize::LongSide(1288).pixels_for(792.0, 612.0),
            (1288, 995)
        );
        assert_eq!(
            RenderSize::Dpi(144.0).pixels_for(612.0, 792.0),
            (1224, 1584)
        );
        assert_eq!(RenderSize::LongSide(100).pixels_for(10000.0, 1.0), (100, 1));
    }

    #[test]
    fn sniff_kinds() {
        assert_eq!(sniff(b"%PDF-1.7\n"), Some(InputKind::Pdf));
        assert_eq!(sniff(b"junk\n%PDF-1.4"), Some(InputKind::Pdf));
        assert_eq!(sniff(b"BM hello world, this is text"), None);
        assert_eq!(sniff(b"hello"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(InputKind::Webp));
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), None);
    }
}
