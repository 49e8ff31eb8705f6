//! The `quire` command line.

mod cli;
mod distributed;
mod doctags;
mod jobname;
mod model;
mod run;

use clap::Parser;

/// Exit codes, documented in `--help` and the README.
pub mod exit {
    /// Everything went through.
    pub const OK: u8 = 0;
    /// quire itself failed (a bug, or the output could not be written).
    pub const INTERNAL: u8 = 1;
    /// Bad command line or setup (missing libpdfium, unreadable model, missing input).
    pub const USAGE: u8 = 2;
    /// The job finished but some inputs or pages failed (see the manifest).
    pub const SOME_FAILED: u8 = 3;
}

/// Render worker processes for PDF pages (see [`start_renderer`]).
static RENDER_PROCS: std::sync::OnceLock<(usize, Option<std::time::Duration>)> = std::sync::OnceLock::new();

/// pdfium for the pages this process renders: `--render-procs` worker
/// processes (this executable started again), so that pages render in
/// parallel, a PDF that crashes pdfium costs one page, not the job, and a
/// page that takes longer than `--page-timeout-s` is cut short. With 0,
/// pdfium runs on a thread of this process.
pub fn start_renderer() -> Result<quire_render::PdfRenderer, quire_core::InputError> {
    let (n, timeout) = *RENDER_PROCS.get().unwrap_or(&(0, None));
    if n == 0 {
        return quire_render::PdfRenderer::start(1);
    }
    let exe = std::env::current_exe()
        .map_err(|e| quire_core::InputError::new(quire_core::ErrorKind::Io, format!("cannot find the quire executable: {e}")))?;
    quire_render::PdfRenderer::start_processes_with(n, &exe, &[], timeout)
}

/// `{date}` and `{time}` in the job name of any subcommand (see [`jobname`]).
fn expand_job_name(cli: &mut cli::Cli) -> Result<(), String> {
    let job = match &mut cli.command {
        cli::Command::Run(a) => &mut a.opts.job,
        cli::Command::Coordinator(a) => &mut a.opts.job,
        cli::Command::Status(a) => &mut a.job,
        // The worker has no job of its own (and other subcommands no job name).
        #[allow(unreachable_patterns)]
        _ => return Ok(()),
    };
    let at = jobname::job_clock(cli.job_time.as_deref())?;
    *job = jobname::expand_job_name(job, at)?;
    let runs = match &mut cli.command {
        cli::Command::Run(a) => Some(&mut a.runs),
        cli::Command::Coordinator(a) => Some(&mut a.runs),
        #[allow(unreachable_patterns)]
        _ => None,
    };
    if let Some(r) = runs {
        r.run = jobname::expand_job_name(&r.run, at).map_err(|e| e.replacen("--job", "--run", 1))?;
    }
    Ok(())
}

/// Fixes glibc's mmap threshold at 256 KiB. Archive members and decoded images (a MiB or so
/// each) are then mapped and handed back to the system when freed. By default glibc raises the
/// threshold after the first such buffer is freed; later ones then come from the heaps of the
/// threads that decode them, which fragment, and a long archive run grows (measured: 153 MiB
/// peak over a 0.2 GB shard, 203 MiB over a 2 GB one; 161 and 166 MiB with the fixed
/// threshold). Loading a model on the CPU raises it again for the model's large buffers
/// (`quire_vlm::tune_allocator`). A no-op on other C libraries.
fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only adjusts an allocator tunable, before any heavy allocation.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 10);
        }
    }
}

fn main() -> std::process::ExitCode {
    // A render worker process started by `start_renderer` does only that.
    if let Some(code) = quire_render::run_worker_if_requested() {
        std::process::exit(code);
    }
    bound_allocator();
    let mut cli = cli::Cli::parse();
    if let Err(m) = expand_job_name(&mut cli) {
        eprintln!("error: {m}");
        return std::process::ExitCode::from(exit::USAGE);
    }
    let timeout = (cli.page_timeout_s > 0).then(|| std::time::Duration::from_secs(cli.page_timeout_s));
    let _ = RENDER_PROCS.set((cli.render_procs.map(|n| n as usize).unwrap_or_else(|| {
        std::thread::available_parallelism().map(|n| n.get().min(4)).unwrap_or(1)
    }), timeout));
    let filter = match cli.verbose {
        0 => "quire=info,quire_pipeline=info,warn",
        1 => "quire=debug,quire_pipeline=debug,info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("QUIRE_LOG").unwrap_or_else(|_| filter.into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let code = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Coordinator(args) => distributed::coordinator(args),
        cli::Command::Worker(args) => distributed::worker(args),
        cli::Command::Status(args) => distributed::status(args),
        cli::Command::Check(args) => distributed::check(args),
        cli::Command::Doctags(args) => doctags::run(args),
    };
    std::process::ExitCode::from(code)
}
