//! DocTags, the markup that SmolDocling and Granite-Docling write, turned into
//! layout [`Block`]s and Markdown.
//!
//! ```text
//! <doctag><section_header_level_1><loc_58><loc_44><loc_426><loc_61>Introduction</section_header_level_1>
//! <text><loc_58><loc_70><loc_442><loc_120>…</text><otsl>…<nl></otsl></doctag>
//! ```
//!
//! [`parse_page`] reads one page into blocks, with bounding boxes in the
//! page's pixels; [`markdown`] renders blocks the way docling-core's
//! `export_to_markdown` renders the same DocTags. [`split_pages`] cuts a
//! multi-page text at `<page_break>`.
//!
//! Model output is often cut off or slightly malformed; the parser never
//! fails and keeps every piece of text it was given:
//!
//! * an element still open at the end of the page ends there, with its text;
//! * an element left open when the next element starts (`<title>a<text>b`) ends there;
//! * a closing tag without its opening tag is ignored;
//! * an unknown tag is ignored, its text stays where it is; text outside any
//!   element becomes a `text` block, except text before `<doctag>` (a chat
//!   template's `Assistant:` in a saved raw answer), which is not the page's;
//! * a tag cut off by the end of the input (`<loc_4`, maybe followed by a
//!   newline) is dropped;
//! * a table row with fewer cells than the longest row is padded with empty cells;
//! * fewer than four locations give no bounding box (`null`).
//!
//! Pure: no model code and no I/O.

mod lex;
mod markdown;
mod parse;
mod tabulate;

pub use markdown::markdown;
pub use parse::parse_page;
use serde::{Deserialize, Serialize};

/// The locations of DocTags run over `0..=LOC_GRID` on each axis, from the top-left corner.
pub const LOC_GRID: u32 = 500;

/// What a block is. The names are DocTags' own element names, except
/// `section_header` (its level is in [`Block::level`]) and `table` (`otsl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Title,
    SectionHeader,
    Text,
    Paragraph,
    Caption,
    Footnote,
    PageHeader,
    PageFooter,
    Formula,
    Code,
    ListItem,
    CheckboxSelected,
    CheckboxUnselected,
    Reference,
    HandwrittenText,
    Smiles,
    DocumentIndex,
    Table,
    Picture,
    Chart,
    Inline,
    KeyValueRegion,
}

/// One layout element of a page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub kind: Kind,
    /// The element's text, tags removed and surrounding whitespace trimmed.
    /// Tables: the cells' texts, row by row; pictures and charts: text the
    /// model put inside them besides the caption (usually none), then the
    /// texts of a chart's data cells; inline
    /// groups: their parts' texts joined by spaces; key-value regions: their
    /// keys' and values' texts in the model's order, one a line.
    pub text: String,
    /// `[x0, y0, x1, y1]` in page pixels from the top-left corner: the first
    /// four `<loc_N>` of the element scaled from 0..500 to the page size;
    /// `null` when the model gave fewer than four.
    pub bbox: Option<[f64; 4]>,
    /// Section headers: 1..=6 from `section_header_level_N`. List items: the
    /// nesting depth, 1 for a top-level list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u32>,
    /// Tables, and charts that carry their data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<Table>,
    /// Code: the language from the leading `<_Language_>` tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// List items: `-` in unordered lists, `1.`, `2.`, … in ordered ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    /// List items: which list of the page the item belongs to (0, 1, …;
    /// nested lists share the number of the list they are nested in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<u32>,
    /// Pictures and charts: the class tags the model gave (`bar_chart`, `logo`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// Inline groups: their parts in order (`text`, `formula`, `code`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<Vec<Part>>,
    /// Key-value regions: their keys and values in the model's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cells: Option<Vec<KeyValueCell>>,
}

/// One key or value of a key-value region (`<key_N>…</key_N>`,
/// `<value_N>…</value_N>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyValueCell {
    /// The `N` of the tag; null for text the model put in the region outside any cell.
    pub id: Option<u32>,
    /// A key; false for a value.
    pub key: bool,
    pub text: String,
    /// The cell's first four locations in page pixels, as [`Block::bbox`].
    pub bbox: Option<[f64; 4]>,
    /// The ids of the cells this one points to (`<link_M>` in it): a key's values.
    pub links: Vec<u32>,
}

/// One piece of an inline group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub kind: Kind,
    pub text: String,
}

/// An OTSL table as a grid of cells. A spanning cell appears once, at its
/// top-left slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub rows: u32,
    /// The length of the longest row.
    pub cols: u32,
    pub cells: Vec<Cell>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub row: u32,
    pub col: u32,
    pub row_span: u32,
    pub col_span: u32,
    pub text: String,
    /// A header cell: `ched` (column header) or `rhed` (row header).
    pub header: bool,
    /// The OTSL token that started the cell: `fcel`, `ecel`, `ched`, `rhed` or `srow`.
    pub token: String,
}

impl Table {
    /// The grid docling-core renders: every slot holds the text of the cell
    /// covering it (spanning cells repeat), empty slots hold `""`.
    pub fn grid(&self) -> Vec<Vec<&str>> {
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        let mut g = vec![vec![""; cols]; rows];
        for c in &self.cells {
            let cols_covered = (c.col as usize).min(cols)..((c.col + c.col_span) as usize).min(cols);
            for row in g.iter_mut().take(((c.row + c.row_span) as usize).min(rows)).skip(c.row as usize) {
                for slot in &mut row[cols_covered.clone()] {
                    *slot = &c.text;
                }
            }
        }
        g
    }
}

/// Whether a model's output is DocTags: it starts with `<doctag>` (after
/// leading whitespace).
pub fn is_doctags(text: &str) -> bool {
    text.trim_start().starts_with("<doctag>")
}

/// Splits a text of several pages at `<page_break>`.
pub fn split_pages(text: &str) -> Vec<&str> {
    text.split("<page_break>").collect()
}

/// One page's DocTags to Markdown: [`parse_page`] then [`markdown`].
pub fn page_markdown(doctags: &str) -> String {
    markdown(&parse_page(doctags, 1, 1))
}

#[cfg(test)]
mod tests;
