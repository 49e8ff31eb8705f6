//! Chat template rendering (minijinja, configured like transformers' Jinja environment)
//! and the `tokenizer.json` tokenizer with the decode options of `tokenizer_config.json`.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

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
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Processor(format!("parsing the chat template: {e}")))?;
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
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Processor(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from_serialize(&messages),
            add_generation_prompt => true,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| Error::Processor(format!("rendering the chat template: {e}")))
    }
}

/// `tokenizer.json` plus the decode behaviour set in `tokenizer_config.json`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    clean_up_spaces: bool,
    /// For a DocTags model (its vocabulary has `<doctag>` and `<loc_0>`): the special tokens
    /// that are not DocTags markup (end of turn, padding, image and chat tokens). Its output is
    /// decoded with the DocTags tokens kept, as docling reads it, and only these dropped.
    doctags_control: Option<std::collections::HashSet<u32>>,
}

/// Whether a special token of a DocTags model's vocabulary is a control token rather than
/// DocTags markup: chat and end-of-text tokens (`<|im_end|>`), the turn end, the image
/// placeholders and tile markers, and the tokenizer's own BOS/EOS/PAD/UNK.
fn is_control_token(content: &str, roles: &[String]) -> bool {
    let tile = content.strip_prefix("<row_").and_then(|r| r.strip_suffix('>')).is_some_and(|r| r.contains("_col_"));
    content.contains('|')
        || tile
        || matches!(content, "<end_of_utterance>" | "<fake_token_around_image>" | "<image>" | "<global-img>")
        || roles.iter().any(|r| r == content)
}

/// The role tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`) of `tokenizer_config.json`,
/// given as a string or as `{"content": ...}`.
fn role_tokens(tok_config: &Value) -> Vec<String> {
    ["bos_token", "eos_token", "pad_token", "unk_token"]
        .iter()
        .filter_map(|k| {
            let v = tok_config.get(*k)?;
            v.as_str().or_else(|| v.get("content").and_then(Value::as_str)).map(str::to_string)
        })
        .collect()
}

impl TextTokenizer {
    pub fn load(dir: &Path, tok_config: &Value) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("loading {}: {e}", path.display())))?;
        let clean_up_spaces =
            tok_config.get("clean_up_tokenization_spaces").and_then(Value::as_bool).unwrap_or(false);
        let doctags = inner.token_to_id("<doctag>").is_some() && inner.token_to_id("<loc_0>").is_some();
        let doctags_control = doctags.then(|| {
            let roles = role_tokens(tok_config);
            inner
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special && is_control_token(&t.content, &roles))
                .map(|(id, _)| id)
                .collect()
        });
        Ok(TextTokenizer { inner, clean_up_spaces, doctags_control })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::Tokenizer(format!("tokenizing the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids of the DocTags location tokens (`<loc_0>`, `<loc_1>`, …) in the vocabulary, added
    /// tokens included; empty for other models.
    pub fn loc_token_ids(&self) -> Vec<u32> {
        let is_loc = |t: &str| {
            t.strip_prefix("<loc_")
                .and_then(|r| r.strip_suffix('>'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        let mut ids: Vec<u32> = self.inner.get_vocab(true).into_iter().filter(|(t, _)| is_loc(t)).map(|(_, id)| id).collect();
        ids.sort_unstable();
        ids
    }

    /// Decodes with special tokens skipped; a DocTags model keeps its DocTags tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let s = match &self.doctags_control {
            Some(control) => {
                let kept: Vec<u32> = ids.iter().copied().filter(|id| !control.contains(id)).collect();
                self.inner.decode(&kept, false)
            }
            None => self.inner.decode(ids, true),
        }
        .map_err(|e| Error::Tokenizer(format!("decoding: {e}")))?;
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

#[cfg(test)]
mod doctags_decoding {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::AddedToken;

    fn tokenizer(doctags: bool) -> (TextTokenizer, Vec<u32>) {
        let vocab = [("[UNK]", 0u32), ("Intro", 1), ("text", 2)].iter().map(|(w, i)| (w.to_string(), *i)).collect();
        let model = WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let mut specials = vec!["<end_of_utterance>", "<|im_start|>", "<row_1_col_2>", "<text>", "</text>", "<loc_12>"];
        if doctags {
            specials.extend(["<doctag>", "</doctag>", "<loc_0>"]);
        }
        inner.add_special_tokens(specials.iter().map(|t| AddedToken::from(t.to_string(), true)).collect::<Vec<_>>()).unwrap();
        let tok_config = serde_json::json!({"eos_token": "<end_of_utterance>"});
        let dir = tempfile::tempdir().unwrap();
        inner.save(dir.path().join("tokenizer.json"), false).unwrap();
        let t = TextTokenizer::load(dir.path(), &tok_config).unwrap();
        let id = |s: &str| t.token_id(s).unwrap();
        let mut ids = vec![];
        if doctags {
            ids.push(id("<doctag>"));
        }
        ids.extend([id("<text>"), id("<loc_12>"), id("Intro"), id("</text>")]);
        if doctags {
            ids.push(id("</doctag>"));
        }
        ids.extend([id("<|im_start|>"), id("<row_1_col_2>"), id("<end_of_utterance>")]);
        (t, ids)
    }

    #[test]
    fn a_doctags_model_keeps_its_markup_and_drops_only_control_tokens() {
        let (t, ids) = tokenizer(true);
        assert_eq!(t.decode(&ids).unwrap(), "<doctag><text><loc_12>Intro</text></doctag>");
    }

    #[test]
    fn other_models_drop_every_special_token() {
        let (t, ids) = tokenizer(false);
        assert_eq!(t.decode(&ids).unwrap(), "Intro");
    }
}
