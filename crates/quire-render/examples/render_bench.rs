//! Renders every page of the given PDFs to RGB with quire-render and reports pages/s and
//! peak memory. Used by benches/render/bench.sh (compared there with poppler's pdftoppm).
//!
//!   render_bench [--long-side 1288] [--procs N] [--keep] [--no-text] FILE.pdf...
//!
//! --procs N: N worker processes (this binary re-executed), each with its own pdfium,
//! rendering a contiguous share of all pages: pdfium cannot render in parallel inside one
//! process. --keep holds every rendered page in memory (as a pipeline with no back-pressure
//! would); by default each page buffer is dropped after rendering. Text extraction is on by
//! default (the pipeline wants it to route text-layer pages); --no-text turns it off.
//! Output: one line `pages=… secs=… pages_per_s=… peak_rss_mb=…` (peak RSS summed over
//! worker processes).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use quire_render::{PdfRenderer, RenderOptions, RenderSize};

struct Args {
    long_side: u32,
    procs: usize,
    keep: bool,
    text: bool,
    child: bool,
    files: Vec<String>,
}

fn parse() -> Args {
    let mut a = Args { long_side: 1288, procs: 1, keep: false, text: true, child: false, files: vec![] };
    let mut it = std::env::args().skip(1);
    while let Some(s) = it.next() {
        match s.as_str() {
            "--long-side" => a.long_side = it.next().unwrap().parse().unwrap(),
            "--procs" => a.procs = it.next().unwrap().parse().unwrap(),
            "--keep" => a.keep = true,
            "--no-text" => a.text = false,
            "--child" => a.child = true,
            _ => a.files.push(s),
        }
    }
    a
}

/// Peak resident set size of this process, KiB (Linux: VmHWM).
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Segment syntax for children: FILE@FIRST@LAST.
fn segment(s: &str) -> (PathBuf, u32, u32) {
    let mut p = s.rsplitn(3, '@');
    let last = p.next().unwrap().parse().unwrap();
    let first = p.next().unwrap().parse().unwrap();
    (PathBuf::from(p.next().unwrap()), first, last)
}

fn render_segments(pdf: &PdfRenderer, a: &Args, segs: &[(PathBuf, u32, u32)]) -> u64 {
    let opts = RenderOptions { size: RenderSize::LongSide(a.long_side), want_text: a.text, ..Default::default() };
    let mut kept = Vec::new();
    let mut n = 0u64;
    for (path, first, last) in segs {
        let stream = pdf.render_stream(path, *first..=*last, &opts).expect("open");
        for page in stream {
            match page {
                Ok(p) => {
                    n += 1;
                    if a.keep {
                        kept.push(p);
                    }
                }
                Err(e) => eprintln!("{e}"),
            }
        }
    }
    drop(kept);
    n
}

fn main() {
    let a = parse();
    let pdf = PdfRenderer::start(1).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    if a.child {
        let segs: Vec<_> = a.files.iter().map(|s| segment(s)).collect();
        let n = render_segments(&pdf, &a, &segs);
        println!("{n} {}", peak_rss_kb());
        return;
    }
    let t0 = Instant::now();
    let files: Vec<(PathBuf, u32)> = a
        .files
        .iter()
        .map(|f| {
            let p = PathBuf::from(f);
            let n = pdf.page_count(&p).expect("page count");
            (p, n)
        })
        .collect();
    let total: u32 = files.iter().map(|f| f.1).sum();
    let (pages, rss_kb) = if a.procs <= 1 {
        let segs: Vec<_> = files.iter().map(|(p, n)| (p.clone(), 1, *n)).collect();
        (render_segments(&pdf, &a, &segs), peak_rss_kb())
    } else {
        // Split the concatenated page list into `procs` contiguous shares.
        let mut shares: Vec<Vec<String>> = vec![vec![]; a.procs];
        let mut g = 0u32; // global page index
        for (p, n) in &files {
            for page in 1..=*n {
                let k = (g as u64 * a.procs as u64 / total as u64) as usize;
                let seg = &mut shares[k];
                let extend = seg.last().map(|s| {
                    let (sp, _, last) = segment(s);
                    sp == *p && last + 1 == page
                });
                if extend == Some(true) {
                    let (sp, first, _) = segment(seg.last().unwrap());
                    *seg.last_mut().unwrap() = format!("{}@{first}@{page}", sp.display());
                } else {
                    seg.push(format!("{}@{page}@{page}", p.display()));
                }
                g += 1;
            }
        }
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = shares
            .iter()
            .map(|segs| {
                let mut c = Command::new(&exe);
                c.arg("--child").arg("--long-side").arg(a.long_side.to_string());
                if a.keep {
                    c.arg("--keep");
                }
                if !a.text {
                    c.arg("--no-text");
                }
                c.args(segs).stdout(Stdio::piped()).spawn().expect("spawn worker")
            })
            .collect();
        let mut pages = 0;
        let mut rss = peak_rss_kb();
        for ch in children {
            let out = ch.wait_with_output().unwrap();
            let s = String::from_utf8_lossy(&out.stdout);
            let mut it = s.split_whitespace();
            pages += it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            rss += it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        (pages, rss)
    };
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "pages={pages} secs={secs:.2} pages_per_s={:.1} peak_rss_mb={:.0} procs={} long_side={} keep={} text={}",
        pages as f64 / secs,
        rss_kb as f64 / 1024.0,
        a.procs.max(1),
        a.long_side,
        a.keep,
        a.text
    );
}
