//! `generation_config.json`: what `transformers`' `generate()` applies by default in greedy
//! decoding, and the same logits processing, row by row.
//!
//! Honoured: `eos_token_id`, `max_new_tokens` / `max_length` (the default length when the
//! caller gives none), `min_length` / `min_new_tokens`, `repetition_penalty`,
//! `no_repeat_ngram_size`, `bad_words_ids`, `suppress_tokens`, `begin_suppress_tokens` and
//! `forced_eos_token_id`, each exactly as the corresponding `transformers` logits processor
//! computes it on f32 scores (`generation/logits_process.py`). Decoding is always greedy
//! with one beam: `do_sample`, `temperature`, `top_k`, `top_p` and `num_beams` are read only
//! to say, once, that they are not used.
//!
//! Every rule looks at one row's own tokens (its prompt, then what it generated), never at
//! the left padding of a batch, so a batched row decodes exactly like the same request alone.

use serde_json::Value;

/// New tokens per request when neither the caller nor the checkpoint says
/// (`transformers` would stop after 20, far too few for a page).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 1024;

/// Where the default length comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultLength {
    /// `max_new_tokens` of the generation config.
    NewTokens(usize),
    /// `max_length` of the generation config: prompt plus new tokens.
    Total(usize),
    /// Nothing set: [`DEFAULT_MAX_NEW_TOKENS`].
    Unset,
}

/// The generation settings of a checkpoint, with `transformers`' defaults for absent keys.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub default_length: DefaultLength,
    pub min_length: usize,
    pub min_new_tokens: usize,
    /// 1.0 is off.
    pub repetition_penalty: f64,
    /// 0 is off.
    pub no_repeat_ngram_size: usize,
    /// Sequences never generated (EOS alone is exempt, as in `transformers`).
    pub bad_words_ids: Vec<Vec<u32>>,
    pub suppress_tokens: Vec<u32>,
    /// Suppressed at the first new token only.
    pub begin_suppress_tokens: Vec<u32>,
    pub forced_eos_token_ids: Vec<u32>,
    /// Read to be reported; decoding stays greedy.
    pub do_sample: bool,
    pub num_beams: usize,
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

fn usize_of(v: &Value, k: &str) -> Option<usize> {
    v.get(k).and_then(Value::as_u64).map(|x| x as usize)
}

impl GenerationConfig {
    /// Reads `generation_config.json` (already parsed); `eos_token_ids` are the checkpoint's
    /// EOS ids as resolved by [`crate::Checkpoint::eos_token_ids`].
    pub fn from_json(g: &Value, eos_token_ids: Vec<u32>) -> GenerationConfig {
        let default_length = match (usize_of(g, "max_new_tokens"), usize_of(g, "max_length")) {
            (Some(n), _) => DefaultLength::NewTokens(n),
            (None, Some(n)) => DefaultLength::Total(n),
            (None, None) => DefaultLength::Unset,
        };
        let bad_words_ids = g
            .get("bad_words_ids")
            .and_then(Value::as_array)
            .map(|seqs| {
                seqs.iter()
                    .map(|s| ids(Some(s)))
                    .filter(|s| !s.is_empty())
                    .filter(|s| !(s.len() == 1 && eos_token_ids.contains(&s[0])))
                    .collect()
            })
            .unwrap_or_default();
        GenerationConfig {
            default_length,
            min_length: usize_of(g, "min_length").unwrap_or(0),
            min_new_tokens: usize_of(g, "min_new_tokens").unwrap_or(0),
            repetition_penalty: g.get("repetition_penalty").and_then(Value::as_f64).unwrap_or(1.0),
            no_repeat_ngram_size: usize_of(g, "no_repeat_ngram_size").unwrap_or(0),
            bad_words_ids,
            suppress_tokens: ids(g.get("suppress_tokens")),
            begin_suppress_tokens: ids(g.get("begin_suppress_tokens")),
            forced_eos_token_ids: ids(g.get("forced_eos_token_id")),
            do_sample: g.get("do_sample").and_then(Value::as_bool).unwrap_or(false),
            num_beams: usize_of(g, "num_beams").unwrap_or(1),
            eos_token_ids,
        }
    }

    /// New tokens allowed for a prompt of `prompt_len` tokens: the caller's `requested` when
    /// given, else `max_new_tokens`, else `max_length - prompt_len` (0 when the prompt alone
    /// reaches it), else [`DEFAULT_MAX_NEW_TOKENS`].
    pub fn budget(&self, requested: Option<usize>, prompt_len: usize) -> usize {
        match (requested, self.default_length) {
            (Some(n), _) | (None, DefaultLength::NewTokens(n)) => n,
            (None, DefaultLength::Total(n)) => n.saturating_sub(prompt_len),
            (None, DefaultLength::Unset) => DEFAULT_MAX_NEW_TOKENS,
        }
    }

    /// Settings the checkpoint asks for that quire does not apply (it decodes greedily with
    /// one beam), for a log line; empty when there are none.
    pub fn ignored(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.do_sample {
            v.push("do_sample=true (sampling)".to_string());
        }
        if self.num_beams > 1 {
            v.push(format!("num_beams={}", self.num_beams));
        }
        v
    }

    /// Whether any rule changes scores (so callers can skip the work when none does).
    pub fn processes_scores(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.no_repeat_ngram_size > 0
            || !self.bad_words_ids.is_empty()
            || !self.suppress_tokens.is_empty()
            || !self.begin_suppress_tokens.is_empty()
            || !self.forced_eos_token_ids.is_empty()
            || self.min_length > 0
            || self.min_new_tokens > 0
    }

    /// Applies the logits processors of greedy `generate()` to one row's f32 `scores`, in
    /// `transformers`' order. `seq` is the row's prompt followed by its generated tokens,
    /// `prompt_len` the prompt's part, `budget` the new tokens allowed in all.
    pub fn process(&self, seq: &[u32], prompt_len: usize, budget: usize, scores: &mut [f32]) {
        let vocab = scores.len();
        let ban = |scores: &mut [f32], t: u32| {
            if let Some(s) = scores.get_mut(t as usize) {
                *s = f32::NEG_INFINITY;
            }
        };
        // RepetitionPenaltyLogitsProcessor: every distinct id seen, once.
        if self.repetition_penalty != 1.0 {
            let p = self.repetition_penalty as f32;
            let mut seen = vec![false; vocab];
            for &t in seq {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (s, hit) in scores.iter_mut().zip(seen) {
                if hit {
                    *s = if *s < 0.0 { *s * p } else { *s / p };
                }
            }
        }
        // NoRepeatNGramLogitsProcessor: a token that would complete an n-gram already present.
        let n = self.no_repeat_ngram_size;
        if n > 0 && seq.len() >= n {
            let prefix = &seq[seq.len() + 1 - n..];
            for w in seq.windows(n) {
                if &w[..n - 1] == prefix {
                    ban(scores, w[n - 1]);
                }
            }
        }
        // NoBadWordsLogitsProcessor: single ids always; longer ones when their prefix ends `seq`.
        for bad in &self.bad_words_ids {
            let (last, prefix) = bad.split_last().expect("non-empty");
            if prefix.len() <= seq.len() && seq.ends_with(prefix) {
                ban(scores, *last);
            }
        }
        let generated = seq.len() - prompt_len;
        // MinLengthLogitsProcessor (length counts the prompt) and MinNewTokensLengthLogitsProcessor.
        if seq.len() < self.min_length || generated < self.min_new_tokens {
            for &e in &self.eos_token_ids {
                ban(scores, e);
            }
        }
        // ForcedEOSTokenLogitsProcessor: the last allowed token is EOS.
        if !self.forced_eos_token_ids.is_empty() && generated + 1 == budget {
            scores.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
            for &e in &self.forced_eos_token_ids {
                if let Some(s) = scores.get_mut(e as usize) {
                    *s = 0.0;
                }
            }
        }
        // SuppressTokensLogitsProcessor and SuppressTokensAtBeginLogitsProcessor.
        for &t in &self.suppress_tokens {
            ban(scores, t);
        }
        if generated == 0 {
            for &t in &self.begin_suppress_tokens {
                ban(scores, t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> GenerationConfig {
        GenerationConfig::from_json(&v, vec![2])
    }

    #[test]
    fn default_length_follows_transformers_precedence() {
        let both = cfg(json!({"max_new_tokens": 7, "max_length": 100}));
        assert_eq!(both.budget(None, 50), 7, "max_new_tokens wins over max_length");
        assert_eq!(both.budget(Some(3), 50), 3, "the caller's value wins");
        let total = cfg(json!({"max_length": 100}));
        assert_eq!(total.budget(None, 60), 40, "max_length counts the prompt");
        assert_eq!(total.budget(None, 120), 0);
        assert_eq!(cfg(json!({})).budget(None, 60), DEFAULT_MAX_NEW_TOKENS);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores_once() {
        let c = cfg(json!({"repetition_penalty": 1.3}));
        let mut s = vec![2.6f32, -1.0, 0.5, 4.0];
        c.process(&[0, 1, 1, 0], 2, 10, &mut s);
        assert_eq!(s, vec![2.6f32 / 1.3f32, -1.3f32, 0.5, 4.0]);
    }

    #[test]
    fn no_repeat_ngram_bans_completions_of_earlier_ngrams() {
        let c = cfg(json!({"no_repeat_ngram_size": 3}));
        // seq ends with (5, 6); (5, 6, 7) and (5, 6, 9) occurred before
        let mut s = vec![0f32; 10];
        c.process(&[5, 6, 7, 1, 5, 6, 9, 5, 6], 3, 10, &mut s);
        let banned: Vec<usize> = (0..10).filter(|&i| s[i] == f32::NEG_INFINITY).collect();
        assert_eq!(banned, vec![7, 9]);
        // size 1 bans every id seen
        let c = cfg(json!({"no_repeat_ngram_size": 1}));
        let mut s = vec![0f32; 5];
        c.process(&[1, 3], 1, 10, &mut s);
        assert_eq!(s, vec![0.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0]);
    }

    #[test]
    fn bad_words_suppression_min_length_and_forced_eos() {
        let c = cfg(json!({"bad_words_ids": [[4], [2], [1, 3]], "suppress_tokens": [0], "begin_suppress_tokens": [5],
                           "min_new_tokens": 2}));
        assert_eq!(c.bad_words_ids, vec![vec![4], vec![1, 3]], "EOS alone is never a bad word");
        let mut s = vec![1f32; 6];
        c.process(&[9, 1], 2, 10, &mut s); // first new token; the prompt ends with 1
        let inf = f32::NEG_INFINITY;
        assert_eq!(s, vec![inf, 1.0, inf, inf, inf, inf]);
        let mut s = vec![1f32; 6];
        c.process(&[9, 8, 7, 0], 2, 10, &mut s); // two new tokens: EOS allowed again
        assert_eq!(s, vec![inf, 1.0, 1.0, 1.0, inf, 1.0]);
        let f = cfg(json!({"forced_eos_token_id": 2}));
        let mut s = vec![1f32; 4];
        f.process(&[9, 8, 7], 1, 3, &mut s); // two generated, budget 3: the last one is EOS
        assert_eq!(s, vec![inf, inf, 0.0, inf]);
        assert!(!cfg(json!({"do_sample": true})).ignored().is_empty());
        assert!(!cfg(json!({"temperature": 0.7})).processes_scores());
    }
}
