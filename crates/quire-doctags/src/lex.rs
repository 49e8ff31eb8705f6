//! DocTags text to tokens: tags (`<name>`, `</name>`) and the text between them.
//!
//! A tag is `<`, an optional `/`, a name of ASCII letters, digits and `_`
//! that starts with a letter or `_`, and `>`. Anything else that starts with
//! `<` is text (`P < 0.05`, `x<y`). A tag cut off by the end of the input
//! (`<loc_4`, `</tex`, a lone `<`), with nothing but whitespace after it, is
//! dropped: it is a token the model did not finish, not text.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tok<'a> {
    Open(&'a str),
    Close(&'a str),
    Text(&'a str),
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

pub(crate) fn lex<'a>(s: &'a str) -> Vec<Tok<'a>> {
    let b = s.as_bytes();
    let mut out: Vec<Tok<'a>> = Vec::new();
    let mut text_start = 0;
    let mut i = 0;
    let flush = |out: &mut Vec<Tok<'a>>, from: usize, to: usize| {
        if to > from {
            out.push(Tok::Text(&s[from..to]));
        }
    };
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let closing = b.get(i + 1) == Some(&b'/');
        let name_start = i + 1 + closing as usize;
        let mut j = name_start;
        while j < b.len() && name_byte(b[j]) {
            j += 1;
        }
        let starts_well = b.get(name_start).is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_');
        // Only whitespace after the name: the input ends inside this tag
        // (saved answers often end with a newline after the cut).
        let at_end = b[j..].iter().all(u8::is_ascii_whitespace);
        let lone_comparison = j == name_start && i > 0 && b[i - 1].is_ascii_whitespace() && j < b.len();
        if at_end && (starts_well || (j == name_start && !lone_comparison)) {
            // Cut off inside a tag: drop the unfinished tag.
            flush(&mut out, text_start, i);
            text_start = b.len();
            break;
        }
        if starts_well && b[j] == b'>' {
            flush(&mut out, text_start, i);
            let name = &s[name_start..j];
            out.push(if closing { Tok::Close(name) } else { Tok::Open(name) });
            i = j + 1;
            text_start = i;
        } else {
            i += 1;
        }
    }
    flush(&mut out, text_start, b.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use Tok::*;

    #[test]
    fn tags_and_text_and_things_that_only_look_like_tags() {
        assert_eq!(
            lex("<text><loc_1>P < 0.05 and x<y>z</text>"),
            vec![Open("text"), Open("loc_1"), Text("P < 0.05 and x"), Open("y"), Text("z"), Close("text")]
        );
        assert_eq!(lex("a <3> b <_Python_>"), vec![Text("a <3> b "), Open("_Python_")]);
        assert_eq!(lex("a<b c>d"), vec![Text("a<b c>d")]);
    }

    #[test]
    fn a_tag_cut_off_at_the_end_is_dropped() {
        assert_eq!(lex("<text>ab<loc_4"), vec![Open("text"), Text("ab")]);
        assert_eq!(lex("ab</tex"), vec![Text("ab")]);
        assert_eq!(lex("ab<"), vec![Text("ab")]);
        assert_eq!(lex("ab</"), vec![Text("ab")]);
        assert_eq!(lex("a <5"), vec![Text("a <5")]);
    }

    #[test]
    fn a_tag_cut_off_before_a_final_newline_is_dropped_too() {
        assert_eq!(lex("<text>ab<loc_4\n"), vec![Open("text"), Text("ab")]);
        assert_eq!(lex("<text><loc_1><loc_\n"), vec![Open("text"), Open("loc_1")]);
        assert_eq!(lex("<text><loc_1><\n"), vec![Open("text"), Open("loc_1")]);
        assert_eq!(lex("ab</tex \r\n"), vec![Text("ab")]);
        // A comparison sign at the end stays text.
        assert_eq!(lex("if a < \n"), vec![Text("if a < \n")]);
        assert_eq!(lex("x <5\n"), vec![Text("x <5\n")]);
    }
}
