//! Renders every page of the given PDFs to RGB with quire-render and reports pages/s and
//! peak memory. Used by benches/render/bench.sh (compared there with poppler's pdftoppm).
//!
//!   render_bench [--long-side 1288] [--procs N] [--keep] [--no-text] FILE.pdf...
//!
//! --procs N: PdfRenderer::start_processes(N) (N render worker processes, this binary
//! re-executed, each with its own pdfium: pdfium cannot render in parallel inside one
//! process), fed by N threads taking --pages-per-task (16) page ranges from a shared queue, as
//! the pipeline does. --keep holds every rendered page in memory (as a pipeline with no
//! back-pressure would); by default each page buffer is dropped after rendering. Text
//! extraction is on by default (the pipeline routes on it); --no-text turns it off.
//! Output: one line `pages=… secs=… pages_per_s=… peak_rss_mb=…` (peak RSS summed over this
//! process and its workers).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quire_render::{run_worker_if_requested, PdfRenderer, RenderOptions, RenderSize};

struct Args {
    long_side: u32,
    procs: usize,
    per_task: u32,
    keep: bool,
    text: bool,
    files: Vec<String>,
}

fn parse() -> Args {
    let mut a = Args {
        long_side: 1288,
        procs: 1,
        per_task: 16,
        keep: false,
        text: true,
        files: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(s) = it.next() {
        match s.as_str() {
            "--long-side" => a.long_side = it.next().unwrap().parse().unwrap(),
            "--procs" => a.procs = it.next().unwrap().parse().unwrap(),
            "--pages-per-task" => a.per_task = it.next().unwrap().parse().unwrap(),
            "--keep" => a.keep = true,
            "--no-text" => a.text = false,
            _ => a.files.push(s),
        }
    }
    a
}

/// Peak resident set size, KiB (Linux: VmHWM of /proc/PID/status).
fn peak_rss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// utime + stime of a process, seconds (/proc/PID/stat fields 14 and 15, clock ticks of 1/100 s).
fn cpu_secs(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Peak RSS (KiB) and CPU seconds of this process plus its live children (the render workers).
fn totals() -> (u64, f64) {
    let me = std::process::id().to_string();
    let mut kb = peak_rss_kb("self");
    let mut cpu = cpu_secs("self");
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let ppid = std::fs::read_to_string(format!("/proc/{name}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(1).map(str::to_owned))
                });
            if ppid.as_deref() == Some(me.as_str()) {
                kb += peak_rss_kb(&name);
                cpu += cpu_secs(&name);
            }
        }
    }
    (kb, cpu)
}

fn main() {
    if let Some(code) = run_worker_if_requested() {
        std::process::exit(code);
    }
    let a = parse();
    let started = if a.procs <= 1 {
        PdfRenderer::start(1)
    } else {
        PdfRenderer::start_processes(a.procs, &std::env::current_exe().unwrap(), &[])
    };
    let pdf = started.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for f in &a.files {
        let p = PathBuf::from(f);
        let n = pdf.page_count(&p).expect("page count");
        let mut first = 1;
        while first <= n {
            let last = (first + a.per_task - 1).min(n);
            tasks.push((p.clone(), first, last));
            first = last + 1;
        }
    }
    tasks.reverse();
    let tasks = Arc::new(Mutex::new(tasks));
    let opts = RenderOptions {
        size: RenderSize::LongSide(a.long_side),
        want_text: a.text,
        ..Default::default()
    };
    let keep = a.keep;
    let threads: Vec<_> = (0..a.procs.max(1))
        .map(|_| {
            let (pdf, tasks, opts) = (pdf.clone(), tasks.clone(), opts.clone());
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                let mut n = 0u64;
                loop {
                    let Some((path, first, last)) = tasks.lock().unwrap().pop() else {
                        break;
                    };
                    for page in pdf.render_stream(&path, first..=last, &opts).expect("open") {
                        match page {
                            Ok(p) => {
                                n += 1;
                                if keep {
                                    kept.push(p);
                                }
                            }
                            Err(e) => eprintln!("{e}"),
                        }
                    }
                }
                (n, kept)
            })
        })
        .collect();
    let mut pages = 0;
    let mut kept = Vec::new();
    for t in threads {
        let (n, k) = t.join().unwrap();
        pages += n;
        kept.push(k);
    }
    let secs = t0.elapsed().as_secs_f64();
    let (rss_kb, cpu) = totals();
    drop(kept);
    println!(
        "pages={pages} secs={secs:.2} pages_per_s={:.1} cpu_secs={cpu:.2} pages_per_cpu_s={:.1} peak_rss_mb={:.0} procs={} long_side={} keep={} text={}",
        pages as f64 / secs,
        pages as f64 / cpu.max(1e-9),
        rss_kb as f64 / 1024.0,
        a.procs.max(1),
        a.long_side,
        a.keep,
        a.text
    );
}
