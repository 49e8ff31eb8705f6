//! Is a PDF page's text layer usable, or does the page need the model?
//!
//! The rule, chosen to be cheap and easy to check by hand:
//! * the text holds at least `min_chars` letters or digits (a scanned page
//!   has none, or only a few from a stamp or a page number), and
//! * at most 10% of its non-space characters are "junk": U+FFFD, control
//!   characters or private-use code points, which is what a broken font
//!   encoding turns a real text layer into.

/// Counts used by [`usable_text`], exposed so records and tests can explain a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextStats {
    pub alnum: usize,
    pub junk: usize,
    pub non_space: usize,
}

pub fn text_stats(text: &str) -> TextStats {
    let mut s = TextStats { alnum: 0, junk: 0, non_space: 0 };
    for c in text.chars() {
        if c.is_whitespace() {
            continue;
        }
        s.non_space += 1;
        if c.is_alphanumeric() {
            s.alnum += 1;
        }
        let private = matches!(c as u32, 0xE000..=0xF8FF | 0xF0000..=0x10FFFF);
        if c == '\u{FFFD}' || c.is_control() || private {
            s.junk += 1;
        }
    }
    s
}

/// True when the text layer can stand in for the page (see the module doc).
pub fn usable_text(text: &str, min_chars: usize) -> bool {
    let s = text_stats(text);
    s.alnum >= min_chars.max(1) && s.junk * 10 <= s.non_space
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanned_and_garbled_pages_need_the_model() {
        let prose = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.";
        assert!(usable_text(prose, 32));
        assert!(!usable_text("", 32));
        assert!(!usable_text("  12  \n", 32), "a lone page number is not a text layer");
        let garbled: String = prose.chars().map(|c| if c.is_alphabetic() && c < 'm' { '\u{E012}' } else { c }).collect();
        assert!(!usable_text(&garbled, 32), "private-use glyph codes mean a broken font map");
        assert!(usable_text("Résumé für Ärzte, naïve café, 東京の地図とデータ ".repeat(2).as_str(), 32));
    }
}
