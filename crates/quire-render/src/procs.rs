//! pdfium in worker processes: real parallelism (pdfium cannot render two pages at once in
//! one process) and crash isolation (a PDF that crashes pdfium takes down one worker, which is
//! restarted, not the pipeline).
//!
//! The worker is the caller's own executable started again with `QUIRE_RENDER_WORKER=1`; its
//! `main` must call [`run_worker_if_requested`] first thing. Requests and replies travel over
//! the worker's stdin/stdout: one JSON line per message, a reply page followed by its raw RGB
//! bytes.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use quire_core::{ErrorKind, InputError};
use crate::pdf::{count_job, load_pdfium, render_job, Job, Msg, PdfRenderer};
use crate::{Page, RenderOptions};

/// Set (to `1`) in the environment of render worker processes.
pub const WORKER_ENV: &str = "QUIRE_RENDER_WORKER";
const GREETING: &str = r#"{"t":"hello""#;
const GREETING_WAIT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Count {
        path: PathBuf,
    },
    Render {
        path: PathBuf,
        first: u32,
        last: u32,
        opts: RenderOptions,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Reply {
    Hello {
        ok: Option<InputError>,
    },
    Count {
        r: Result<u32, InputError>,
    },
    Opened {
        r: Result<u32, InputError>,
    },
    /// Followed by `image_bytes` raw RGB bytes (0 without an image).
    Page {
        r: Result<PageHead, InputError>,
    },
}

#[derive(Serialize, Deserialize)]
struct PageHead {
    page: u32,
    width: u32,
    height: u32,
    text: Option<String>,
    render_ms: f64,
    image_bytes: u64,
}

/// In a render worker process (`QUIRE_RENDER_WORKER=1`), serves requests on stdin/stdout until
/// stdin closes and returns the exit code; returns `None` in any other process. Call it first
/// thing in `main`: `if let Some(code) = quire_render::run_worker_if_requested() { std::process::exit(code) }`.
pub fn run_worker_if_requested() -> Option<i32> {
    if std::env::var_os(WORKER_ENV).is_none_or(|v| v != "1") {
        return None;
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let pdfium = match load_pdfium() {
        Ok(p) => p,
        Err(e) => {
            let _ = write_reply(&mut out, &Reply::Hello { ok: Some(e) }, None);
            return Some(3);
        }
    };
    if write_reply(&mut out, &Reply::Hello { ok: None }, None).is_err() {
        return Some(1);
    }
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { return Some(1) };
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("quire render worker: bad request: {e}");
                return Some(2);
            }
        };
        let ok = match req {
            Request::Count { path } => write_reply(
                &mut out,
                &Reply::Count {
                    r: count_job(&pdfium, &path),
                },
                None,
            )
            .is_ok(),
            Request::Render {
                path,
                first,
                last,
                opts,
            } => {
                let mut ok = true;
                render_job(&pdfium, &path, first..=last, &opts, &mut |m| {
                    ok = match m {
                        Msg::Opened(r) => write_reply(&mut out, &Reply::Opened { r }, None).is_ok(),
                        Msg::Page(Err(e)) => {
                            write_reply(&mut out, &Reply::Page { r: Err(e) }, None).is_ok()
                        }
                        Msg::Page(Ok(p)) => {
                            let head = PageHead {
                                page: p.page,
                                width: p.width,
                                height: p.height,
                                text: p.text,
                                render_ms: p.render_ms,
                                image_bytes: p
                                    .image
                                    .as_ref()
                                    .map_or(0, |i| i.as_raw().len() as u64),
                            };
                            write_reply(
                                &mut out,
                                &Reply::Page { r: Ok(head) },
                                p.image.as_ref().map(|i| i.as_raw().as_slice()),
                            )
                            .is_ok()
                        }
                    };
                    ok
                });
                ok
            }
        };
        if !ok {
            return Some(1); // parent went away
        }
    }
    Some(0)
}

fn write_reply(out: &mut impl Write, r: &Reply, bytes: Option<&[u8]>) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, r)?;
    out.write_all(b"\n")?;
    if let Some(b) = bytes {
        out.write_all(b)?;
    }
    out.flush()
}

struct Worker {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    /// Replies as a reader thread reads them off the worker's stdout (so that waiting for one
    /// can time out).
    replies: Receiver<std::io::Result<(Reply, Vec<u8>)>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Spawner {
    exe: PathBuf,
    args: Vec<OsString>,
    /// Longest wait for one page (or for opening a document, or counting its pages).
    page_timeout: Option<Duration>,
}

/// How long a render process may take over one page before it is stopped and replaced, unless
/// [`PdfRenderer::start_processes_with`] says otherwise.
pub const DEFAULT_PAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Failed pages after which a request gives up on the rest of its pages (each failure costs a
/// new render process).
const MAX_RESTARTS_PER_REQUEST: u32 = 3;

impl Spawner {
    fn spawn(&self) -> Result<Worker, InputError> {
        let mut child = Command::new(&self.exe)
            .args(&self.args)
            .env(WORKER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                InputError::new(
                    ErrorKind::Io,
                    format!("cannot start render worker {}: {e}", self.exe.display()),
                )
            })?;
        let stdin = BufWriter::new(child.stdin.take().expect("piped"));
        let stdout = BufReader::with_capacity(1 << 20, child.stdout.take().expect("piped"));
        // Wait for the greeting, skipping whatever the executable prints first (a test harness
        // prints "test NAME ... " on the same line), at most GREETING_WAIT.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = stdout;
            let mut line = String::new();
            let mut hello = None;
            for _ in 0..64 {
                line.clear();
                if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(i) = line.find(GREETING) {
                    hello = serde_json::from_str::<Reply>(line[i..].trim_end()).ok();
                    break;
                }
            }
            let _ = tx.send((hello, stdout));
        });
        match rx.recv_timeout(GREETING_WAIT) {
            Ok((Some(Reply::Hello { ok: None }), mut stdout)) => {
                let (tx, replies) = mpsc::sync_channel(1);
                std::thread::spawn(move || loop {
                    let r = read_reply_from(&mut stdout);
                    let end = r.is_err();
                    if tx.send(r).is_err() || end {
                        return;
                    }
                });
                return Ok(Worker {
                    child,
                    stdin,
                    replies,
                });
            }
            Ok((Some(Reply::Hello { ok: Some(e) }), _)) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            _ => {}
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(InputError::new(
            ErrorKind::PdfiumMissing,
            format!(
                "{} did not start as a render worker (no greeting on stdout within {GREETING_WAIT:?}): its main must call quire_render::run_worker_if_requested()",
                self.exe.display()
            ),
        ))
    }
}

impl PdfRenderer {
    /// Starts `n` render worker processes (`exe` with `args`, plus `QUIRE_RENDER_WORKER=1`),
    /// each with its own pdfium, and returns a handle that spreads requests over them (a
    /// request goes to the next free worker). Same API and semantics as the in-process
    /// renderer; in addition a worker that dies on a page (a PDF that crashes pdfium) fails
    /// that page with [`ErrorKind::Corrupt`], and one that takes longer than
    /// [`DEFAULT_PAGE_TIMEOUT`] fails it with [`ErrorKind::Timeout`]; either way the worker is
    /// replaced and the request goes on with the next page (after a few such pages the rest of
    /// the request fails). `exe` is usually `std::env::current_exe()`; its `main` must call
    /// [`run_worker_if_requested`].
    pub fn start_processes(
        n: usize,
        exe: &Path,
        args: &[OsString],
    ) -> Result<PdfRenderer, InputError> {
        Self::start_processes_with(n, exe, args, Some(DEFAULT_PAGE_TIMEOUT))
    }

    /// [`Self::start_processes`] with another page time limit (`None`: wait for ever).
    pub fn start_processes_with(
        n: usize,
        exe: &Path,
        args: &[OsString],
        page_timeout: Option<Duration>,
    ) -> Result<PdfRenderer, InputError> {
        let spawner = Arc::new(Spawner {
            exe: exe.to_path_buf(),
            args: args.to_vec(),
            page_timeout,
        });
        // Start them all now, so a broken setup fails here and not on the first document.
        let mut workers = Vec::new();
        for _ in 0..n.max(1) {
            workers.push(spawner.spawn()?);
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for (i, w) in workers.into_iter().enumerate() {
            let (rx, spawner) = (rx.clone(), spawner.clone());
            std::thread::Builder::new()
                .name(format!("quire-render-proc-{i}"))
                .spawn(move || dispatch(rx, spawner, Some(w)))
                .map_err(|e| {
                    InputError::new(
                        ErrorKind::Io,
                        format!("cannot start a dispatcher thread: {e}"),
                    )
                })?;
        }
        Ok(PdfRenderer { tx })
    }
}

fn dispatch(rx: Arc<Mutex<Receiver<Job>>>, spawner: Arc<Spawner>, mut worker: Option<Worker>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // every PdfRenderer handle is gone
            }
        };
        if worker.is_none() {
            match spawner.spawn() {
                Ok(w) => worker = Some(w),
                Err(e) => {
                    fail_job(job, e);
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
        }
        let w = worker.as_mut().expect("just spawned");
        if !serve(w, &spawner, job) {
            worker = None; // died or abandoned mid-request: restart on the next one
        }
    }
}

fn fail_job(job: Job, e: InputError) {
    match job {
        Job::PageCount { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Job::Render { reply, .. } => {
            let _ = reply.send(Msg::Opened(Err(e)));
        }
    }
}

fn crashed(path: &Path, what: &str) -> InputError {
    InputError::new(
        ErrorKind::Corrupt,
        format!(
            "{}: the render worker died {what} (pdfium crashed on this file?)",
            path.display()
        ),
    )
}

/// The error for a worker that failed while `what` (crashed, or was stopped after the limit).
fn failed(path: &Path, what: &str, e: &std::io::Error, limit: Option<Duration>) -> InputError {
    if e.kind() == std::io::ErrorKind::TimedOut {
        InputError::new(
            ErrorKind::Timeout,
            format!(
                "{}: pdfium took longer than {:?} {what}; its render worker was stopped",
                path.display(),
                limit.unwrap_or_default()
            ),
        )
    } else {
        crashed(path, what)
    }
}

/// Runs one job on `w`; false when the worker must be replaced. A worker that fails on a page
/// is replaced here and the rest of the pages go to the new one.
fn serve(w: &mut Worker, spawner: &Spawner, job: Job) -> bool {
    let limit = spawner.page_timeout;
    match job {
        Job::PageCount { path, reply } => {
            let sent = send_request(w, &Request::Count { path: path.clone() });
            match sent.and_then(|_| read_reply(w, limit)) {
                Ok((Reply::Count { r }, _)) => {
                    let _ = reply.send(r);
                    true
                }
                Ok(_) => {
                    let _ = reply.send(Err(crashed(&path, "while counting pages")));
                    false
                }
                Err(e) => {
                    let _ = reply.send(Err(failed(&path, "while counting pages", &e, limit)));
                    false
                }
            }
        }
        Job::Render {
            path,
            pages,
            opts,
            reply,
        } => {
            let (first, last) = (*pages.start(), *pages.end());
            let request = |first| Request::Render {
                path: path.clone(),
                first,
                last,
                opts: opts.clone(),
            };
            let sent = send_request(w, &request(first));
            match sent.and_then(|_| read_reply(w, limit)) {
                Ok((Reply::Opened { r }, _)) => {
                    let opened = r.is_ok();
                    if reply.send(Msg::Opened(r)).is_err() {
                        return !opened; // consumer gone; the worker would still be rendering
                    }
                    if !opened {
                        return true;
                    }
                }
                Ok(_) => {
                    let _ = reply.send(Msg::Opened(Err(crashed(&path, "while opening"))));
                    return false;
                }
                Err(e) => {
                    let _ = reply.send(Msg::Opened(Err(failed(&path, "while opening", &e, limit))));
                    return false;
                }
            }
            let mut restarts = 0;
            let mut n = first;
            while n <= last {
                let msg = match read_reply(w, limit) {
                    Ok((Reply::Page { r: Ok(h) }, bytes)) => {
                        let image = if h.image_bytes > 0 {
                            image::RgbImage::from_raw(h.width, h.height, bytes)
                        } else {
                            None
                        };
                        Msg::Page(Ok(Page {
                            page: h.page,
                            image,
                            alpha: None,
                            width: h.width,
                            height: h.height,
                            text: h.text,
                            render_ms: h.render_ms,
                        }))
                    }
                    Ok((Reply::Page { r: Err(e) }, _)) => Msg::Page(Err(e)),
                    other => {
                        let what = format!("on page {n}");
                        let e = match other {
                            Err(e) => failed(&path, &what, &e, limit),
                            Ok(_) => crashed(&path, &what),
                        };
                        tracing::warn!("{e}");
                        if reply.send(Msg::Page(Err(e))).is_err() || n == last {
                            return false;
                        }
                        // The rest of the pages go to a new worker; after a few failures the
                        // stream reports the remaining pages as failed (sender dropped).
                        restarts += 1;
                        if restarts >= MAX_RESTARTS_PER_REQUEST {
                            return false;
                        }
                        let Ok(fresh) = spawner.spawn() else { return false };
                        *w = fresh;
                        n += 1;
                        let sent = send_request(w, &request(n));
                        if !matches!(sent.and_then(|_| read_reply(w, limit)), Ok((Reply::Opened { r: Ok(_) }, _))) {
                            return false;
                        }
                        continue;
                    }
                };
                if reply.send(msg).is_err() {
                    return n == last; // abandoned mid-way: kill rather than drain
                }
                n += 1;
            }
            true
        }
    }
}

fn send_request(w: &mut Worker, r: &Request) -> std::io::Result<()> {
    serde_json::to_writer(&mut w.stdin, r)?;
    w.stdin.write_all(b"\n")?;
    w.stdin.flush()
}

/// The next reply of `w`, waiting at most `limit` (then an error of kind `TimedOut`).
fn read_reply(w: &mut Worker, limit: Option<Duration>) -> std::io::Result<(Reply, Vec<u8>)> {
    let got = match limit {
        Some(d) => w.replies.recv_timeout(d),
        None => w.replies.recv().map_err(|_| RecvTimeoutError::Disconnected),
    };
    match got {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => Err(std::io::ErrorKind::TimedOut.into()),
        Err(RecvTimeoutError::Disconnected) => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

fn read_reply_from(stdout: &mut BufReader<ChildStdout>) -> std::io::Result<(Reply, Vec<u8>)> {
    let mut line = String::new();
    if stdout.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let r: Reply = serde_json::from_str(line.trim_end()).map_err(std::io::Error::other)?;
    let mut bytes = Vec::new();
    if let Reply::Page { r: Ok(h) } = &r {
        if h.image_bytes > 0 {
            bytes = vec![0u8; h.image_bytes as usize];
            stdout.read_exact(&mut bytes)?;
        }
    }
    Ok((r, bytes))
}
