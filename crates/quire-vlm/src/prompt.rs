//! Chat template rendering (minijinja, configured like transformers' Jinja environment)
//! and the `tokenizer.json` tokenizer with the decode options of `tokenizer_config.json`.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

/// Renders a checkpoint's chat template for one user turn holding an image and text.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn special_token(tok_config: &Value, key: &str) -> String {
    match tok_config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    pub fn new(source: &str, tok_config: &Value) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks, dropping one trailing newline.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).context("parsing the chat template")?;
        Ok(ChatTemplate {
            env,
            bos_token: special_token(tok_config, "bos_token"),
            eos_token: special_token(tok_config, "eos_token"),
        })
    }

    /// The prompt for `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ..}]}]`
    /// with `add_generation_prompt=True`.
    pub fn render_user_image_turn(&self, text: &str) -> Result<String> {
        let messages = serde_json::json!([{
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": text}],
        }]);
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from_serialize(&messages),
            add_generation_prompt => true,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .context("rendering the chat template")
    }
}

/// `tokenizer.json` plus the decode behaviour set in `tokenizer_config.json`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    clean_up_spaces: bool,
}

impl TextTokenizer {
    pub fn load(dir: &Path, tok_config: &Value) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        let clean_up_spaces =
            tok_config.get("clean_up_tokenization_spaces").and_then(Value::as_bool).unwrap_or(false);
        Ok(TextTokenizer { inner, clean_up_spaces })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Decodes with special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let s = self.inner.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))?;
        Ok(if self.clean_up_spaces { clean_up_tokenization(&s) } else { s })
    }
}

/// transformers' `clean_up_tokenization`: drops the space before punctuation and contractions.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
