//! GitHub pipe tables laid out the way docling-core lays them out (it
//! calls the Python `tabulate` package with `tablefmt="github"`): columns
//! padded to their widest cell and at least two past their header, numeric
//! columns flush right, a `|---|` line under the header.

/// Renders `header` and `body` (every row as long as `header`).
pub(crate) fn github_table(header: &[String], body: &[Vec<String>]) -> String {
    let n = header.len();
    let right: Vec<bool> = (0..n)
        .map(|c| !body.is_empty() && column_is_numeric(body.iter().map(|r| r[c].as_str())))
        .collect();
    let body: Vec<Vec<&str>> = body.iter().map(|r| r.iter().map(|s| s.trim()).collect()).collect();
    let width = |s: &str| s.chars().count();
    let widths: Vec<usize> = (0..n)
        .map(|c| body.iter().map(|r| width(r[c])).chain([width(&header[c]) + 2]).max().unwrap_or(0))
        .collect();
    let pad = |s: &str, c: usize| {
        let fill = " ".repeat(widths[c].saturating_sub(width(s)));
        if right[c] {
            format!("{fill}{s}")
        } else {
            format!("{s}{fill}")
        }
    };
    let line = |cells: Vec<String>| format!("| {} |", cells.join(" | "));
    let mut out = vec![line((0..n).map(|c| pad(&header[c], c)).collect())];
    out.push(format!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|")));
    for row in &body {
        out.push(line((0..n).map(|c| pad(row[c], c)).collect()));
    }
    out.join("\n")
}

/// Python's types as `tabulate` ranks them for a column: a column is
/// numeric when its most general non-empty value is an int or a float.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ty {
    None,
    Bool,
    Int,
    Float,
    Str,
}

fn column_is_numeric<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    let ty = values.map(value_type).fold(Ty::Bool, |a, b| a.max(b));
    matches!(ty, Ty::Int | Ty::Float)
}

fn value_type(s: &str) -> Ty {
    if s.is_empty() {
        Ty::None
    } else if s == "True" || s == "False" {
        Ty::Bool
    } else if py_int(s) || (thousands(s) && !s.contains('.')) {
        Ty::Int
    } else if py_float_number(s) || thousands(s) {
        Ty::Float
    } else {
        Ty::Str
    }
}

/// A decimal digit as Python's `int()` reads it: ASCII, Arabic-Indic,
/// extended Arabic-Indic, Devanagari and fullwidth digits.
fn digit(c: char) -> bool {
    c.is_ascii_digit()
        || ('\u{660}'..='\u{669}').contains(&c)
        || ('\u{6F0}'..='\u{6F9}').contains(&c)
        || ('\u{966}'..='\u{96F}').contains(&c)
        || ('\u{FF10}'..='\u{FF19}').contains(&c)
}

/// Digits with single `_` between them, as Python numbers allow; returns the rest.
fn digits(s: &str) -> Option<&str> {
    let mut seen = false;
    let mut last_underscore = false;
    for (i, c) in s.char_indices() {
        if digit(c) {
            seen = true;
            last_underscore = false;
        } else if c == '_' && seen && !last_underscore {
            last_underscore = true;
        } else {
            return (seen && !last_underscore).then_some(&s[i..]);
        }
    }
    (seen && !last_underscore).then_some("")
}

fn sign(s: &str) -> &str {
    s.strip_prefix(['+', '-']).unwrap_or(s)
}

/// `int(s)` succeeds.
fn py_int(s: &str) -> bool {
    digits(sign(s.trim())) == Some("")
}

/// `float(s)` succeeds and is finite, or `s` is literally `inf`, `-inf` or `nan`
/// (any case).
fn py_float_number(s: &str) -> bool {
    let lower = s.to_lowercase();
    if ["inf", "-inf", "nan"].contains(&lower.as_str()) {
        return true;
    }
    let t = sign(s.trim());
    // Mantissa: digits [. [digits]] | . digits
    let rest = match digits(t) {
        Some(r) => match r.strip_prefix('.') {
            Some(after) => digits(after).unwrap_or(after),
            None => r,
        },
        None => match t.strip_prefix('.').and_then(digits) {
            Some(r) => r,
            None => return false,
        },
    };
    let rest = match rest.strip_prefix(['e', 'E']) {
        Some(exp) => match digits(sign(exp)) {
            Some(r) => r,
            None => return false,
        },
        None => rest,
    };
    if !rest.is_empty() {
        return false;
    }
    // Overflow to infinity is not a number to tabulate.
    let ascii: String = t.chars().filter(|&c| c != '_').map(ascii_digit).collect();
    ascii.parse::<f64>().map(|v| v.is_finite()).unwrap_or(true)
}

fn ascii_digit(c: char) -> char {
    for base in ['\u{660}', '\u{6F0}', '\u{966}', '\u{FF10}'] {
        let b = base as u32;
        let v = c as u32;
        if (b..b + 10).contains(&v) {
            return char::from_digit(v - b, 10).unwrap_or(c);
        }
    }
    c
}

/// `tabulate`'s test for numbers with thousands separators: an optional
/// sign with one to three digits and `,ddd` groups, then an optional
/// fraction (`1,000.5`, `12`, `.5`).
fn thousands(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let digits_start = i;
    while i < b.len() && b[i].is_ascii_digit() && i - digits_start < 3 {
        i += 1;
    }
    let has_int = i > digits_start;
    if has_int {
        while i + 3 < b.len() && b[i] == b',' && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            i += 4;
        }
    } else {
        // A sign needs digits after it.
        i = 0;
    }
    if b.get(i) == Some(&b'.') {
        let frac = i + 1;
        i = frac + b[frac..].iter().take_while(|c| c.is_ascii_digit()).count();
        if !has_int && i == frac {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_python_and_tabulate_see_them() {
        for s in ["1", "-3", "+4", "1_000", "١٢", "1,000", "12,345,678"] {
            assert!(value_type(s) == Ty::Int, "{s}");
        }
        for s in ["12.5", "1e3", "nan", "inf", "-inf", ".5", "5.", "1,000.25", "1E-7"] {
            assert!(value_type(s) == Ty::Float, "{s}");
        }
        for s in ["x", "1e999", "+inf", "1__0", "_1", "1_", "1,00", "1000,000", "Infinity", "1.2.3", "."] {
            assert!(value_type(s) == Ty::Str, "{s}");
        }
        assert!(value_type("True") == Ty::Bool);
        assert!(value_type("") == Ty::None);
    }

    #[test]
    fn layout_pads_to_header_plus_two_and_right_aligns_numbers() {
        let h = vec!["a".to_string(), "name".to_string()];
        let body = vec![vec!["1".to_string(), "x".to_string()], vec!["22".to_string(), "".to_string()]];
        assert_eq!(github_table(&h, &body), "|   a | name   |\n|-----|--------|\n|   1 | x      |\n|  22 |        |");
    }
}
