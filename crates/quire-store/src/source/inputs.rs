//! Listing input objects: files and folders on disk (S3 prefixes live with
//! the S3 backend). Listing streams through a channel so that a corpus of
//! millions of files is never held in memory at once.
//!
//! Imports: nothing of this crate (only `quire_core` and outside crates).

use quire_core::SourceRef;
use std::path::Path;
use std::time::UNIX_EPOCH;
use tokio::sync::mpsc;

/// A listing problem that does not stop the listing (a symlink loop, an
/// unreadable folder). Reported to the user; the object itself, if any, is
/// not listed.
#[derive(Debug, Clone)]
pub struct ListWarning {
    pub path: String,
    pub message: String,
}

pub enum Listed {
    Object(SourceRef),
    Warning(ListWarning),
}

/// Lists a file, or every file below a folder (following symlinks, safe
/// against loops), in a stable order. `uri` of each object is the input as
/// given joined with the path below it; `rel` is the path below the input
/// root, prefixed with the root folder's own name so that two inputs do not
/// collide in the Markdown tree.
pub fn list_local(input: &str, tx: mpsc::Sender<Listed>) {
    let root = Path::new(input);
    let meta = match std::fs::metadata(root) {
        Ok(m) => m,
        Err(e) => {
            let _ = tx.blocking_send(Listed::Warning(ListWarning { path: input.to_string(), message: e.to_string() }));
            return;
        }
    };
    if meta.is_file() {
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| input.to_string());
        let _ = tx.blocking_send(Listed::Object(source_ref(input.to_string(), name, &meta)));
        return;
    }
    let base = std::fs::canonicalize(root)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "input".to_string());
    let walk = walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name();
    for entry in walk {
        let msg = match entry {
            // Records name their source as UTF-8 text: a name that is not cannot be named
            // (nor opened again from its record), so it is reported instead.
            Ok(e) if e.file_type().is_file() && e.path().to_str().is_none() => Listed::Warning(ListWarning {
                path: e.path().to_string_lossy().into_owned(),
                message: "the file name is not valid UTF-8; rename the file to process it".into(),
            }),
            Ok(e) if e.file_type().is_file() => {
                let rel_path = e.path().strip_prefix(root).unwrap_or(e.path());
                let rel = rel_path.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                match e.metadata() {
                    Ok(m) => {
                        let uri = e.path().to_string_lossy().into_owned();
                        Listed::Object(source_ref(uri, format!("{base}/{rel}"), &m))
                    }
                    Err(err) => Listed::Warning(ListWarning { path: e.path().display().to_string(), message: err.to_string() }),
                }
            }
            Ok(_) => continue,
            Err(err) => Listed::Warning(ListWarning {
                path: err.path().map(|p| p.display().to_string()).unwrap_or_default(),
                message: if err.loop_ancestor().is_some() {
                    "symbolic link loop, not followed".to_string()
                } else {
                    err.to_string()
                },
            }),
        };
        if tx.blocking_send(msg).is_err() {
            return;
        }
    }
}

fn source_ref(uri: String, rel: String, meta: &std::fs::Metadata) -> SourceRef {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    SourceRef { uri, rel, size: meta.len(), version: format!("mtime:{mtime}") }
}

/// Most inputs one brace pattern may expand to.
pub const MAX_BRACE_EXPANSION: usize = 10_000_000;

/// Expands brace patterns as WebDataset writes shard names: `shard-{000000..000999}.tar`
/// (a numeric range, zero-padded to the width of its bounds when they have leading zeros,
/// ascending or descending) and `{train,val}` (a list); several braces multiply. A string
/// without braces is returned as it is. `s3://` URIs expand the same way.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(format!("{pattern:?}: '}}' without '{{'"));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find('}').map(|i| open + i).ok_or_else(|| format!("{pattern:?}: '{{' without '}}'"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    if head.contains('}') || body.contains('{') {
        return Err(format!("{pattern:?}: nested or unbalanced braces"));
    }
    let choices: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (x, y) = match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(x), Ok(y)) if !a.is_empty() && !b.is_empty() => (x, y),
            _ => return Err(format!("{pattern:?}: {{{body}}} is not a range of whole numbers like {{000000..000999}}")),
        };
        let padded = (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0'));
        let width = if padded { a.len().max(b.len()) } else { 0 };
        let n = x.abs_diff(y) as usize + 1;
        if n > MAX_BRACE_EXPANSION {
            return Err(format!("{pattern:?}: {n} names, more than {MAX_BRACE_EXPANSION}"));
        }
        let step = |i: u64| if x <= y { x + i } else { x - i };
        (0..n as u64).map(|i| format!("{:0width$}", step(i))).collect()
    } else if body.contains(',') {
        body.split(',').map(str::to_string).collect()
    } else {
        return Err(format!("{pattern:?}: {{{body}}} is neither a range {{a..b}} nor a list {{a,b}}"));
    };
    let rest = expand_braces(tail)?;
    if choices.len().saturating_mul(rest.len()) > MAX_BRACE_EXPANSION {
        return Err(format!("{pattern:?}: more than {MAX_BRACE_EXPANSION} names"));
    }
    let mut out = Vec::with_capacity(choices.len() * rest.len());
    for c in &choices {
        for r in &rest {
            out.push(format!("{head}{c}{r}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_patterns_expand_like_webdataset_names() {
        assert_eq!(expand_braces("a.tar").unwrap(), vec!["a.tar"]);
        assert_eq!(
            expand_braces("s3://b/laion/{000000..000002}.tar").unwrap(),
            vec!["s3://b/laion/000000.tar", "s3://b/laion/000001.tar", "s3://b/laion/000002.tar"]
        );
        assert_eq!(expand_braces("x{8..11}").unwrap(), vec!["x8", "x9", "x10", "x11"]);
        assert_eq!(expand_braces("x{2..0}").unwrap(), vec!["x2", "x1", "x0"]);
        assert_eq!(expand_braces("{train,val}-{0..1}.tar").unwrap(), vec!["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]);
        assert!(expand_braces("a{1..b}").is_err());
        assert!(expand_braces("a{1..2").is_err());
        assert!(expand_braces("a{x}").is_err());
        assert!(expand_braces("a{0..99999999}").is_err(), "too many names");
    }

    fn collect(input: &str) -> (Vec<SourceRef>, Vec<ListWarning>) {
        let (tx, mut rx) = mpsc::channel(4);
        let input = input.to_string();
        let h = std::thread::spawn(move || list_local(&input, tx));
        let (mut objs, mut warns) = (vec![], vec![]);
        while let Some(x) = rx.blocking_recv() {
            match x {
                Listed::Object(o) => objs.push(o),
                Listed::Warning(w) => warns.push(w),
            }
        }
        h.join().unwrap();
        (objs, warns)
    }

    #[test]
    fn walks_folders_and_survives_symlink_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("corpus");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a b.pdf"), b"%PDF").unwrap();
        std::fs::write(root.join("sub/ü.png"), b"x").unwrap();
        std::os::unix::fs::symlink(&root, root.join("sub/loop")).unwrap();
        let (objs, warns) = collect(root.to_str().unwrap());
        let rels: Vec<_> = objs.iter().map(|o| o.rel.as_str()).collect();
        assert_eq!(rels, vec!["corpus/a b.pdf", "corpus/sub/ü.png"]);
        assert_eq!(warns.len(), 1);
        assert!(warns[0].message.contains("loop"), "{}", warns[0].message);
        let (one, _) = collect(root.join("a b.pdf").to_str().unwrap());
        assert_eq!(one[0].rel, "a b.pdf");
        assert_eq!(one[0].size, 4);
        let (none, warns) = collect(dir.path().join("missing").to_str().unwrap());
        assert!(none.is_empty() && warns.len() == 1);
    }
}
