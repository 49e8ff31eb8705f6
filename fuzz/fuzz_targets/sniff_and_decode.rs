//! Any bytes as an input file: kind detection never panics and depends only on the head it
//! is documented to read; image decoding under small limits refuses bombs instead of
//! allocating them, and a decoded page never exceeds the pixel limit.
//!
//! TIFFs also go through the file path (`frame_count` + `decode_image`, every frame a page),
//! which has its own pixel checks (the in-memory path decodes the first frame only).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use quire_render::{InputKind, Limits, Page, SNIFF_LEN};
use quire_store::archive::{sniff_archive, ARCHIVE_SNIFF_LEN};

const LIMITS: Limits = Limits {
    max_file_bytes: 1 << 20,
    max_pages: 4,
    max_pixels: 4_000_000,
    max_archive_members: quire_core::DEFAULT_MAX_ARCHIVE_MEMBERS,
    max_zip_ratio: quire_core::DEFAULT_MAX_ZIP_RATIO,
};

fn check_page(p: &Page, what: &str) {
    let px = u64::from(p.width) * u64::from(p.height);
    assert!(
        px <= LIMITS.max_pixels,
        "{what}: decoded {} x {} px, over the limit of {}",
        p.width,
        p.height,
        LIMITS.max_pixels
    );
    let img = p.image.as_ref().expect("a decoded image has pixels");
    assert_eq!(img.dimensions(), (p.width, p.height), "{what}: size mismatch");
    assert_eq!(img.as_raw().len() as u64, px * 3, "{what}: buffer is not w*h*3");
    assert!(p.text.is_none(), "{what}: an image has no text layer");
}

/// One scratch file per fuzzing process (libFuzzer forks/jobs get their own pid).
fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("quire-fuzz-sniff-{}.tif", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    // Detection reads a bounded head, so what follows it cannot change the answer.
    let kind = quire_render::sniff(data);
    assert_eq!(kind, quire_render::sniff(&data[..data.len().min(SNIFF_LEN)]));
    let archive = sniff_archive(data);
    assert_eq!(archive, sniff_archive(&data[..data.len().min(ARCHIVE_SNIFF_LEN)]));

    match quire_render::decode_image_bytes("fuzz", data, &LIMITS) {
        Ok(page) => {
            assert!(kind.is_some_and(InputKind::is_image), "decoded {kind:?}");
            assert_eq!(page.page, 1);
            check_page(&page, "decode_image_bytes");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }

    if kind == Some(InputKind::Tiff) && data.len() as u64 <= LIMITS.max_file_bytes {
        let path = scratch();
        std::fs::write(path, data).expect("write scratch file");
        if let Ok(n) = quire_render::frame_count(path) {
            assert!(n >= 1);
            let last = n.min(LIMITS.max_pages);
            if let Ok(frames) = quire_render::decode_image(path, 1..=last, &LIMITS) {
                assert!(n <= LIMITS.max_pages, "{n} frames decoded past max_pages");
                assert_eq!(frames.len() as u32, last);
                for (i, f) in frames.iter().enumerate() {
                    if let Ok(p) = f {
                        assert_eq!(p.page, i as u32 + 1);
                        check_page(p, "decode_image (tiff)");
                    }
                }
            }
        }
    }
});
