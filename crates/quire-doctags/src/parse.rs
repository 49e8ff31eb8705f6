//! Tokens to blocks. A small recursive-descent parser that knows which
//! elements contain which, and that ends an element early rather than fail.

use crate::lex::{lex, Tok};
use crate::{Block, Cell, KeyValueCell, Kind, Part, Table, LOC_GRID};

/// Leaf elements: text with locations, no child elements.
fn leaf_kind(name: &str) -> Option<(Kind, Option<u32>)> {
    let k = match name {
        "title" => Kind::Title,
        "text" => Kind::Text,
        "paragraph" => Kind::Paragraph,
        "caption" => Kind::Caption,
        "footnote" => Kind::Footnote,
        "page_header" => Kind::PageHeader,
        "page_footer" => Kind::PageFooter,
        "formula" => Kind::Formula,
        "code" => Kind::Code,
        "checkbox_selected" => Kind::CheckboxSelected,
        "checkbox_unselected" => Kind::CheckboxUnselected,
        "reference" => Kind::Reference,
        "handwritten_text" => Kind::HandwrittenText,
        "smiles" => Kind::Smiles,
        "document_index" => Kind::DocumentIndex,
        "list_item" => Kind::ListItem,
        _ => {
            let level = name.strip_prefix("section_header_level_")?.parse::<u32>().ok()?;
            return (1..=6).contains(&level).then_some((Kind::SectionHeader, Some(level)));
        }
    };
    Some((k, None))
}

fn is_list(name: &str) -> bool {
    name == "ordered_list" || name == "unordered_list"
}

fn is_container(name: &str) -> bool {
    is_list(name) || matches!(name, "otsl" | "picture" | "chart" | "inline" | "key_value_region")
}

/// Tags that start an element (or a page): an open element that cannot hold them ends before them.
fn starts_element(name: &str) -> bool {
    leaf_kind(name).is_some() || is_container(name) || name == "page_break"
}

const OTSL_CELLS: [&str; 8] = ["fcel", "ecel", "ched", "rhed", "srow", "lcel", "ucel", "xcel"];

fn is_otsl(name: &str) -> bool {
    name == "nl" || OTSL_CELLS.contains(&name)
}

fn loc(name: &str) -> Option<u32> {
    name.strip_prefix("loc_")?.parse::<u32>().ok()
}

fn link(name: &str) -> Option<u32> {
    name.strip_prefix("link_")?.parse::<u32>().ok()
}

/// The picture classes docling-core reads, in the order it tries them
/// (DocumentFigureClassifier v2, v1, then SmolDocling's own chart names).
pub(crate) const PICTURE_CLASSES: [&str; 39] = [
    "logo",
    "photograph",
    "icon",
    "engineering_drawing",
    "line_chart",
    "bar_chart",
    "other",
    "table",
    "flow_chart",
    "screenshot_from_computer",
    "signature",
    "screenshot_from_manual",
    "geographical_map",
    "pie_chart",
    "page_thumbnail",
    "stamp",
    "music",
    "calendar",
    "qr_code",
    "bar_code",
    "full_page_image",
    "scatter_plot",
    "chemistry_structure",
    "topographical_map",
    "crossword_puzzle",
    "box_plot",
    "stacked_bar_chart",
    "scatter_chart",
    "heatmap",
    "natural_image",
    "remote_sensing",
    "screenshot",
    "molecular_structure",
    "markush_structure",
    "picture_group",
    "line",
    "dot_line",
    "vbar_categorical",
    "hbar_categorical",
];

struct Parser<'a> {
    toks: Vec<Tok<'a>>,
    pos: usize,
    width: f64,
    height: f64,
    blocks: Vec<Block>,
    lists: u32,
    /// The index of the first block of an element still open at the end of the page.
    cut: Option<usize>,
}

/// What a leaf element collected.
#[derive(Default)]
struct Leaf {
    text: String,
    locs: Vec<u32>,
    /// Code: the caption docling's DocTags export writes at the end of the element.
    caption: Option<Box<Leaf>>,
}

#[derive(Default)]
struct ListItem {
    leaf: Leaf,
    children: Vec<List>,
}

struct List {
    ordered: bool,
    items: Vec<ListItem>,
}

/// Reads one page of DocTags into blocks, scaling locations to a page of
/// `width` × `height` pixels. `<page_break>` inside the text ends any open
/// element and is otherwise ignored (see [`crate::split_pages`]). Text
/// before the page's `<doctag>` (a chat template's `Assistant:` in a raw
/// answer) is not part of the page.
pub fn parse_page(doctags: &str, width: u32, height: u32) -> Vec<Block> {
    parse_page_cut(doctags, width, height).0
}

/// [`parse_page`], and the index of the first block that came from an
/// element the page ends inside (cut off by the token budget), if any.
pub(crate) fn parse_page_cut(doctags: &str, width: u32, height: u32) -> (Vec<Block>, Option<usize>) {
    let toks = lex(doctags);
    let pos = toks.iter().position(|t| *t == Tok::Open("doctag")).map_or(0, |i| i + 1);
    let mut p = Parser { toks, pos, width: width as f64, height: height as f64, blocks: Vec::new(), lists: 0, cut: None };
    p.top();
    (p.blocks, p.cut)
}

fn block(kind: Kind, text: String, bbox: Option<[f64; 4]>) -> Block {
    Block {
        kind,
        text,
        bbox,
        level: None,
        table: None,
        language: None,
        marker: None,
        list: None,
        classes: None,
        parts: None,
        cells: None,
    }
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Tok<'a>> {
        self.toks.get(self.pos).copied()
    }

    fn bbox(&self, locs: &[u32]) -> Option<[f64; 4]> {
        if locs.len() < 4 {
            return None;
        }
        let s = |v: u32, size: f64| ((v.min(LOC_GRID) as f64 / LOC_GRID as f64 * size) * 100.0).round() / 100.0;
        Some([s(locs[0], self.width), s(locs[1], self.height), s(locs[2], self.width), s(locs[3], self.height)])
    }

    fn top(&mut self) {
        let mut stray = Leaf::default();
        while let Some(t) = self.peek() {
            match t {
                Tok::Open(name) if starts_element(name) && name != "page_break" => {
                    self.flush_stray(&mut stray);
                    self.pos += 1;
                    let first = self.blocks.len();
                    self.element(name);
                    if self.pos >= self.toks.len() && self.toks.last() != Some(&Tok::Close(name)) {
                        self.cut = Some(first);
                    }
                }
                Tok::Text(s) => {
                    stray.text.push_str(s);
                    self.pos += 1;
                }
                Tok::Open(name) => {
                    if let Some(v) = loc(name) {
                        stray.locs.push(v);
                    } else if name == "page_break" {
                        self.flush_stray(&mut stray);
                    }
                    self.pos += 1;
                }
                Tok::Close(_) => self.pos += 1,
            }
        }
        self.flush_stray(&mut stray);
    }

    fn flush_stray(&mut self, stray: &mut Leaf) {
        let leaf = std::mem::take(stray);
        let text = leaf.text.trim();
        if !text.is_empty() {
            let b = block(Kind::Text, text.to_string(), self.bbox(&leaf.locs));
            self.blocks.push(b);
        }
    }

    /// The element whose opening tag `name` was just read.
    fn element(&mut self, name: &'a str) {
        if let Some((kind, level)) = leaf_kind(name) {
            if kind == Kind::ListItem {
                // A list item outside a list: a list of its own.
                self.pos -= 1;
                let list = self.list(false);
                self.push_list(list);
                return;
            }
            let mut leaf = self.leaf(name, kind);
            let caption = leaf.caption.take();
            let b = self.leaf_block(kind, level, leaf);
            self.blocks.push(b);
            if let Some(caption) = caption {
                // After the code, where docling-core's Markdown puts a code caption.
                let b = self.leaf_block(Kind::Caption, None, *caption);
                self.blocks.push(b);
            }
            return;
        }
        match name {
            "ordered_list" | "unordered_list" => {
                let list = self.list(name == "ordered_list");
                self.push_list(list);
            }
            "otsl" => self.table(),
            "picture" | "chart" => self.picture(name),
            "inline" => self.inline(),
            "key_value_region" => self.key_value(),
            _ => {}
        }
    }

    fn leaf_block(&self, kind: Kind, level: Option<u32>, leaf: Leaf) -> Block {
        let bbox = self.bbox(&leaf.locs);
        let text = leaf.text.trim();
        let mut b = block(kind, text.to_string(), bbox);
        b.level = level;
        if kind == Kind::Code {
            // A leading `<_Language_>` names the language; the rest is kept as written.
            if let Some(rest) = text.strip_prefix("<_") {
                if let Some(end) = rest.find("_>").filter(|&e| e > 0 && !rest[..e].contains('>')) {
                    b.language = Some(rest[..end].to_string());
                    b.text = rest[end + 2..].to_string();
                }
            }
        }
        b
    }

    /// Text and locations up to `</name>`. Ends early, without consuming it,
    /// at a tag that starts another element or a table cell, or at the
    /// closing tag of a container. In code every other tag is literal text,
    /// except a `<caption>` that ends the element (see [`Self::code_caption_here`]).
    fn leaf(&mut self, name: &str, kind: Kind) -> Leaf {
        let mut leaf = Leaf::default();
        let code = kind == Kind::Code;
        while let Some(t) = self.peek() {
            match t {
                Tok::Close(n) if n == name => {
                    self.pos += 1;
                    break;
                }
                Tok::Text(s) => leaf.text.push_str(s),
                Tok::Open("caption") if code && self.code_caption_here() => {
                    self.pos += 1;
                    leaf.caption = Some(Box::new(self.leaf("caption", Kind::Caption)));
                    // The caption is the code element's last part.
                    while matches!(self.peek(), Some(Tok::Text(s)) if s.trim().is_empty()) {
                        self.pos += 1;
                    }
                    if self.peek() == Some(Tok::Close("code")) {
                        self.pos += 1;
                    }
                    break;
                }
                Tok::Open(n) => {
                    if let Some(v) = loc(n) {
                        leaf.locs.push(v);
                    } else if n == "page_break" || (!code && (starts_element(n) || is_otsl(n))) {
                        break;
                    } else if code && n != "doctag" {
                        leaf.text.push('<');
                        leaf.text.push_str(n);
                        leaf.text.push('>');
                    }
                }
                Tok::Close(n) => {
                    if !code && is_container(n) {
                        break;
                    } else if code && n != "doctag" {
                        leaf.text.push_str("</");
                        leaf.text.push_str(n);
                        leaf.text.push('>');
                    }
                }
            }
            self.pos += 1;
        }
        leaf
    }

    /// Whether the `<caption>` at the current token is a code element's
    /// caption: docling's DocTags export writes it last, so it is followed by
    /// `</caption>` and then only whitespace up to `</code>` (or the end of
    /// the page, or its cut-off end has no `</caption>`). A caption tag
    /// anywhere else in code is the code's own text (HTML, say).
    fn code_caption_here(&self) -> bool {
        let rest = &self.toks[self.pos + 1..];
        let end = rest.iter().position(|t| matches!(t, Tok::Close("code") | Tok::Open("page_break"))).unwrap_or(rest.len());
        let inside = &rest[..end];
        match inside.iter().position(|t| *t == Tok::Close("caption")) {
            Some(close) => inside[close + 1..].iter().all(|t| matches!(t, Tok::Text(s) if s.trim().is_empty())),
            None => end == rest.len(),
        }
    }

    /// A list whose opening tag was just read; a nested list belongs to the
    /// item before it.
    fn list(&mut self, ordered: bool) -> List {
        let mut list = List { ordered, items: Vec::new() };
        while let Some(t) = self.peek() {
            match t {
                Tok::Open("list_item") => {
                    self.pos += 1;
                    let item = self.list_item();
                    list.items.push(item);
                    continue;
                }
                Tok::Open(n) if is_list(n) => {
                    self.pos += 1;
                    let nested = self.list(n == "ordered_list");
                    match list.items.last_mut() {
                        Some(item) => item.children.push(nested),
                        None => list.items.extend(nested.items),
                    }
                    continue;
                }
                Tok::Close(n) if is_list(n) => {
                    self.pos += 1;
                    break;
                }
                Tok::Text(s) if !s.trim().is_empty() => {
                    // Text between items: an item the model did not tag.
                    list.items.push(ListItem { leaf: Leaf { text: s.to_string(), ..Leaf::default() }, children: Vec::new() });
                }
                Tok::Open(n) if starts_element(n) => break,
                Tok::Close(n) if is_container(n) => break,
                _ => {}
            }
            self.pos += 1;
        }
        list
    }

    fn list_item(&mut self) -> ListItem {
        let mut item = ListItem::default();
        loop {
            let part = self.leaf("list_item", Kind::ListItem);
            item.leaf.text.push_str(&part.text);
            item.leaf.locs.extend(part.locs);
            match self.peek() {
                Some(Tok::Open(n)) if is_list(n) => {
                    self.pos += 1;
                    let nested = self.list(n == "ordered_list");
                    item.children.push(nested);
                }
                _ => break,
            }
        }
        item
    }

    fn push_list(&mut self, list: List) {
        let id = self.lists;
        self.lists += 1;
        self.list_blocks(&list, 1, id);
    }

    fn list_blocks(&mut self, list: &List, level: u32, id: u32) {
        for (i, item) in list.items.iter().enumerate() {
            let mut b = block(Kind::ListItem, item.leaf.text.trim().to_string(), self.bbox(&item.leaf.locs));
            b.level = Some(level);
            b.list = Some(id);
            b.marker = Some(if list.ordered { format!("{}.", i + 1) } else { "-".to_string() });
            self.blocks.push(b);
            for child in &item.children {
                self.list_blocks(child, level + 1, id);
            }
        }
    }

    /// OTSL cells up to `</otsl>` (or the end of a chart). A caption inside
    /// becomes a caption block before the table.
    fn table(&mut self) {
        let mut locs = Vec::new();
        let mut captions = Vec::new();
        let rows = self.otsl_rows("otsl", &mut locs, &mut captions, &mut Vec::new(), &mut String::new());
        self.blocks.extend(captions);
        let table = build_table(&rows);
        let mut b = block(Kind::Table, table_text(&table), self.bbox(&locs));
        b.table = Some(table);
        self.blocks.push(b);
    }

    /// Reads the inside of a table, picture or chart up to `</end>`.
    fn otsl_rows(
        &mut self,
        end: &str,
        locs: &mut Vec<u32>,
        captions: &mut Vec<Block>,
        classes: &mut Vec<String>,
        stray: &mut String,
    ) -> Vec<Vec<(&'a str, String)>> {
        let mut rows: Vec<Vec<(&'a str, String)>> = Vec::new();
        let mut row: Vec<(&'a str, String)> = Vec::new();
        let picture = end != "otsl";
        while let Some(t) = self.peek() {
            match t {
                Tok::Close(n) if n == end => {
                    self.pos += 1;
                    break;
                }
                Tok::Open("nl") if !row.is_empty() => rows.push(std::mem::take(&mut row)),
                Tok::Open("nl") => {}
                Tok::Open(n) if OTSL_CELLS.contains(&n) => row.push((n, String::new())),
                Tok::Open("caption") => {
                    self.pos += 1;
                    let leaf = self.leaf("caption", Kind::Caption);
                    locs.extend(leaf.locs.iter().copied());
                    let b = self.leaf_block(Kind::Caption, None, leaf);
                    captions.push(b);
                    continue;
                }
                Tok::Open(n) if picture && PICTURE_CLASSES.contains(&n) => classes.push(n.to_string()),
                // A chart may wrap its data in an `otsl` element of its own.
                Tok::Open("otsl") | Tok::Close("otsl") if picture => {}
                Tok::Open(n) if loc(n).is_some() => locs.push(loc(n).unwrap_or(0)),
                Tok::Open(n) if starts_element(n) => break,
                Tok::Close(n) if is_container(n) => break,
                Tok::Text(s) => match row.last_mut() {
                    Some((_, text)) => text.push_str(s),
                    None if picture => stray.push_str(s),
                    None if !s.trim().is_empty() => row.push(("fcel", s.to_string())),
                    None => {}
                },
                _ => {}
            }
            self.pos += 1;
        }
        if !row.is_empty() {
            rows.push(row);
        }
        rows
    }

    fn picture(&mut self, name: &str) {
        let (mut locs, mut captions, mut classes, mut stray) = (Vec::new(), Vec::new(), Vec::new(), String::new());
        let rows = self.otsl_rows(name, &mut locs, &mut captions, &mut classes, &mut stray);
        self.blocks.extend(captions);
        let table = build_table(&rows);
        let mut text = stray.trim().to_string();
        if table.rows > 0 {
            // The cells' text too (docling-core reads data only from charts).
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&table_text(&table));
        }
        let mut b = block(if name == "chart" { Kind::Chart } else { Kind::Picture }, text, self.bbox(&locs));
        b.classes = Some(classes);
        if table.rows > 0 && name == "chart" {
            b.table = Some(table);
        }
        self.blocks.push(b);
    }

    fn inline(&mut self) {
        let mut locs = Vec::new();
        let mut parts: Vec<Part> = Vec::new();
        while let Some(t) = self.peek() {
            match t {
                Tok::Close("inline") => {
                    self.pos += 1;
                    break;
                }
                Tok::Open(n) if leaf_kind(n).is_some() => {
                    self.pos += 1;
                    let kind = leaf_kind(n).map(|k| k.0).unwrap_or(Kind::Text);
                    let mut leaf = self.leaf(n, kind);
                    locs.extend(leaf.locs.iter().copied());
                    let caption = leaf.caption.take();
                    let b = self.leaf_block(kind, None, leaf);
                    parts.push(Part { kind, text: b.text });
                    if let Some(caption) = caption {
                        parts.push(Part { kind: Kind::Caption, text: caption.text.trim().to_string() });
                    }
                    continue;
                }
                Tok::Open(n) if loc(n).is_some() => locs.push(loc(n).unwrap_or(0)),
                Tok::Text(s) if !s.trim().is_empty() => parts.push(Part { kind: Kind::Text, text: s.trim().to_string() }),
                Tok::Open(n) if starts_element(n) => break,
                Tok::Close(n) if is_container(n) => break,
                _ => {}
            }
            self.pos += 1;
        }
        let text = parts.iter().map(|p| p.text.as_str()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" ");
        let mut b = block(Kind::Inline, text, self.bbox(&locs));
        b.parts = Some(parts);
        self.blocks.push(b);
    }

    /// A key-value region: its `<key_N>` / `<value_N>` cells in order, with
    /// the `<link_M>`s in them; the block's text is their texts, one a line.
    fn key_value(&mut self) {
        let mut locs = Vec::new();
        let mut cells: Vec<(KeyValueCell, Vec<u32>)> = Vec::new();
        let mut in_cell = false;
        let cell_id = |n: &str| -> Option<(bool, u32)> {
            let (key, digits) = match n.strip_prefix("key_") {
                Some(d) => (true, d),
                None => (false, n.strip_prefix("value_")?),
            };
            Some((key, digits.parse().ok()?))
        };
        let new_cell = |id, key| (KeyValueCell { id, key, text: String::new(), bbox: None, links: Vec::new() }, Vec::new());
        while let Some(t) = self.peek() {
            match t {
                Tok::Close("key_value_region") => {
                    self.pos += 1;
                    break;
                }
                Tok::Open(n) if cell_id(n).is_some() => {
                    let (key, id) = cell_id(n).unwrap_or_default();
                    cells.push(new_cell(Some(id), key));
                    in_cell = true;
                }
                Tok::Close(n) if cell_id(n).is_some() => in_cell = false,
                Tok::Open(n) if loc(n).is_some() => match cells.last_mut() {
                    Some((_, cell_locs)) if in_cell => cell_locs.push(loc(n).unwrap_or(0)),
                    // The region's own box comes before its first cell.
                    None => locs.push(loc(n).unwrap_or(0)),
                    _ => {}
                },
                Tok::Open(n) if link(n).is_some() => {
                    if let (Some((cell, _)), true) = (cells.last_mut(), in_cell) {
                        cell.links.extend(link(n));
                    }
                }
                Tok::Text(s) => {
                    // Text outside the cells: a cell of its own, up to the next cell.
                    if !in_cell && cells.last().is_none_or(|(c, _)| c.id.is_some()) {
                        cells.push(new_cell(None, false));
                    }
                    if let Some((cell, _)) = cells.last_mut() {
                        cell.text.push_str(s);
                    }
                }
                Tok::Open(n) if starts_element(n) => break,
                Tok::Close(n) if is_container(n) => break,
                _ => {}
            }
            self.pos += 1;
        }
        let cells: Vec<KeyValueCell> = cells
            .into_iter()
            .map(|(mut cell, cell_locs)| {
                cell.text = cell.text.trim().to_string();
                cell.bbox = self.bbox(&cell_locs);
                cell
            })
            .filter(|c| !c.text.is_empty())
            .collect();
        let text = cells.iter().map(|c| c.text.as_str()).collect::<Vec<_>>().join("\n");
        let mut b = block(Kind::KeyValueRegion, text, self.bbox(&locs));
        b.cells = Some(cells);
        self.blocks.push(b);
    }
}

/// OTSL rows (token, text after it) to cells with spans: `lcel` continues
/// the cell on its left, `ucel` the one above, `xcel` both; a cell spans
/// right over the `lcel`/`xcel` that follow it and down over the
/// `ucel`/`xcel` below it. Text after a merge token joins the cell that
/// covers it.
fn build_table(rows: &[Vec<(&str, String)>]) -> Table {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut cells: Vec<Cell> = Vec::new();
    let mut orphans: Vec<(usize, usize, String)> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        for (c, (tok, text)) in row.iter().enumerate() {
            if matches!(*tok, "lcel" | "ucel" | "xcel") {
                if !text.trim().is_empty() {
                    orphans.push((r, c, text.trim().to_string()));
                }
                continue;
            }
            let col_span = 1 + row[c + 1..].iter().take_while(|(t, _)| matches!(*t, "lcel" | "xcel")).count();
            let row_span = 1 + rows[r + 1..]
                .iter()
                .take_while(|below| below.get(c).is_some_and(|(t, _)| matches!(*t, "ucel" | "xcel")))
                .count();
            cells.push(Cell {
                row: r as u32,
                col: c as u32,
                row_span: row_span as u32,
                col_span: col_span as u32,
                text: text.trim().to_string(),
                header: matches!(*tok, "ched" | "rhed"),
                token: tok.to_string(),
            });
        }
    }
    for (r, c, text) in orphans {
        let (r32, c32) = (r as u32, c as u32);
        let owner = cells
            .iter_mut()
            .rev()
            .find(|x| x.row <= r32 && r32 < x.row + x.row_span && x.col <= c32 && c32 < x.col + x.col_span);
        match owner {
            Some(x) if x.text.is_empty() => x.text = text,
            Some(x) => {
                x.text.push(' ');
                x.text.push_str(&text);
            }
            None => cells.push(Cell { row: r32, col: c32, row_span: 1, col_span: 1, text, header: false, token: "fcel".into() }),
        }
    }
    Table { rows: rows.len() as u32, cols: cols as u32, cells }
}

/// A table's cell texts, a line per row.
pub(crate) fn table_text(t: &Table) -> String {
    let mut lines: Vec<String> = vec![String::new(); t.rows as usize];
    for c in &t.cells {
        if c.text.is_empty() {
            continue;
        }
        let line = &mut lines[c.row as usize];
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&c.text);
    }
    lines.retain(|l| !l.is_empty());
    lines.join("\n")
}
