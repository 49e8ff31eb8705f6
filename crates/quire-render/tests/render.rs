//! quire-render against the committed fixtures (tests/fixtures/docs, made by
//! tests/make_fixtures.py) and, for the text layer, against poppler's `pdftotext`.
//!
//! Needs libpdfium: `QUIRE_PDFIUM=$(scripts/setup-pdfium.sh /some/dir) cargo test -p quire-render`.
//! Without it these tests fail (on purpose: a skipped PDF test hides a broken install).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use quire_core::{ErrorKind, InputError};
use quire_render::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/docs")
        .join(name)
}

fn renderer() -> PdfRenderer {
    let set = std::env::var_os(PDFIUM_ENV).is_some_and(|v| !v.is_empty());
    assert!(
        set,
        "{PDFIUM_ENV} is not set: these tests need libpdfium. Run \
         `export {PDFIUM_ENV}=$(scripts/setup-pdfium.sh /root/pdfium)` from the repo root first."
    );
    PdfRenderer::start(1).unwrap_or_else(|e| panic!("cannot start pdfium: {e}"))
}

fn opts(size: RenderSize) -> RenderOptions {
    RenderOptions {
        size,
        ..RenderOptions::default()
    }
}

fn ok_pages(v: Vec<Result<Page, InputError>>) -> Vec<Page> {
    v.into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("page failed: {e}")))
        .collect()
}

fn kind_of<T: std::fmt::Debug>(r: Result<T, InputError>) -> ErrorKind {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            assert!(!e.message.is_empty());
            e.kind
        }
    }
}

fn head(name: &str) -> Vec<u8> {
    let b = std::fs::read(fixture(name)).unwrap();
    b[..b.len().min(SNIFF_LEN)].to_vec()
}

#[test]
fn sniff_uses_magic_bytes_not_names() {
    let cases: &[(&str, Option<InputKind>)] = &[
        ("born_digital.pdf", Some(InputKind::Pdf)),
        ("encrypted_user.pdf", Some(InputKind::Pdf)),
        ("corrupt.pdf", Some(InputKind::Pdf)),
        ("not_a_pdf.pdf", None),
        ("empty.pdf", None),
        ("png_named.jpg", Some(InputKind::Png)),
        ("photo.jpg", Some(InputKind::Jpeg)),
        ("image.png", Some(InputKind::Png)),
        ("image.webp", Some(InputKind::Webp)),
        ("image.bmp", Some(InputKind::Bmp)),
        ("animated.gif", Some(InputKind::Gif)),
        ("multipage.tif", Some(InputKind::Tiff)),
        ("fax_g4.tif", Some(InputKind::Tiff)),
        ("scan été 01.png", Some(InputKind::Png)),
    ];
    for (name, want) in cases {
        assert_eq!(sniff(&head(name)), *want, "{name}");
    }
}

#[test]
fn probe_counts_pages_and_frames() {
    let pdf = renderer();
    let l = Limits::default();
    let cases: &[(&str, InputKind, u32)] = &[
        ("born_digital.pdf", InputKind::Pdf, 3),
        ("mixed.pdf", InputKind::Pdf, 3),
        ("scanned.pdf", InputKind::Pdf, 1),
        ("owner_only.pdf", InputKind::Pdf, 3),
        ("multipage.tif", InputKind::Tiff, 3),
        ("fax_g4.tif", InputKind::Tiff, 1),
        ("animated.gif", InputKind::Gif, 1),
        ("png_named.jpg", InputKind::Png, 1),
        ("scan été 01.png", InputKind::Png, 1),
    ];
    for (name, kind, n) in cases {
        let p = probe(&fixture(name), &l, &pdf).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((p.kind, p.unit_count), (*kind, *n), "{name}");
        assert_eq!(p.bytes, std::fs::metadata(fixture(name)).unwrap().len());
    }
    assert_eq!(pdf.page_count(&fixture("born_digital.pdf")).unwrap(), 3);
}

#[test]
fn bad_inputs_give_the_right_kind() {
    let pdf = renderer();
    let l = Limits::default();
    let cases: &[(&str, ErrorKind)] = &[
        ("encrypted_user.pdf", ErrorKind::Encrypted),
        ("truncated.pdf", ErrorKind::Truncated),
        ("corrupt.pdf", ErrorKind::Corrupt),
        ("zero_pages.pdf", ErrorKind::Empty),
        ("empty.pdf", ErrorKind::Empty),
        ("not_a_pdf.pdf", ErrorKind::Unsupported),
        ("bomb.png", ErrorKind::TooManyPixels),
        ("does-not-exist.pdf", ErrorKind::Io),
    ];
    for (name, want) in cases {
        let got = kind_of(probe(&fixture(name), &l, &pdf));
        assert_eq!(got, *want, "probe {name}");
        if name.ends_with(".pdf") {
            let got = kind_of(pdf.render(&fixture(name), 1..=1, &RenderOptions::default()));
            assert_eq!(got, *want, "render {name}");
        }
    }
    // An image handed to the PDF renderer, and a PDF handed to the image decoder.
    assert_eq!(
        kind_of(pdf.render(&fixture("image.png"), 1..=1, &RenderOptions::default())),
        ErrorKind::Unsupported
    );
    assert_eq!(
        kind_of(decode_image(&fixture("born_digital.pdf"), 1..=1, &l)),
        ErrorKind::Unsupported
    );
    assert_eq!(
        kind_of(decode_image(&fixture("not_a_pdf.pdf"), 1..=1, &l)),
        ErrorKind::Unsupported
    );
    assert_eq!(
        kind_of(decode_image(&fixture("empty.pdf"), 1..=1, &l)),
        ErrorKind::Empty
    );
    assert_eq!(ErrorKind::TooManyPixels.as_str(), "too_many_pixels");
    assert_eq!(ErrorKind::PdfiumMissing.as_str(), "pdfium_missing");
}

#[test]
fn owner_password_only_renders() {
    let pdf = renderer();
    let pages = ok_pages(
        pdf.render(&fixture("owner_only.pdf"), 1..=3, &RenderOptions::default())
            .unwrap(),
    );
    assert_eq!(pages.len(), 3);
    assert!(pages[0]
        .text
        .as_deref()
        .unwrap()
        .contains("river had been rising"));
    assert!(pages[0].image.is_some());
}

#[test]
fn long_side_is_exact_and_colours_are_rgb() {
    let pdf = renderer();
    let pages = ok_pages(
        pdf.render(
            &fixture("born_digital.pdf"),
            1..=3,
            &opts(RenderSize::LongSide(1288)),
        )
        .unwrap(),
    );
    let dims: Vec<_> = pages.iter().map(|p| (p.page, p.width, p.height)).collect();
    // Letter portrait 612x792 pt, page 3 is landscape.
    assert_eq!(dims, vec![(1, 995, 1288), (2, 995, 1288), (3, 1288, 995)]);
    for p in &pages {
        assert_eq!(p.image.as_ref().unwrap().dimensions(), (p.width, p.height));
        assert!(p.render_ms > 0.0);
    }
    // 72 dpi: one pixel per point. The red box is at x 72..216, y 72..144 (from the bottom).
    let p = ok_pages(
        pdf.render(
            &fixture("born_digital.pdf"),
            1..=1,
            &opts(RenderSize::Dpi(72.0)),
        )
        .unwrap(),
    )
    .remove(0);
    assert_eq!((p.width, p.height), (612, 792));
    let img = p.image.unwrap();
    assert_eq!(
        img.get_pixel(144, 792 - 108).0,
        [255, 0, 0],
        "red box must read as red (channel order)"
    );
    assert_eq!(img.get_pixel(5, 5).0, [255, 255, 255], "white background");
    // Some dark text pixels exist.
    assert!(
        img.pixels()
            .filter(|px| px.0.iter().all(|&c| c < 100))
            .count()
            > 500
    );
}

#[test]
fn text_only_and_size_only() {
    let pdf = renderer();
    let o = RenderOptions {
        want_image: false,
        ..opts(RenderSize::LongSide(1000))
    };
    let p = ok_pages(pdf.render(&fixture("born_digital.pdf"), 2..=2, &o).unwrap()).remove(0);
    assert!(p.image.is_none());
    assert_eq!((p.page, p.width, p.height), (2, 773, 1000));
    assert!(p.text.unwrap().contains("Chapter 2"));
    let o = RenderOptions {
        want_text: false,
        ..opts(RenderSize::LongSide(500))
    };
    let p = ok_pages(pdf.render(&fixture("born_digital.pdf"), 1..=1, &o).unwrap()).remove(0);
    assert!(p.text.is_none() && p.image.is_some());
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn text_layer_agrees_with_pdftotext() {
    let pdf = renderer();
    let path = fixture("born_digital.pdf");
    let pages = ok_pages(
        pdf.render(
            &path,
            1..=3,
            &RenderOptions {
                want_image: false,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    for p in &pages {
        let out = Command::new("pdftotext")
            .args([
                "-f",
                &p.page.to_string(),
                "-l",
                &p.page.to_string(),
                "-enc",
                "UTF-8",
            ])
            .arg(&path)
            .arg("-")
            .output()
            .expect(
                "pdftotext (poppler-utils) is needed for this test: apt-get install poppler-utils",
            );
        assert!(out.status.success());
        let poppler = String::from_utf8(out.stdout).unwrap();
        let text = p.text.as_deref().unwrap();
        assert!(!text.contains('\r'), "line ends normalised");
        assert_eq!(words(text), words(&poppler), "page {}", p.page);
        assert!(words(text).len() > 100);
    }
}

#[test]
fn scanned_pages_have_no_text_layer() {
    let pdf = renderer();
    let o = RenderOptions::default();
    let scanned = ok_pages(pdf.render(&fixture("scanned.pdf"), 1..=1, &o).unwrap());
    assert_eq!(scanned[0].text.as_deref(), Some(""));
    assert!(scanned[0].image.is_some());
    let mixed = ok_pages(pdf.render(&fixture("mixed.pdf"), 1..=3, &o).unwrap());
    let lens: Vec<usize> = mixed
        .iter()
        .map(|p| p.text.as_deref().unwrap().trim().len())
        .collect();
    assert!(lens[0] > 200 && lens[1] == 0 && lens[2] > 200, "{lens:?}");
    // The scanned page still has ink.
    let img = mixed[1].image.as_ref().unwrap();
    assert!(img.pixels().filter(|px| px.0[0] < 100).count() > 1000);
}

#[test]
fn page_ranges() {
    let pdf = renderer();
    let o = RenderOptions {
        want_image: false,
        ..Default::default()
    };
    let p = ok_pages(pdf.render(&fixture("born_digital.pdf"), 2..=3, &o).unwrap());
    assert_eq!(p.iter().map(|p| p.page).collect::<Vec<_>>(), vec![2, 3]);
    #[allow(clippy::reversed_empty_ranges)] // an empty range is one of the bad inputs
    let bad_ranges = [0..=1, 3..=4, 3..=2];
    for bad in bad_ranges {
        assert_eq!(
            kind_of(pdf.render(&fixture("born_digital.pdf"), bad, &o)),
            ErrorKind::BadRange
        );
    }
    // A stream dropped half way does not wedge the pdfium thread.
    let mut s = pdf
        .render_stream(
            &fixture("born_digital.pdf"),
            1..=3,
            &RenderOptions::default(),
        )
        .unwrap();
    assert_eq!(s.page_count(), 3);
    assert!(s.next().unwrap().is_ok());
    drop(s);
    assert_eq!(pdf.page_count(&fixture("mixed.pdf")).unwrap(), 3);
}

#[test]
fn many_threads_share_one_pdfium() {
    let pdf = renderer();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let pdf = pdf.clone();
            std::thread::spawn(move || {
                let name = if i % 2 == 0 {
                    "born_digital.pdf"
                } else {
                    "mixed.pdf"
                };
                let pages = pdf
                    .render(&fixture(name), 1..=3, &opts(RenderSize::LongSide(600)))
                    .unwrap();
                pages.into_iter().filter(|p| p.is_ok()).count()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 3);
    }
}

#[test]
fn limits_are_configurable() {
    let pdf = renderer();
    let born = fixture("born_digital.pdf");
    let small_pages = Limits {
        max_pages: 2,
        ..Limits::default()
    };
    assert_eq!(
        kind_of(probe(&born, &small_pages, &pdf)),
        ErrorKind::TooManyPages
    );
    let o = RenderOptions {
        limits: small_pages,
        ..Default::default()
    };
    assert_eq!(
        kind_of(pdf.render(&born, 1..=1, &o)),
        ErrorKind::TooManyPages
    );
    let small_file = Limits {
        max_file_bytes: 100,
        ..Limits::default()
    };
    assert_eq!(
        kind_of(probe(&born, &small_file, &pdf)),
        ErrorKind::TooLarge
    );
    assert_eq!(
        kind_of(decode_image(&fixture("image.png"), 1..=1, &small_file)),
        ErrorKind::TooLarge
    );
    let tiff = Limits {
        max_pages: 2,
        ..Limits::default()
    };
    assert_eq!(
        kind_of(probe(&fixture("multipage.tif"), &tiff, &pdf)),
        ErrorKind::TooManyPages
    );

    // Pixel limit per page: a huge DPI fails each page on its own, the document still opens.
    let o = RenderOptions {
        size: RenderSize::Dpi(6000.0),
        ..Default::default()
    };
    let pages = pdf.render(&born, 1..=2, &o).unwrap();
    assert_eq!(pages.len(), 2);
    for p in pages {
        assert_eq!(kind_of(p), ErrorKind::TooManyPixels);
    }
    let few_px = Limits {
        max_pixels: 10_000,
        ..Limits::default()
    };
    let img = decode_image(&fixture("photo.jpg"), 1..=1, &few_px).unwrap();
    assert_eq!(
        kind_of(img.into_iter().next().unwrap()),
        ErrorKind::TooManyPixels
    );
}

#[test]
fn bomb_is_refused_from_the_header() {
    let pdf = renderer();
    let bomb = fixture("bomb.png");
    assert!(std::fs::metadata(&bomb).unwrap().len() < 200);
    let t = Instant::now();
    let err = probe(&bomb, &Limits::default(), &pdf).unwrap_err();
    assert_eq!(err.kind, ErrorKind::TooManyPixels);
    assert!(err.message.contains("100000 x 100000"), "{}", err.message);
    let r = decode_image(&bomb, 1..=1, &Limits::default()).unwrap();
    assert_eq!(
        kind_of(r.into_iter().next().unwrap()),
        ErrorKind::TooManyPixels
    );
    // 10^10 pixels would take 30 GB and many seconds to allocate and fill.
    assert!(t.elapsed().as_millis() < 500, "{:?}", t.elapsed());
}

#[test]
fn images_decode_to_rgb() {
    let l = Limits::default();
    let one = |name: &str| -> Page {
        let mut v =
            decode_image(&fixture(name), 1..=1, &l).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.len(), 1);
        v.remove(0).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    for name in [
        "photo.jpg",
        "png_named.jpg",
        "image.png",
        "image.webp",
        "image.bmp",
    ] {
        let p = one(name);
        assert_eq!((p.page, p.width, p.height), (1, 320, 240), "{name}");
        let img = p.image.unwrap();
        let [r, g, b] = img.get_pixel(5, 5).0;
        assert!(
            r < 80 && (60..130).contains(&g) && b > 120,
            "{name}: sky is blue, got {r},{g},{b}"
        );
        assert!(p.text.is_none());
    }
    // EXIF orientation 6: stored 320x240, displayed 240x320.
    let p = one("exif_rotated.jpg");
    assert_eq!((p.width, p.height), (240, 320));
    // Transparent black composited on white, opaque blue stays blue.
    let img = one("rgba.png").image.unwrap();
    assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(img.get_pixel(32, 32).0, [0, 0, 255]);
    // Grayscale becomes three equal channels.
    let img = one("gray.png").image.unwrap();
    assert!(img
        .pixels()
        .all(|px| px.0[0] == px.0[1] && px.0[1] == px.0[2]));
    // Animated GIF: the first frame (red), one page.
    let img = one("animated.gif").image.unwrap();
    assert_eq!(img.get_pixel(10, 10).0, [255, 0, 0]);
    assert_eq!(
        kind_of(decode_image(&fixture("animated.gif"), 1..=2, &l)),
        ErrorKind::BadRange
    );
    // Non-ASCII name with spaces.
    let p = one("scan été 01.png");
    assert_eq!((p.width, p.height), (425, 550));
}

#[test]
fn images_in_memory_decode_like_files() {
    let l = Limits::default();
    for name in ["photo.jpg", "exif_rotated.jpg", "rgba.png", "image.webp", "image.bmp", "multipage.tif", "png_named.jpg"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let mem = decode_image_bytes(name, &bytes, &l).unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = decode_image(&fixture(name), 1..=1, &l).unwrap().remove(0).unwrap();
        assert_eq!((mem.page, mem.width, mem.height), (1, file.width, file.height), "{name}");
        assert!(mem.image.unwrap() == file.image.unwrap(), "{name}: same pixels as from the file");
    }
    let pdf = std::fs::read(fixture("born_digital.pdf")).unwrap();
    assert_eq!(kind_of(decode_image_bytes("x.jpg", &pdf, &l)), ErrorKind::Unsupported);
    assert_eq!(kind_of(decode_image_bytes("x.jpg", b"hello", &l)), ErrorKind::Unsupported);
    assert_eq!(kind_of(decode_image_bytes("x.jpg", b"", &l)), ErrorKind::Empty);
    let bomb = std::fs::read(fixture("bomb.png")).unwrap();
    assert_eq!(kind_of(decode_image_bytes("bomb.png", &bomb, &l)), ErrorKind::TooManyPixels);
    let small = Limits { max_file_bytes: 100, ..Limits::default() };
    let photo = std::fs::read(fixture("photo.jpg")).unwrap();
    assert_eq!(kind_of(decode_image_bytes("photo.jpg", &photo, &small)), ErrorKind::TooLarge);
}

#[test]
fn tiff_frames_are_pages() {
    let l = Limits::default();
    let tif = fixture("multipage.tif");
    assert_eq!(frame_count(&tif).unwrap(), 3);
    let pages = ok_pages(decode_image(&tif, 1..=3, &l).unwrap());
    let want = [[255, 0, 0], [0, 255, 0], [0, 0, 255]];
    for (k, p) in pages.iter().enumerate() {
        assert_eq!(p.page, k as u32 + 1);
        assert_eq!((p.width, p.height), (200 + 10 * k as u32, 100));
        assert_eq!(p.image.as_ref().unwrap().get_pixel(2, 2).0, want[k]);
    }
    let two = ok_pages(decode_image(&tif, 2..=2, &l).unwrap());
    assert_eq!((two.len(), two[0].page, two[0].width), (1, 2, 210));
    assert_eq!(kind_of(decode_image(&tif, 3..=4, &l)), ErrorKind::BadRange);
    // Bilevel CCITT G4 (the usual fax/scan TIFF): white paper, black ink.
    let fax = ok_pages(decode_image(&fixture("fax_g4.tif"), 1..=1, &l).unwrap()).remove(0);
    let img = fax.image.unwrap();
    assert_eq!((img.width(), img.height()), (600, 400));
    assert_eq!(img.get_pixel(2, 2).0, [255, 255, 255]);
    let black = img.pixels().filter(|px| px.0 == [0, 0, 0]).count();
    assert!(black > 500 && black < 600 * 400 / 4, "{black}");
}

#[test]
fn missing_library_names_the_setup_script() {
    // find_pdfium with a bad QUIRE_PDFIUM is checked in a child process, so the env of this
    // test process (and the running pdfium thread) stays untouched.
    if std::env::var_os("QUIRE_RENDER_TEST_CHILD").is_some() {
        let e = find_pdfium().unwrap_err();
        assert_eq!(e.kind, ErrorKind::PdfiumMissing);
        assert!(
            e.message.contains("scripts/setup-pdfium.sh"),
            "{}",
            e.message
        );
        return;
    }
    let _ = renderer();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "missing_library_names_the_setup_script",
            "--nocapture",
        ])
        .env(PDFIUM_ENV, "/nonexistent/libpdfium.so")
        .env("QUIRE_RENDER_TEST_CHILD", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Not a test of its own: the body of the render worker processes that the pool tests start
/// (this test binary re-executed with QUIRE_RENDER_WORKER=1, running only this function).
#[test]
fn worker_entry_point() {
    if let Some(code) = run_worker_if_requested() {
        std::process::exit(code);
    }
}

fn pool(n: usize) -> PdfRenderer {
    let _ = renderer();
    let args: Vec<std::ffi::OsString> = [
        "--exact",
        "worker_entry_point",
        "--nocapture",
        "--test-threads=1",
    ]
    .iter()
    .map(Into::into)
    .collect();
    PdfRenderer::start_processes(n, &std::env::current_exe().unwrap(), &args)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn process_pool_matches_the_thread() {
    let local = renderer();
    let procs = pool(2);
    let o = opts(RenderSize::LongSide(700));
    for name in ["born_digital.pdf", "mixed.pdf"] {
        let a = ok_pages(local.render(&fixture(name), 1..=3, &o).unwrap());
        let b = ok_pages(procs.render(&fixture(name), 1..=3, &o).unwrap());
        for (a, b) in a.iter().zip(&b) {
            assert_eq!((a.page, a.width, a.height), (b.page, b.width, b.height));
            assert_eq!(a.text, b.text);
            assert!(
                a.image.as_ref().unwrap().as_raw() == b.image.as_ref().unwrap().as_raw(),
                "{name} p{}",
                a.page
            );
        }
    }
    assert_eq!(procs.page_count(&fixture("mixed.pdf")).unwrap(), 3);
    assert_eq!(
        kind_of(procs.page_count(&fixture("encrypted_user.pdf"))),
        ErrorKind::Encrypted
    );
    assert_eq!(
        kind_of(procs.render(&fixture("encrypted_user.pdf"), 1..=1, &o)),
        ErrorKind::Encrypted
    );
    assert_eq!(
        kind_of(procs.render(&fixture("born_digital.pdf"), 2..=9, &o)),
        ErrorKind::BadRange
    );
    let px = RenderOptions {
        size: RenderSize::Dpi(6000.0),
        ..o.clone()
    };
    let r = procs
        .render(&fixture("born_digital.pdf"), 1..=1, &px)
        .unwrap();
    assert_eq!(
        kind_of(r.into_iter().next().unwrap()),
        ErrorKind::TooManyPixels
    );
    // Abandoned stream: that worker is replaced, later requests still work.
    let mut s = procs
        .render_stream(&fixture("born_digital.pdf"), 1..=3, &o)
        .unwrap();
    assert!(s.next().unwrap().is_ok());
    drop(s);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let p = procs.clone();
            std::thread::spawn(move || {
                ok_pages(
                    p.render(
                        &fixture("born_digital.pdf"),
                        1..=3,
                        &opts(RenderSize::LongSide(300)),
                    )
                    .unwrap(),
                )
                .len()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 3);
    }
}

#[test]
fn pool_refuses_an_executable_that_is_no_worker() {
    let _ = renderer();
    let e = PdfRenderer::start_processes(1, Path::new("/bin/true"), &[])
        .err()
        .expect("must fail");
    assert!(
        e.message.contains("run_worker_if_requested"),
        "{}",
        e.message
    );
}

/// A worker that greets and then dies on its first request, as one would when pdfium crashes.
#[test]
fn crashing_worker_entry_point() {
    if std::env::var_os(WORKER_ENV).is_some() {
        use std::io::{BufRead, Write};
        let mut out = std::io::stdout().lock();
        writeln!(out, r#"{{"t":"hello","ok":null}}"#).unwrap();
        out.flush().unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        std::process::abort();
    }
}

#[test]
fn a_dying_worker_fails_the_request_and_is_replaced() {
    let _ = renderer();
    let args: Vec<std::ffi::OsString> = [
        "--exact",
        "crashing_worker_entry_point",
        "--nocapture",
        "--test-threads=1",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let pdf = PdfRenderer::start_processes(1, &std::env::current_exe().unwrap(), &args).unwrap();
    for _ in 0..2 {
        let e = pdf
            .render(
                &fixture("born_digital.pdf"),
                1..=1,
                &RenderOptions::default(),
            )
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert!(e.message.contains("worker died"), "{}", e.message);
        assert_eq!(
            kind_of(pdf.page_count(&fixture("born_digital.pdf"))),
            ErrorKind::Corrupt
        );
    }
}

/// A worker that speaks the protocol but hangs on page 2 of any document, as pdfium can on a
/// pathological page: it claims 3 pages and sends pages 1 and 3 without images.
#[test]
fn hanging_worker_entry_point() {
    if std::env::var_os(WORKER_ENV).is_some() {
        use std::io::{BufRead, Write};
        let mut out = std::io::stdout().lock();
        writeln!(out, r#"{{"t":"hello","ok":null}}"#).unwrap();
        out.flush().unwrap();
        for line in std::io::stdin().lock().lines() {
            let req: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            writeln!(out, r#"{{"t":"opened","r":{{"Ok":3}}}}"#).unwrap();
            out.flush().unwrap();
            for p in req["first"].as_u64().unwrap()..=req["last"].as_u64().unwrap() {
                if p == 2 {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
                let head = serde_json::json!({"page": p, "width": 1, "height": 1, "text": format!("page {p}"), "render_ms": 0.0, "image_bytes": 0});
                writeln!(out, "{}", serde_json::json!({"t": "page", "r": {"Ok": head}})).unwrap();
                out.flush().unwrap();
            }
        }
        std::process::exit(0);
    }
}

#[test]
fn a_hanging_page_times_out_and_the_rest_of_the_document_still_renders() {
    let _ = renderer();
    let args: Vec<std::ffi::OsString> = ["--exact", "hanging_worker_entry_point", "--nocapture", "--test-threads=1"]
        .iter()
        .map(Into::into)
        .collect();
    let limit = std::time::Duration::from_millis(1500);
    let pdf = PdfRenderer::start_processes_with(1, &std::env::current_exe().unwrap(), &args, Some(limit)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let pages = pdf.render(&fixture("born_digital.pdf"), 1..=3, &RenderOptions::default()).unwrap();
        let _ = tx.send(pages);
    });
    let pages = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the hang was not cut short");
    assert!(t0.elapsed() >= limit);
    assert_eq!(pages.len(), 3);
    assert_eq!(pages[0].as_ref().unwrap().text.as_deref(), Some("page 1"));
    let e = pages[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert!(e.message.contains("longer than"), "{}", e.message);
    // Page 3 went to a fresh worker.
    assert_eq!(pages[2].as_ref().unwrap().text.as_deref(), Some("page 3"));
}
