//! Real DocTags pages (model answers, docling exports, answers cut off by
//! the token budget) against docling-core's Markdown. The pages are public
//! but not ours to commit, so this runs only where they are:
//! `scripts/check-doctags-real.sh` writes the references with
//! `tests/gen_doctags_md.py --input` and runs it with `QUIRE_DOCTAGS_REAL`
//! (a folder of pages, `*.doctags` or `*.dt`) and `QUIRE_DOCTAGS_REAL_REF`
//! (their references).
//!
//! A page that differs from docling-core counts as differing for a
//! documented reason only when undoing quire's documented differences
//! (README, "DocTags models") on its blocks gives docling-core's Markdown
//! exactly. Every page must also keep every word.

use super::{lost_words, normalise, render};
use crate::parse::parse_page_cut;
use crate::*;
use std::path::{Path, PathBuf};

const CUT_OFF: &str = "an element cut off at the end keeps its text";
const CODE_CAPTION: &str = "a code caption goes after the code";
const KEY_VALUE: &str = "a key-value region is written as a list";
const KEY_VALUE_MARK: &str = "\u{1}key-value\u{1}";

/// What docling-core does where quire deliberately differs, applied to
/// quire's blocks of one page. Returns the reasons that applied.
fn as_docling_core(page: &str, blocks: &mut Vec<Block>, cut: Option<usize>) -> Vec<&'static str> {
    let mut reasons = Vec::new();
    // An element the page ends inside: docling-core keeps that it exists, not its text.
    if let Some(first) = cut.filter(|&f| f < blocks.len()) {
        reasons.push(CUT_OFF);
        let own = blocks.split_off(first).pop().filter(|b| b.kind != Kind::ListItem);
        if let Some(mut own) = own {
            own.text.clear();
            (own.table, own.parts, own.classes, own.cells) = (None, None, None, None);
            blocks.push(own);
        }
    }
    // A code caption: docling-core glues its text to the end of the code.
    let mut i = 0;
    while i + 1 < blocks.len() {
        if blocks[i].kind == Kind::Code
            && blocks[i + 1].kind == Kind::Caption
            && page.contains(&format!("{}</caption></code>", blocks[i + 1].text))
        {
            let caption = blocks.remove(i + 1);
            blocks[i].text.push_str(&caption.text);
            reasons.push(CODE_CAPTION);
        }
        i += 1;
    }
    // A key-value region: docling-core writes a placeholder.
    for b in blocks.iter_mut().filter(|b| b.kind == Kind::KeyValueRegion) {
        (b.kind, b.text, b.cells) = (Kind::Text, KEY_VALUE_MARK.into(), None);
        reasons.push(KEY_VALUE);
    }
    reasons
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "doctags" || x == "dt"))
        .collect();
    files.sort();
    files
}

#[test]
#[ignore = "needs the real pages: scripts/check-doctags-real.sh"]
fn real_pages_match_docling_core_or_differ_for_a_documented_reason() {
    let (Some(pages), Some(refs)) = (std::env::var_os("QUIRE_DOCTAGS_REAL"), std::env::var_os("QUIRE_DOCTAGS_REAL_REF"))
    else {
        eprintln!("skipped: set QUIRE_DOCTAGS_REAL and QUIRE_DOCTAGS_REAL_REF (scripts/check-doctags-real.sh does)");
        return;
    };
    let (pages, refs) = (PathBuf::from(pages), PathBuf::from(refs));
    let files = files(&pages);
    assert!(!files.is_empty(), "no *.doctags or *.dt in {}", pages.display());
    let (mut equal, mut documented, mut docling_failed, mut words_lost) = (0, 0, 0, 0);
    let mut differing = Vec::new();
    let mut reasons_seen: Vec<(&str, usize)> = Vec::new();
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let input = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
        let lost = lost_words(&input);
        if !lost.is_empty() {
            words_lost += lost.len();
            println!("{name}: words lost: {lost:?}");
        }
        let Ok(reference) = std::fs::read_to_string(refs.join(format!("{name}.md"))) else {
            // docling-core raised (NAME.error.txt): nothing to compare with.
            docling_failed += 1;
            println!("{name}: no docling-core Markdown, see {name}.error.txt");
            continue;
        };
        let reference = normalise(&reference);
        if normalise(&render(&input)) == reference {
            equal += 1;
            continue;
        }
        let mut reasons = Vec::new();
        let mut parts = Vec::new();
        for page in split_pages(&input) {
            let (mut blocks, cut) = parse_page_cut(page, 1, 1);
            reasons.extend(as_docling_core(page, &mut blocks, cut));
            parts.push(markdown(&blocks).replace(KEY_VALUE_MARK, "<!-- missing-key-value-item -->"));
        }
        parts.retain(|p| !p.is_empty());
        reasons.sort();
        reasons.dedup();
        if !reasons.is_empty() && normalise(&parts.join("\n\n")) == reference {
            documented += 1;
            println!("{name}: differs: {}", reasons.join("; "));
            for r in reasons {
                match reasons_seen.iter_mut().find(|x| x.0 == r) {
                    Some(x) => x.1 += 1,
                    None => reasons_seen.push((r, 1)),
                }
            }
        } else {
            println!("{name}: DIFFERS without a documented reason");
            differing.push(name);
        }
    }
    println!(
        "{} files: {equal} equal to docling-core, {documented} differ for a documented reason, {} differ otherwise, \
         {docling_failed} that docling-core fails on; words lost: {words_lost}",
        files.len(),
        differing.len()
    );
    for (r, n) in &reasons_seen {
        println!("  {r}: {n} files");
    }
    assert!(differing.is_empty() && words_lost == 0, "differing without a reason: {differing:?}; words lost: {words_lost}");
}
