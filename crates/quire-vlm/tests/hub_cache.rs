//! Hub ids resolve from a local Hugging Face cache without network access.
//!
//! Its own test binary with a single test: it sets process-wide environment variables
//! (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`), which must not race with
//! other tests.

use std::path::{Path, PathBuf};

use quire_vlm::{resolve_model_dir, LoadOptions, Request, Vlm};

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3").join(name)
}

/// Lays out `src` as `huggingface_hub` stores a download: content in `blobs/`, the files of a
/// commit as relative symbolic links in `snapshots/<commit>/`, the branch in `refs/main`.
/// `skip` names files left out (an interrupted download).
fn lay_out(hub: &Path, id: &str, src: &Path, skip: &[&str]) -> PathBuf {
    let repo = hub.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(REV);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), REV).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("reference") && !skip.contains(&n.as_str()))
        .collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let blob = format!("{:064x}", 0xb10b_0000u64 + i as u64);
        std::fs::copy(src.join(name), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snap.join(name)).unwrap();
    }
    snap
}

fn image() -> image::DynamicImage {
    image::open(fixture("images").join("small_rgb.png")).unwrap()
}

#[test]
fn hub_ids_resolve_from_the_local_cache_without_network() {
    let tmp = std::env::temp_dir().join(format!("quire-hub-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let hf_home = tmp.join("hf");
    let hub = hf_home.join("hub");
    // Any network access fails at once: nothing listens on the discard port.
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    std::env::set_var("HF_HOME", &hf_home);
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_TOKEN");

    let snap = lay_out(&hub, "org/name", &fixture("split_sf2_gqa"), &[]);
    let sharded = lay_out(&hub, "org/sharded", &fixture("split_sf1_sharded"), &[]);
    lay_out(&hub, "org/partial", &fixture("split_sf1_sharded"), &["model-00007-of-00018.safetensors"]);

    // Online mode, hub unreachable: the cache is consulted first, so no request is made.
    assert_eq!(resolve_model_dir("org/name").unwrap(), snap);
    assert_eq!(resolve_model_dir(&format!("org/name@{REV}")).unwrap(), snap, "a commit hash as revision");
    assert_eq!(resolve_model_dir("org/sharded").unwrap(), sharded);
    // The resolved folder is a working checkpoint (files are symbolic links into blobs/).
    let mut vlm = Vlm::load(&snap, &LoadOptions::default()).unwrap();
    let g = vlm
        .generate(&[Request { image: image(), prompt: "Describe this image in one sentence.".into(), max_new_tokens: Some(3) }])
        .unwrap();
    assert_eq!(g[0].tokens_out, 3);

    // Not cached and the hub unreachable: the error names the id and says why.
    let err = format!("{:#}", resolve_model_dir("org/missing").unwrap_err());
    assert!(err.contains("org/missing") && err.contains("offline") && err.contains("HF_TOKEN"), "{err}");
    // A snapshot with a shard missing is not complete: it is fetched, which fails here.
    let err = format!("{:#}", resolve_model_dir("org/partial").unwrap_err());
    assert!(err.contains("org/partial") && err.contains("HF_TOKEN"), "{err}");

    // HF_HUB_OFFLINE: cached models still resolve; missing ones fail without trying the hub.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(resolve_model_dir("org/name").unwrap(), snap);
    for id in ["org/missing", "org/partial", "org/name@v2"] {
        let err = format!("{:#}", resolve_model_dir(id).unwrap_err());
        let bare = id.split('@').next().unwrap();
        assert!(err.contains(bare) && err.contains("HF_HUB_OFFLINE") && err.contains("HF_TOKEN"), "{err}");
        assert!(err.contains(&hub.display().to_string()), "the error says where it looked: {err}");
    }

    // HF_HUB_CACHE takes precedence over HF_HOME, as in huggingface_hub.
    std::env::set_var("HF_HOME", tmp.join("elsewhere"));
    std::env::set_var("HF_HUB_CACHE", &hub);
    assert_eq!(resolve_model_dir("org/name").unwrap(), snap);
    std::env::remove_var("HF_HUB_CACHE");
    assert!(resolve_model_dir("org/name").is_err(), "not in the cache under the new HF_HOME");

    std::fs::remove_dir_all(&tmp).unwrap();
}
