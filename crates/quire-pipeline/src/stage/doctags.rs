//! Models that write DocTags (SmolDocling, Granite-Docling): which they
//! are, and their pages turned into Markdown and layout blocks.
//!
//! A model counts as a DocTags model when its tokenizer has the DocTags
//! vocabulary (`<doctag>` and the location tokens `<loc_0>`…); a page of
//! its output is transformed when it starts with `<doctag>`. Anything else
//! (text-layer pages, other models, a DocTags model that answered in plain
//! text) keeps `markdown` and `blocks` null.

use quire_doctags::Block;
use serde_json::Value;
use std::path::Path;

/// Tokens every DocTags tokenizer has.
const DOCTAGS_TOKENS: [&str; 2] = ["<doctag>", "<loc_0>"];

/// Whether the checkpoint at `dir` has the DocTags vocabulary in its
/// `tokenizer.json` (as added tokens or in the model's vocabulary). A missing
/// or unreadable file means no.
pub fn has_doctags_vocabulary(dir: &Path) -> bool {
    let Ok(bytes) = std::fs::read(dir.join("tokenizer.json")) else {
        return false;
    };
    let Ok(tok) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    let added: Vec<&str> = tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|t| t.get("content").and_then(Value::as_str)).collect())
        .unwrap_or_default();
    let vocab = tok.pointer("/model/vocab").and_then(Value::as_object);
    DOCTAGS_TOKENS.iter().all(|t| added.contains(t) || vocab.is_some_and(|v| v.contains_key(*t)))
}

/// A page of model output to its Markdown and blocks (bounding boxes in a
/// page of `width` × `height` pixels), or `None` when it is not DocTags.
pub fn transform(text: &str, width: u32, height: u32) -> Option<(String, Vec<Block>)> {
    if !quire_doctags::is_doctags(text) {
        return None;
    }
    let blocks = quire_doctags::parse_page(text, width, height);
    Some((quire_doctags::markdown(&blocks), blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(tokenizer: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("tokenizer.json"), tokenizer).unwrap();
        d
    }

    #[test]
    fn the_doctags_vocabulary_is_found_in_added_tokens_or_the_vocab() {
        let added = r#"{"added_tokens":[{"id":1,"content":"<doctag>"},{"id":2,"content":"<loc_0>"}],"model":{"vocab":{"a":0}}}"#;
        assert!(has_doctags_vocabulary(checkpoint(added).path()));
        let vocab = r#"{"added_tokens":[],"model":{"vocab":{"<doctag>":5,"<loc_0>":6}}}"#;
        assert!(has_doctags_vocabulary(checkpoint(vocab).path()));
        let half = r#"{"added_tokens":[{"id":1,"content":"<doctag>"}],"model":{"vocab":{}}}"#;
        assert!(!has_doctags_vocabulary(checkpoint(half).path()));
        assert!(!has_doctags_vocabulary(checkpoint("not json").path()));
        assert!(!has_doctags_vocabulary(tempfile::tempdir().unwrap().path()));
        // A SmolVLM-style tokenizer (the test checkpoints) has no DocTags.
        let smolvlm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3/split_sf2_gqa");
        assert!(smolvlm.join("tokenizer.json").exists());
        assert!(!has_doctags_vocabulary(&smolvlm));
    }

    #[test]
    fn only_output_that_starts_with_doctag_is_transformed() {
        assert!(transform("Plain <text> answer", 100, 100).is_none());
        let (md, blocks) = transform("<doctag><title><loc_0><loc_0><loc_250><loc_50>Hi</title></doctag>", 1000, 800).unwrap();
        assert_eq!(md, "# Hi");
        assert_eq!(blocks[0].bbox, Some([0.0, 0.0, 500.0, 80.0]));
    }
}
