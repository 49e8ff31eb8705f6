//! Blocks to Markdown, following docling-core's `export_to_markdown`
//! (docling-core 2.104, `transforms/serializer/markdown.py`) on documents
//! loaded from DocTags.

use crate::tabulate::github_table;
use crate::{Block, KeyValueCell, Kind, Table};
use std::collections::HashMap;

/// Renders blocks as docling-core renders the document they come from:
/// blocks joined by a blank line, page headers and footers left out, the
/// items of one list on consecutive lines.
pub fn markdown(blocks: &[Block]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let b = &blocks[i];
        if b.kind == Kind::ListItem {
            let mut lines = Vec::new();
            while i < blocks.len() && blocks[i].kind == Kind::ListItem && blocks[i].list == b.list {
                lines.push(list_line(&blocks[i]));
                i += 1;
            }
            out.push(lines.join("\n"));
            continue;
        }
        let s = render(b);
        if !s.is_empty() {
            out.push(s);
        }
        i += 1;
    }
    out.join("\n\n")
}

fn list_line(b: &Block) -> String {
    let indent = " ".repeat(4 * b.level.unwrap_or(1).saturating_sub(1) as usize);
    let marker = b.marker.as_deref().unwrap_or("-");
    format!("{indent}{marker} {}", escape(&line_breaks(&b.text)))
}

fn render(b: &Block) -> String {
    match b.kind {
        Kind::PageHeader | Kind::PageFooter => String::new(),
        Kind::Title => format!("# {}", escape(&b.text.replace('\n', " "))),
        Kind::SectionHeader => {
            let n = (b.level.unwrap_or(1) + 1).min(6) as usize;
            format!("{} {}", "#".repeat(n), escape(&b.text.replace('\n', " ")))
        }
        Kind::CheckboxSelected => escape(&line_breaks(&format!("- [x] {}", b.text))),
        Kind::CheckboxUnselected => escape(&line_breaks(&format!("- [ ] {}", b.text))),
        Kind::Code => code_block(&b.text),
        Kind::Formula if b.text.is_empty() => String::new(),
        Kind::Formula => format!("$${}$$", b.text),
        Kind::Table => b.table.as_ref().map(table).unwrap_or_default(),
        Kind::Picture | Kind::Chart => picture(b),
        Kind::Inline => inline(b),
        Kind::ListItem => list_line(b),
        Kind::KeyValueRegion => match &b.cells {
            Some(cells) => key_values(cells),
            None => escape(&line_breaks(&b.text)),
        },
        // Text-like: text, paragraph, caption, footnote, reference,
        // handwritten text, SMILES, document index.
        _ => escape(&line_breaks(&b.text)),
    }
}

/// A picture or chart: the image placeholder, the class docling-core picks,
/// the chart's data as a table. docling-core keeps no picture that has no
/// location; then only the model's text in it remains (a chart's data
/// still as a table). Text the model put inside besides the data follows.
fn picture(b: &Block) -> String {
    let mut parts: Vec<String> = Vec::new();
    if b.bbox.is_some() {
        parts.push("<!-- image -->".into());
        if let Some(class) = main_class(b.classes.as_deref().unwrap_or(&[])) {
            parts.push(humanize(class));
        }
    }
    let mut text = b.text.as_str();
    if let Some(t) = &b.table {
        parts.push(table(t));
        // The block's text ends with the data's cells (see `Block::text`).
        text = text.strip_suffix(&crate::parse::table_text(t)).unwrap_or(text).trim_end();
    }
    if !text.is_empty() {
        parts.push(escape(&line_breaks(text)));
    }
    parts.retain(|p| !p.is_empty());
    parts.join("\n\n")
}

/// The first class in docling-core's order of preference, with
/// SmolDocling's chart names mapped to today's.
fn main_class(classes: &[String]) -> Option<&'static str> {
    let class = crate::parse::PICTURE_CLASSES.iter().find(|c| classes.iter().any(|x| x == *c))?;
    Some(match *class {
        "line" | "dot_line" => "line_chart",
        "vbar_categorical" | "hbar_categorical" => "bar_chart",
        c => c,
    })
}

fn humanize(class: &str) -> String {
    let s = class.replace("__", "_").replace('_', " ");
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
        None => s,
    }
}

fn inline(b: &Block) -> String {
    let parts = b.parts.as_deref().unwrap_or(&[]);
    parts
        .iter()
        .map(|p| match p.kind {
            Kind::Formula if p.text.is_empty() => String::new(),
            Kind::Formula => format!("${}$", p.text),
            Kind::Code => code_span(&p.text),
            Kind::PageHeader | Kind::PageFooter => String::new(),
            Kind::Title => format!("# {}", escape(&p.text.replace('\n', " "))),
            Kind::CheckboxSelected => escape(&line_breaks(&format!("- [x] {}", p.text))),
            Kind::CheckboxUnselected => escape(&line_breaks(&format!("- [ ] {}", p.text))),
            _ => escape(&line_breaks(&p.text)),
        })
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A key-value region as a list (docling-core writes only a placeholder
/// comment; the text matters more): each cell that no other cell links to
/// is an item, in the model's order, with the cells it links to nested
/// under it, or on its line when it links to one cell that links nowhere
/// further (`TO: Mrs. Smith`). Every cell is written once; nesting stops at
/// [`KEY_VALUE_DEPTH`] levels (deeper cells stay at that level).
fn key_values(cells: &[KeyValueCell]) -> String {
    let mut by_id = HashMap::new();
    for (i, c) in cells.iter().enumerate() {
        if let Some(id) = c.id {
            by_id.entry(id).or_insert(i);
        }
    }
    let targets: Vec<Vec<usize>> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut t: Vec<usize> = Vec::new();
            for j in c.links.iter().filter_map(|id| by_id.get(id).copied()) {
                if j != i && !t.contains(&j) {
                    t.push(j);
                }
            }
            t
        })
        .collect();
    let mut linked = vec![false; cells.len()];
    for &j in targets.iter().flatten() {
        linked[j] = true;
    }
    let mut placed = vec![false; cells.len()];
    let mut lines = Vec::new();
    // Roots first; then whatever only a cycle reaches.
    for roots_only in [true, false] {
        for root in 0..cells.len() {
            if placed[root] || (roots_only && linked[root]) {
                continue;
            }
            let mut stack = vec![(root, 0)];
            while let Some((i, depth)) = stack.pop() {
                if placed[i] {
                    continue;
                }
                placed[i] = true;
                let children: Vec<usize> = targets[i].iter().copied().filter(|&k| !placed[k]).collect();
                let mut text = cells[i].text.replace('\n', " ");
                match children[..] {
                    [only] if targets[only].iter().all(|&k| placed[k]) => {
                        placed[only] = true;
                        text.push(' ');
                        text.push_str(&cells[only].text.replace('\n', " "));
                    }
                    _ => stack.extend(children.iter().rev().map(|&k| (k, (depth + 1).min(KEY_VALUE_DEPTH)))),
                }
                lines.push(format!("{}- {}", " ".repeat(4 * depth), escape(&text)));
            }
        }
    }
    lines.join("\n")
}

/// How deep key-value lists nest (a model that links cells in a long chain
/// would otherwise indent without end).
const KEY_VALUE_DEPTH: usize = 3;

/// The first row is the header (docling-core keeps no header flags from
/// DocTags); spanning cells repeat in every slot; `|` becomes `&#124;`.
fn table(t: &Table) -> String {
    let grid: Vec<Vec<String>> =
        t.grid().into_iter().map(|r| r.into_iter().map(|s| s.replace('\n', " ").replace('|', "&#124;")).collect()).collect();
    match grid.split_first() {
        Some((header, body)) if !header.is_empty() => github_table(header, body),
        _ => String::new(),
    }
}

fn longest_backtick_run(s: &str) -> usize {
    s.split(|c| c != '`').map(str::len).max().unwrap_or(0)
}

fn code_block(s: &str) -> String {
    let fence = "`".repeat((longest_backtick_run(s) + 1).max(3));
    format!("{fence}\n{s}\n{fence}")
}

fn code_span(s: &str) -> String {
    let ticks = "`".repeat(longest_backtick_run(s) + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') { " " } else { "" };
    format!("{ticks}{pad}{s}{pad}{ticks}")
}

/// A single newline becomes a hard line break (two spaces before it); a
/// blank line stays a paragraph break.
fn line_breaks(s: &str) -> String {
    s.split("\n\n").map(|p| p.replace('\n', "  \n")).collect::<Vec<_>>().join("\n\n")
}

/// docling-core's escaping: `_` not already after a backslash becomes
/// `\_` (except inside the target of an image link `![…](…)`), then `&`,
/// `<` and `>` become entities.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s;
    let mut prev: Option<char> = None;
    while !rest.is_empty() {
        if let Some(len) = image_link_len(rest) {
            out.push_str(&rest[..len]);
            prev = rest[..len].chars().last();
            rest = &rest[len..];
            continue;
        }
        let c = rest.chars().next().unwrap_or_default();
        if c == '_' && prev != Some('\\') {
            out.push('\\');
        }
        out.push(c);
        prev = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The length of `![alt](target)` at the start of `s` (no line breaks in it).
fn image_link_len(s: &str) -> Option<usize> {
    let after = s.strip_prefix("![")?;
    let line = &after[..after.find('\n').unwrap_or(after.len())];
    let close = line.find("](")?;
    let target = &line[close + 2..];
    let end = target.find(')')?;
    Some(2 + close + 2 + end + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_follows_docling_core() {
        assert_eq!(escape("a_b \\_c __ x<y & z>"), "a\\_b \\_c \\_\\_ x&lt;y &amp; z&gt;");
        assert_eq!(escape("see ![fig_1](img_1.png) and a_b"), "see ![fig_1](img_1.png) and a\\_b");
        assert_eq!(line_breaks("a\nb\n\nc\nd"), "a  \nb\n\nc  \nd");
        assert_eq!(code_block("x ``` y"), "````\nx ``` y\n````");
        assert_eq!(code_span("`a`"), "`` `a` ``");
        assert_eq!(humanize("screenshot_from_computer"), "Screenshot from computer");
    }
}
