//! Runaway generation: telling, while a sequence decodes, that its newest tokens repeat one
//! period over and over (a table row, a `<loc_…>` run, a phrase), so that the decoder can stop
//! it long before its token budget.
//!
//! The rule: the generated ids end in a period of `p` ≤ [`LoopOptions::max_period`] tokens
//! repeated so that the periodic tail spans at least [`LoopOptions::min_tokens`] tokens (the
//! first occurrence of the period included). For DocTags models the `<loc_…>` ids compare equal
//! to each other: rows that repeat their text with other coordinates repeat, rows whose text
//! differs do not, whatever their coordinates.
//!
//! Per sequence the detector keeps, for each period, how many of the latest tokens equal the
//! token one period earlier; a step costs `max_period` comparisons of ids already on the host.

use crate::error::bail;
use crate::Result;

/// Longest period looked for, in tokens, unless configured.
pub const DEFAULT_LOOP_MAX_PERIOD: usize = 64;
/// Tokens the periodic tail must span before it counts as a loop, unless configured (see
/// the README for how it was chosen).
pub const DEFAULT_LOOP_MIN_TOKENS: usize = 256;
/// Repetition penalty of the second attempt under [`OnLoop::Retry`], unless configured.
pub const DEFAULT_LOOP_RETRY_PENALTY: f64 = 1.1;

/// What the decoder does with a sequence found looping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLoop {
    /// End it at once and keep its text up to one period of the repeated tail.
    Stop,
    /// End it as `Stop` does, then decode the page once more with a repetition penalty and
    /// keep the better of the two (one that does not loop, else the one with fewer tokens).
    Retry,
    /// Look for nothing: every sequence runs to EOS or its budget.
    Off,
}

impl OnLoop {
    /// Parses `stop`, `retry` or `off`.
    pub fn parse(s: &str) -> Result<OnLoop> {
        Ok(match s {
            "stop" => OnLoop::Stop,
            "retry" => OnLoop::Retry,
            "off" => OnLoop::Off,
            other => bail!(Invalid, "unknown --on-loop {other:?}; use stop, retry or off"),
        })
    }
}

/// The loop detector's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopOptions {
    pub on_loop: OnLoop,
    pub max_period: usize,
    pub min_tokens: usize,
    /// Repetition penalty of the retry (above 1).
    pub retry_penalty: f64,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            on_loop: OnLoop::Stop,
            max_period: DEFAULT_LOOP_MAX_PERIOD,
            min_tokens: DEFAULT_LOOP_MIN_TOKENS,
            retry_penalty: DEFAULT_LOOP_RETRY_PENALTY,
        }
    }
}

impl LoopOptions {
    /// Refuses settings that cannot work: a period of 0, a tail shorter than two periods
    /// (one token sequence would then count as its own repetition), a penalty of 1 or less.
    pub fn validate(&self) -> Result<()> {
        if self.max_period == 0 {
            bail!(Invalid, "--loop-max-period must be at least 1");
        }
        if self.min_tokens < 2 * self.max_period {
            bail!(
                Invalid,
                "--loop-min-tokens ({}) must be at least twice --loop-max-period ({}): a loop repeats its period at least once",
                self.min_tokens,
                self.max_period
            );
        }
        if !(self.retry_penalty.is_finite() && self.retry_penalty > 1.0) {
            bail!(Invalid, "--loop-retry-penalty must be a number above 1 (got {})", self.retry_penalty);
        }
        Ok(())
    }

    /// Whether sequences are watched at all.
    pub fn enabled(&self) -> bool {
        self.on_loop != OnLoop::Off
    }
}

/// A loop found at the end of a sequence's generated ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Tokens in one period.
    pub period: usize,
    /// Where the periodic tail starts, as an index into the generated ids.
    pub start: usize,
    /// Generated ids to keep: everything before the tail plus its first period.
    pub keep: usize,
}

/// The ids that compare equal to each other (a DocTags model's `<loc_…>` tokens), sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wildcards(Vec<u32>);

impl Wildcards {
    pub fn new(mut ids: Vec<u32>) -> Wildcards {
        ids.sort_unstable();
        ids.dedup();
        Wildcards(ids)
    }

    fn contains(&self, id: u32) -> bool {
        !self.0.is_empty() && self.0.binary_search(&id).is_ok()
    }

    /// Whether `a` and `b` count as the same token.
    pub fn same(&self, a: u32, b: u32) -> bool {
        a == b || (self.contains(a) && self.contains(b))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One sequence's detector: feed it the generated ids after each new token.
#[derive(Clone, Debug)]
pub struct LoopDetector {
    min_tokens: usize,
    /// `runs[p - 1]`: how many of the latest ids equal the id `p` before them.
    runs: Vec<u32>,
}

impl LoopDetector {
    pub fn new(opts: &LoopOptions) -> LoopDetector {
        LoopDetector { min_tokens: opts.min_tokens, runs: vec![0; opts.max_period] }
    }

    /// Looks at the newest id of `generated` (the ids generated so far, the newest last; call
    /// once per new id). Returns the loop when the tail just became one, shortest period first.
    pub fn push(&mut self, generated: &[u32], wild: &Wildcards) -> Option<Found> {
        let n = generated.len();
        let &last = generated.last()?;
        let mut found = None;
        for (i, run) in self.runs.iter_mut().enumerate() {
            let p = i + 1;
            if n > p && wild.same(last, generated[n - 1 - p]) {
                *run += 1;
            } else {
                *run = 0;
            }
            let tail = *run as usize + p;
            if found.is_none() && *run > 0 && tail >= self.min_tokens {
                found = Some(Found { period: p, start: n - tail, keep: n - *run as usize });
            }
        }
        found
    }
}

/// How a page's decoding went when a loop was seen in it (recorded with its generation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopReport {
    /// Tokens in the period of the (last) loop found.
    pub period: usize,
    /// Tokens each attempt generated before it ended (two under [`OnLoop::Retry`]).
    pub attempts: Vec<usize>,
    /// Budget not spent by attempts stopped on a loop: their `max_new_tokens` minus what they generated.
    pub tokens_saved: usize,
    /// Whether the kept result is a loop (false when the retry ended without one).
    pub looped: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(max_period: usize, min_tokens: usize) -> LoopOptions {
        LoopOptions { max_period, min_tokens, ..LoopOptions::default() }
    }

    /// Feeds `ids` one by one; the first loop found and how many ids had been fed.
    fn run(ids: &[u32], o: &LoopOptions, wild: &Wildcards) -> Option<(usize, Found)> {
        let mut d = LoopDetector::new(o);
        (1..=ids.len()).find_map(|n| d.push(&ids[..n], wild).map(|f| (n, f)))
    }

    #[test]
    fn a_period_repeated_over_the_minimum_is_found_the_moment_it_spans_it() {
        let prefix: Vec<u32> = (100..137).collect();
        let period = [7u32, 8, 9, 10, 11];
        let ids: Vec<u32> = prefix.iter().copied().chain(period.iter().copied().cycle().take(500)).collect();
        let (n, f) = run(&ids, &opts(64, 128), &Wildcards::default()).expect("a loop");
        assert_eq!(f.period, 5);
        assert_eq!(f.start, prefix.len(), "the tail starts with the first period");
        assert_eq!(n, prefix.len() + 128, "found after exactly min_tokens tokens of loop");
        assert_eq!(f.keep, prefix.len() + 5, "one period is kept");
        assert_eq!(&ids[f.start..f.keep], &period);
    }

    #[test]
    fn short_repeats_and_periods_longer_than_the_maximum_are_not_loops() {
        let o = opts(8, 64);
        let w = Wildcards::default();
        // 63 tokens of a period-1 run: one short of the minimum
        let ids: Vec<u32> = std::iter::once(1).chain(std::iter::repeat_n(5, 63)).chain([2, 3]).collect();
        assert_eq!(run(&ids, &o, &w), None);
        // period 9 > max_period 8, repeated far beyond the minimum
        let ids: Vec<u32> = (0..9u32).cycle().take(400).collect();
        assert_eq!(run(&ids, &o, &w), None);
        // the same with period 8 is found
        let ids: Vec<u32> = (0..8u32).cycle().take(400).collect();
        assert_eq!(run(&ids, &o, &w).map(|(n, f)| (n, f.period)), Some((64, 8)));
    }

    #[test]
    fn the_shortest_period_is_reported() {
        let ids: Vec<u32> = [3u32, 4].iter().copied().cycle().take(300).collect();
        let (_, f) = run(&ids, &opts(64, 128), &Wildcards::default()).unwrap();
        assert_eq!(f.period, 2);
        assert_eq!(f.keep, 2);
    }

    #[test]
    fn coordinates_compare_equal_text_does_not() {
        // rows: [row, loc, loc, text..., /row] with locs from 1000..1100
        let wild = Wildcards::new((1000..1100).collect());
        let row = |k: u32, text: &[u32]| -> Vec<u32> {
            let mut r = vec![1, 1000 + k % 100, 1000 + (k * 7) % 100];
            r.extend_from_slice(text);
            r.push(2);
            r
        };
        let o = opts(64, 128);
        // same text, coordinates moving down the page: a loop
        let same: Vec<u32> = (0..40).flat_map(|k| row(k, &[50, 51, 52])).collect();
        let (_, f) = run(&same, &o, &wild).expect("same text, other coordinates");
        assert_eq!(f.period, 7);
        // without wildcards the moving coordinates hide it
        assert_eq!(run(&same, &o, &Wildcards::default()), None);
        // text differing in one token per row: no loop, whatever the coordinates
        let differ: Vec<u32> = (0..40).flat_map(|k| row(k, &[50, 60 + k, 52])).collect();
        assert_eq!(run(&differ, &o, &wild), None);
        let identical_locs: Vec<u32> = (0..40).flat_map(|k| row(0, &[50, 60 + k, 52])).collect();
        assert_eq!(run(&identical_locs, &o, &wild), None);
    }

    /// A DocTags vocabulary: tags and `<loc_0>`..`<loc_99>` as special tokens, one id per word
    /// of `words`; the tokenizer as a checkpoint folder holds it.
    fn doctags_tokenizer(words: &[&str]) -> crate::prompt::TextTokenizer {
        use tokenizers::models::wordlevel::WordLevel;
        let mut vocab: std::collections::HashMap<String, u32> = [("[UNK]".to_string(), 0)].into();
        for w in words {
            let n = vocab.len() as u32;
            vocab.entry(w.to_string()).or_insert(n);
        }
        let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("[UNK]".into()).build().unwrap();
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        let specials: Vec<String> = ["<doctag>", "</doctag>", "<otsl>", "</otsl>", "<fcel>", "<nl>", "<text>", "</text>"]
            .iter()
            .map(|t| t.to_string())
            .chain((0..100).map(|i| format!("<loc_{i}>")))
            .collect();
        inner.add_special_tokens(specials.into_iter().map(|t| tokenizers::AddedToken::from(t, true)).collect::<Vec<_>>()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        inner.save(dir.path().join("tokenizer.json"), false).unwrap();
        crate::prompt::TextTokenizer::load(dir.path(), &serde_json::json!({})).unwrap()
    }

    /// DocTags through a tokenizer with location tokens, token by token into the detector: a
    /// table whose rows repeat their structure with other locations and other text is no
    /// loop; the same rows with the same text are, whether their locations move or not.
    #[test]
    fn a_doctags_table_with_differing_rows_is_no_loop_and_identical_rows_are() {
        let row = |k: usize, text: &str| {
            format!("<fcel><loc_{}><loc_{}><loc_{}><loc_{}>{text}<nl>", 5, (k * 3) % 100, 90, (k * 3 + 2) % 100)
        };
        let table = |f: &dyn Fn(usize) -> String| format!("<doctag><otsl>{}</otsl></doctag>", (0..80).map(f).collect::<String>());
        let differing = table(&|k| row(k, &format!("item {} total {} . {}", k, 10 + 3 * k, (k * 37) % 100)));
        let same_text = table(&|k| row(k, "item total 10 . 00"));
        let fixed = table(&|_| row(0, "item total 10 . 00"));
        let leaders = format!("<doctag><text><loc_1><loc_2><loc_3><loc_4>Contents {} 1</text></doctag>", ". ".repeat(120));
        let words: Vec<String> = [&differing, &same_text, &leaders]
            .iter()
            .flat_map(|t| t.split(|c: char| c == '<' || c == '>' || c.is_whitespace()).map(String::from).collect::<Vec<_>>())
            .filter(|w| !w.is_empty())
            .collect();
        let tok = doctags_tokenizer(&words.iter().map(String::as_str).collect::<Vec<_>>());
        let wild = Wildcards::new(tok.loc_token_ids());
        assert_eq!(wild.len(), 100, "the location tokens of the vocabulary");
        let o = LoopOptions::default();
        let detect = |text: &str| {
            let ids = tok.encode(text).unwrap();
            assert!(!ids.contains(&0), "every word is in the vocabulary");
            run(&ids, &o, &wild).map(|(n, f)| (ids.len(), n, f))
        };
        assert_eq!(detect(&differing), None, "rows with their own text and locations");
        assert_eq!(detect(&leaders), None, "a line of 120 leader dots");
        let (len, at, f) = detect(&same_text).expect("identical rows at moving locations");
        assert_eq!((f.period, at - f.start), (11, o.min_tokens), "a row is the period; caught at the minimum");
        assert!(at < len / 2, "stopped long before the table's end");
        let (_, _, f) = detect(&fixed).expect("identical rows at identical locations");
        assert_eq!(f.period, 11);
    }

    #[test]
    fn options_are_checked() {
        assert!(LoopOptions::default().validate().is_ok());
        assert!(opts(0, 128).validate().is_err());
        assert!(opts(64, 127).validate().is_err());
        assert!(LoopOptions { retry_penalty: 1.0, ..LoopOptions::default() }.validate().is_err());
        assert_eq!(OnLoop::parse("retry").unwrap(), OnLoop::Retry);
        assert!(OnLoop::parse("halt").is_err());
    }
}
