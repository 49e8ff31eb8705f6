//! Any bytes as a PDF, through quire's own pdfium code in process (`PdfRenderer::start`: the
//! pdfium thread of this process, not the worker processes that exist to survive pdfium
//! crashes; here a crash is the finding): page count, then at most `MAX_PAGES` pages rendered
//! at 24 dpi (a Letter page is 204 x 264 px) with their text layer; a page whose box would
//! exceed the small pixel limit must be refused before rendering.
//!
//! Checks: no page exceeds the pixel limit, pixel buffers match the reported size, the text
//! is normalised as documented, and no panic is hidden (quire turns a panic inside the
//! renderer into a `Corrupt` error; the fuzzer turns it back into a crash).
//!
//! Needs libpdfium: `QUIRE_PDFIUM=/path/to/libpdfium.so` (or the folder). libpdfium is a
//! prebuilt library without coverage instrumentation, so libFuzzer is guided only by the
//! Rust side (quire-render, pdfium-render); pdfium's own code is exercised, not explored.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use quire_core::InputError;
use quire_render::{Limits, PdfRenderer, RenderOptions, RenderSize};

const MAX_PAGES: u32 = 3;

const LIMITS: Limits = Limits {
    max_file_bytes: 1 << 20,
    max_pages: 64,
    max_pixels: 200_000,
    max_archive_members: quire_core::DEFAULT_MAX_ARCHIVE_MEMBERS,
    max_zip_ratio: quire_core::DEFAULT_MAX_ZIP_RATIO,
};

struct Ctx {
    pdf: PdfRenderer,
    path: PathBuf,
}

fn ctx() -> &'static Ctx {
    static C: OnceLock<Ctx> = OnceLock::new();
    C.get_or_init(|| {
        if std::env::var_os(quire_render::PDFIUM_ENV).is_none() {
            let default = "/root/.cache/quire-tools/pdfium/libpdfium.so";
            if std::path::Path::new(default).is_file() {
                std::env::set_var(quire_render::PDFIUM_ENV, default);
            }
        }
        let pdf = PdfRenderer::start(1).unwrap_or_else(|e| panic!("cannot start pdfium: {e} (set QUIRE_PDFIUM)"));
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("quire-fuzz-pdf-{}.pdf", std::process::id()));
        Ctx { pdf, path }
    })
}

/// A panic inside the renderer comes back as an error; surface it.
fn no_hidden_panic(e: &InputError) {
    let msg = e.to_string();
    assert!(!msg.contains("renderer panicked"), "{msg}");
}

fn check_text(t: &str) {
    for c in ['\r', '\0', '\u{2}', '\u{FFFE}', '\u{FEFF}'] {
        assert!(!t.contains(c), "text keeps {c:?}: {t:?}");
    }
    assert_eq!(t, t.trim_end(), "trailing blank lines kept");
    for line in t.split('\n') {
        assert_eq!(line, line.trim_end(), "trailing spaces kept in {line:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    // Not a PDF by its head: quire refuses it before pdfium sees it.
    if quire_render::sniff(data) != Some(quire_render::InputKind::Pdf) {
        return;
    }
    let c = ctx();
    std::fs::write(&c.path, data).expect("write scratch file");
    let n = match c.pdf.page_count(&c.path) {
        Ok(n) => n,
        Err(e) => return no_hidden_panic(&e),
    };
    if n == 0 {
        return;
    }
    let last = n.min(MAX_PAGES);
    let opts = RenderOptions { size: RenderSize::Dpi(24.0), want_image: true, want_text: true, limits: LIMITS };
    match c.pdf.render(&c.path, 1..=last, &opts) {
        Ok(pages) => {
            assert!(n <= LIMITS.max_pages, "{n} pages rendered past max_pages");
            assert_eq!(pages.len() as u32, last);
            for (i, r) in pages.iter().enumerate() {
                match r {
                    Ok(p) => {
                        assert_eq!(p.page, i as u32 + 1);
                        let px = u64::from(p.width) * u64::from(p.height);
                        assert!(px <= LIMITS.max_pixels, "page {}: {} x {} px", p.page, p.width, p.height);
                        let img = p.image.as_ref().expect("pixels were asked for");
                        assert_eq!(img.dimensions(), (p.width, p.height));
                        assert_eq!(img.as_raw().len() as u64, px * 3);
                        check_text(p.text.as_deref().expect("text was asked for"));
                    }
                    Err(e) => no_hidden_panic(e),
                }
            }
        }
        Err(e) => no_hidden_panic(&e),
    }
});
