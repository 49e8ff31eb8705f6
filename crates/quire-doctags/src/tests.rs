//! The corpus in tests/fixtures/doctags against docling-core's Markdown,
//! blocks on chosen pages, and random token sequences; every word of the
//! input kept. `real` runs the same checks on real pages kept outside the
//! repository.

use crate::*;
use std::path::PathBuf;

mod real;

/// tests/fixtures/doctags, or the folder in `QUIRE_DOCTAGS_CORPUS` (pages and
/// references written by `tests/gen_doctags_md.py --random`).
fn corpus() -> PathBuf {
    match std::env::var_os("QUIRE_DOCTAGS_CORPUS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/doctags"),
    }
}

/// Markdown of a corpus file as `quire doctags` writes it: pages split at
/// `<page_break>`, joined by a blank line.
fn render(text: &str) -> String {
    split_pages(text).iter().map(|p| page_markdown(p)).filter(|m| !m.is_empty()).collect::<Vec<_>>().join("\n\n")
}

fn normalise(s: &str) -> String {
    s.lines().map(str::trim_end).collect::<Vec<_>>().join("\n").trim_end().to_string()
}

/// The words of a DocTags text that the output must keep, found without
/// quire's parser: each page's text from its `<doctag>` on (what comes
/// before is a chat template's, not the model's), every tag (`<name>`,
/// `</name>`) replaced by a space, a tag cut off at the end dropped, split
/// at whitespace.
fn model_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for page in split_pages(text) {
        let page = page.find("<doctag>").map_or(page, |i| &page[i..]);
        let mut plain = String::with_capacity(page.len());
        let mut rest = page;
        while let Some(i) = rest.find('<') {
            plain.push_str(&rest[..i]);
            let after_space = page[..page.len() - rest.len() + i].ends_with(char::is_whitespace);
            let after = &rest[i + 1..];
            let name = after.strip_prefix('/').unwrap_or(after);
            let len = name.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(name.len());
            let starts_well = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
            let tail = &name[len..];
            // `x < ` at the very end is a comparison, `x<` or `<loc_4` a cut-off tag.
            let comparison = len == 0 && after_space && !tail.is_empty();
            if starts_well && tail.starts_with('>') {
                plain.push(' ');
                rest = &tail[1..];
            } else if tail.trim().is_empty() && (starts_well || (len == 0 && !comparison)) {
                // A tag cut off at the end (only whitespace after it).
                rest = "";
            } else {
                plain.push('<');
                rest = after;
            }
        }
        plain.push_str(rest);
        words.extend(plain.split_whitespace().map(str::to_string));
    }
    words
}

/// Markdown as a reader sees it: docling-core's escapes undone (a `\_`
/// in the model's text stays `\_`, so words are looked for in both).
fn unescape(md: &str) -> String {
    md.replace("&#124;", "|").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("\\_", "_")
}

/// The words of `text` (a whole file, pages split at `<page_break>`) that
/// quire loses: missing from every block's text, or, outside page headers
/// and footers (which Markdown leaves out, as docling-core does, inline
/// ones too), missing from the Markdown.
fn lost_words(text: &str) -> Vec<String> {
    let blocks: Vec<Block> = split_pages(text).iter().flat_map(|p| parse_page(p, 1, 1)).collect();
    let mut in_blocks = String::new();
    let mut outside_furniture = String::new();
    for b in &blocks {
        in_blocks.push_str(&b.text);
        in_blocks.push('\n');
        let furniture = |k: Kind| matches!(k, Kind::PageHeader | Kind::PageFooter);
        match &b.parts {
            Some(parts) => parts.iter().filter(|p| !furniture(p.kind)).for_each(|p| {
                outside_furniture.push_str(&p.text);
                outside_furniture.push('\n');
            }),
            None if !furniture(b.kind) => {
                outside_furniture.push_str(&b.text);
                outside_furniture.push('\n');
            }
            None => {}
        }
    }
    let raw = render(text);
    let md = format!("{raw}\n{}", unescape(&raw));
    let mut lost: Vec<String> = model_words(text).into_iter().filter(|w| !in_blocks.contains(w.as_str())).collect();
    lost.extend(outside_furniture.split_whitespace().filter(|w| !md.contains(*w)).map(|w| format!("{w} (Markdown)")));
    lost
}

/// Pages where quire deliberately writes something else than docling-core,
/// why, and text that quire keeps there (docling-core loses it).
const DIFFERENCES: &[(&str, &str, &[&str])] = &[
    ("07-nested-list", "docling-core ends the outer list at the inner list's closing tag and loses the items after it; quire nests", &["    - apple", "- Vegetables"]),
    ("08-nested-list-in-item", "docling-core flattens a list nested in an item into it; quire nests it under the item, as docling-core's own Markdown does for nested lists", &["2. Configure\n    - edit config.toml\n    - set the token\n3. Run"]),
    ("13-code-with-tags", "docling-core strips everything tag-like from code (`Vec<String>` becomes `Vec`); quire keeps code as written", &["Vec<String>", "<title>Hello</title>"]),
    ("35-key-value", "docling-core writes a placeholder comment for a key-value region; quire writes its keys and values as a list, a key with the value it links to on one line", &["- Invoice number INV-0042\n- Date\n- 2024-03-01\n\nThank you."]),
    ("38-cut-mid-loc", "docling-core keeps only the existence of an element that is not closed; quire keeps its text", &["These words were written before the model ran out of tokens"]),
    ("39-cut-mid-table", "an unclosed table: docling-core drops its cells, quire keeps the rows it got", &["|   3 |   4 |"]),
    ("40-cut-mid-element", "an unclosed header at the end: docling-core writes an empty heading", &["### Unfinished head"]),
    ("42-unknown-top-level", "docling-core drops elements it does not know, text and all; quire keeps their text as a paragraph", &["Unknown element text"]),
    ("46-other-text-kinds", "paragraph, reference, handwritten_text and smiles are DocTags elements docling-core's loader does not read (their text is lost); quire writes them as paragraphs", &["A paragraph element.", "[1] A. Author, On things, 2020.", "signed J. Doe", "CC(=O)OC1=CC=CC=C1C(=O)O"]),
    ("47-paper-page", "docling-core takes everything from a `<` followed by a letter to the next `>` for a tag, so `y_{<t}, x)` loses `<t}, x)`; quire reads only well-formed tags as tags", &["y_{<t}, x)$$"]),
    ("49-stray-text", "docling-core drops text outside any element; quire keeps it as a paragraph", &["Loose words before", "and loose words after"]),
    ("50-empty-fcel", "docling-core gives an `<fcel>` with no text the next tag as its text (`<fcel>`, `<nl>`); quire an empty cell", &["| a   |    | c   |", "| d   | e  |     |"]),
    ("53-unclosed-then-next", "docling-core reads an unclosed title up to the end of the page (an empty title, the text after it lost); quire ends it where the next element starts", &["# Title without end", "Body that follows."]),
    ("54-picture-inside-text", "docling-core ignores text inside a picture; quire keeps it after the image", &["Text the model put in the picture"]),
    ("59-code-caption", "docling-core glues a code element's caption to the end of the code, inside the fence, and strips tags from code; quire writes the caption as a paragraph after the code (where docling-core's Markdown puts code captions) and keeps the HTML as written", &["```\ndef area(r):\n    return 3.14159 * r * r\n```\n\nListing 2: circle\\_area helper\n\n```\n<table><caption>Prices</caption><tr><td>9</td></tr></table>\n```"]),
    ("60-key-value-links", "docling-core writes a placeholder comment for a key-value region; quire writes it as a list that follows the links from keys to values", &["- Ship to: Harbour Depot 7\n- Terms\n    - Net 30 from invoice date\n    - 2% early\n- Approved\n- stray note\n- ☑\n\nPage total follows."]),
    ("61-chart-no-loc", "docling-core keeps no chart without a location, its data and text lost; quire writes the data as a table and the text after it", &["Sales by region:\n\n| Region   |   Units |\n|----------|---------|\n| North    |     120 |\n| South    |      95 |\n\nNorth and South"]),
];

#[test]
fn corpus_matches_docling_core_markdown_except_where_listed() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus())
        .expect("tests/fixtures/doctags")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dt"))
        .collect();
    files.sort();
    let pages: usize = files.iter().map(|f| split_pages(&std::fs::read_to_string(f).unwrap()).len()).sum();
    assert!(pages >= 40, "the corpus has {pages} pages");
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let input = std::fs::read_to_string(f).unwrap();
        let lost = lost_words(&input);
        if !lost.is_empty() {
            failures.push(format!("{name}: words lost: {lost:?}"));
        }
        let ours = normalise(&render(&input));
        let reference = std::fs::read_to_string(f.with_extension("md"))
            .unwrap_or_else(|_| panic!("{name}.md is missing: run tests/gen_doctags_md.py"));
        let reference = normalise(&reference);
        match DIFFERENCES.iter().find(|d| d.0 == name) {
            None if ours != reference => {
                failures.push(format!("{name}:\n--- docling-core ---\n{reference}\n--- quire ---\n{ours}\n"))
            }
            None => {}
            Some((_, why, keeps)) => {
                if ours == reference {
                    failures.push(format!("{name}: listed as a difference ({why}) but quire now matches docling-core"));
                }
                for k in *keeps {
                    if !ours.contains(k) {
                        failures.push(format!("{name}: quire should keep {k:?}:\n{ours}\n"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} pages differ:\n{}", failures.len(), files.len(), failures.join("\n"));
}

fn one(doctags: &str) -> Vec<Block> {
    parse_page(doctags, 1000, 2000)
}

#[test]
fn locations_scale_to_page_pixels_and_fewer_than_four_give_none() {
    let b = one("<doctag><text><loc_50><loc_100><loc_450><loc_400>x</text><text><loc_0><loc_0><loc_700><loc_500>y</text><text><loc_1><loc_2><loc_3>z</text></doctag>");
    assert_eq!(b[0].bbox, Some([100.0, 400.0, 900.0, 1600.0]));
    assert_eq!(b[1].bbox, Some([0.0, 0.0, 1000.0, 2000.0]), "locations past 500 are clamped to the page");
    assert_eq!(b[2].bbox, None);
    assert_eq!(b[2].text, "z");
}

#[test]
fn table_cells_carry_spans_and_header_flags() {
    let b = one("<otsl><loc_1><loc_2><loc_3><loc_4><ched>A<lcel><ched>C<nl><rhed>r<fcel>x<fcel>y<nl><ucel><xcel><ecel><nl><srow>s<nl></otsl>");
    let t = b[0].table.as_ref().unwrap();
    assert_eq!((t.rows, t.cols), (4, 3), "the longest row sets the columns");
    let cell = |r: u32, c: u32| t.cells.iter().find(|x| x.row == r && x.col == c).unwrap();
    let a = cell(0, 0);
    assert_eq!((a.col_span, a.row_span, a.header, a.token.as_str()), (2, 1, true, "ched"));
    let r = cell(1, 0);
    assert_eq!((r.text.as_str(), r.row_span, r.col_span, r.header), ("r", 2, 1, true), "ucel below extends the row header");
    let x = cell(1, 1);
    assert_eq!((x.row_span, x.col_span), (2, 1), "xcel below counts for the cell above");
    assert_eq!(cell(3, 0).token, "srow");
    assert!(!cell(3, 0).header);
    assert!(t.cells.iter().all(|c| !(c.row == 2 && c.col < 2)), "merge tokens start no cell");
    let g = t.grid();
    assert_eq!(g[0], vec!["A", "A", "C"]);
    assert_eq!(g[2], vec!["r", "x", ""]);
    assert_eq!(g[3], vec!["s", "", ""], "a short row is padded with empty slots");
}

#[test]
fn nested_lists_keep_their_level_marker_and_list() {
    let b = one("<ordered_list><list_item>a</list_item><list_item>b<unordered_list><list_item>c</list_item></unordered_list></list_item></ordered_list><unordered_list><list_item>d</list_item></unordered_list>");
    let got: Vec<(&str, u32, &str, u32)> = b
        .iter()
        .map(|x| (x.text.as_str(), x.level.unwrap(), x.marker.as_deref().unwrap(), x.list.unwrap()))
        .collect();
    assert_eq!(got, vec![("a", 1, "1.", 0), ("b", 1, "2.", 0), ("c", 2, "-", 0), ("d", 1, "-", 1)]);
    assert_eq!(markdown(&b), "1. a\n2. b\n    - c\n\n- d");
}

#[test]
fn code_language_pictures_and_captions() {
    let b = one("<code><loc_1><loc_2><loc_3><loc_4><_Python_>print(1)</code><picture><loc_10><loc_10><loc_20><loc_20><pie_chart><caption><loc_10><loc_21><loc_20><loc_25>Shares</caption></picture>");
    assert_eq!((b[0].kind, b[0].language.as_deref(), b[0].text.as_str()), (Kind::Code, Some("Python"), "print(1)"));
    assert_eq!((b[1].kind, b[1].text.as_str()), (Kind::Caption, "Shares"), "the caption comes first, as its own block");
    assert_eq!(b[1].bbox, Some([20.0, 84.0, 40.0, 100.0]));
    assert_eq!(b[2].kind, Kind::Picture);
    assert_eq!(b[2].classes.as_deref(), Some(&["pie_chart".to_string()][..]));
    assert_eq!(b[2].bbox, Some([20.0, 40.0, 40.0, 80.0]));
    assert_eq!(markdown(&b), "```\nprint(1)\n```\n\nShares\n\n<!-- image -->\n\nPie chart");
}

#[test]
fn text_before_doctag_is_not_the_pages() {
    let b = one("Assistant: <doctag><text>Body</text></doctag><end_of_utterance>");
    assert_eq!(b.iter().map(|x| x.text.as_str()).collect::<Vec<_>>(), vec!["Body"]);
    // Without `<doctag>` nothing marks where the page starts: the text stays.
    assert_eq!(one("Assistant: <text>Body</text>")[0].text, "Assistant:");
}

#[test]
fn a_code_caption_becomes_a_caption_block_after_the_code() {
    let b = one("<code><loc_0><loc_0><loc_250><loc_250><_Rust_>let x = 1;<caption><loc_0><loc_250><loc_250><loc_300>Listing 1</caption></code>");
    let got: Vec<(Kind, &str)> = b.iter().map(|x| (x.kind, x.text.as_str())).collect();
    assert_eq!(got, vec![(Kind::Code, "let x = 1;"), (Kind::Caption, "Listing 1")]);
    assert_eq!(b[0].bbox, Some([0.0, 0.0, 500.0, 1000.0]), "the caption's locations are not the code's");
    assert_eq!(b[1].bbox, Some([0.0, 1000.0, 500.0, 1200.0]));
    assert_eq!(markdown(&b), "```\nlet x = 1;\n```\n\nListing 1");
    // A caption cut off at the end of the page is still the caption.
    let b = one("<code>f()<caption>Listing");
    assert_eq!((b[0].text.as_str(), b[1].kind, b[1].text.as_str()), ("f()", Kind::Caption, "Listing"));
    // Anywhere else, a caption tag is the code's own text.
    let b = one("<code><figure><caption>c</caption></figure></code>");
    assert_eq!((b.len(), b[0].text.as_str()), (1, "<figure><caption>c</caption></figure>"));
}

#[test]
fn key_value_cells_keep_ids_links_and_boxes() {
    let b = one("<key_value_region><loc_0><loc_0><loc_500><loc_500><key_1><loc_0><loc_0><loc_100><loc_50>Name<link_2><link_9></key_1><value_2>Ada</value_2>loose<value_x>odd</value_x></key_value_region>");
    let cells = b[0].cells.as_ref().unwrap();
    let got: Vec<(Option<u32>, bool, &str, &[u32])> = cells.iter().map(|c| (c.id, c.key, c.text.as_str(), &c.links[..])).collect();
    assert_eq!(got, vec![(Some(1), true, "Name", &[2, 9][..]), (Some(2), false, "Ada", &[][..]), (None, false, "looseodd", &[][..])]);
    assert_eq!(cells[0].bbox, Some([0.0, 0.0, 200.0, 200.0]));
    assert_eq!(b[0].bbox, Some([0.0, 0.0, 1000.0, 2000.0]));
    assert_eq!(b[0].text, "Name\nAda\nlooseodd");
    assert_eq!(markdown(&b), "- Name Ada\n- looseodd");
}

#[test]
fn key_value_lists_survive_cycles_and_long_chains() {
    // A cycle that no root reaches is still written, each cell once.
    let b = one("<key_value_region><key_1>a<link_2></key_1><value_2>b<link_1><link_3></value_2><value_3>c</value_3></key_value_region>");
    assert_eq!(markdown(&b), "- a\n    - b c");
    // A chain of 2,000 links nests only so deep and costs linear time.
    let mut chain = String::from("<key_value_region>");
    for i in 0..2000 {
        chain.push_str(&format!("<key_{i}>k{i}<link_{}></key_{i}>", i + 1));
    }
    chain.push_str("</key_value_region>");
    let md = markdown(&one(&chain));
    assert_eq!(md.lines().count(), 1999, "the last two share a line");
    assert!(md.lines().all(|l| l.len() - l.trim_start().len() <= 12), "at most three levels of indentation");
    assert!(md.ends_with("            - k1998 k1999"));
}

#[test]
fn malformed_input_keeps_its_text() {
    // Unclosed at the end, stray closing tags, an unknown tag, a cut-off location.
    let b = one("</text><title>T</title></list_item><foo>bar</foo><text>cut<loc_1");
    let texts: Vec<(Kind, &str)> = b.iter().map(|x| (x.kind, x.text.as_str())).collect();
    assert_eq!(texts, vec![(Kind::Title, "T"), (Kind::Text, "bar"), (Kind::Text, "cut")]);
    // A table cut mid-row keeps the row; a new element ends an open one.
    let b = one("<otsl><fcel>a<fcel>b<nl><fcel>c<title>next");
    assert_eq!(b[0].table.as_ref().unwrap().grid(), vec![vec!["a", "b"], vec!["c", ""]]);
    assert_eq!((b[1].kind, b[1].text.as_str()), (Kind::Title, "next"));
    assert!(one("").is_empty());
    assert!(one("<doctag></doctag>").is_empty());
}

#[test]
fn blocks_serialise_to_the_record_shape() {
    let b = one("<section_header_level_2><loc_0><loc_0><loc_250><loc_250>H</section_header_level_2><otsl><fcel>a<nl></otsl>");
    let v = serde_json::to_value(&b).unwrap();
    assert_eq!(v[0], serde_json::json!({"kind": "section_header", "text": "H", "bbox": [0.0, 0.0, 500.0, 1000.0], "level": 2}));
    assert_eq!(v[1]["kind"], "table");
    assert_eq!(v[1]["bbox"], serde_json::Value::Null);
    assert_eq!(
        v[1]["table"],
        serde_json::json!({"rows": 1, "cols": 1, "cells": [{"row": 0, "col": 0, "row_span": 1, "col_span": 1, "text": "a", "header": false, "token": "fcel"}]})
    );
    let back: Vec<Block> = serde_json::from_value(v).unwrap();
    assert_eq!(back, b);
}

#[test]
fn doctags_is_recognised_by_its_opening_tag() {
    assert!(is_doctags("<doctag><text>x</text></doctag>"));
    assert!(is_doctags("\n <doctag>"));
    assert!(!is_doctags("plain text <doctag>"));
    assert_eq!(split_pages("a<page_break>b<page_break>"), vec!["a", "b", ""]);
}

/// A small xorshift generator, so the property test needs no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const VOCABULARY: &[&str] = &[
    "doctag", "title", "section_header_level_1", "section_header_level_3", "section_header_level_6", "text", "paragraph",
    "caption", "footnote", "page_header", "page_footer", "formula", "code", "list_item", "ordered_list", "unordered_list",
    "checkbox_selected", "checkbox_unselected", "picture", "chart", "otsl", "key_value_region", "key_1", "value_2", "link_1",
    "inline", "page_break", "reference", "handwritten_text", "smiles", "fcel", "ecel", "ched", "rhed", "srow", "lcel",
    "ucel", "xcel", "nl", "loc_0", "loc_17", "loc_250", "loc_500", "loc_999", "_Python_", "bar_chart", "logo", "line",
    "unknown_tag", "b",
];

#[test]
fn random_token_sequences_never_panic_and_keep_every_word() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // QUIRE_DOCTAGS_CASES=N runs more (or fewer) cases.
    let cases: u64 = std::env::var("QUIRE_DOCTAGS_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    for case in 0..cases {
        let mut input = String::new();
        let mut words = Vec::new();
        for _ in 0..rng.below(40) {
            match rng.below(10) {
                0..=3 => {
                    let w = format!("w{}x{}", case, words.len());
                    input.push_str(&w);
                    words.push(w);
                }
                4 => input.push_str([" ", "\n", " < ", "|", "_", "&"][rng.below(6)]),
                5 => input.push_str(&format!("</{}>", VOCABULARY[rng.below(VOCABULARY.len())])),
                _ => input.push_str(&format!("<{}>", VOCABULARY[rng.below(VOCABULARY.len())])),
            }
        }
        if rng.below(4) == 0 {
            // Cut off anywhere, even inside a tag.
            let mut cut = rng.below(input.len() + 1);
            while !input.is_char_boundary(cut) {
                cut -= 1;
            }
            input.truncate(cut);
        }
        // Text before a page's `<doctag>` is not the page's.
        let pages: Vec<&str> = split_pages(&input).into_iter().map(|p| p.find("<doctag>").map_or(p, |i| &p[i..])).collect();
        words.retain(|w| pages.iter().any(|p| p.contains(w.as_str())));
        let mut out = String::new();
        let mut md = String::new();
        for page in split_pages(&input) {
            let blocks = parse_page(page, 640, 480);
            for b in &blocks {
                out.push_str(&b.text);
                out.push('\n');
                if let Some(bbox) = b.bbox {
                    assert!(bbox.iter().zip([640.0, 480.0, 640.0, 480.0]).all(|(v, max)| (0.0..=max).contains(v)), "{input}");
                }
                if let Some(t) = &b.table {
                    let g = t.grid();
                    assert_eq!(g.len(), t.rows as usize);
                    assert!(g.iter().all(|r| r.len() == t.cols as usize));
                }
            }
            md.push_str(&markdown(&blocks));
        }
        for w in &words {
            assert!(out.contains(w.as_str()), "{w:?} lost from {input:?}:\n{out}");
        }
        let lost = lost_words(&input);
        assert!(lost.is_empty(), "{lost:?} lost from {input:?}:\n{out}\n{md}");
        assert!(!md.contains("<loc_"), "{input:?} → {md}");
    }
}

