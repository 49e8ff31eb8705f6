//! `quire doctags`: DocTags text to Markdown or layout blocks, for model
//! output saved before quire did this itself, or DocTags from elsewhere.

use crate::cli::DoctagsArgs;
use crate::exit;
use std::io::{Read, Write};

pub fn run(args: DoctagsArgs) -> u8 {
    let names: Vec<String> = if args.files.is_empty() {
        vec!["-".into()]
    } else {
        args.files.iter().map(|p| p.to_string_lossy().into_owned()).collect()
    };
    // Read everything first: an unreadable input prints nothing.
    let mut inputs = Vec::new();
    let mut failed = false;
    for name in &names {
        let read = if name == "-" {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b).map(|_| b)
        } else {
            std::fs::read(name)
        };
        match read {
            Ok(bytes) => inputs.push((name.as_str(), String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) => {
                eprintln!("quire doctags: cannot read {}: {e}", if name == "-" { "stdin" } else { name });
                failed = true;
            }
        }
    }
    if failed {
        return exit::USAGE;
    }
    let mut out = String::new();
    let mut parts: Vec<String> = Vec::new();
    for (name, text) in &inputs {
        for (i, page) in quire_doctags::split_pages(text).into_iter().enumerate() {
            let blocks = quire_doctags::parse_page(page, args.width, args.height);
            if args.json {
                let line = serde_json::json!({"source": name, "page": i + 1, "blocks": blocks});
                out.push_str(&line.to_string());
                out.push('\n');
            } else {
                let md = quire_doctags::markdown(&blocks);
                if !md.is_empty() {
                    parts.push(md);
                }
            }
        }
    }
    if !args.json && !parts.is_empty() {
        out = parts.join("\n\n");
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush()) {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            eprintln!("quire doctags: writing the output: {e}");
            exit::INTERNAL
        }
    }
}
