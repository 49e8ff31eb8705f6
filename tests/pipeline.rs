//! End-to-end tests of `quire run` on real files with the real pdfium.
//!
//! Needs libpdfium (`QUIRE_PDFIUM`, see scripts/setup-pdfium.sh) and
//! poppler's `pdftotext` (the independent extractor the text layer is
//! checked against). Both are installed by `.ci/run`.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn doc(name: &str) -> PathBuf {
    fixtures().join("docs").join(name)
}

fn quire(args: &[&str]) -> Output {
    assert!(
        std::env::var_os("QUIRE_PDFIUM").is_some(),
        "QUIRE_PDFIUM is not set: run scripts/setup-pdfium.sh and export the path it prints"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_quire")).args(args).output().expect("run quire");
    eprintln!("quire {}\n--- stderr ---\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

/// All records of a job, keyed by (source file name, page).
fn records(out: &Path, job: &str) -> BTreeMap<(String, u64), Value> {
    let mut map = BTreeMap::new();
    let dir = out.join(job).join("results");
    for entry in std::fs::read_dir(&dir).expect("results folder") {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("a JSON record per line");
            let name = Path::new(v["source"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned();
            let page = v["page"].as_u64().unwrap();
            assert!(map.insert((name.clone(), page), v).is_none(), "duplicate record for {name} page {page}");
        }
    }
    map
}

fn manifest(out: &Path, job: &str) -> Value {
    serde_json::from_slice(&std::fs::read(out.join(job).join("manifest.json")).expect("manifest")).unwrap()
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(|w| w.to_string()).collect()
}

fn copy_into(dir: &Path, names: &[&str]) {
    for n in names {
        std::fs::copy(doc(n), dir.join(n)).unwrap();
    }
}

#[test]
fn text_layer_matches_pdftotext_and_output_contract_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let input = doc("born_digital.pdf");
    let o = quire(&["run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--engine", "text-layer", "--job", "t1", "--pages-per-task", "2"]);
    assert_eq!(code(&o), 0);
    let recs = records(&out, "t1");
    let n = recs.len() as u64;
    assert!(n >= 3, "born_digital.pdf has several pages, got {n} records");
    for (i, ((name, page), r)) in recs.iter().enumerate() {
        assert_eq!(name, "born_digital.pdf");
        assert_eq!(*page, i as u64 + 1);
        // The output contract, field by field and typed.
        assert_eq!(r["job"], "t1");
        assert!(r["task_id"].as_str().unwrap().len() == 32);
        assert_eq!(r["source"], input.to_str().unwrap());
        assert_eq!(r["page_count"].as_u64(), Some(n));
        assert_eq!(r["task"], "ocr");
        assert_eq!(r["engine"], "text-layer");
        assert!(r["model"].is_null() && r["prompt"].is_null());
        assert!(r["tokens_in"].is_u64() && r["tokens_out"].is_u64());
        assert_eq!(r["finish_reason"], "stop");
        assert!(r["width"].as_u64().unwrap() > 0 && r["height"].as_u64().unwrap() > 0);
        assert!(r["timings_ms"]["render"].is_number() && r["timings_ms"]["infer"].is_number());
        assert!(r["error"].is_null());
        // The text agrees with poppler's extractor, word for word.
        let p = page.to_string();
        let pt = Command::new("pdftotext")
            .args(["-f", &p, "-l", &p, "-enc", "UTF-8", input.to_str().unwrap(), "-"])
            .output()
            .expect("pdftotext (poppler-utils) is needed for this test");
        let expected = words(&String::from_utf8_lossy(&pt.stdout));
        assert!(!expected.is_empty());
        assert_eq!(words(r["text"].as_str().unwrap()), expected, "page {page}");
    }
    // Two records per task file, pages in order.
    let results: Vec<_> = std::fs::read_dir(out.join("t1/results")).unwrap().collect();
    assert_eq!(results.len() as u64, n.div_ceil(2));
    let md = std::fs::read_to_string(out.join("t1/markdown/born_digital.pdf.md")).unwrap();
    let first = md.find("<!-- page 1 -->").unwrap();
    let last = md.find(&format!("<!-- page {n} -->")).unwrap();
    assert!(first < last);
    let m = manifest(&out, "t1");
    assert_eq!(m["counts"]["pages_ok"].as_u64(), Some(n));
    assert_eq!(m["counts"]["pages_failed"].as_u64(), Some(0));
    assert_eq!(m["counts"]["documents"].as_u64(), Some(1));
    assert_eq!(m["settings"]["engine"], "text-layer");
    assert!(m["throughput"]["pages_per_second"].as_f64().unwrap() > 0.0);
    assert!(m["failures"].as_array().unwrap().is_empty());
}

#[test]
fn bad_inputs_each_get_one_clear_error_record_and_the_rest_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    copy_into(
        &input,
        &["corrupt.pdf", "truncated.pdf", "encrypted_user.pdf", "zero_pages.pdf", "empty.pdf", "not_a_pdf.pdf", "bomb.png", "born_digital.pdf", "owner_only.pdf"],
    );
    std::fs::write(input.join("notes.txt"), "just some text, not a document\n").unwrap();
    let huge = input.join("big.pdf");
    std::fs::copy(doc("scanned.pdf"), &huge).unwrap();
    let unreadable = input.join("locked.pdf");
    std::fs::copy(doc("born_digital.pdf"), &unreadable).unwrap();
    std::fs::set_permissions(&unreadable, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let root = unsafe { libc_geteuid() } == 0;
    std::os::unix::fs::symlink(&input, input.join("loop")).unwrap();

    let out = tmp.path().join("out");
    let o = quire(&[
        "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--engine", "text-layer", "--job", "bad2",
        "--max-pixels", "20000000",
    ]);
    assert_eq!(code(&o), 3, "some inputs failed: exit code 3");
    let recs = records(&out, "bad2");
    let kind = |name: &str| -> String {
        let r = recs.get(&(name.to_string(), 1)).unwrap_or_else(|| panic!("a record for {name}"));
        r["error"]["kind"].as_str().map(str::to_string).unwrap_or_else(|| "ok".into())
    };
    assert_eq!(kind("corrupt.pdf"), "corrupt");
    assert!(["truncated", "corrupt"].contains(&kind("truncated.pdf").as_str()), "{}", kind("truncated.pdf"));
    assert_eq!(kind("encrypted_user.pdf"), "encrypted");
    assert_eq!(kind("zero_pages.pdf"), "empty");
    assert_eq!(kind("empty.pdf"), "empty");
    assert_eq!(kind("not_a_pdf.pdf"), "unsupported");
    assert_eq!(kind("notes.txt"), "unsupported");
    assert_eq!(kind("bomb.png"), "too_many_pixels");
    assert_eq!(kind("owner_only.pdf"), "ok", "an owner password alone does not stop reading");
    assert_eq!(kind("born_digital.pdf"), "ok");
    if !root {
        assert_eq!(kind("locked.pdf"), "io");
    }
    for ((name, _), r) in &recs {
        if let Some(msg) = r["error"]["message"].as_str() {
            assert!(msg.len() > 10, "{name}: message too terse: {msg}");
            assert_eq!(r["finish_reason"], "error");
            assert_eq!(r["text"], "");
        }
    }
    let m = manifest(&out, "bad2");
    let failures = m["failures"].as_array().unwrap();
    assert!(failures.iter().any(|f| f["kind"] == "encrypted" && f["source"].as_str().unwrap().ends_with("encrypted_user.pdf")));
    assert!(m["counts"]["pages_ok"].as_u64().unwrap() >= 2);

    // The size limit is configurable: a tight one refuses the large file only.
    let o = quire(&[
        "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--engine", "text-layer", "--job", "small",
        "--max-file-mb", "0.03",
    ]);
    assert_eq!(code(&o), 3);
    let recs = records(&out, "small");
    assert_eq!(recs[&("big.pdf".to_string(), 1)]["error"]["kind"], "too_large");
    assert!(recs[&("big.pdf".to_string(), 1)]["error"]["message"].as_str().unwrap().contains("limit"));
    assert!(recs[&("born_digital.pdf".to_string(), 1)]["error"].is_null());
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn reruns_skip_finished_tasks_and_never_duplicate() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("docs");
    std::fs::create_dir(&input).unwrap();
    copy_into(&input, &["born_digital.pdf", "mixed.pdf", "corrupt.pdf"]);
    let out = tmp.path().join("out");
    let args = ["run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "again", "--pages-per-task", "1"];
    let first = quire(&args);
    assert_eq!(code(&first), 3, "mixed.pdf has a scanned page and no model was given");
    let before = records(&out, "again");
    let files_before: Vec<_> = std::fs::read_dir(out.join("again/results")).unwrap().map(|e| e.unwrap().file_name()).collect();
    let second = quire(&args);
    assert_eq!(code(&second), 3);
    let stderr = String::from_utf8_lossy(&second.stderr);
    let tasks = files_before.len();
    assert!(stderr.contains(&format!("0 done now, {tasks} already done and skipped")), "{stderr}");
    assert_eq!(records(&out, "again"), before, "a rerun changes nothing");
    let m = manifest(&out, "again");
    assert_eq!(m["counts"]["tasks_skipped"].as_u64(), Some(tasks as u64));
    assert_eq!(m["counts"]["records"].as_u64(), Some(before.len() as u64));
    // --force redoes every task, still without duplicates.
    let forced = quire(&[&args[..], &["--force"]].concat());
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(stderr.contains(&format!("{tasks} done now, 0 already done")), "{stderr}");
    let after = records(&out, "again");
    assert_eq!(after.len(), before.len());
    for (k, v) in &before {
        assert_eq!(after[k]["text"], v["text"]);
    }
    // A changed setting is new work, not a reuse of old results.
    let other = quire(&[&args[..], &["--text-min-chars", "5"]].concat());
    assert!(String::from_utf8_lossy(&other.stderr).contains("0 already done"));
}

#[test]
fn auto_routes_text_pages_to_the_text_layer_and_scans_to_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = quire(&["run", doc("mixed.pdf").to_str().unwrap(), doc("scanned.pdf").to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "auto"]);
    assert_eq!(code(&o), 3);
    let recs = records(&out, "auto");
    let mixed: Vec<_> = recs.iter().filter(|((n, _), _)| n == "mixed.pdf").map(|(_, r)| r).collect();
    let text_pages = mixed.iter().filter(|r| r["engine"] == "text-layer" && r["error"].is_null()).count();
    let scan_pages: Vec<_> = mixed.iter().filter(|r| r["error"]["kind"] == "needs_model").collect();
    assert!(text_pages >= 1, "mixed.pdf's text pages use their text layer");
    assert_eq!(scan_pages.len(), 1, "mixed.pdf has one scanned page, which needs the model");
    assert!(scan_pages[0]["error"]["message"].as_str().unwrap().contains("--model"));
    assert!(recs.iter().filter(|((n, _), _)| n == "scanned.pdf").all(|(_, r)| r["error"]["kind"] == "needs_model"));
}

#[test]
fn images_and_tiff_frames_are_pages_and_odd_names_stay_inside_out() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imgs");
    std::fs::create_dir_all(input.join("sub dir")).unwrap();
    copy_into(&input, &["multipage.tif", "animated.gif", "png_named.jpg", "scan été 01.png"]);
    std::fs::copy(doc("born_digital.pdf"), input.join("sub dir").join("..evil\nname.pdf")).unwrap();
    let out = tmp.path().join("out");
    let o = quire(&["run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "img", "--engine", "text-layer"]);
    assert_eq!(code(&o), 3, "images need a model for text");
    let recs = records(&out, "img");
    let tiff: Vec<_> = recs.iter().filter(|((n, _), _)| n == "multipage.tif").map(|((_, p), r)| (*p, r["page_count"].as_u64().unwrap())).collect();
    assert_eq!(tiff, vec![(1, 3), (2, 3), (3, 3)], "each TIFF frame is a page");
    assert_eq!(recs[&("animated.gif".to_string(), 1)]["page_count"], 1, "a GIF is its first frame");
    assert_eq!(recs[&("png_named.jpg".to_string(), 1)]["width"].as_u64().map(|w| w > 0), Some(true), "decoded by content, not name");
    for r in recs.values().filter(|r| !r["source"].as_str().unwrap().ends_with(".pdf")) {
        assert_eq!(r["error"]["kind"], "needs_model");
    }
    // Every file quire wrote is inside --out.
    let md_root = out.join("img/markdown");
    assert!(md_root.join("imgs/scan été 01.png.md").exists());
    let evil: Vec<_> = walk(&md_root).into_iter().filter(|p| p.to_string_lossy().contains("evil")).collect();
    assert_eq!(evil.len(), 1);
    assert!(evil[0].starts_with(&md_root));
    assert!(walk(tmp.path()).iter().all(|p| p.starts_with(&out) || p.starts_with(&input)));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn usage_errors_exit_2_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let o = quire(&["run", "/no/such/input", "--out", tmp.path().to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/input"));
    let o = quire(&["run", doc("born_digital.pdf").to_str().unwrap(), "--out", tmp.path().to_str().unwrap(), "--engine", "vlm"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--model"));
    let o = Command::new(env!("CARGO_BIN_EXE_quire"))
        .args(["run", doc("born_digital.pdf").to_str().unwrap(), "--out", tmp.path().to_str().unwrap()]).env("QUIRE_PDFIUM", "/nonexistent/libpdfium.so").output().unwrap();
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("setup-pdfium"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The tiny random-weight checkpoints written by `tests/gen_idefics3.py` and
/// what `transformers` generated with them.
fn idefics3(name: &str) -> (PathBuf, Value) {
    let dir = fixtures().join("idefics3").join(name);
    let reference = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (dir, reference)
}

#[test]
fn vlm_engine_reproduces_the_reference_greedy_text_through_quire_run() {
    let tmp = tempfile::tempdir().unwrap();
    for ckpt in ["split_sf2_gqa", "nosplit_sf4_tied_old"] {
        let (model, reference) = idefics3(ckpt);
        let max_new = reference["max_new_tokens"].as_u64().unwrap().to_string();
        for case in reference["cases"].as_array().unwrap() {
            let image = case["image"].as_str().unwrap();
            if image.contains("rgba") {
                continue; // compositing onto white is covered by the model's own parity tests
            }
            let input = fixtures().join("idefics3/images").join(image);
            let out = tmp.path().join(format!("{ckpt}-{image}"));
            let o = quire(&[
                "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "vlm", "--engine", "vlm",
                "--model", model.to_str().unwrap(), "--prompt", case["prompt"].as_str().unwrap(), "--max-new-tokens", &max_new,
            ]);
            assert_eq!(code(&o), 0);
            let recs = records(&out, "vlm");
            let r = &recs[&(image.to_string(), 1)];
            assert_eq!(r["engine"], "vlm");
            assert_eq!(r["model"], model.to_str().unwrap());
            assert_eq!(r["text"], case["text"], "{ckpt} {image}: greedy text differs from transformers");
            assert_eq!(r["tokens_out"].as_u64().unwrap() as usize, case["new_tokens"].as_array().unwrap().len());
            let ids = case["input_ids"].as_array().unwrap();
            assert_eq!(r["tokens_in"].as_u64().unwrap() as usize, ids.len(), "tokens_in counts image tokens");
            let expect_finish = if case["new_tokens"].as_array().unwrap().len() as u64 == reference["max_new_tokens"].as_u64().unwrap() { "length" } else { "stop" };
            assert_eq!(r["finish_reason"], expect_finish);
        }
    }
}

#[test]
fn scanned_pages_and_images_go_to_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = idefics3("split_sf2_gqa");
    let out = tmp.path().join("out");
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    copy_into(&input, &["mixed.pdf", "multipage.tif", "photo.jpg"]);
    let o = quire(&[
        "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "m", "--model", model.to_str().unwrap(),
        "--max-new-tokens", "5", "--pages-per-task", "1", "--batch-size", "4",
    ]);
    assert_eq!(code(&o), 0);
    let recs = records(&out, "m");
    let mixed: Vec<_> = recs.iter().filter(|((n, _), _)| n == "mixed.pdf").map(|(_, r)| r).collect();
    assert_eq!(mixed.iter().filter(|r| r["engine"] == "vlm").count(), 1, "only the scanned page goes to the model");
    assert!(mixed.iter().filter(|r| r["engine"] == "text-layer").all(|r| r["model"].is_null()));
    for r in recs.values().filter(|r| r["engine"] == "vlm") {
        assert!(r["error"].is_null(), "{r}");
        assert!(r["tokens_out"].as_u64().unwrap() >= 1 && r["tokens_out"].as_u64().unwrap() <= 5);
        assert!(r["tokens_in"].as_u64().unwrap() > 64, "prompt tokens include the image tokens");
        assert!(r["prompt"].as_str().unwrap().len() > 5, "the family's default prompt is recorded");
    }
    assert_eq!(recs.values().filter(|r| r["source"].as_str().unwrap().ends_with("multipage.tif")).count(), 3);
    // Same pages, captioning: a different task, so new work and a different prompt.
    let o = quire(&[
        "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "m", "--model", model.to_str().unwrap(),
        "--max-new-tokens", "5", "--task", "caption", "--engine", "vlm",
    ]);
    assert_eq!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("0 already done"));
}

/// Scanned PDF pages rendered the way quire renders them, by pypdfium2 with the same
/// libpdfium (the pypdfium2 5.15.2 wheel's), and what `transformers` generated on exactly
/// those pixels: `tests/gen_idefics3.py pdf` writes `idefics3/pdf_pages/`.
fn pdf_pages() -> (PathBuf, Value) {
    let dir = fixtures().join("idefics3/pdf_pages");
    let reference = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (dir, reference)
}

#[test]
fn pdf_pages_render_to_the_same_pixels_as_the_reference_rendering() {
    assert!(std::env::var_os("QUIRE_PDFIUM").is_some(), "QUIRE_PDFIUM is not set (scripts/setup-pdfium.sh)");
    let (dir, reference) = pdf_pages();
    let pdf = quire_render::PdfRenderer::start(1).expect("pdfium");
    for case in reference["cases"].as_array().unwrap() {
        let what = format!("{} page {} at {} px", case["document"], case["page"], case["long_side"]);
        let n = case["page"].as_u64().unwrap() as u32;
        let opts = quire_render::RenderOptions {
            size: quire_render::RenderSize::LongSide(case["long_side"].as_u64().unwrap() as u32),
            want_image: true,
            want_text: false,
            limits: quire_render::Limits::default(),
        };
        let page = pdf.render(&doc(case["document"].as_str().unwrap()), n..=n, &opts).unwrap().remove(0).unwrap();
        let got = page.image.expect("pixels");
        let png = dir.join(case["png"].as_str().unwrap());
        let want = quire_render::decode_image(&png, 1..=1, &quire_render::Limits::default()).unwrap().remove(0).unwrap();
        let want = want.image.unwrap();
        assert_eq!(got.dimensions(), want.dimensions(), "{what}: size");
        assert_eq!(
            (got.width() as u64, got.height() as u64),
            (case["width"].as_u64().unwrap(), case["height"].as_u64().unwrap())
        );
        // Same library, same bitmap format, flags and background: the bytes are identical.
        let differing = got.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{what}: {differing} of {} bytes differ from pypdfium2's rendering", got.as_raw().len());
    }
}

#[test]
fn vlm_engine_reproduces_the_reference_greedy_text_on_scanned_pdf_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, reference) = pdf_pages();
    let max_new = reference["max_new_tokens"].as_u64().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for case in reference["cases"].as_array().unwrap() {
        let ckpt = case["checkpoint"].as_str().unwrap();
        let (model, _) = idefics3(ckpt);
        let document = case["document"].as_str().unwrap();
        let out = tmp.path().join(format!("{ckpt}-{document}"));
        // No --render-long-side: quire renders at the long side the model's processor reads,
        // which is what the reference rendering used.
        let o = quire(&[
            "run", doc(document).to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "pdf", "--engine", "vlm",
            "--model", model.to_str().unwrap(), "--prompt", reference["prompt"].as_str().unwrap(),
            "--max-new-tokens", &max_new.to_string(),
        ]);
        assert_eq!(code(&o), 0);
        let recs = records(&out, "pdf");
        let r = &recs[&(document.to_string(), case["page"].as_u64().unwrap())];
        assert_eq!(r["engine"], "vlm");
        assert_eq!((r["width"].as_u64(), r["height"].as_u64()), (case["width"].as_u64(), case["height"].as_u64()), "{ckpt}: render size");
        assert_eq!(r["text"], case["text"], "{ckpt} {document}: greedy text differs from transformers");
        let new_tokens = case["new_tokens"].as_array().unwrap().len() as u64;
        assert_eq!(r["tokens_out"].as_u64(), Some(new_tokens));
        assert_eq!(r["tokens_in"].as_u64().unwrap() as usize, case["input_ids"].as_array().unwrap().len());
        assert_eq!(r["finish_reason"], if new_tokens == max_new { "length" } else { "stop" });
        seen.insert(r["finish_reason"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "the cases cover both a stop and a length finish");
}

#[test]
fn without_max_new_tokens_the_checkpoints_generation_config_decides() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, reference) = idefics3("genconf_penalties");
    let case = &reference["cases"][0];
    let image = case["image"].as_str().unwrap();
    let input = fixtures().join("idefics3/images").join(image);
    let run = |job: &str, extra: &[&str]| {
        let out = tmp.path().join("out");
        let args = [
            &["run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", job, "--engine", "vlm",
              "--model", model.to_str().unwrap(), "--prompt", case["prompt"].as_str().unwrap()][..],
            extra,
        ]
        .concat();
        let o = quire(&args);
        assert_eq!(code(&o), 0);
        records(&out, job).remove(&(image.to_string(), 1)).unwrap()
    };
    // The generation config's max_new_tokens, repetition penalty, n-gram and bad-word rules.
    let r = run("default", &[]);
    assert_eq!(r["text"], case["text"], "greedy text differs from transformers' generate()");
    assert_eq!(r["tokens_out"], reference["max_new_tokens"]);
    assert_eq!(r["finish_reason"], "length");
    // An explicit --max-new-tokens wins.
    let r = run("explicit", &["--max-new-tokens", "5"]);
    assert_eq!(r["tokens_out"], 5);
    let o = quire(&["run", input.to_str().unwrap(), "--out", tmp.path().to_str().unwrap(), "--max-new-tokens", "0"]);
    assert_eq!(code(&o), 2, "--max-new-tokens 0 is a usage error");
}

/// The python with pyarrow and webdataset (`scripts/setup-python-readers.sh`): `QUIRE_PYTHON`,
/// else the venv that script makes by default. Missing, the test fails unless
/// `QUIRE_SKIP_PYTHON_READERS=1` says to leave the read-back out.
fn python_readers() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QUIRE_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let tools = std::env::var_os("QUIRE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/quire-tools"));
    let default = tools.join("py-readers/bin/python");
    if default.exists() {
        return Some(default);
    }
    if std::env::var("QUIRE_SKIP_PYTHON_READERS").as_deref() == Ok("1") {
        return None;
    }
    panic!("no python with pyarrow and webdataset: run scripts/setup-python-readers.sh and set QUIRE_PYTHON to the path it prints (or QUIRE_SKIP_PYTHON_READERS=1)");
}

#[test]
fn captions_of_loose_images_go_to_parquet_and_pdfs_keep_their_markdown() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = idefics3("split_sf2_gqa");
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    copy_into(&input, &["photo.jpg", "image.png", "gray.png", "born_digital.pdf"]);
    let out = tmp.path().join("out");
    let run = |job: &str, extra: &[&str]| {
        let mut args = vec![
            "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", job, "--task", "caption", "--model",
            model.to_str().unwrap(), "--max-new-tokens", "3",
        ];
        args.extend_from_slice(extra);
        quire(&args)
    };
    assert_eq!(code(&run("cap", &[])), 0);
    let parquet_dir = out.join("cap/parquet");
    let files = walk(&parquet_dir);
    let mut sources = Vec::new();
    let python = python_readers();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let task = name.strip_prefix("images-").and_then(|n| n.strip_suffix(".parquet")).expect("images-TASK_ID.parquet");
        // The file holds exactly the task's records, in order.
        let results = out.join("cap/results").join(format!("{task}.jsonl"));
        for line in std::fs::read_to_string(&results).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            sources.push(Path::new(v["source"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned());
        }
        if let Some(py) = &python {
            let script = fixtures().join("../../crates/quire-dataset/tests/read_back.py");
            let o = Command::new(py).arg(script).arg(&results).arg("--parquet").arg(f).output().unwrap();
            assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    sources.sort();
    assert_eq!(sources, ["gray.png", "image.png", "photo.jpg"], "every image in exactly one Parquet file");
    let md: Vec<String> = walk(&out.join("cap/markdown")).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(md, ["born_digital.pdf.md"], "Markdown for the PDF only");
    let m = manifest(&out, "cap");
    let listed: Vec<&Value> = m["datasets"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), files.len());
    assert!(listed.iter().all(|f| f["format"] == "parquet" && f["written"] == true && out.join(f["path"].as_str().unwrap()).exists()));

    // A rerun finds nothing new: the same files, not written again.
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert_eq!(code(&run("cap", &[])), 0);
    assert!(manifest(&out, "cap")["datasets"].as_array().unwrap().iter().all(|f| f["written"] == false));
    assert_eq!(files.iter().map(|f| std::fs::read(f).unwrap()).collect::<Vec<_>>(), before);

    // --dataset none: Markdown as for documents, no Parquet.
    assert_eq!(code(&run("plain", &["--dataset", "none"])), 0);
    assert!(!out.join("plain/parquet").exists());
    assert_eq!(walk(&out.join("plain/markdown")).len(), 4);
    let o = run("bad", &["--dataset", "none,parquet"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--dataset none"));
}
