//! Parity with `transformers` on the tiny random-weight checkpoints written by
//! `tests/gen_idefics3.py` (fixtures under `tests/fixtures/idefics3/`).
//!
//! Tolerances: tile grids, rendered prompts, token ids and greedy tokens must be identical.
//! Pixel values are compared with max |diff| <= 1e-6: the Pillow-compatible resampler is
//! integer-exact, so the only slack is f32 rounding in rescale/normalize. First-step logits
//! (f32) are compared with max |diff| <= 1e-4 on the CPU.
//!
//! Device: `QUIRE_TEST_DEVICE=cpu|cuda` (default cpu; cuda means GPU 0 and needs the `cuda`
//! feature). The same token-exact tests run on either. On CUDA, f32 logits get max |diff| <=
//! 5e-4: cuBLAS sums in another order than PyTorch's CPU kernels (candle keeps f32 products
//! in f32, no TF32), and 5e-4 is about 1e-4 of the largest |logit| (~4.6) on these
//! checkpoints, still 20x below the drift of transformers' own f16 run (~1e-2), so a wrong
//! kernel or a dtype slip cannot hide under it.
//! `QUIRE_TEST_DTYPE=f32|bf16|f16` (default f32): the f32 references are compared in f32;
//! bf16 or f16 skips the token-exact tests (their reference is f32) and runs the low-precision
//! test in that dtype only (by default it runs both).
//! Fixtures: `QUIRE_FIXTURES` overrides the folder (for a test binary run on another machine).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use quire_vlm::{FamilyModel, FinishReason, LoadOptions, Request, Vlm};
use serde_json::Value;

const CHECKPOINTS: &[&str] = &["split_sf2_gqa", "nosplit_sf4_tied_old", "split_sf1_sharded"];

fn fixtures() -> PathBuf {
    match std::env::var_os("QUIRE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3"),
    }
}

/// The device under test, from `QUIRE_TEST_DEVICE` (cpu when unset).
fn device() -> Device {
    match std::env::var("QUIRE_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).unwrap_or_else(|e| panic!("QUIRE_TEST_DEVICE=cuda: {e}")),
        Ok(other) => panic!("QUIRE_TEST_DEVICE={other:?}: expected cpu or cuda"),
    }
}

fn device_label() -> &'static str {
    if device().is_cpu() {
        "cpu"
    } else {
        "cuda"
    }
}

/// The dtype asked for by `QUIRE_TEST_DTYPE` (f32 when unset).
fn test_dtype() -> candle_core::DType {
    match std::env::var("QUIRE_TEST_DTYPE") {
        Ok(s) if !s.is_empty() => LoadOptions::parse_dtype(&s).unwrap_or_else(|e| panic!("QUIRE_TEST_DTYPE: {e}")),
        _ => candle_core::DType::F32,
    }
}

/// True (after saying why) when a test compared against an f32 reference should not run.
fn skip_unless_f32(test: &str) -> bool {
    let dt = test_dtype();
    if dt == candle_core::DType::F32 {
        return false;
    }
    eprintln!("{test}: skipped, QUIRE_TEST_DTYPE={dt:?} and its transformers reference is f32");
    true
}

fn f32_options() -> LoadOptions {
    LoadOptions { device: device(), dtype: candle_core::DType::F32, ..LoadOptions::default() }
}

/// Tolerance for f32 first-step logits on the device under test (see the module docs).
fn f32_logit_tolerance() -> f32 {
    if device().is_cpu() {
        1e-4
    } else {
        5e-4
    }
}

struct Fixture {
    vlm: Vlm,
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

/// One family's fixtures: its folder and checkpoints.
struct Family {
    label: &'static str,
    dir: fn() -> PathBuf,
    checkpoints: &'static [&'static str],
}

/// Both families, for the tests that hold for every family alike.
const FAMILIES: [Family; 2] = [
    Family { label: "idefics3", dir: fixtures, checkpoints: CHECKPOINTS },
    Family { label: "idefics2", dir: idefics2_dir, checkpoints: IDEFICS2 },
];

fn load(name: &str) -> Fixture {
    load_from(&fixtures(), name)
}

fn load_from(dir: &Path, name: &str) -> Fixture {
    let dir = dir.join(name);
    let vlm = Vlm::load(&dir, &f32_options()).unwrap_or_else(|e| panic!("loading {name}: {e:#}"));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    Fixture { vlm, meta, tensors }
}

fn cases(meta: &Value) -> &Vec<Value> {
    meta["cases"].as_array().unwrap()
}

fn image(case: &Value) -> image::DynamicImage {
    image::open(fixtures().join("images").join(case["image"].as_str().unwrap())).unwrap()
}

fn request(case: &Value, max_new: usize) -> Request {
    Request { image: image(case), prompt: case["prompt"].as_str().unwrap().to_string(), max_new_tokens: Some(max_new) }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn processor_matches_reference() {
    for name in CHECKPOINTS {
        let mut fx = load(name);
        let m = fx.vlm.as_idefics3().unwrap();
        for case in cases(&fx.meta) {
            let key = case["image"].as_str().unwrap().trim_end_matches(".png");
            let prompt = case["prompt"].as_str().unwrap();
            assert_eq!(m.render_prompt(prompt).unwrap(), case["rendered_prompt"].as_str().unwrap(), "{name}/{key}");
            let p = m.prepare(&image(case), prompt).unwrap();
            let grid = (case["rows"].as_u64().unwrap() as usize, case["cols"].as_u64().unwrap() as usize);
            assert_eq!((p.image.rows, p.image.cols), grid, "{name}/{key} tile grid");
            assert_eq!(p.input_ids, u32s(&case["input_ids"]), "{name}/{key} input ids");
            let want = &fx.tensors[&format!("{key}.pixel_values")];
            let (n, _, h, w) = want.dims4().unwrap();
            assert_eq!(p.image.tiles.len(), n, "{name}/{key} tile count");
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = p
                .image
                .tiles
                .iter()
                .flat_map(|t| {
                    assert_eq!((t.height, t.width), (h, w));
                    t.data.iter().copied()
                })
                .collect();
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-6, "{name}/{key} pixel values differ by {d}");
        }
    }
}

/// First-step logits of every family's checkpoints against the reference (f32).
#[test]
fn first_step_logits_match() {
    if skip_unless_f32("first_step_logits_match") {
        return;
    }
    for fam in &FAMILIES {
        for name in fam.checkpoints {
            let mut fx = load_from(&(fam.dir)(), name);
            for case in cases(&fx.meta) {
                let key = case["image"].as_str().unwrap().trim_end_matches(".png");
                let got = fx.vlm.prefill_logits(&[request(case, 1)]).unwrap().remove(0);
                let want: Vec<f32> = fx.tensors[&format!("{key}.logits")].to_vec1().unwrap();
                let d = max_abs_diff(&got, &want);
                eprintln!("{} {name}/{key} f32 on {}: max |logit diff| {d:.2e}", fam.label, device_label());
                assert!(d <= f32_logit_tolerance(), "{name}/{key} logits differ by {d}");
                // Where the checkpoint has a sliding window (Idefics2), the reference's logits
                // move by more than the tolerance without it: matching them means the window
                // is applied.
                if let Some(change) = case["logits_change_without_sliding_window"].as_f64() {
                    assert!(change > 100.0 * f32_logit_tolerance() as f64, "{name}/{key}: the window does not matter here");
                }
            }
        }
    }
}

#[test]
fn greedy_tokens_match_unbatched() {
    if skip_unless_f32("greedy_tokens_match_unbatched") {
        return;
    }
    for fam in &FAMILIES {
        let mut finishes = std::collections::BTreeSet::new();
        for name in fam.checkpoints {
            let mut fx = load_from(&(fam.dir)(), name);
            let max_new = fx.meta["max_new_tokens"].as_u64().unwrap() as usize;
            for case in cases(&fx.meta) {
                let g = fx.vlm.generate(&[request(case, max_new)]).unwrap().remove(0);
                let want = u32s(&case["new_tokens"]);
                assert_eq!(g.token_ids, want, "{name}/{}", case["image"]);
                assert_eq!(g.text, case["text"].as_str().unwrap(), "{name}/{} text", case["image"]);
                assert_eq!(g.tokens_in, case["input_ids"].as_array().unwrap().len());
                assert_eq!(g.tokens_out, want.len());
                let expect = if want.len() < max_new { FinishReason::Stop } else { FinishReason::Length };
                assert_eq!(g.finish_reason, expect, "{name}/{}", case["image"]);
                finishes.insert(format!("{expect:?}"));
            }
        }
        assert_eq!(finishes.len(), 2, "{}: the references cover both a stop and a length finish", fam.label);
    }
}

#[test]
fn batched_equals_unbatched() {
    if skip_unless_f32("batched_equals_unbatched") {
        return;
    }
    for fam in &FAMILIES {
        for name in fam.checkpoints {
            let mut fx = load_from(&(fam.dir)(), name);
            let max_new = fx.meta["max_new_tokens"].as_u64().unwrap() as usize;
            if fam.label == "idefics2" {
                // frames of different sizes in one batch
                let sizes: std::collections::BTreeSet<String> = cases(&fx.meta).iter().map(|c| c["frames"].to_string()).collect();
                assert!(sizes.len() >= 3, "{name}: the images give frames of several sizes");
            }
            // different tile counts or frame sizes and prompt lengths in one batch, left padded
            let reqs: Vec<Request> = cases(&fx.meta).iter().map(|c| request(c, max_new)).collect();
            let out = fx.vlm.generate(&reqs).unwrap();
            for (g, case) in out.iter().zip(cases(&fx.meta)) {
                assert_eq!(g.token_ids, u32s(&case["new_tokens"]), "{name}/{} batched", case["image"]);
            }
            let logits = fx.vlm.prefill_logits(&reqs).unwrap();
            for (got, case) in logits.iter().zip(cases(&fx.meta)) {
                let key = case["image"].as_str().unwrap().trim_end_matches(".png");
                let want: Vec<f32> = fx.tensors[&format!("{key}.logits")].to_vec1().unwrap();
                let d = max_abs_diff(got, &want);
                assert!(d <= f32_logit_tolerance(), "{name}/{key} batched logits differ by {d}");
            }
            // per-request budgets differ inside a batch
            let mut reqs = reqs;
            reqs[0].max_new_tokens = Some(3);
            let out = fx.vlm.generate(&reqs).unwrap();
            let first = u32s(&cases(&fx.meta)[0]["new_tokens"]);
            assert_eq!(out[0].token_ids, first[..first.len().min(3)].to_vec());
            assert_eq!(out[1].token_ids, u32s(&cases(&fx.meta)[1]["new_tokens"]));
        }
    }
}

#[test]
fn layouts_and_sources() {
    // old flat preprocessor_config.json + rope_theta + tied embeddings, new nested layout,
    // sharded weights with template in tokenizer_config.json: all load (the other tests use them).
    for name in CHECKPOINTS {
        let mut fx = load(name);
        let m = fx.vlm.as_idefics3().unwrap();
        assert_eq!(m.image_seq_len, fx.meta["image_seq_len"].as_u64().unwrap() as usize);
        // Nothing but EOS and pad in these generation configs: the quire default length applies.
        assert_eq!(fx.vlm.generation_config().budget(None, 10), quire_vlm::DEFAULT_MAX_NEW_TOKENS);
        assert!(!fx.vlm.generation_config().processes_scores());
    }
    let dir = fixtures().join("split_sf2_gqa");
    assert_eq!(quire_vlm::resolve_model_dir(dir.to_str().unwrap()).unwrap(), dir);
    let err = quire_vlm::resolve_model_dir("s3://bucket/models/smolvlm").unwrap_err().to_string();
    assert!(err.contains("resolved by the caller"), "{err}");
    assert!(quire_vlm::resolve_model_dir("/no/such/folder").is_err());
}


/// `genconf_penalties`: the generation config sets repetition_penalty, no_repeat_ngram_size,
/// bad_words_ids, suppress_tokens and max_new_tokens (plus do_sample, which greedy decoding
/// ignores); the reference is `generate(do_sample=False)` with no length given.
#[test]
fn generation_config_is_applied_like_transformers_generate() {
    if skip_unless_f32("generation_config_is_applied_like_transformers_generate") {
        return;
    }
    let dir = fixtures().join("genconf_penalties");
    let mut vlm = Vlm::load(&dir, &f32_options()).unwrap();
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    assert_eq!(meta["max_new_tokens_from_generation_config"], true);
    let default_len = meta["max_new_tokens"].as_u64().unwrap() as usize;
    let gc = vlm.generation_config().clone();
    assert_eq!(gc.repetition_penalty, 1.3);
    assert_eq!(gc.no_repeat_ngram_size, 3);
    assert_eq!(gc.bad_words_ids.len(), 2);
    assert_eq!(gc.suppress_tokens.len(), 1);
    assert!(gc.do_sample, "read, reported, and not used");
    assert_eq!(gc.budget(None, 50), default_len);
    // The processors matter: with them off, transformers generates something else.
    let differs = cases(&meta).iter().filter(|c| c["new_tokens"] != c["plain_new_tokens"]).count();
    assert!(differs >= 2, "the reference does not exercise the generation config");
    let req = |case: &Value, n: Option<usize>| Request {
        image: image(case),
        prompt: case["prompt"].as_str().unwrap().to_string(),
        max_new_tokens: n,
    };
    for case in cases(&meta) {
        let g = vlm.generate(&[req(case, None)]).unwrap().remove(0);
        let want = u32s(&case["new_tokens"]);
        assert_eq!(g.token_ids, want, "genconf_penalties/{}", case["image"]);
        assert_eq!(g.text, case["text"].as_str().unwrap());
        assert_eq!(g.tokens_out, default_len, "the generation config's max_new_tokens is the default length");
        assert_eq!(g.finish_reason, FinishReason::Length);
    }
    // Batched (left padded, different prompt lengths) equals unbatched, with the caller's
    // length winning over the generation config's where given.
    let mut reqs: Vec<Request> = cases(&meta).iter().map(|c| req(c, None)).collect();
    reqs[1].max_new_tokens = Some(5);
    let out = vlm.generate(&reqs).unwrap();
    for (i, (g, case)) in out.iter().zip(cases(&meta)).enumerate() {
        let want = u32s(&case["new_tokens"]);
        let n = if i == 1 { 5 } else { default_len };
        assert_eq!(g.token_ids, want[..n].to_vec(), "genconf_penalties/{} batched", case["image"]);
    }
}

/// bf16 and f16 on the device under test: first-step logits stay as close to the f32
/// reference as transformers' own bf16/f16 runs do (`lowp_reference.json`, written by
/// `gen_idefics3.py lowp`), and generation runs to completion. (On the CPU, f16 computes in
/// f16; bf16 multiplies in bf16 on quire's kernels (AMX / AVX-512 FMAs on widened weights, f32 sums) with f32
/// activations between layers. On CUDA both compute in their own dtype, with cuBLAS
/// accumulating in f32, like transformers' reference runs.) Prints how many cases keep f32's
/// greedy tokens and the largest logit difference per dtype.
///
/// Tolerance per case: max |logit - f32 reference| <= 2 x what transformers gets in the same
/// dtype on the same case, and at most 4% (bf16) or 0.5% (f16) of the largest |logit|. The
/// two formats keep 8 and 11 significant bits (unit roundoff 2^-8 = 0.4%, 2^-11 = 0.05%);
/// a few layers of rounding multiply that by a small factor, which is what transformers
/// shows (bf16 up to 2.8%, f16 up to 0.3% of the largest logit on these checkpoints).
/// Every case is checked and printed before the test fails, so one run shows them all.
#[test]
fn bf16_and_f16_stay_as_close_to_f32_as_transformers() {
    use candle_core::DType;
    let lowp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("lowp_reference.json")).unwrap()).unwrap();
    let only = test_dtype();
    let dtypes: Vec<(&str, DType, f32)> = [("bf16", DType::BF16, 0.04f32), ("f16", DType::F16, 0.005)]
        .into_iter()
        .filter(|(_, dt, _)| only == DType::F32 || only == *dt)
        .collect();
    let mut failures = Vec::new();
    // Per dtype: cases whose greedy tokens equal f32's, cases, largest logit difference.
    let mut summary: std::collections::BTreeMap<&str, (usize, usize, f32)> = Default::default();
    for name in CHECKPOINTS {
        let dir = fixtures().join(name);
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        for &(label, dtype, rel) in &dtypes {
            let mut vlm = Vlm::load(&dir, &LoadOptions { device: device(), dtype, ..LoadOptions::default() })
                .unwrap_or_else(|e| panic!("loading {name} in {label}: {e:#}"));
            let max_new = meta["max_new_tokens"].as_u64().unwrap() as usize;
            for case in cases(&meta) {
                let key = case["image"].as_str().unwrap().trim_end_matches(".png");
                let got = vlm.prefill_logits(&[request(case, 1)]).unwrap().remove(0);
                if !got.iter().all(|x| x.is_finite()) {
                    failures.push(format!("{name}/{key} {label}: non-finite logits"));
                    continue;
                }
                let want: Vec<f32> = tensors[&format!("{key}.logits")].to_vec1().unwrap();
                let d = max_abs_diff(&got, &want);
                let hf = &lowp["checkpoints"][*name][label][key];
                let hf_d = hf["max_abs_diff"].as_f64().unwrap() as f32;
                let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
                let s = summary.entry(label).or_default();
                s.2 = s.2.max(d);
                eprintln!(
                    "{name}/{key} {label} on {}: max |diff| {d:.5} (transformers {hf_d:.5}), largest |logit| {scale:.3}",
                    device_label()
                );
                if !(d <= 2.0 * hf_d && d <= rel * scale) {
                    failures.push(format!("{name}/{key} {label}: logits differ by {d} (transformers: {hf_d})"));
                }
                if d <= 1e-5 {
                    failures.push(format!("{name}/{key} {label}: logits equal f32's, so {label} is not in effect"));
                }
            }
            // Generation runs to completion in the low dtype, batched and alone alike.
            let reqs: Vec<Request> = cases(&meta).iter().map(|c| request(c, max_new)).collect();
            let batched = vlm.generate(&reqs).unwrap();
            for (g, case) in batched.iter().zip(cases(&meta)) {
                let s = summary.entry(label).or_default();
                s.0 += usize::from(g.token_ids == u32s(&case["new_tokens"]));
                s.1 += 1;
            }
            for (g, r) in batched.iter().zip(&reqs) {
                if !(g.tokens_out >= 1 && g.tokens_out <= max_new)
                    || (g.finish_reason == FinishReason::Length) != (g.tokens_out == max_new)
                {
                    failures.push(format!("{name} {label}: {} tokens, {:?}", g.tokens_out, g.finish_reason));
                }
                let alone = vlm.generate(std::slice::from_ref(r)).unwrap().remove(0);
                if alone.token_ids != g.token_ids {
                    failures.push(format!(
                        "{name} {label}: batched differs from alone: {:?} vs {:?}",
                        g.token_ids, alone.token_ids
                    ));
                }
            }
        }
    }
    for (label, (same, n, d)) in &summary {
        eprintln!("{label} on {}: greedy tokens equal f32's in {same}/{n} cases; largest logit diff {d:.5}", device_label());
    }
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Idefics2: the tiny random-weight checkpoints written by `tests/gen_idefics2.py`
// (fixtures under `tests/fixtures/idefics2/`, input images shared with Idefics3). Same
// tolerances as above: prompts, token ids, frame sizes and greedy tokens identical, pixel
// values within 1e-6, f32 first-step logits within 1e-4 on the CPU.

const IDEFICS2: &[&str] = &["split_gqa", "nosplit_window_old", "split_deep_sharded"];

fn idefics2_dir() -> PathBuf {
    match std::env::var_os("QUIRE_FIXTURES") {
        Some(d) => PathBuf::from(d).join("../idefics2"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics2"),
    }
}

fn load2(name: &str) -> Fixture {
    load_from(&idefics2_dir(), name)
}

#[test]
fn idefics2_checkpoints_load_as_their_own_family() {
    for name in IDEFICS2 {
        let mut fx = load2(name);
        assert_eq!(fx.vlm.family(), quire_vlm::Family::Idefics2("Idefics2".into()), "{name}");
        assert!(fx.vlm.as_idefics3().is_none());
        let m = fx.vlm.as_idefics2().unwrap();
        assert_eq!(m.image_seq_len, fx.meta["image_seq_len"].as_u64().unwrap() as usize, "{name}");
        assert_eq!(m.image_processor.do_image_splitting, fx.meta["do_image_splitting"].as_bool().unwrap(), "{name}");
        assert_eq!(m.config.text.sliding_window, fx.meta["sliding_window"].as_u64().map(|w| w as usize), "{name}");
        assert_eq!(m.config.perceiver.hidden_size, m.config.text.hidden_size);
    }
}

#[test]
fn idefics2_processor_matches_reference() {
    for name in IDEFICS2 {
        let mut fx = load2(name);
        let m = fx.vlm.as_idefics2().unwrap();
        for case in cases(&fx.meta) {
            let key = case["image"].as_str().unwrap().trim_end_matches(".png");
            let prompt = case["prompt"].as_str().unwrap();
            assert_eq!(m.render_prompt(prompt).unwrap(), case["rendered_prompt"].as_str().unwrap(), "{name}/{key}");
            let p = m.prepare(&image(case), prompt).unwrap();
            assert_eq!(p.input_ids, u32s(&case["input_ids"]), "{name}/{key} input ids");
            // Frames: the reference pads them to the largest with a pixel mask; quire keeps
            // each at its own size and pads when batching.
            let want = &fx.tensors[&format!("{key}.pixel_values")];
            let mask = &fx.tensors[&format!("{key}.pixel_attention_mask")];
            let (n, _, mh, mw) = want.dims4().unwrap();
            assert_eq!(p.frames.len(), n, "{name}/{key} frame count");
            for (i, f) in p.frames.iter().enumerate() {
                let size = &case["frames"][i];
                assert_eq!((f.height as u64, f.width as u64), (size[0].as_u64().unwrap(), size[1].as_u64().unwrap()), "{name}/{key} frame {i} size");
                let m_i: Vec<Vec<i64>> = mask.get(i).unwrap().to_vec2().unwrap();
                for (y, row) in m_i.iter().enumerate() {
                    for (x, &v) in row.iter().enumerate() {
                        assert_eq!(v == 1, y < f.height && x < f.width, "{name}/{key} frame {i}: pixel mask at ({y}, {x})");
                    }
                }
                let w: Vec<f32> = want
                    .get(i)
                    .unwrap()
                    .narrow(1, 0, f.height)
                    .unwrap()
                    .narrow(2, 0, f.width)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let d = max_abs_diff(&f.data, &w);
                assert!(d <= 1e-6, "{name}/{key} frame {i}: pixel values differ by {d}");
                assert!(f.height <= mh && f.width <= mw);
            }
        }
    }
}

/// bf16 and f16 on the device under test: the Idefics2 checkpoints load and run in the low
/// dtype, first-step logits stay within twice the drift transformers itself shows in that
/// dtype on the same case (`lowp_reference.json`, from `gen_idefics2.py lowp`) without
/// equalling f32's, and (on the CPU) a batch decodes like its rows alone.
#[test]
fn idefics2_bf16_and_f16_stay_as_close_to_f32_as_transformers() {
    use candle_core::DType;
    let only = test_dtype();
    let lowp: Value =
        serde_json::from_str(&std::fs::read_to_string(idefics2_dir().join("lowp_reference.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut summary: std::collections::BTreeMap<&str, (usize, usize, f32)> = Default::default();
    for name in IDEFICS2 {
        let dir = idefics2_dir().join(name);
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        for (label, dtype) in [("bf16", DType::BF16), ("f16", DType::F16)] {
            if only != DType::F32 && only != dtype {
                continue;
            }
            let mut vlm = Vlm::load(&dir, &LoadOptions { device: device(), dtype, ..LoadOptions::default() }).unwrap();
            for case in cases(&meta) {
                let key = case["image"].as_str().unwrap().trim_end_matches(".png");
                let got = vlm.prefill_logits(&[request(case, 1)]).unwrap().remove(0);
                let want: Vec<f32> = tensors[&format!("{key}.logits")].to_vec1().unwrap();
                let d = max_abs_diff(&got, &want);
                let hf_d = lowp["checkpoints"][*name][label][key]["max_abs_diff"].as_f64().unwrap() as f32;
                eprintln!("idefics2 {name}/{key} {label} on {}: max |diff| {d:.5} (transformers {hf_d:.5})", device_label());
                let s = summary.entry(label).or_default();
                s.2 = s.2.max(d);
                if !(got.iter().all(|x| x.is_finite()) && d <= 2.0 * hf_d && d > 1e-5) {
                    failures.push(format!("{name}/{key} {label}: logits differ by {d} (transformers: {hf_d})"));
                }
            }
            let reqs: Vec<Request> = cases(&meta).iter().map(|c| request(c, 8)).collect();
            let batched = vlm.generate(&reqs).unwrap();
            for (g, case) in batched.iter().zip(cases(&meta)) {
                let want = u32s(&case["new_tokens"]);
                let s = summary.entry(label).or_default();
                s.0 += usize::from(g.token_ids[..] == want[..want.len().min(8)]);
                s.1 += 1;
            }
            for (g, r) in batched.iter().zip(&reqs) {
                let alone = vlm.generate(std::slice::from_ref(r)).unwrap().remove(0);
                // On CUDA, cuBLAS picks its kernels by the batch's shape, so a low-precision row
                // rounds differently batched than alone and greedy text may part (seen on an H200
                // in bf16); the CPU kernels sum each row the same way whatever the batch.
                let must_match = device().is_cpu();
                if (must_match && alone.token_ids != g.token_ids) || g.tokens_out == 0 {
                    failures.push(format!("{name} {label}: batched {:?} vs alone {:?}", g.token_ids, alone.token_ids));
                }
            }
        }
    }
    for (label, (same, n, d)) in &summary {
        eprintln!(
            "idefics2 {label} on {}: first 8 greedy tokens equal f32's in {same}/{n} cases; largest logit diff {d:.5}",
            device_label()
        );
    }
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// A copy of the checkpoint at `dir` in `to`, its text model's linear weights and `lm_head`
/// replaced by the values the 4-bit packing holds for them (one `model.safetensors`, in
/// f32), from the weights as loaded at `dtype` (at bf16 the loader rounds them to bf16
/// before they are quantized); false (nothing usable written) for a checkpoint with tied
/// embeddings, whose `lm_head` is the embedding table, which `--quantize` leaves alone at
/// the input.
fn with_q4_text_weights(dir: &Path, to: &Path, dtype: candle_core::DType) -> bool {
    let mut tensors = std::collections::HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".safetensors") && name != "reference.safetensors" {
            tensors.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        } else if !name.ends_with(".safetensors.index.json") && path.is_file() {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
    if !tensors.contains_key("lm_head.weight") {
        return false;
    }
    for (name, t) in tensors.iter_mut() {
        if name == "lm_head.weight" || (name.starts_with("model.text_model.") && name.ends_with("_proj.weight")) {
            let f = t.to_dtype(dtype).unwrap().to_dtype(candle_core::DType::F32).unwrap();
            let (n, k) = f.dims2().unwrap();
            let v = quire_vlm::bf16::Bf16Linear::q4_values(&f.flatten_all().unwrap().to_vec1::<f32>().unwrap(), k);
            *t = candle_core::Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, to.join("model.safetensors")).unwrap();
    true
}

/// `--quantize q8` and `q4` (CPU): the text model's linear layers in int8 or 4 bits with an
/// f16 scale per 32 weights, on both families' checkpoints, with f32 and with bf16 elsewhere.
/// First-step logits stay close to the f32 reference without equalling it (so the quantized weights are in
/// effect) and generation runs to completion. With `--dtype bf16` (every product on the CPU's
/// bf16 kernels, which sum each row the same way whatever is beside it, and Idefics2's frames
/// encoded in groups of one size) a page batched gives the same first-step logits, bit for
/// bit, and the same tokens as alone. Prints how many cases keep f32's greedy tokens and the
/// largest logit difference, beside transformers' own bf16 drift on the same case.
///
/// Bounds: with f32 elsewhere, Q8_REL of the largest |logit|: a weight is off by at most half
/// its block's step (largest |w| / 254), about 2^-8 of the block's largest weight, the size
/// of bf16's rounding, on the text model's weights only, so the drift is of the order of
/// bf16's, which stays under 4% on these checkpoints (measured: 1.5-3.3%). With bf16
/// elsewhere, the larger of that and twice transformers' bf16 drift, as the bf16 test allows.
///
/// q4 (4 bits, ±7 steps) takes steps 127/7 ≈ 18 times q8's, and its products without AMX
/// round the inputs to int8 per block of 32 as well (half a step of 1/254 of the block's
/// largest |x|, bf16's size again): against f32, Q4_REL (measured 21-71% on these
/// checkpoints, whose weights are Gaussian noise with nothing for the logits to lean on;
/// q8's drift times 18 is 60%), which says little. What pins q4 down is the unquantized
/// run on its 4-bit values (where the embeddings are untied): only the inputs' int8 rounding
/// is left, and the logits stay within q8's bounds of it (measured: f32 2.2-3.5%, bf16 up
/// to 9.8%, as bf16+q8 against f32).
#[test]
fn quantized_weights_stay_close_to_f32_on_both_families() {
    use candle_core::DType;
    use quire_vlm::Quantize;
    const Q8_REL: f32 = 0.04;
    const Q4_REL: f32 = 0.9;
    if !device().is_cpu() || test_dtype() != DType::F32 {
        eprintln!("quantized_weights_stay_close_to_f32_on_both_families: skipped, quantized weights run on the CPU (f32 tests only)");
        return;
    }
    if let Err(why) = quire_vlm::bf16::support() {
        eprintln!("quantized_weights_stay_close_to_f32_on_both_families: skipped, {why}");
        return;
    }
    // (folder, checkpoint, tokens to compare: 0 for the reference's length)
    let all: Vec<(PathBuf, &str, usize)> = CHECKPOINTS
        .iter()
        .map(|n| (fixtures(), *n, 0))
        .chain(IDEFICS2.iter().map(|n| (idefics2_dir(), *n, 8)))
        .collect();
    let mut failures = Vec::new();
    // Per dtype beside q8: cases keeping f32's tokens, cases, largest drift / largest |logit|.
    // q4's largest drift from the unquantized run on its 4-bit values.
    let mut summary: std::collections::BTreeMap<&str, (usize, usize, f32, f32)> = Default::default();
    for (root, name, max_new) in all {
        let dir = root.join(name);
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let lowp: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("lowp_reference.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let max_new = if max_new == 0 { meta["max_new_tokens"].as_u64().unwrap() as usize } else { max_new };
        let runs = [
            ("f32+q8", DType::F32, Quantize::Q8, Q8_REL),
            ("bf16+q8", DType::BF16, Quantize::Q8, Q8_REL),
            ("f32+q4", DType::F32, Quantize::Q4, Q4_REL),
            ("bf16+q4", DType::BF16, Quantize::Q4, Q4_REL),
        ];
        for (label, dtype, quantize, rel) in runs {
            let opts = LoadOptions { dtype, quantize, ..LoadOptions::default() };
            let mut vlm = match Vlm::load(&dir, &opts) {
                Err(e) if quantize == Quantize::Q4 && format!("{e:#}").contains("AVX512-VNNI") => {
                    eprintln!("{name} {label}: skipped, {e:#}");
                    continue;
                }
                loaded => loaded.unwrap_or_else(|e| panic!("loading {name} with {label}: {e:#}")),
            };
            let sum = summary.entry(label).or_default();
            // q4: f32 without quantization on the weights' 4-bit values, which leaves q4's
            // rounding of the inputs to int8 (and with bf16, bf16's drift).
            let q4_dir = tempfile::tempdir().unwrap();
            let mut q4_ref = (quantize == Quantize::Q4 && with_q4_text_weights(&dir, q4_dir.path(), dtype))
                .then(|| Vlm::load(q4_dir.path(), &LoadOptions::default()).unwrap());
            for case in cases(&meta) {
                let key = case["image"].as_str().unwrap().trim_end_matches(".png");
                let got = vlm.prefill_logits(&[request(case, 1)]).unwrap().remove(0);
                let want: Vec<f32> = tensors[&format!("{key}.logits")].to_vec1().unwrap();
                let d = max_abs_diff(&got, &want);
                let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
                let hf = lowp["checkpoints"][name]["bf16"][key]["max_abs_diff"].as_f64().unwrap() as f32;
                eprintln!(
                    "{name}/{key} {label}: max |diff| {d:.5} ({:.2}% of the largest |logit| {scale:.3}; transformers bf16: {hf:.5})",
                    100.0 * d / scale
                );
                sum.2 = sum.2.max(d / scale);
                let bound = if dtype == DType::F32 { rel * scale } else { (rel * scale).max(2.0 * hf) };
                if !(got.iter().all(|x| x.is_finite()) && d <= bound && d > 1e-5) {
                    failures.push(format!("{name}/{key} {label}: logits differ by {d} (bound {bound})"));
                }
                if let Some(r) = q4_ref.as_mut() {
                    let want = r.prefill_logits(&[request(case, 1)]).unwrap().remove(0);
                    let d = max_abs_diff(&got, &want);
                    eprintln!("{name}/{key} {label}: max |diff| {d:.5} ({:.2}%) from the unquantized run on the 4-bit values", 100.0 * d / scale);
                    sum.3 = sum.3.max(d / scale);
                    let bound = if dtype == DType::F32 { Q8_REL * scale } else { (Q8_REL * scale).max(2.0 * hf) };
                    if d > bound {
                        failures.push(format!("{name}/{key} {label}: logits differ from the run on the 4-bit values by {d} (bound {bound})"));
                    }
                }
            }
            let reqs: Vec<Request> = cases(&meta).iter().map(|c| request(c, max_new)).collect();
            let batched = vlm.generate(&reqs).unwrap();
            let first: Vec<Request> = cases(&meta).iter().map(|c| request(c, 1)).collect();
            let first_batched = vlm.prefill_logits(&first).unwrap();
            for (((g, case), r), (one, logits)) in batched.iter().zip(cases(&meta)).zip(&reqs).zip(first.iter().zip(&first_batched)) {
                let want = u32s(&case["new_tokens"]);
                sum.0 += usize::from(g.token_ids[..] == want[..want.len().min(max_new)]);
                sum.1 += 1;
                if g.tokens_out == 0 || g.tokens_out > max_new {
                    failures.push(format!("{name} {label}: {} tokens", g.tokens_out));
                }
                if dtype == DType::F32 {
                    // The f32 vision products' sums depend on how many rows are beside them
                    // (well under 1e-5), which the bf16 rounding of the text's inputs can
                    // carry further: no bit-for-bit claim here.
                    continue;
                }
                let alone = vlm.prefill_logits(std::slice::from_ref(one)).unwrap().remove(0);
                if alone.iter().zip(logits).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    failures.push(format!("{name} {label}: first-step logits batched differ from alone by {}", max_abs_diff(&alone, logits)));
                }
                let alone = vlm.generate(std::slice::from_ref(r)).unwrap().remove(0);
                if alone.token_ids != g.token_ids {
                    failures.push(format!("{name} {label}: batched {:?} vs alone {:?}", g.token_ids, alone.token_ids));
                }
            }
        }
    }
    for (label, (same, n, d, dv)) in &summary {
        eprintln!("{label}: greedy tokens equal f32's in {same}/{n} cases; largest logit diff {:.2}% of the largest |logit|", 100.0 * d);
        if label.ends_with("q4") {
            eprintln!("{label}: largest logit diff from the unquantized run on the 4-bit values {:.2}%", 100.0 * dv);
        }
    }
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// Continuous batching: requests join as others leave, with at most two in flight and one
/// admitted per step, so pages are admitted at different steps next to sequences of other
/// prompt lengths, tile counts and output lengths (one stops early at a budget of 3). Each
/// must give exactly its transformers tokens, as alone.
#[test]
fn continuous_batching_gives_each_page_its_own_tokens() {
    if skip_unless_f32("continuous_batching_gives_each_page_its_own_tokens") {
        return;
    }
    use quire_vlm::batcher::{Batcher, BatcherOptions};
    use quire_vlm::engine::KvBudget;
    let all: Vec<(PathBuf, &str)> = CHECKPOINTS
        .iter()
        .map(|n| (fixtures(), *n))
        .chain(IDEFICS2.iter().map(|n| (idefics2_dir(), *n)))
        .collect();
    // Whole prefills with preparation on the stepping thread, then prefills in chunks of 7
    // positions (prompts are 23 to 88 long: chunks end inside the image tokens and in the
    // text) between decode steps, with images prepared on two threads ahead of the model.
    let settings = [(0, 0), (7, 2)];
    for ((dir, name), (prefill_tokens, prep_threads)) in all.into_iter().flat_map(|c| settings.map(|s| (c.clone(), s))) {
        let fx = load_from(&dir, name);
        let name = format!("{name} (prefill_tokens {prefill_tokens}, prep_threads {prep_threads})");
        let max_new = fx.meta["max_new_tokens"].as_u64().unwrap() as usize;
        let kv = KvBudget { bytes: 1 << 30, max_sequences: 2 };
        let opts = BatcherOptions { kv, prefill_per_step: 1, prefill_tokens, prep_threads };
        let mut b = Batcher::new(fx.vlm, opts);
        let mut want = Vec::new();
        for (round, limit) in [max_new, 3, max_new].into_iter().enumerate() {
            for (i, case) in cases(&fx.meta).iter().enumerate() {
                let tokens = u32s(&case["new_tokens"]);
                want.push(tokens[..tokens.len().min(limit)].to_vec());
                b.submit((round * 100 + i) as u64, request(case, limit));
            }
        }
        let ids: Vec<u64> = (0..3).flat_map(|r| (0..cases(&fx.meta).len()).map(move |i| (r * 100 + i) as u64)).collect();
        let mut got = std::collections::HashMap::new();
        let (mut steps, mut most) = (0, 0);
        while b.outstanding() > 0 {
            for (id, g) in b.step() {
                got.insert(id, g.unwrap_or_else(|e| panic!("{name}: request {id}: {e}")).token_ids);
            }
            most = most.max(b.in_flight());
            steps += 1;
            assert!(steps < 10_000, "{name}: the batcher made no progress");
        }
        assert_eq!(most, 2, "{name}: two sequences in flight at most, and two at some point");
        for (id, w) in ids.iter().zip(&want) {
            assert_eq!(&got[id], w, "{name}: request {id}");
        }
        assert_eq!(b.kv_usage().0, 0, "{name}: every slot given back");
    }
}

/// Preparation threads resize, tile and tokenize submitted requests before the model asks
/// for them, never more than the look-ahead (two steps' admissions), and the answers are
/// those of the model run alone.
#[test]
fn requests_are_prepared_ahead_of_the_model_within_a_bound() {
    if skip_unless_f32("requests_are_prepared_ahead_of_the_model_within_a_bound") {
        return;
    }
    use quire_vlm::batcher::{Batcher, BatcherOptions};
    use quire_vlm::engine::KvBudget;
    let fx = load("split_sf2_gqa");
    let max_new = fx.meta["max_new_tokens"].as_u64().unwrap() as usize;
    let kv = KvBudget { bytes: 1 << 30, max_sequences: 2 };
    let mut b = Batcher::new(fx.vlm, BatcherOptions { kv, prefill_per_step: 2, prefill_tokens: 0, prep_threads: 3 });
    let cases = cases(&fx.meta);
    for i in 0..10 {
        b.submit(i, request(&cases[i as usize % cases.len()], max_new));
    }
    // No step has run: only the threads can have prepared anything.
    let t = std::time::Instant::now();
    while b.prepared() < 4 && t.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(b.prepared(), 4, "prepared ahead before any step");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(b.prepared(), 4, "no more than the look-ahead");
    let mut got = std::collections::HashMap::new();
    while b.outstanding() > 0 {
        for (id, g) in b.step() {
            got.insert(id, g.unwrap().token_ids);
        }
    }
    for i in 0..10u64 {
        assert_eq!(got[&i], u32s(&cases[i as usize % cases.len()]["new_tokens"]), "request {i}");
    }
}

/// A KV-cache budget too small for one page fails that page with a clear message; the
/// batcher stays usable.
#[test]
fn a_kv_budget_too_small_for_one_page_is_a_clear_error() {
    use quire_vlm::batcher::{Batcher, BatcherOptions};
    use quire_vlm::engine::KvBudget;
    let fx = load("split_sf2_gqa");
    let case = &cases(&fx.meta)[0];
    let opts = BatcherOptions { prefill_per_step: 4, ..BatcherOptions::new(KvBudget { bytes: 4096, max_sequences: 4 }) };
    let mut b = Batcher::new(fx.vlm, opts);
    b.submit(7, request(case, 4));
    let out = b.step();
    assert_eq!(out.len(), 1);
    let err = out[0].1.as_ref().unwrap_err();
    assert!(err.contains("KV cache") && err.contains("--kv-cache-mb"), "{err}");
    assert_eq!(b.outstanding(), 0);
}

/// The masked decode attention of continuous batching (what runs on a GPU, and on the CPU
/// in f16): in f16 on the CPU, sequences admitted at different steps give the tokens each
/// gives alone in the same dtype.
#[test]
fn continuous_batching_in_f16_gives_the_tokens_of_each_page_alone() {
    if !device().is_cpu() {
        eprintln!("continuous_batching_in_f16_gives_the_tokens_of_each_page_alone: CPU only (a GPU batch may round differently)");
        return;
    }
    use quire_vlm::batcher::{Batcher, BatcherOptions};
    use quire_vlm::engine::KvBudget;
    for (dir, name) in [(fixtures(), "split_sf2_gqa"), (idefics2_dir(), "nosplit_window_old")] {
        let opts = LoadOptions { device: Device::Cpu, dtype: candle_core::DType::F16, ..LoadOptions::default() };
        let mut vlm = Vlm::load(&dir.join(name), &opts).unwrap();
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(name).join("reference.json")).unwrap()).unwrap();
        let max_new = meta["max_new_tokens"].as_u64().unwrap() as usize;
        let reqs: Vec<Request> =
            cases(&meta).iter().enumerate().map(|(i, c)| request(c, if i % 2 == 0 { max_new } else { 4 })).collect();
        let alone: Vec<Vec<u32>> = reqs.iter().map(|r| vlm.generate(std::slice::from_ref(r)).unwrap().remove(0).token_ids).collect();
        // Prefills in chunks of 5 positions, also through the masked path.
        let kv = KvBudget { bytes: 1 << 30, max_sequences: 3 };
        let mut b = Batcher::new(vlm, BatcherOptions { kv, prefill_per_step: 1, prefill_tokens: 5, prep_threads: 1 });
        for (i, r) in reqs.into_iter().enumerate() {
            b.submit(i as u64, r);
        }
        let mut got = std::collections::HashMap::new();
        while b.outstanding() > 0 {
            for (id, g) in b.step() {
                got.insert(id as usize, g.unwrap().token_ids);
            }
        }
        for (i, want) in alone.iter().enumerate() {
            assert_eq!(&got[&i], want, "{name}: request {i}");
        }
    }
}

// ---- Runaway generation ----------------------------------------------------------------------
//
// `idefics2/nosplit_window_old/loops_reference.json` (tests/gen_idefics2.py loops): with its
// 12-token sliding window that checkpoint's greedy output settles into a repeated period on
// some pages (as runaway pages of real models do) and ends with EOS on others. The reference
// holds transformers' tokens up to `max_new_tokens` (480) on every (image, prompt) pair, where
// quire's rule first holds in them, computed in the generator by a Python copy of the rule
// (`loops["128"|"256"]`: found_at, period, start, keep), and for looping pages the tokens of
// `generate(repetition_penalty=retry_penalty)`. DocTags location tokens: see the unit tests
// of `quire_vlm::loops`.

mod runaway {
    use super::*;
    use quire_vlm::batcher::{Batcher, BatcherOptions};
    use quire_vlm::engine::KvBudget;
    use quire_vlm::loops::{LoopOptions, OnLoop};
    use quire_vlm::Generation;

    fn fixture(opts: LoopOptions) -> (Vlm, Value) {
        let dir = idefics2_dir().join("nosplit_window_old");
        let mut vlm = Vlm::load(&dir, &f32_options()).unwrap_or_else(|e| panic!("loading nosplit_window_old: {e:#}"));
        vlm.set_loop_options(opts).unwrap();
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("loops_reference.json")).unwrap()).unwrap();
        (vlm, meta)
    }

    fn max_new(meta: &Value) -> usize {
        meta["max_new_tokens"].as_u64().unwrap() as usize
    }

    /// The loop the generator found in a case under `min_tokens` (None: no loop).
    fn hit(case: &Value, min_tokens: usize, prefix: &str) -> Option<(usize, usize, usize, usize)> {
        let h = &case[format!("{prefix}loops")][min_tokens.to_string()];
        (!h.is_null()).then(|| {
            let g = |k: &str| h[k].as_u64().unwrap() as usize;
            (g("found_at"), g("period"), g("start"), g("keep"))
        })
    }

    fn with_min(min_tokens: usize) -> LoopOptions {
        LoopOptions { min_tokens, ..LoopOptions::default() }
    }

    /// Every request through continuous batching (two in flight), answers by index.
    fn continuous(vlm: Vlm, reqs: Vec<Request>) -> (Vec<Generation>, Vlm) {
        let kv = KvBudget { bytes: 1 << 30, max_sequences: 2 };
        let mut b = Batcher::new(vlm, BatcherOptions { kv, prefill_per_step: 1, prefill_tokens: 0, prep_threads: 0 });
        let n = reqs.len();
        for (i, r) in reqs.into_iter().enumerate() {
            b.submit(i as u64, r);
        }
        let mut got: Vec<Option<Generation>> = vec![None; n];
        let mut steps = 0;
        while b.outstanding() > 0 {
            for (id, g) in b.step() {
                got[id as usize] = Some(g.unwrap_or_else(|e| panic!("request {id}: {e}")));
            }
            steps += 1;
            assert!(steps < 20_000, "the batcher made no progress");
        }
        assert_eq!(b.kv_usage().0, 0, "every slot given back");
        (got.into_iter().map(Option::unwrap).collect(), b.into_inner())
    }

    fn looping_cases(meta: &Value, min_tokens: usize) -> Vec<&Value> {
        cases(meta).iter().filter(|c| hit(c, min_tokens, "").is_some()).collect()
    }

    /// transformers' own output shows the loop: it runs to the token limit repeating the
    /// period from where the generator says it starts, after a prefix longer than the
    /// longest period looked for; other pages end by themselves.
    #[test]
    fn the_fixture_loops_late_in_transformers_on_some_pages_only() {
        let (_, meta) = fixture(LoopOptions::default());
        let n = max_new(&meta);
        let mut starts = Vec::new();
        for case in cases(&meta) {
            let ids = u32s(&case["new_tokens"]);
            if let Some((_, period, start, _)) = hit(case, 256, "") {
                assert_eq!(ids.len(), n, "a looping page runs to the limit in transformers");
                assert!((start + period..n).all(|i| ids[i] == ids[i - period]), "{}: periodic to the end", case["image"]);
                starts.push(start);
            }
        }
        assert!(starts.len() >= 2, "looping pages: {starts:?}");
        assert!(starts.iter().all(|&s| s > 64), "loops that start late: {starts:?}");
        assert!(starts.len() < cases(&meta).len(), "a page that does not loop");
    }

    /// `stop` (the default): a looping page ends exactly `min_tokens` tokens after its loop
    /// starts, with transformers' tokens up to the end of the first period; the others keep
    /// every token. Static batches and continuous batching alike; for both limits the
    /// generator computed.
    #[test]
    fn a_looping_page_stops_min_tokens_after_the_loop_starts_and_keeps_one_period() {
        if skip_unless_f32("a_looping_page_stops_min_tokens_after_the_loop_starts_and_keeps_one_period") {
            return;
        }
        for min_tokens in [256, 128] {
            let (mut vlm, meta) = fixture(with_min(min_tokens));
            let n = max_new(&meta);
            let reqs: Vec<Request> = cases(&meta).iter().map(|c| request(c, n)).collect();
            let alone: Vec<Generation> = reqs.iter().map(|r| vlm.generate(std::slice::from_ref(r)).unwrap().remove(0)).collect();
            let batched = vlm.generate(&reqs).unwrap();
            let (cont, _) = continuous(vlm, reqs);
            for (i, case) in cases(&meta).iter().enumerate() {
                let want = u32s(&case["new_tokens"]);
                let label = format!("{} / {} (min_tokens {min_tokens})", case["image"], case["prompt"]);
                for (how, g) in [("alone", &alone[i]), ("static batch", &batched[i]), ("continuous", &cont[i])] {
                    match hit(case, min_tokens, "") {
                        Some((found_at, period, start, keep)) => {
                            assert_eq!(found_at - start, min_tokens, "{label}: the rule holds min_tokens after the start");
                            assert_eq!(g.finish_reason, FinishReason::Loop, "{label} {how}");
                            assert_eq!(g.token_ids, want[..keep].to_vec(), "{label} {how}: one period kept");
                            assert_eq!(g.tokens_out, start + period);
                            let r = g.loop_report.as_ref().expect("a loop report");
                            assert_eq!((r.period, r.attempts.clone(), r.tokens_saved), (period, vec![found_at], n - found_at), "{label} {how}");
                        }
                        None => {
                            assert_eq!(g.token_ids, want, "{label} {how}: untouched");
                            assert!(g.loop_report.is_none());
                            assert_ne!(g.finish_reason, FinishReason::Loop);
                        }
                    }
                }
            }
        }
    }

    /// `off`: every page runs to the limit exactly as in transformers.
    #[test]
    fn off_leaves_looping_pages_to_the_token_limit() {
        if skip_unless_f32("off_leaves_looping_pages_to_the_token_limit") {
            return;
        }
        let (mut vlm, meta) = fixture(LoopOptions { on_loop: OnLoop::Off, ..LoopOptions::default() });
        let n = max_new(&meta);
        let case = looping_cases(&meta, 256)[0];
        let g = vlm.generate(&[request(case, n)]).unwrap().remove(0);
        assert_eq!(g.token_ids, u32s(&case["new_tokens"]));
        assert_eq!((g.finish_reason, g.loop_report.is_none()), (FinishReason::Length, true));
    }

    /// One looping and one normal page decode side by side: under continuous batching the
    /// normal page joins a few steps before the loop is caught, so the looping sequence leaves
    /// its slot while the normal one decodes (and the normal one's cache moves into it); and
    /// in one static batch. The normal page's tokens are transformers' tokens, every one.
    #[test]
    fn a_loop_next_to_a_normal_page_leaves_the_normal_page_exact() {
        if skip_unless_f32("a_loop_next_to_a_normal_page_leaves_the_normal_page_exact") {
            return;
        }
        let (mut vlm, meta) = fixture(LoopOptions::default());
        let n = max_new(&meta);
        let looping = looping_cases(&meta, 256)[0];
        let (found_at, ..) = hit(looping, 256, "").unwrap();
        let normal = cases(&meta)
            .iter()
            .filter(|c| hit(c, 256, "").is_none())
            .max_by_key(|c| c["new_tokens"].as_array().unwrap().len())
            .expect("a normal page");
        let want = u32s(&normal["new_tokens"]);
        assert!(want.len() > 6 && want.len() < n, "the normal page ends by itself");
        let batched = vlm.generate(&[request(looping, n), request(normal, n)]).unwrap();
        assert_eq!(batched[0].finish_reason, FinishReason::Loop);
        assert_eq!(batched[1].token_ids, want, "static batch: the normal page");

        let kv = KvBudget { bytes: 1 << 30, max_sequences: 2 };
        let mut b = Batcher::new(vlm, BatcherOptions { kv, prefill_per_step: 1, prefill_tokens: 0, prep_threads: 0 });
        b.submit(0, request(looping, n));
        let mut order = Vec::new();
        let mut got = std::collections::HashMap::new();
        let mut steps = 0;
        while b.outstanding() > 0 {
            if steps == found_at - 4 {
                b.submit(1, request(normal, n));
            }
            for (id, g) in b.step() {
                let g = g.unwrap();
                if id == 0 {
                    assert_eq!(b.in_flight(), 1, "the normal page is decoding when the loop leaves");
                }
                order.push(id);
                got.insert(id, g);
            }
            steps += 1;
            assert!(steps < 5_000);
        }
        assert_eq!(order, vec![0, 1], "the looping page left first");
        assert_eq!(got[&0].finish_reason, FinishReason::Loop);
        assert_eq!(got[&0].loop_report.as_ref().unwrap().attempts, vec![found_at]);
        assert_eq!(got[&1].token_ids, want, "continuous: the normal page");
    }

    /// `retry`: a looping page is decoded once more with the retry penalty, token-exact against
    /// transformers' `repetition_penalty` run, and the better attempt kept (one that does not
    /// loop, else the shorter); the report gives both attempts' token counts.
    #[test]
    fn retry_decodes_a_looping_page_again_with_the_penalty_and_keeps_the_better() {
        if skip_unless_f32("retry_decodes_a_looping_page_again_with_the_penalty_and_keeps_the_better") {
            return;
        }
        let (_, meta) = fixture(LoopOptions::default());
        let opts = LoopOptions {
            on_loop: OnLoop::Retry,
            retry_penalty: meta["retry_penalty"].as_f64().unwrap(),
            ..LoopOptions::default()
        };
        let (mut vlm, _) = fixture(opts);
        let n = max_new(&meta);
        let reqs: Vec<Request> = cases(&meta).iter().map(|c| request(c, n)).collect();
        let batched = vlm.generate(&reqs).unwrap();
        let (cont, _) = continuous(vlm, reqs);
        for (i, case) in cases(&meta).iter().enumerate() {
            let label = format!("{} / {}", case["image"], case["prompt"]);
            let Some((found_at, _, _, keep)) = hit(case, 256, "") else {
                assert!(batched[i].loop_report.is_none() && cont[i].loop_report.is_none(), "{label}: no retry");
                continue;
            };
            let first = u32s(&case["new_tokens"])[..keep].to_vec();
            let retry = u32s(&case["retry_new_tokens"]);
            let (want, attempt2, looped) = match hit(case, 256, "retry_") {
                None => (retry.clone(), retry.len(), false),
                Some((f2, _, _, k2)) if k2 < keep => (retry[..k2].to_vec(), f2, true),
                Some((f2, ..)) => (first.clone(), f2, true),
            };
            for (how, g) in [("static batch", &batched[i]), ("continuous", &cont[i])] {
                assert_eq!(g.token_ids, want, "{label} {how}");
                assert_eq!(g.finish_reason == FinishReason::Loop, looped, "{label} {how}");
                let r = g.loop_report.as_ref().expect("a loop report");
                assert_eq!(r.attempts, vec![found_at, attempt2], "{label} {how}");
                assert_eq!(r.looped, looped);
            }
        }
    }
}


