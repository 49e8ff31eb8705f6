//! A Hugging Face checkpoint folder on disk: where its files are and how to read the
//! settings that different `transformers` versions spelled differently.
//!
//! Knows `config.json`, single or sharded safetensors (`model.safetensors.index.json`),
//! `generation_config.json`, processor settings in the old flat `preprocessor_config.json`
//! or the new nested `processor_config.json`, and the chat template in `chat_template.jinja`,
//! `chat_template.json` or `tokenizer_config.json`. Also resolves a model spec (local folder
//! or hub id) to such a folder.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::bail;
use crate::{Error, Result};

/// Resolves a model spec to a local checkpoint folder.
///
/// * an existing directory is used as is;
/// * `s3://…` is not handled here: the caller downloads the prefix and passes the folder;
/// * anything else is taken as a Hugging Face hub id (`org/name`, optionally `@revision`).
///   The local Hugging Face cache is consulted first (`$HF_HUB_CACHE`, else `$HF_HOME/hub`,
///   else `~/.cache/huggingface/hub`, the layout `huggingface_hub` and `hf-hub` write): a
///   complete snapshot there is used without any network access. Otherwise the files are
///   fetched through `hf-hub` (which honours `HF_ENDPOINT` and the token in `HF_HOME`), unless
///   `HF_HUB_OFFLINE` is set, in which case a missing model is an error.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if spec.starts_with("s3://") {
        bail!(
            Checkpoint,
            "{spec}: s3:// model locations are resolved by the caller (the pipeline downloads the \
             prefix to a local cache folder); pass that local folder to quire-vlm"
        );
    }
    if p.exists() {
        bail!(Checkpoint, "{spec} exists but is not a directory; pass the checkpoint folder");
    }
    let id = spec.split_once('@').map_or(spec, |(i, _)| i);
    if spec.starts_with('/') || spec.starts_with('.') || id.matches('/').count() != 1 {
        bail!(Checkpoint, "{spec}: no such model folder (and it does not look like a hub id `org/name`)");
    }
    let (id, revision) = match spec.split_once('@') {
        Some((i, r)) => (i, r),
        None => (spec, "main"),
    };
    let cache = hub_cache_dir();
    if let Some(dir) = cached_snapshot(&cache, id, revision) {
        tracing::debug!(model = spec, dir = %dir.display(), "model found in the Hugging Face cache");
        return Ok(dir);
    }
    if hub_offline() {
        bail!(
            Checkpoint,
            "{id} (revision {revision}) is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set, \
             so it cannot be downloaded; download it where the hub is reachable (with HF_TOKEN for gated \
             or private models), or pass a local checkpoint folder",
            cache.display()
        );
    }
    download_from_hub(id, revision, &cache)
}

/// The hub cache folder, as `huggingface_hub` picks it.
fn hub_cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env("HF_HUB_CACHE") {
        return d;
    }
    if let Some(d) = env("HF_HOME") {
        return d.join("hub");
    }
    let home = env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache"))).unwrap_or_default();
    home.join("huggingface").join("hub")
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it: 1, ON, YES or TRUE (any case).
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
        .unwrap_or(false)
}

/// The snapshot folder of `id` at `revision` (a branch or tag under `refs/`, or a commit hash)
/// in the hub cache, when it holds a complete checkpoint: `config.json`, `tokenizer.json` and
/// the weights (every shard the index names, or at least one `*.safetensors`).
fn cached_snapshot(cache: &Path, id: &str, revision: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let commit = match std::fs::read_to_string(repo.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit == "." || commit == ".." {
        return None;
    }
    let dir = repo.join("snapshots").join(&commit);
    if !dir.join("config.json").is_file() || !dir.join("tokenizer.json").is_file() {
        return None;
    }
    let index = dir.join("model.safetensors.index.json");
    let weights_ok = if index.is_file() {
        let idx = read_json(&index).ok()?;
        let map = idx.get("weight_map")?.as_object()?;
        !map.is_empty() && map.values().all(|f| f.as_str().is_some_and(|f| dir.join(f).is_file()))
    } else {
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "safetensors") && e.path().is_file())
    };
    weights_ok.then_some(dir)
}

fn download_from_hub(id: &str, revision: &str, cache: &Path) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()));
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| Error::Checkpoint(format!("initialising the Hugging Face hub client: {e}")))?;
    let repo = api.repo(Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string()));
    let hint = || {
        format!(
            "could not fetch {id} (revision {revision}) from the Hugging Face hub: offline, or a gated or \
             private model that needs HF_TOKEN? Not in the local cache at {} either; download the \
             checkpoint elsewhere and pass its local folder instead",
            cache.display()
        )
    };
    let fetch_error = |e: hf_hub::api::sync::ApiError| Error::Checkpoint(format!("{}: {e}", hint()));
    let config = repo.get("config.json").map_err(fetch_error)?;
    let dir = config.parent().ok_or_else(|| Error::Checkpoint("hub cache path has no parent".into()))?.to_path_buf();
    let info = repo.info().map_err(fetch_error)?;
    for s in info.siblings {
        let f = s.rfilename;
        let wanted = f.ends_with(".safetensors")
            || f.ends_with(".json") && !f.contains('/')
            || f == "chat_template.jinja";
        if wanted {
            repo.get(&f).map_err(|e| Error::Checkpoint(format!("{}: fetching {f}: {e}", hint())))?;
        }
    }
    Ok(dir)
}

/// Parsed JSON files of a checkpoint folder.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Value,
    pub generation_config: Value,
    pub tokenizer_config: Value,
    /// Flat image processor settings (whichever file held them).
    pub image_processor: Value,
    /// Processor-level settings such as `image_seq_len`.
    pub processor: Value,
    pub chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint(format!("parsing {}: {e}", path.display())))
}

fn read_json_opt(path: &Path) -> Result<Value> {
    if path.exists() {
        read_json(path)
    } else {
        Ok(Value::Object(Default::default()))
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            bail!(Checkpoint, "{} has no config.json; is it a Hugging Face checkpoint folder?", dir.display());
        }
        let config = read_json(&config_path)?;
        let generation_config = read_json_opt(&dir.join("generation_config.json"))?;
        let tokenizer_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let pre = read_json_opt(&dir.join("preprocessor_config.json"))?;
        let mut processor = read_json_opt(&dir.join("processor_config.json"))?;
        // Newer layout nests the image processor; the older one keeps it flat in preprocessor_config.json.
        let image_processor = match processor.as_object_mut().and_then(|o| o.remove("image_processor")) {
            Some(ip) => ip,
            None => pre.clone(),
        };
        for key in ["image_seq_len"] {
            if processor.get(key).is_none() {
                if let Some(v) = pre.get(key) {
                    processor[key] = v.clone();
                }
            }
        }
        let chat_template = Self::find_chat_template(dir, &processor, &tokenizer_config)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            generation_config,
            tokenizer_config,
            image_processor,
            processor,
            chat_template,
        })
    }

    fn find_chat_template(dir: &Path, processor: &Value, tok: &Value) -> Result<Option<String>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            return std::fs::read_to_string(&jinja).map(Some).map_err(|err| Error::Io { path: jinja, err });
        }
        let json = dir.join("chat_template.json");
        if json.exists() {
            if let Some(t) = read_json(&json)?.get("chat_template").and_then(template_text) {
                return Ok(Some(t));
            }
        }
        if let Some(t) = processor.get("chat_template").and_then(template_text) {
            return Ok(Some(t));
        }
        Ok(tok.get("chat_template").and_then(template_text))
    }

    /// Weight files: the shards named by the index, or every `*.safetensors` in the folder.
    pub fn safetensors_files(&self) -> Result<Vec<PathBuf>> {
        let index = self.dir.join("model.safetensors.index.json");
        if index.exists() {
            let idx = read_json(&index)?;
            let map = idx.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::Checkpoint(format!("{}: index without weight_map", index.display())))?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            return Ok(files.into_iter().map(|f| self.dir.join(f)).collect());
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|err| Error::Io { path: self.dir.clone(), err })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!(Checkpoint, "{} has no *.safetensors weights", self.dir.display());
        }
        Ok(files)
    }

    /// `model_type` and the first `architectures` entry of config.json.
    pub fn model_type(&self) -> (String, String) {
        let mt = self.config.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        let arch = self
            .config
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        (mt, arch)
    }

    /// EOS ids from generation_config.json (int or list), else from config.json.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
                _ => vec![],
            }
        };
        let mut ids = from(self.generation_config.get("eos_token_id"));
        if ids.is_empty() {
            ids = from(self.config.get("eos_token_id"));
        }
        if ids.is_empty() {
            ids = from(self.config.get("text_config").and_then(|t| t.get("eos_token_id")));
        }
        ids
    }

    /// Pad id for finished rows; only fills the batch, never read back.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.generation_config.get("pad_token_id").and_then(Value::as_u64).map(|x| x as u32)
    }

    /// A human-readable model name: `_name_or_path` if it looks like one, else the folder name.
    pub fn model_name(&self) -> String {
        if let Some(n) = self.config.get("_name_or_path").and_then(Value::as_str) {
            if !n.is_empty() && !n.starts_with('/') && !n.starts_with('.') {
                return n.to_string();
            }
        }
        self.dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| self.dir.display().to_string())
    }
}

/// A chat template is a string, or (older tokenizers) a list of named templates.
fn template_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}
