//! End-to-end tests of `quire run` on real files with the real pdfium.
//!
//! Needs libpdfium (`QUIRE_PDFIUM`, see scripts/setup-pdfium.sh) and
//! poppler's `pdftotext` (the independent extractor the text layer is
//! checked against). Both are installed by `.ci/run`.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
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
    // A resolution or price that is no number of the kind (inf used to render 1x1 pages or
    // publish tasks no worker could read).
    for (flag, value, says) in [("--render-dpi", "inf", "between 1 and 2400"), ("--render-dpi", "0", "between 1 and 2400"), ("--price-per-hour=-1", "", "not a price")] {
        let pdf = doc("born_digital.pdf");
        let mut args = vec!["run", pdf.to_str().unwrap(), "--out", tmp.path().to_str().unwrap(), flag];
        if !value.is_empty() {
            args.push(value);
        }
        let o = quire(&args);
        assert_eq!(code(&o), 2, "{flag} {value}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(says), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn job_names_expand_the_date_so_a_nightly_command_makes_a_new_job_each_night() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    let input = doc("born_digital.pdf");
    let night = |time: &str| {
        Command::new(env!("CARGO_BIN_EXE_quire"))
            .args(["run", input.to_str().unwrap(), "--out", out, "--engine", "text-layer", "--quiet", "--job", "nightly-{date}"])
            .env("QUIRE_JOB_TIME", time)
            .output()
            .unwrap()
    };
    assert_eq!(code(&night("2026-11-28T02:00:00Z")), 0);
    // The same command the next night: a job of its own, nothing skipped.
    assert_eq!(code(&night("2026-11-29T02:00:00Z")), 0);
    for job in ["nightly-2026-11-28", "nightly-2026-11-29"] {
        let m = manifest(tmp.path(), job);
        assert_eq!(m["counts"]["tasks_skipped"], 0, "{job}: {m}");
        assert!(m["counts"]["pages_ok"].as_u64().unwrap() > 0, "{job}: {m}");
        assert!(records(tmp.path(), job).values().all(|r| r["job"] == job));
    }
    // --job-time beats the variable; {time} is HHMM, in UTC.
    let o = quire(&["run", input.to_str().unwrap(), "--out", out, "--engine", "text-layer", "--quiet",
                    "--job", "adhoc-{date}-{time}", "--job-time", "2026-11-29T00:30:00+01:00"]);
    assert_eq!(code(&o), 0);
    assert!(tmp.path().join("adhoc-2026-11-28-2330/manifest.json").is_file());
    // An unknown placeholder or a time that is not RFC 3339 is a usage error, before any work.
    let o = quire(&["run", input.to_str().unwrap(), "--out", out, "--job", "nightly-{day}"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("{day}"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = quire(&["run", input.to_str().unwrap(), "--out", out, "--job", "nightly-{date}", "--job-time", "yesterday"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("RFC 3339"));
    assert!(!tmp.path().join("nightly-{day}").exists());
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
            let input = fixtures().join("idefics3/images").join(image);
            let out = tmp.path().join(format!("{ckpt}-{image}"));
            let o = quire(&[
                "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "vlm", "--engine", "vlm",
                "--model", model.to_str().unwrap(), "--prompt", case["prompt"].as_str().unwrap(), "--max-new-tokens", &max_new,
                "--price-per-hour", "3.6",
            ]);
            assert_eq!(code(&o), 0);
            let recs = records(&out, "vlm");
            let r = &recs[&(image.to_string(), 1)];
            assert_eq!(r["engine"], "vlm");
            // The page's share of the model's time, and its cost in the manifest: at 3.6 an
            // hour, dollars per 1,000 pages equal device seconds per page.
            let device_ms = r["timings_ms"]["device"].as_f64().unwrap();
            assert!(device_ms > 0.0 && device_ms <= r["timings_ms"]["infer"].as_f64().unwrap() + 1.0, "{r}");
            let m: Value = serde_json::from_slice(&std::fs::read(out.join("vlm/manifest.json")).unwrap()).unwrap();
            let t = &m["throughput"];
            assert!((t["gpu_seconds"].as_f64().unwrap() - device_ms / 1e3).abs() < 2e-3, "{t}");
            assert_eq!(t["device_seconds_per_page"], t["gpu_seconds"], "one page: {t}");
            assert_eq!(t["usd_per_1000_pages"], t["device_seconds_per_page"], "{t}");
            assert_eq!(t["price_per_hour"], 3.6);
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

/// `--quantize q8` and `q4`: the model's text weights in int8 or 4 bits on the CPU; records
/// as without them. A combination they cannot run (f16) is refused before any page, saying
/// what to use.
#[test]
fn quantize_runs_the_model_with_int8_and_4_bit_text_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = idefics3("split_sf2_gqa");
    let out = tmp.path().join("out");
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    copy_into(&input, &["photo.jpg"]);
    let run = |job: &str, extra: &[&str]| {
        let mut args = vec![
            "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", job, "--model", model.to_str().unwrap(),
            "--max-new-tokens", "4",
        ];
        args.extend_from_slice(extra);
        quire(&args)
    };
    let o = run("q8", &["--quantize", "q8", "--dtype", "f16"]);
    assert_ne!(code(&o), 0);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--quantize q8 runs with --dtype f32 or bf16"), "{err}");
    let x86 = cfg!(target_arch = "x86_64");
    let avx512 = x86 && std::arch::is_x86_feature_detected!("avx512f");
    let vnni = avx512 && std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw");
    for (job, needs, can) in [("q8", "AVX-512", avx512), ("q4", if avx512 { "AVX512-VNNI" } else { "AVX-512" }, vnni)] {
        let o = run(job, &["--quantize", job, "--dtype", "bf16"]);
        if !can {
            assert_ne!(code(&o), 0);
            assert!(String::from_utf8_lossy(&o.stderr).contains(needs), "{}", String::from_utf8_lossy(&o.stderr));
            continue;
        }
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        let recs = records(&out, job);
        assert_eq!(recs.len(), 1);
        for r in recs.values() {
            assert!(r["error"].is_null(), "{r}");
            assert_eq!(r["engine"], "vlm");
            assert!((1..=4).contains(&r["tokens_out"].as_u64().unwrap()), "{r}");
        }
    }
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

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` when this process may not mount (not root).
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status().is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_run_with_a_clear_error_and_a_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    copy_into(&input, &["born_digital.pdf", "mixed.pdf"]);
    let Some(fs) = Tmpfs::mount(&tmp.path().join("small"), "1m") else {
        assert!(!is_root(), "root could not mount a tmpfs");
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    };
    // Fill the file system, then leave a few KiB: enough for some results, not for all.
    let filler = fs.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![b'x'; 4096];
        while f.write_all(&block).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len - 12 * 1024).unwrap();
    }
    let out = fs.0.join("out");
    let args = ["run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--engine", "text-layer", "--job", "full", "--pages-per-task", "1"];
    let o = quire(&args);
    assert_eq!(code(&o), 1, "a full disk is an error of the output, exit 1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left on device") && err.contains("free some space"), "{err}");
    // Nothing half-written is left behind: no temporary files, every result file whole.
    for f in walk(&out) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.starts_with(".quire-tmp-"), "temporary file left: {f:?}");
        if name.ends_with(".jsonl") {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(text.ends_with('\n'), "truncated result file {f:?}");
            for line in text.lines() {
                serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("truncated record in {f:?}: {e}"));
            }
        }
    }
    std::fs::remove_file(&filler).unwrap();
    let o = quire(&args);
    assert_eq!(code(&o), 0, "after freeing space the rerun completes");
    let recs = records(&out, "full");
    let pages = manifest(&out, "full")["counts"]["pages_ok"].as_u64().unwrap();
    assert_eq!(recs.len() as u64, pages);
    assert!(recs.keys().filter(|(n, _)| n == "mixed.pdf").count() >= 2 && recs.keys().any(|(n, _)| n == "born_digital.pdf"));
    drop(fs);
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// DocTags as SmolDocling writes it, for every page the test model is given.
const DOCTAGS_PAGE: &str = "<doctag><page_header><loc_20><loc_10><loc_480><loc_20>ACME Corp</page_header>\
<title><loc_50><loc_40><loc_450><loc_60>Quarterly report</title>\
<text><loc_50><loc_70><loc_450><loc_100>Revenue grew by 12% in region_north.</text>\
<otsl><loc_50><loc_110><loc_450><loc_200><ched>Region<ched>Q1<nl><fcel>North<fcel>120<nl><fcel>South<fcel>80<nl></otsl>\
<page_footer><loc_240><loc_480><loc_260><loc_490>1</page_footer></doctag>";

/// What docling-core renders for `DOCTAGS_PAGE`.
const DOCTAGS_MARKDOWN: &str = "# Quarterly report\n\nRevenue grew by 12% in region\\_north.\n\n\
| Region   |   Q1 |\n|----------|------|\n| North    |  120 |\n| South    |   80 |";

/// A model whose greedy output is `DOCTAGS_PAGE`; a DocTags model or not as
/// its checkpoint's tokenizer says.
struct FixedDocTags {
    doctags: bool,
}

impl quire_pipeline::Generator for FixedDocTags {
    fn model_name(&self) -> String {
        "test/fixed-doctags".into()
    }
    fn default_prompt(&self, _: quire_core::TaskKind) -> String {
        "Convert this page to docling.".into()
    }
    fn generate(&mut self, reqs: &[quire_pipeline::GenRequest]) -> anyhow::Result<Vec<quire_pipeline::GenOutput>> {
        Ok(reqs
            .iter()
            .map(|_| quire_pipeline::GenOutput {
                text: DOCTAGS_PAGE.into(),
                tokens_in: 10,
                tokens_out: 60,
                finish: quire_core::FinishReason::Stop,
                device_ms: 5.0,
                loop_info: None,
            })
            .collect())
    }
    fn emits_doctags(&self) -> bool {
        self.doctags
    }
}

/// Runs `quire run`'s pipeline on `inputs` with the fixed model, whose
/// checkpoint has `tokenizer` as its tokenizer.json.
fn run_fixed_doctags(inputs: &Path, out: &Path, job: &str, tokenizer: &str) {
    let ck = tempfile::tempdir().unwrap();
    std::fs::write(ck.path().join("tokenizer.json"), tokenizer).unwrap();
    let doctags = quire_pipeline::stage::doctags::has_doctags_vocabulary(ck.path());
    let model = quire_pipeline::InferenceHandle::start(Box::new(FixedDocTags { doctags }), Default::default());
    let mut settings = quire_core::JobSettings::new(job);
    settings.model = Some("test/fixed-doctags".into());
    let opts = quire_pipeline::RunOptions {
        inputs: vec![inputs.to_string_lossy().into_owned()],
        out: out.to_string_lossy().into_owned(),
        access: Default::default(),
        download_cache_bytes: 0,
        settings,
        workers: 1,
        force: false,
        run: "r1".into(),
        retry_failed: false,
        prune: false,
        queue: quire_queue::QueueOptions::default(),
        ctx: quire_pipeline::stage::process::ProcessContext {
            pdf: quire_render::PdfRenderer::start(1).expect("pdfium (QUIRE_PDFIUM)"),
            model: Some(model),
            model_long_side: Some(512),
        },
        price_per_hour: Some(2.5),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let summary = rt.block_on(quire_pipeline::run_embedded(opts, Default::default())).unwrap();
    assert_eq!(summary.manifest.counts.pages_failed, 0, "{:?}", summary.manifest.failures);
}

#[test]
fn doctags_models_get_markdown_and_layout_blocks_in_records_and_markdown_files() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    copy_into(&inputs, &["scanned.pdf", "born_digital.pdf", "image.png"]);
    let out = tmp.path().join("out");
    let vocab = r#"{"added_tokens":[{"id":49152,"content":"<doctag>","special":false},{"id":49153,"content":"<loc_0>","special":false}],"model":{"vocab":{}}}"#;
    run_fixed_doctags(&inputs, &out, "dt", vocab);
    let recs = records(&out, "dt");
    let scanned: Vec<&Value> = recs.iter().filter(|(k, _)| k.0 == "scanned.pdf").map(|(_, v)| v).collect();
    assert!(!scanned.is_empty());
    for r in scanned.iter().copied().chain([&recs[&("image.png".to_string(), 1)]]) {
        assert_eq!(r["engine"], "vlm");
        assert_eq!(r["text"], DOCTAGS_PAGE, "the raw output stays in text");
        assert_eq!(r["markdown"], DOCTAGS_MARKDOWN);
        let blocks = r["blocks"].as_array().expect("blocks");
        let kinds: Vec<&str> = blocks.iter().map(|b| b["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["page_header", "title", "text", "table", "page_footer"]);
        // Boxes in the page's pixels: <loc_50><loc_40><loc_450><loc_60> of a width × height page.
        let (w, h) = (r["width"].as_f64().unwrap(), r["height"].as_f64().unwrap());
        assert!(w > 0.0 && h > 0.0);
        let px = |loc: f64, size: f64| (loc / 500.0 * size * 100.0).round() / 100.0;
        let bbox: Vec<f64> = blocks[1]["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(bbox, [px(50.0, w), px(40.0, h), px(450.0, w), px(60.0, h)]);
        let table = &blocks[3]["table"];
        assert_eq!((table["rows"].as_u64(), table["cols"].as_u64()), (Some(3), Some(2)));
        assert_eq!(table["cells"][0]["header"], true, "ched cells are headers");
        assert_eq!(table["cells"][2]["text"], "North");
    }
    // The text layer has neither.
    let born = &recs[&("born_digital.pdf".to_string(), 1)];
    assert_eq!(born["engine"], "text-layer");
    assert!(born["markdown"].is_null() && born["blocks"].is_null());
    // Each model page took 5 ms of the (fixed) model's time; the text layer none. At 2.5 an
    // hour: 0.005 s × 2.5 / 3.6 = 0.00347 dollars per 1,000 pages.
    let vlm_pages = recs.values().filter(|r| r["engine"] == "vlm").count() as f64;
    assert_eq!(born["timings_ms"]["device"], 0.0);
    let m: Value = serde_json::from_slice(&std::fs::read(out.join("dt/manifest.json")).unwrap()).unwrap();
    let t = &m["throughput"];
    assert_eq!(t["gpu_seconds"].as_f64(), Some((vlm_pages * 5.0).round() / 1e3), "{t}");
    assert_eq!(t["device_seconds_per_page"].as_f64(), Some(0.005), "{t}");
    assert_eq!(t["new_tokens_per_device_second"].as_f64(), Some(12000.0), "60 tokens in 5 ms: {t}");
    assert_eq!(t["usd_per_1000_pages"].as_f64(), Some(0.003), "{t}");
    let md = std::fs::read_to_string(out.join("dt/markdown/in/scanned.pdf.md")).unwrap();
    assert!(md.contains(&format!("<!-- page 1 -->\n{DOCTAGS_MARKDOWN}\n")), "{md}");
    assert!(!md.contains("<loc_") && !md.contains("<doctag>") && !md.contains("ACME Corp"), "{md}");

    // The same output from a model without the DocTags vocabulary stays text.
    let no_vocab = r#"{"added_tokens":[{"id":0,"content":"<|endoftext|>"}],"model":{"vocab":{}}}"#;
    run_fixed_doctags(&inputs, &out, "plain", no_vocab);
    let recs = records(&out, "plain");
    let r = &recs[&("image.png".to_string(), 1)];
    assert_eq!(r["text"], DOCTAGS_PAGE);
    assert!(r["markdown"].is_null() && r["blocks"].is_null());
    let md = std::fs::read_to_string(out.join("plain/markdown/in/scanned.pdf.md")).unwrap();
    assert!(md.contains(DOCTAGS_PAGE), "{md}");
}

#[test]
fn quire_doctags_converts_files_and_stdin_and_refuses_unreadable_files() {
    let corpus = fixtures().join("doctags");
    let normalise = |s: &str| s.lines().map(str::trim_end).collect::<Vec<_>>().join("\n").trim_end().to_string();
    // Several files, one of several pages: docling-core's Markdown of each, joined.
    let (a, b) = (corpus.join("36-multi-page.dt"), corpus.join("27-table-headers.dt"));
    let o = quire(&["doctags", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(code(&o), 0);
    let want = [a.with_extension("md"), b.with_extension("md")].map(|p| normalise(&std::fs::read_to_string(p).unwrap())).join("\n\n");
    assert_eq!(normalise(&String::from_utf8(o.stdout).unwrap()), want);
    assert!(!want.contains("<loc_"));

    // stdin, blocks as a JSON line per page, boxes in the given page size.
    let mut child = Command::new(env!("CARGO_BIN_EXE_quire"))
        .args(["doctags", "--json", "--width", "1000", "--height", "2000", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(std::fs::read(&a).unwrap().as_slice()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0);
    let pages: Vec<Value> = String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(pages.len(), 3, "36-multi-page has three pages");
    assert_eq!((pages[0]["source"].as_str(), pages[2]["page"].as_u64()), (Some("-"), Some(3)));
    let title = &pages[0]["blocks"][0];
    assert_eq!((title["kind"].as_str(), title["text"].as_str()), (Some("title"), Some("A Short Book")));
    assert_eq!(title["bbox"], serde_json::json!([120.0, 160.0, 880.0, 248.0]), "<loc_60><loc_40><loc_440><loc_62> on 1000x2000");
    assert_eq!(pages[2]["blocks"][0]["table"]["rows"], 2);

    // An unreadable file: a clear message, exit 2, nothing on stdout.
    let o = quire(&["doctags", a.to_str().unwrap(), "/nonexistent/page.dt"]);
    assert_eq!(code(&o), 2);
    assert!(o.stdout.is_empty());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read /nonexistent/page.dt"));
}

/// The tiny random-weight Idefics2 checkpoints written by `tests/gen_idefics2.py` and what
/// `transformers` generated with them (input images shared with Idefics3).
fn idefics2(name: &str) -> (PathBuf, Value) {
    let dir = fixtures().join("idefics2").join(name);
    let reference = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (dir, reference)
}

#[test]
fn idefics2_checkpoints_give_the_reference_greedy_text_through_quire_run() {
    let tmp = tempfile::tempdir().unwrap();
    for ckpt in ["split_gqa", "nosplit_window_old", "split_deep_sharded"] {
        let (model, reference) = idefics2(ckpt);
        let max_new = reference["max_new_tokens"].as_u64().unwrap();
        for case in reference["cases"].as_array().unwrap() {
            let image = case["image"].as_str().unwrap();
            let input = fixtures().join("idefics3/images").join(image);
            let out = tmp.path().join(format!("{ckpt}-{image}"));
            let o = quire(&[
                "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "vlm", "--engine", "vlm",
                "--task", "caption", "--model", model.to_str().unwrap(), "--prompt", case["prompt"].as_str().unwrap(),
                "--max-new-tokens", &max_new.to_string(),
            ]);
            assert_eq!(code(&o), 0);
            let recs = records(&out, "vlm");
            let r = &recs[&(image.to_string(), 1)];
            assert_eq!(r["engine"], "vlm");
            assert!(r["error"].is_null(), "{r}");
            assert_eq!(r["text"], case["text"], "{ckpt} {image}: greedy text differs from transformers");
            let new_tokens = case["new_tokens"].as_array().unwrap().len() as u64;
            assert_eq!(r["tokens_out"].as_u64(), Some(new_tokens));
            assert_eq!(r["tokens_in"].as_u64().unwrap() as usize, case["input_ids"].as_array().unwrap().len());
            assert_eq!(r["finish_reason"], if new_tokens == max_new { "length" } else { "stop" });
        }
    }
}

#[test]
fn idefics2_checkpoints_give_the_reference_greedy_text_on_scanned_pdf_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("idefics2/pdf_pages");
    let reference: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let max_new = reference["max_new_tokens"].as_u64().unwrap();
    let pdf = quire_render::PdfRenderer::start(1).expect("pdfium");
    for case in reference["cases"].as_array().unwrap() {
        let ckpt = case["checkpoint"].as_str().unwrap();
        let (model, _) = idefics2(ckpt);
        let document = case["document"].as_str().unwrap();
        let n = case["page"].as_u64().unwrap() as u32;
        // The reference's pixels are quire's rendering of the page at the processor's long side.
        let opts = quire_render::RenderOptions {
            size: quire_render::RenderSize::LongSide(case["long_side"].as_u64().unwrap() as u32),
            want_image: true,
            want_text: false,
            limits: quire_render::Limits::default(),
        };
        let page = pdf.render(&doc(document), n..=n, &opts).unwrap().remove(0).unwrap();
        let png = dir.join(case["png"].as_str().unwrap());
        let want = quire_render::decode_image(&png, 1..=1, &quire_render::Limits::default()).unwrap().remove(0).unwrap();
        assert_eq!(page.image.expect("pixels").as_raw(), want.image.unwrap().as_raw(), "{ckpt}: rendering differs");
        let out = tmp.path().join(format!("{ckpt}-{document}"));
        let o = quire(&[
            "run", doc(document).to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "pdf", "--engine", "vlm",
            "--model", model.to_str().unwrap(), "--prompt", reference["prompt"].as_str().unwrap(),
            "--max-new-tokens", &max_new.to_string(),
        ]);
        assert_eq!(code(&o), 0);
        let recs = records(&out, "pdf");
        let r = &recs[&(document.to_string(), n as u64)];
        assert_eq!(r["engine"], "vlm");
        assert_eq!((r["width"].as_u64(), r["height"].as_u64()), (case["width"].as_u64(), case["height"].as_u64()), "{ckpt}: render size");
        assert_eq!(r["text"], case["text"], "{ckpt} {document}: greedy text differs from transformers");
        let new_tokens = case["new_tokens"].as_array().unwrap().len() as u64;
        assert_eq!(r["tokens_out"].as_u64(), Some(new_tokens));
        assert_eq!(r["tokens_in"].as_u64().unwrap() as usize, case["input_ids"].as_array().unwrap().len());
        assert_eq!(r["finish_reason"], if new_tokens == max_new { "length" } else { "stop" });
    }
}

/// A PDF of `pages` pages of `w` × `h` points, each showing one line of text (one shared
/// content stream), written object by object with a correct cross-reference table.
fn make_pdf(pages: usize, w: f32, h: f32) -> Vec<u8> {
    let mut objs: Vec<String> = vec![
        "<< /Type /Catalog /Pages 2 0 R >>".into(),
        format!(
            "<< /Type /Pages /Count {pages} /Kids [{}] >>",
            (0..pages).map(|i| format!("{} 0 R", i + 5)).collect::<Vec<_>>().join(" ")
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into(),
    ];
    let content = "BT /F1 12 Tf 72 72 Td (A page of many, all alike.) Tj ET";
    objs.push(format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()));
    for _ in 0..pages {
        objs.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
        ));
    }
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n{o}\nendobj\n", i + 1).bytes());
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objs.len() + 1).bytes());
    for off in offsets {
        out.extend(format!("{off:010} 00000 n \n").bytes());
    }
    out.extend(format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objs.len() + 1).bytes());
    out
}

/// A little-endian TIFF of `frames` 1×1 grey frames (one IFD each).
fn make_tiff(frames: u32) -> Vec<u8> {
    let mut out = b"II*\0".to_vec();
    out.extend(8u32.to_le_bytes());
    let entries: u16 = 9;
    let ifd_len = 2 + entries as u32 * 12 + 4;
    for f in 0..frames {
        let at = out.len() as u32;
        let pixel_at = at + ifd_len;
        let next = if f + 1 < frames { pixel_at + 2 } else { 0 };
        out.extend(entries.to_le_bytes());
        for (tag, kind, value) in [
            (256u16, 3u16, 1u32), // width
            (257, 3, 1),          // height
            (258, 3, 8),          // bits per sample
            (259, 3, 1),          // no compression
            (262, 3, 1),          // black is zero
            (273, 4, pixel_at),   // strip offset
            (277, 3, 1),          // samples per pixel
            (278, 3, 1),          // rows per strip
            (279, 4, 1),          // strip byte count
        ] {
            out.extend(tag.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(1u32.to_le_bytes());
            out.extend(value.to_le_bytes());
        }
        out.extend(next.to_le_bytes());
        out.extend([0x80, 0]); // the pixel, and a pad byte to keep IFDs word-aligned
    }
    out
}

/// Peak resident memory of `quire ARGS` (and the render processes it waited for), in MiB.
fn quire_peak_rss_mib(args: &[&str]) -> (Output, u64) {
    let out = Command::new("/usr/bin/time").arg("-f").arg("peak-rss-kib=%M").arg(env!("CARGO_BIN_EXE_quire")).args(args).output().expect("/usr/bin/time");
    let err = String::from_utf8_lossy(&out.stderr);
    let kib: u64 = err.lines().rev().find_map(|l| l.strip_prefix("peak-rss-kib=")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no peak RSS in:\n{err}"));
    eprintln!("quire {}\n--- stderr ---\n{err}", args.join(" "));
    (out, kib / 1024)
}

#[test]
fn hostile_files_each_get_one_clear_error_record_with_memory_bounded() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let put = |name: &str, bytes: &[u8]| std::fs::write(input.join(name), bytes).unwrap();
    let born = std::fs::read(doc("born_digital.pdf")).unwrap();
    for pct in [10, 50, 90] {
        put(&format!("cut{pct}.pdf"), &born[..born.len() * pct / 100]);
    }
    let mixed = std::fs::read(doc("mixed.pdf")).unwrap();
    put("cut_mixed.pdf", &mixed[..mixed.len() / 2]);
    put("zero.pdf", b"");
    let mut noise = Vec::with_capacity(64 << 10);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..(64 << 10) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    put("noise.pdf", &noise);
    put("huge_page.pdf", &make_pdf(1, 14400.0, 14400.0)); // 200 × 200 inches
    put("pages2500.pdf", &make_pdf(2500, 612.0, 792.0));
    put("frames2500.tif", &make_tiff(2500));
    // Headers that promise billions of pixels: refused before any decoding.
    let mut jpeg = std::fs::read(doc("photo.jpg")).unwrap();
    let sof = jpeg.windows(2).position(|w| w[0] == 0xFF && (0xC0..=0xC2).contains(&w[1])).unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    put("bomb.jpg", &jpeg);
    let mut webp = std::fs::read(doc("image.webp")).unwrap();
    assert_eq!(&webp[12..16], b"VP8 ");
    webp[26..30].copy_from_slice(&[0xFF, 0x3F, 0xFF, 0x3F]);
    put("bomb.webp", &webp);
    std::fs::copy(doc("bomb.png"), input.join("bomb.png")).unwrap();
    let photo = std::fs::read(doc("photo.jpg")).unwrap();
    put("cut.jpg", &photo[..photo.len() / 2]);
    let png = std::fs::read(doc("image.png")).unwrap();
    put("cut.png", &png[..png.len() / 2]);
    // Names: not UTF-8, and as long as a file name may be.
    std::fs::write(input.join(std::ffi::OsStr::from_bytes(b"scan-\xff\xfe.png")), &png).unwrap();
    let long = format!("{}.png", "l".repeat(251));
    std::fs::write(input.join(&long), &png).unwrap();
    std::fs::copy(doc("born_digital.pdf"), input.join("fine.pdf")).unwrap();

    let out = tmp.path().join("out");
    let (o, peak) = quire_peak_rss_mib(&[
        "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--engine", "text-layer", "--job", "hostile", "--render-dpi", "300",
    ]);
    eprintln!("peak RSS over the hostile files: {peak} MiB");
    assert_eq!(code(&o), 3, "bad files fail alone; the job finishes");
    assert!(peak < 1024, "peak RSS {peak} MiB: a bomb was decoded or a huge page rendered");
    let recs = records(&out, "hostile");
    let kinds = |name: &str| -> Vec<String> {
        let v: Vec<String> = recs
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, r)| r["error"]["kind"].as_str().unwrap_or("ok").to_string())
            .collect();
        assert!(!v.is_empty(), "no record for {name}");
        v
    };
    for name in ["cut10.pdf", "cut50.pdf", "cut90.pdf", "cut_mixed.pdf"] {
        let k = kinds(name);
        assert!(k.iter().all(|k| ["ok", "truncated", "corrupt"].contains(&k.as_str())), "{name}: {k:?}");
    }
    assert_eq!(kinds("cut10.pdf"), vec!["truncated"], "a PDF cut to its first tenth cannot be opened");
    assert_eq!(kinds("zero.pdf"), vec!["empty"]);
    assert_eq!(kinds("noise.pdf"), vec!["unsupported"]);
    assert_eq!(kinds("huge_page.pdf"), vec!["too_many_pixels"], "200 inches at 300 dpi is 3.6 gigapixels");
    assert_eq!(kinds("pages2500.pdf"), vec!["too_many_pages"]);
    assert_eq!(kinds("frames2500.tif"), vec!["too_many_pages"]);
    for name in ["bomb.jpg", "bomb.webp", "bomb.png"] {
        assert_eq!(kinds(name), vec!["too_many_pixels"], "{name}");
    }
    // A JPEG without its end marker is cut short, model or not.
    assert_eq!(kinds("cut.jpg"), vec!["truncated"]);
    assert_eq!(kinds("fine.pdf"), vec!["ok"; 3]);
    assert_eq!(kinds(&long), vec!["needs_model"], "a long name is processed like any other");
    assert!(!recs.keys().any(|(n, _)| n.starts_with("scan-")), "a name that is not UTF-8 cannot be a record's source");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("not valid UTF-8; rename the file"), "the name is reported instead:\n{log}");
    let md: Vec<_> = walk(&out.join("hostile/markdown")).into_iter().filter(|p| p.to_string_lossy().contains("lll")).collect();
    assert_eq!(md.len(), 1, "the long name gets its Markdown under a shortened name: {md:?}");
    for r in recs.values() {
        if let Some(msg) = r["error"]["message"].as_str() {
            assert!(msg.len() > 10, "terse message: {r}");
        }
    }
    for f in walk(&out) {
        assert!(f.starts_with(&out), "{f:?} outside --out");
    }
    // With a (tiny) model the images are decoded: cut ones fail alone, bombs stay refused.
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for name in ["cut.jpg", "cut.png", "bomb.jpg", "bomb.webp", "bomb.png"] {
        std::fs::rename(input.join(name), images.join(name)).unwrap();
    }
    std::fs::copy(doc("image.png"), images.join("fine.png")).unwrap();
    let (model, _) = idefics3("nosplit_sf4_tied_old");
    let (o, peak) = quire_peak_rss_mib(&[
        "run", images.to_str().unwrap(), "--out", out.to_str().unwrap(), "--model", model.to_str().unwrap(), "--job", "images",
        "--max-new-tokens", "2", "--task", "caption",
    ]);
    eprintln!("peak RSS decoding the hostile images with a model: {peak} MiB");
    assert_eq!(code(&o), 3);
    let recs = records(&out, "images");
    let kind = |name: &str| recs[&(name.to_string(), 1)]["error"]["kind"].as_str().unwrap_or("ok").to_string();
    for name in ["cut.jpg", "cut.png"] {
        assert!(["truncated", "corrupt"].contains(&kind(name).as_str()), "{name}: {}", kind(name));
    }
    for name in ["bomb.jpg", "bomb.webp", "bomb.png"] {
        assert_eq!(kind(name), "too_many_pixels", "{name}");
    }
    assert_eq!(kind("fine.png"), "ok");
    assert_eq!(recs.len(), 6);
    assert!(peak < 1024, "peak RSS {peak} MiB");

    // The same limits, raised, let the big but honest documents through.
    let (o, peak) = quire_peak_rss_mib(&[
        "run", input.join("pages2500.pdf").to_str().unwrap(), "--out", out.to_str().unwrap(), "--engine", "text-layer", "--job", "many",
        "--max-pages", "3000", "--pages-per-task", "500",
    ]);
    eprintln!("peak RSS over a 2500-page PDF: {peak} MiB");
    assert_eq!(code(&o), 0);
    let recs = records(&out, "many");
    assert_eq!(recs.len(), 2500);
    assert!(recs.values().all(|r| r["text"].as_str().unwrap().contains("all alike")));
}

fn archive(name: &str) -> PathBuf {
    fixtures().join("archives").join(name)
}

/// Every record of a job in stored order: results files by name, lines in order.
fn record_list(out: &Path, job: &str) -> Vec<Value> {
    let dir = out.join(job).join("results");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("results folder").map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect::<Vec<_>>())
        .collect()
}

/// The keys img2dataset gave the committed shards (tests/gen_archives.py): shard 1 lost
/// sample 2's download, so it has no image.
fn shard_keys(shard: u32) -> Vec<String> {
    (0..5).filter(|&i| !(shard == 1 && i == 2)).map(|i| format!("{shard:05}{i:04}")).collect()
}

#[test]
fn archives_and_brace_patterns_give_one_record_per_image_member() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = idefics3("split_sf2_gqa");
    let out = tmp.path().join("out");
    let pattern = format!("{}/shard-{{000000..000003}}.tar", fixtures().join("archives").display());
    let (gz, zip) = (archive("gz-000000.tar.gz"), archive("pictures.zip"));
    let args = [
        "run", &pattern, gz.to_str().unwrap(), zip.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "wds",
        "--task", "caption", "--model", model.to_str().unwrap(), "--max-new-tokens", "3", "--images-per-task", "2",
    ];
    let o = quire(&args);
    assert_eq!(code(&o), 0);
    let recs = record_list(&out, "wds");
    for shard in 0..4u32 {
        let src = archive(&format!("shard-{shard:06}.tar"));
        let mine: Vec<&Value> = recs.iter().filter(|r| r["source"] == src.to_str().unwrap()).collect();
        let mut keys: Vec<String> = mine.iter().map(|r| r["key"].as_str().unwrap().to_string()).collect();
        keys.sort();
        assert_eq!(keys, shard_keys(shard), "one record per image member of shard {shard}");
        for r in &mine {
            assert_eq!(r["member"], format!("{}.jpg", r["key"].as_str().unwrap()));
            assert_eq!((r["page"].as_u64(), r["page_count"].as_u64()), (Some(1), Some(1)));
            assert!(r["error"].is_null(), "{r}");
            assert_eq!((r["engine"].as_str(), r["task"].as_str()), (Some("vlm"), Some("caption")));
            assert_eq!((r["width"].as_u64(), r["height"].as_u64()), (Some(48), Some(32)));
            assert!(r["tokens_out"].as_u64().unwrap() >= 1);
        }
    }
    let gz_keys: Vec<_> = recs.iter().filter(|r| r["source"] == gz.to_str().unwrap()).map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(gz_keys.len(), 3);
    let zip_members: Vec<_> = recs.iter().filter(|r| r["source"] == zip.to_str().unwrap()).map(|r| (r["key"].as_str().unwrap(), r["member"].as_str().unwrap())).collect();
    let mut sorted = zip_members.clone();
    sorted.sort();
    assert_eq!(sorted, vec![("pics/000", "pics/000.png"), ("pics/001", "pics/001.png"), ("pics/002", "pics/002.png")]);
    // Sample ranges of 2: 5 samples make 3 tasks, 3 make 2 (4 shards, the gz, the zip).
    let files = std::fs::read_dir(out.join("wds/results")).unwrap().count();
    assert_eq!(files, 4 * 3 + 2 + 2);
    for f in std::fs::read_dir(out.join("wds/results")).unwrap() {
        let keys: Vec<String> = std::fs::read_to_string(f.unwrap().path()).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["key"].as_str().unwrap().to_string()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "records of a task are in archive order");
    }
    // Captions make a dataset: one Parquet file per shard (the default for --task caption), no Markdown.
    for shard in 0..4 {
        assert!(out.join(format!("wds/parquet/shard-00000{shard}.tar.parquet")).is_file(), "shard {shard}");
    }
    assert!(!out.join("wds/markdown/shard-000002.tar.md").exists());
    let m = manifest(&out, "wds");
    assert_eq!(m["counts"]["pages_ok"].as_u64(), Some(19 + 3 + 3));
    assert_eq!(m["counts"]["documents"].as_u64(), Some(6));
    // A rerun finds every task done.
    let again = quire(&args);
    assert_eq!(code(&again), 0);
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 done now, 16 already done"), "{}", String::from_utf8_lossy(&again.stderr));

    // The same images as loose files get the same captions: the archive's bytes are the files'.
    let loose = tmp.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    let x = Command::new("tar").args(["xf", archive("shard-000000.tar").to_str().unwrap(), "-C", loose.to_str().unwrap()]).status().unwrap();
    assert!(x.success());
    let out2 = tmp.path().join("out2");
    let o = quire(&[
        "run", loose.to_str().unwrap(), "--out", out2.to_str().unwrap(), "--job", "loose", "--task", "caption",
        "--model", model.to_str().unwrap(), "--max-new-tokens", "3", "--images-per-task", "2",
    ]);
    assert_eq!(code(&o), 3, "the .txt and .json files are no images: unsupported");
    let loose_recs = records(&out2, "loose");
    for r in recs.iter().filter(|r| r["source"] == archive("shard-000000.tar").to_str().unwrap()) {
        let file = &loose_recs[&(r["member"].as_str().unwrap().to_string(), 1)];
        assert_eq!((&file["text"], &file["tokens_in"]), (&r["text"], &r["tokens_in"]), "{}", r["member"]);
        assert!(file["key"].is_null() && file["member"].is_null());
    }
}

#[test]
fn loose_images_are_grouped_into_tasks_with_a_record_per_file() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("pics");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    copy_into(&input, &["photo.jpg", "gray.png", "multipage.tif", "rgba.png", "born_digital.pdf"]);
    std::fs::copy(doc("image.webp"), input.join("sub/image.webp")).unwrap();
    std::fs::copy(doc("bomb.png"), input.join("sub/bomb.png")).unwrap();
    let out = tmp.path().join("out");
    let args = ["run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "g", "--engine", "text-layer", "--images-per-task", "2"];
    let o = quire(&args);
    assert_eq!(code(&o), 3);
    let recs = records(&out, "g");
    // Five readable images in groups that end after a name whose hash says so (about 2 each,
    // the last group ends with the listing), the PDF's one task, the bomb's own one.
    let images = ["pics/gray.png", "pics/multipage.tif", "pics/photo.jpg", "pics/rgba.png", "pics/sub/image.webp"];
    let groups = images.iter().enumerate().filter(|(i, r)| *i == 4 || quire_pipeline::stage::plan::is_group_boundary(r, 2)).count();
    let tasks = groups + 2;
    assert_eq!(std::fs::read_dir(out.join("g/results")).unwrap().count(), tasks);
    for name in ["photo.jpg", "gray.png", "rgba.png", "image.webp"] {
        let r = &recs[&(name.to_string(), 1)];
        assert_eq!(r["error"]["kind"], "needs_model", "{name}");
        assert!(r["source"].as_str().unwrap().ends_with(name) && r["key"].is_null() && r["member"].is_null());
        assert_eq!(r["page_count"], 1);
    }
    let tiff: Vec<_> = recs.iter().filter(|((n, _), _)| n == "multipage.tif").map(|((_, p), r)| (*p, r["page_count"].as_u64().unwrap())).collect();
    assert_eq!(tiff, vec![(1, 3), (2, 3), (3, 3)], "each TIFF frame is still a record");
    assert_eq!(recs[&("bomb.png".to_string(), 1)]["error"]["kind"], "too_many_pixels");
    // Markdown per image file, as before.
    for md in ["pics/photo.jpg.md", "pics/sub/image.webp.md", "pics/multipage.tif.md", "pics/born_digital.pdf.md"] {
        assert!(out.join("g/markdown").join(md).exists(), "{md}");
    }
    assert_eq!(manifest(&out, "g")["counts"]["documents"].as_u64(), Some(7));
    let again = quire(&args);
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("0 done now, {tasks} already done")));
    // A changed image is new work for its group only.
    std::fs::copy(doc("image.png"), input.join("gray.png")).unwrap();
    let changed = quire(&args);
    let said = String::from_utf8_lossy(&changed.stderr);
    assert!(said.contains(&format!("1 done now, {} already done", tasks - 1)), "{said}");
}

#[test]
fn bad_archives_get_error_records_and_the_job_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = idefics3("split_sf2_gqa");
    let input = tmp.path().join("bad");
    std::fs::create_dir(&input).unwrap();
    for e in std::fs::read_dir(fixtures().join("archives/bad")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, input.join(p.file_name().unwrap())).unwrap();
    }
    let out = tmp.path().join("out");
    let o = quire(&[
        "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "bad", "--task", "caption", "--model",
        model.to_str().unwrap(), "--max-new-tokens", "2",
    ]);
    assert_eq!(code(&o), 3);
    let recs = record_list(&out, "bad");
    let of = |name: &str| -> Vec<(Option<String>, String)> {
        recs.iter()
            .filter(|r| r["source"].as_str().unwrap().ends_with(name))
            .map(|r| (r["member"].as_str().map(str::to_string), r["error"]["kind"].as_str().unwrap_or("ok").to_string()))
            .collect()
    };
    let s = |m: &str, k: &str| (Some(m.to_string()), k.to_string());
    assert_eq!(of("truncated.tar"), vec![s("000000000.jpg", "ok"), s("000000001.jpg", "ok"), (None, "truncated".into())]);
    let tz = of("truncated.zip");
    assert_eq!(&tz[..3], &[s("000.jpg", "ok"), s("001.jpg", "ok"), s("002.jpg", "ok")]);
    assert_eq!(tz.last().unwrap(), &(None, "truncated".to_string()));
    assert_eq!(of("names.tar"), vec![
        s("000000000.jpg", "ok"),
        s("../escape.jpg", "unsupported"),
        s("/abs/000000002.jpg", "unsupported"),
        s("caf\u{fffd}.jpg", "unsupported"),
        s("link.jpg", "unsupported"),
        s("000000005.tar", "unsupported"),
        s("000000006.jpg", "ok"),
    ]);
    let dups = of("duplicates.tar");
    assert_eq!(dups.last().unwrap(), &s("000000001.json", "corrupt"));
    assert_eq!(dups.iter().filter(|d| d.1 == "ok").count(), 3);
    assert_eq!(of("hostile.zip"), vec![
        s("000.jpg", "ok"),
        s("bomb.bmp", "too_large"),
        s("secret.jpg", "encrypted"),
        s("inner.zip", "unsupported"),
        s("002.jpg", "ok"),
    ]);
    assert_eq!(of("noimages.tar"), vec![(None, "empty".to_string())]);
    assert_eq!(of("empty.tar"), vec![(None, "empty".to_string())]);
    for r in recs.iter().filter(|r| !r["error"].is_null()) {
        assert!(r["error"]["message"].as_str().unwrap().len() > 10, "{r}");
        assert_eq!(r["finish_reason"], "error");
    }
    let noimg = recs.iter().find(|r| r["source"].as_str().unwrap().ends_with("noimages.tar")).unwrap();
    assert!(noimg["error"]["message"].as_str().unwrap().contains("3 samples without an image"), "{noimg}");
    // Nothing was written outside --out (no member was unpacked anywhere).
    assert!(walk(tmp.path()).iter().all(|p| p.starts_with(&out) || p.starts_with(&input)));
    // The member-count limit is explicit: a tight one refuses a whole shard in one record.
    let o = quire(&[
        "run", archive("shard-000000.tar").to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "few",
        "--engine", "text-layer", "--max-archive-members", "10",
    ]);
    assert_eq!(code(&o), 3);
    let few = record_list(&out, "few");
    assert_eq!(few.len(), 1);
    assert_eq!(few[0]["error"]["kind"], "too_large");
    assert!(few[0]["error"]["message"].as_str().unwrap().contains("--max-archive-members"));
    // A brace pattern naming a missing shard is a usage error.
    let o = quire(&["run", &format!("{}/shard-{{000000..000009}}.tar", fixtures().join("archives").display()), "--out", out.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("shard-000004.tar"));
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

// ---------------------------------------------------------------------------------------
// Standing jobs: runs over a collection that grows, changes and shrinks.

/// `OUT/JOB/runs/RUN/manifest.json`.
fn run_manifest(out: &Path, job: &str, run: &str) -> Value {
    let p = out.join(job).join("runs").join(run).join("manifest.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Files below `dir` by their path below it, with their bytes (none when `dir` is absent).
fn files_below(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    if !dir.exists() {
        return BTreeMap::new();
    }
    walk(dir).into_iter().map(|p| (p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect()
}

fn count(v: &Value, field: &str) -> u64 {
    v["counts"][field].as_u64().unwrap_or_else(|| panic!("counts.{field} in {v}"))
}

/// Sets a file's modification time (what identifies a local file's version, with its size).
fn set_mtime(p: &Path, t: std::time::SystemTime) {
    std::fs::OpenOptions::new().write(true).open(p).unwrap().set_modified(t).unwrap();
}

/// The `source` column of every Parquet file given, read with pyarrow.
fn parquet_sources(python: &Path, files: &[PathBuf]) -> Vec<String> {
    if files.is_empty() {
        return Vec::new();
    }
    let script = "import json, sys, pyarrow.parquet as pq\nprint(json.dumps([s for f in sys.argv[1:] for s in pq.read_table(f, columns=['source']).column('source').to_pylist()]))";
    let o = Command::new(python).arg("-c").arg(script).args(files).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_standing_job_over_a_growing_folder_redoes_only_the_groups_that_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = idefics3("split_sf2_gqa");
    let input = tmp.path().join("imgs");
    std::fs::create_dir(&input).unwrap();
    let mut names: BTreeSet<String> = (0..600).map(|i| format!("img-{i:04}.png")).collect();
    for n in &names {
        std::fs::copy(doc("gray.png"), input.join(n)).unwrap();
    }
    let out = tmp.path().join("out");
    let job = out.join("cap");
    let night = |run: &str| {
        let o = quire(&[
            "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "cap", "--run", run, "--task", "caption",
            "--model", model.to_str().unwrap(), "--max-new-tokens", "1", "--images-per-task", "64", "-q",
        ]);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        run_manifest(&out, "cap", run)
    };
    let python = python_readers();
    // Results, Parquet files and the job manifest hold exactly one current record per image.
    let check = |names: &BTreeSet<String>| {
        let recs = records(&out, "cap");
        let got: BTreeSet<String> = recs.keys().map(|(n, _)| n.clone()).collect();
        assert_eq!(&got, names, "one record per current image, no other");
        assert!(recs.values().all(|r| r["error"].is_null()));
        let results: BTreeSet<String> = files_below(&job.join("results")).into_keys().map(|k| k.trim_end_matches(".jsonl").to_string()).collect();
        let parquet: Vec<PathBuf> = walk(&job.join("parquet"));
        let tasks: BTreeSet<String> = parquet
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().trim_start_matches("images-").trim_end_matches(".parquet").to_string())
            .collect();
        assert_eq!(tasks, results, "a Parquet file per current task, none stale");
        if let Some(py) = &python {
            let mut sources: Vec<String> = parquet_sources(py, &parquet).iter().map(|s| Path::new(s).file_name().unwrap().to_string_lossy().into_owned()).collect();
            sources.sort();
            assert_eq!(sources, names.iter().cloned().collect::<Vec<_>>(), "one Parquet row per current image");
        }
        let m = manifest(&out, "cap");
        let objects = m["objects"].as_array().unwrap();
        assert_eq!(objects.len(), names.len());
        assert!(objects.iter().all(|o| o["status"] == "done" && o["kind"] == "image" && o["pages_ok"] == 1));
        assert_eq!(count(&m, "records"), names.len() as u64);
    };

    let first = night("n01");
    assert_eq!((count(&first, "objects_new"), count(&first, "objects_unchanged")), (600, 0));
    let groups = count(&first, "tasks_done");
    assert!((3..=40).contains(&groups), "600 images in groups of 64 on average: {groups} groups");
    check(&names);

    // One change at a time, each followed by a run of its own.
    let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    // A change, what it does to the expected names, and the run's new/changed/removed counts.
    type Step<'a> = (&'a str, Box<dyn Fn(&mut BTreeSet<String>) + 'a>, [u64; 3]);
    let steps: Vec<Step> = vec![
        ("added first", Box::new(|n: &mut BTreeSet<String>| {
            std::fs::copy(doc("rgba.png"), input.join("a-first.png")).unwrap();
            n.insert("a-first.png".into());
        }), [1, 0, 0]),
        ("added in the middle", Box::new(|n: &mut BTreeSet<String>| {
            std::fs::copy(doc("rgba.png"), input.join("img-0300a.png")).unwrap();
            n.insert("img-0300a.png".into());
        }), [1, 0, 0]),
        ("added last", Box::new(|n: &mut BTreeSet<String>| {
            std::fs::copy(doc("gray.png"), input.join("zz-last.png")).unwrap();
            n.insert("zz-last.png".into());
        }), [1, 0, 0]),
        ("replaced", Box::new(|_: &mut BTreeSet<String>| {
            std::fs::copy(doc("image.png"), input.join("img-0100.png")).unwrap();
            set_mtime(&input.join("img-0100.png"), t0);
        }), [0, 1, 0]),
        ("removed", Box::new(|n: &mut BTreeSet<String>| {
            std::fs::remove_file(input.join("img-0200.png")).unwrap();
            n.remove("img-0200.png");
        }), [0, 0, 1]),
    ];
    for (i, (what, change, [new, changed, removed])) in steps.iter().enumerate() {
        let before = files_below(&job.join("parquet"));
        let records_before = records(&out, "cap");
        change(&mut names);
        let run = format!("n{:02}", i + 2);
        let m = night(&run);
        let done = count(&m, "tasks_done");
        assert!((1..=2).contains(&done), "{what}: {done} tasks ran again");
        assert_eq!(
            [count(&m, "objects_new"), count(&m, "objects_changed"), count(&m, "objects_removed")],
            [*new, *changed, *removed],
            "{what}"
        );
        assert_eq!(count(&m, "objects_unchanged"), names.len() as u64 - new - changed, "{what}");
        assert_eq!(count(&m, "objects"), names.len() as u64);
        // The run manifest alone says what is new tonight.
        let listed: Vec<&Value> = m["objects"].as_array().unwrap().iter().collect();
        assert_eq!(listed.len() as u64, new + changed + removed, "{what}");
        check(&names);
        // Unchanged groups' Parquet files are the same bytes; replaced ones moved aside.
        let after = files_below(&job.join("parquet"));
        let kept = before.iter().filter(|(k, v)| after.get(*k) == Some(*v)).count();
        assert!(kept + 2 >= before.len(), "{what}: {kept} of {} Parquet files kept", before.len());
        assert!(before.keys().all(|k| after.contains_key(k) || job.join("superseded").join(&run).join("parquet").join(k).exists()), "{what}");
        // The unchanged images of a re-formed group keep their records (taken over, not
        // captioned again: the timings would differ, and the maker's task id is kept), so the
        // run's own records are the new or changed images' only.
        let records_after = records(&out, "cap");
        for (k, r) in &records_after {
            if k.0 == "img-0100.png" || !records_before.contains_key(k) {
                continue;
            }
            assert_eq!(&records_before[k], r, "{what}: {k:?} made again");
        }
        assert_eq!((count(&m, "records"), count(&m, "pages_ok")), (new + changed, new + changed), "{what}: tonight's model work");
        let moved = files_below(&job.join("superseded").join(&run));
        assert_eq!(moved.len() as u64, count(&m, "files_superseded"), "{what}: {:?}", moved.keys());
        assert!(moved.keys().any(|k| k.starts_with("results/")) && moved.keys().any(|k| k.starts_with("parquet/")), "{what}: {:?}", moved.keys());
    }

    // An unchanged image is not opened: same size and time, other bytes, still unchanged.
    let p = input.join("img-0005.png");
    let (len, mtime) = (std::fs::metadata(&p).unwrap().len(), std::fs::metadata(&p).unwrap().modified().unwrap());
    std::fs::write(&p, vec![0u8; len as usize]).unwrap();
    set_mtime(&p, mtime);
    let quiet = night("n07");
    assert_eq!((count(&quiet, "tasks_done"), count(&quiet, "objects_unchanged"), count(&quiet, "files_superseded")), (0, names.len() as u64, 0));
    check(&names);
    // A run started again under the same name continues it: the same findings, no work.
    let again = night("n06");
    assert_eq!((count(&again, "tasks_done"), count(&again, "objects_removed")), (0, 1), "the sixth run removed one image");

    // `quire status` knows the job made by `quire run`, with its runs.
    let st = quire(&["status", "cap", "--out", out.to_str().unwrap()]);
    assert_eq!(code(&st), 0);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("runs      7") && text.contains("n01") && text.contains("n07"), "{text}");
    let js = quire(&["status", "cap", "--out", out.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_slice(&js.stdout).unwrap();
    assert_eq!(v["objects"].as_u64(), Some(names.len() as u64));
    assert_eq!(v["runs"].as_array().unwrap().len(), 7);
}

#[test]
fn a_standing_job_redoes_a_replaced_pdf_and_a_new_shard_and_keeps_one_record_per_page() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = idefics3("split_sf2_gqa");
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    copy_into(&input, &["born_digital.pdf", "mixed.pdf"]);
    std::fs::copy(archive("shard-000000.tar"), input.join("shard-000000.tar")).unwrap();
    let out = tmp.path().join("out");
    let night = |run: &str, extra: &[&str]| {
        let mut args = vec![
            "run", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--job", "docs", "--run", run, "--task", "caption",
            "--model", model.to_str().unwrap(), "--max-new-tokens", "1", "--images-per-task", "2", "--dataset", "parquet,webdataset", "-q",
        ];
        args.extend_from_slice(extra);
        let o = quire(&args);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        run_manifest(&out, "docs", run)
    };
    // Records by (source file, page or member): exactly one each.
    let units = || {
        let mut seen = BTreeSet::new();
        for r in record_list(&out, "docs") {
            let name = Path::new(r["source"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned();
            let unit = r["member"].as_str().map(str::to_string).unwrap_or_else(|| r["page"].to_string());
            assert!(seen.insert((name.clone(), unit.clone())), "two records for {name} {unit}");
        }
        seen
    };
    let first = night("d1", &[]);
    assert_eq!(count(&first, "objects_new"), 3);
    let pages_mixed = units().iter().filter(|(n, _)| n == "mixed.pdf").count();
    let before = units();

    // A new shard and a replaced PDF (another document under the same name).
    std::fs::copy(archive("shard-000001.tar"), input.join("shard-000001.tar")).unwrap();
    std::fs::copy(doc("scanned.pdf"), input.join("born_digital.pdf")).unwrap();
    let second = night("d2", &[]);
    assert_eq!([count(&second, "objects_new"), count(&second, "objects_changed"), count(&second, "objects_unchanged")], [1, 1, 2]);
    let changed: Vec<(&str, &str)> =
        second["objects"].as_array().unwrap().iter().map(|o| (o["rel"].as_str().unwrap(), o["change"].as_str().unwrap())).collect();
    assert_eq!(changed, [("in/born_digital.pdf", "changed"), ("in/shard-000001.tar", "new")]);
    // Only their tasks ran: the unchanged PDF and shard were skipped without a look.
    let new_tasks: u64 = second["objects"].as_array().unwrap().iter().map(|o| o["tasks"].as_array().unwrap().len() as u64).sum();
    assert_eq!(count(&second, "tasks_done"), new_tasks);
    let after = units();
    assert_eq!(after.iter().filter(|(n, _)| n == "mixed.pdf").count(), pages_mixed);
    assert_eq!(after.iter().filter(|(n, _)| n == "shard-000001.tar").count(), shard_keys(1).len(), "a record per image member of the new shard");
    assert_ne!(before.iter().filter(|(n, _)| n == "born_digital.pdf").count(), 0);
    // The replaced PDF's old results moved aside; one record per page of the new one.
    let moved = files_below(&out.join("docs/superseded/d2"));
    assert!(!moved.is_empty() && moved.keys().all(|k| k.starts_with("results/")), "{:?}", moved.keys());
    let md = std::fs::read_to_string(out.join("docs/markdown/in/born_digital.pdf.md")).unwrap();
    assert_eq!(md.matches("<!-- page ").count(), after.iter().filter(|(n, _)| n == "born_digital.pdf").count());
    // Dataset files for both shards, the first one not written again.
    let m = manifest(&out, "docs");
    let files: Vec<(&str, bool)> = m["datasets"].as_array().unwrap().iter().map(|f| (f["path"].as_str().unwrap(), f["written"].as_bool().unwrap())).collect();
    assert_eq!(files, [
        ("docs/parquet/in/shard-000000.tar.parquet", false),
        ("docs/webdataset/in/shard-000000.tar", false),
        ("docs/parquet/in/shard-000001.tar.parquet", true),
        ("docs/webdataset/in/shard-000001.tar", true),
    ]);

    // A shard removed: its results and dataset files leave with it (deleted with --prune).
    std::fs::remove_file(input.join("shard-000000.tar")).unwrap();
    let third = night("d3", &["--prune"]);
    assert_eq!(count(&third, "objects_removed"), 1);
    assert!(count(&third, "files_superseded") >= 3, "results, Parquet and WebDataset of the shard");
    assert!(!out.join("docs/superseded/d3").exists(), "--prune deletes");
    assert!(!out.join("docs/parquet/in/shard-000000.tar.parquet").exists() && !out.join("docs/webdataset/in/shard-000000.tar").exists());
    assert!(units().iter().all(|(n, _)| n != "shard-000000.tar"));
    assert_eq!(manifest(&out, "docs")["objects"].as_array().unwrap().len(), 3);
}

#[test]
fn quire_run_refuses_misspelt_s3_locations_instead_of_writing_a_folder_named_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let o = quire(&["run", doc("born_digital.pdf").to_str().unwrap(), "--out", "s3:/bucket/x", "--engine", "text-layer"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("s3://bucket/prefix"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!Path::new("s3:").exists());
    let o = quire(&["run", "S3://bucket/x", "--out", tmp.path().join("o").to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(!tmp.path().join("o").exists());
}

/// A model that fails every page while `down` is set (a transient fault: a driver reset, an
/// out-of-memory), and answers "caption" otherwise.
struct Flaky {
    down: bool,
}

impl quire_pipeline::Generator for Flaky {
    fn model_name(&self) -> String {
        "test/flaky".into()
    }
    fn default_prompt(&self, _: quire_core::TaskKind) -> String {
        "Describe.".into()
    }
    fn generate(&mut self, reqs: &[quire_pipeline::GenRequest]) -> anyhow::Result<Vec<quire_pipeline::GenOutput>> {
        anyhow::ensure!(!self.down, "the device is gone");
        Ok(reqs
            .iter()
            .map(|_| quire_pipeline::GenOutput {
                text: "caption".into(),
                tokens_in: 10,
                tokens_out: 1,
                finish: quire_core::FinishReason::Stop,
                device_ms: 1.0,
                loop_info: None,
            })
            .collect())
    }
}

#[test]
fn retry_failed_redoes_the_pages_an_earlier_run_failed_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imgs");
    std::fs::create_dir(&input).unwrap();
    for i in 0..40 {
        std::fs::copy(doc("gray.png"), input.join(format!("img-{i:02}.png"))).unwrap();
    }
    let out = tmp.path().join("out");
    let night = |run: &str, down: bool, retry_failed: bool| {
        let mut settings = quire_core::JobSettings::new("flaky");
        settings.task = quire_core::TaskKind::Caption;
        settings.model = Some("test/flaky".into());
        settings.images_per_task = 8;
        let opts = quire_pipeline::RunOptions {
            inputs: vec![input.to_string_lossy().into_owned()],
            out: out.to_string_lossy().into_owned(),
            access: Default::default(),
            download_cache_bytes: 0,
            settings,
            workers: 1,
            force: false,
            run: run.into(),
            retry_failed,
            prune: false,
            queue: quire_queue::QueueOptions::default(),
            ctx: quire_pipeline::stage::process::ProcessContext {
                pdf: quire_render::PdfRenderer::start(1).expect("pdfium (QUIRE_PDFIUM)"),
                model: Some(quire_pipeline::InferenceHandle::start(Box::new(Flaky { down }), Default::default())),
                model_long_side: Some(512),
            },
            price_per_hour: None,
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(quire_pipeline::run_embedded(opts, Default::default())).unwrap()
    };
    // Night 1: the device is down, every page fails.
    let first = night("n1", true, false);
    assert_eq!((first.run.counts.pages_failed, first.run.counts.pages_ok), (40, 0));
    let failed_tasks = first.run.counts.tasks_done;
    assert!(first.manifest.objects.iter().all(|o| o.status == quire_core::ObjectStatus::Failed));
    // Night 2, device back, no --retry-failed: the failed pages stay failed.
    let second = night("n2", false, false);
    assert_eq!((second.run.counts.tasks_done, second.run.counts.tasks_skipped), (0, failed_tasks));
    assert_eq!(second.manifest.counts.pages_failed, 40);
    // Night 3 with --retry-failed: exactly the failed tasks run again, and every page is ok.
    let third = night("n3", false, true);
    assert_eq!(third.run.counts.tasks_done, failed_tasks);
    assert_eq!((third.manifest.counts.pages_ok, third.manifest.counts.pages_failed), (40, 0));
    assert!(third.manifest.objects.iter().all(|o| o.status == quire_core::ObjectStatus::Done));
    assert_eq!(records(&out, "flaky").len(), 40, "one record per image, the failed ones replaced");
    // Night 4 with --retry-failed again: nothing left to redo.
    assert_eq!(night("n4", false, true).run.counts.tasks_done, 0);
}
