//! PDF pages through pdfium, on one dedicated thread per process.
//!
//! pdfium keeps global state and is not thread-safe, and `pdfium-render` binds the library
//! once per process. So there is exactly one pdfium thread per process, started by the first
//! [`PdfRenderer::start`]; every [`PdfRenderer`] is a cheap handle (a channel sender) to it.

use std::ops::RangeInclusive;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use pdfium_render::prelude::*;

use crate::error::io_error;
use quire_core::{ErrorKind, InputError};
use crate::{check_units, open_checked, InputKind, Limits, Page, RenderOptions};

/// Environment variable naming libpdfium (the file, or the folder holding it).
pub const PDFIUM_ENV: &str = "QUIRE_PDFIUM";

const SETUP_HINT: &str = "install it with `scripts/setup-pdfium.sh [DEST_DIR]` (puts libpdfium next to the quire binary by default) or point QUIRE_PDFIUM at the .so or its folder";

/// Where libpdfium will be loaded from: `Ok(Some(file))` from `$QUIRE_PDFIUM` or the folder of
/// the running executable, `Ok(None)` when neither has it (the system library path is tried
/// next), `Err` when `$QUIRE_PDFIUM` is set but names nothing usable.
pub fn find_pdfium() -> Result<Option<PathBuf>, InputError> {
    let name = Pdfium::pdfium_platform_library_name();
    if let Some(v) = std::env::var_os(PDFIUM_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        let file = if p.is_dir() { p.join(&name) } else { p.clone() };
        if file.is_file() {
            return Ok(Some(file));
        }
        return Err(InputError::new(
            ErrorKind::PdfiumMissing,
            format!(
                "{PDFIUM_ENV}={} but {} does not exist; {SETUP_HINT}",
                p.display(),
                file.display()
            ),
        ));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let file = dir.join(&name);
        if file.is_file() {
            return Ok(Some(file));
        }
    }
    Ok(None)
}

pub(crate) type Reply<T> = SyncSender<Result<T, InputError>>;

pub(crate) enum Job {
    PageCount {
        path: PathBuf,
        reply: Reply<u32>,
    },
    Render {
        path: PathBuf,
        pages: RangeInclusive<u32>,
        opts: RenderOptions,
        reply: SyncSender<Msg>,
    },
}

pub(crate) enum Msg {
    Opened(Result<u32, InputError>),
    Page(Result<Page, InputError>),
}

/// Handle to this process's pdfium thread. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct PdfRenderer {
    pub(crate) tx: Sender<Job>,
}

static WORKER: Mutex<Option<Sender<Job>>> = Mutex::new(None);

impl PdfRenderer {
    /// Finds and loads libpdfium (see [`find_pdfium`]) and starts the pdfium thread, or returns
    /// a handle to the one already running. A missing library gives one
    /// [`ErrorKind::PdfiumMissing`] error that names the setup script.
    ///
    /// `threads`: pdfium cannot render in parallel inside one process, so all handles share
    /// one thread and values above 1 are treated as 1. For parallel rendering use
    /// [`PdfRenderer::start_processes`].
    pub fn start(threads: usize) -> Result<PdfRenderer, InputError> {
        if threads > 1 {
            tracing::debug!(threads, "pdfium renders on one thread per process; using 1");
        }
        let mut slot = WORKER.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = slot.as_ref() {
            return Ok(PdfRenderer { tx: tx.clone() });
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), InputError>>(1);
        std::thread::Builder::new()
            .name("quire-pdfium".into())
            .spawn(move || worker_main(rx, ready_tx))
            .map_err(|e| {
                InputError::new(
                    ErrorKind::Io,
                    format!("cannot start the pdfium thread: {e}"),
                )
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(InputError::new(
                    ErrorKind::PdfiumMissing,
                    "the pdfium thread died while loading libpdfium",
                ))
            }
        }
        *slot = Some(tx.clone());
        Ok(PdfRenderer { tx })
    }

    /// Number of pages of the PDF at `path`.
    pub fn page_count(&self, path: &Path) -> Result<u32, InputError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Job::PageCount {
            path: path.to_path_buf(),
            reply,
        })?;
        rx.recv().unwrap_or_else(|_| Err(worker_gone()))
    }

    /// Renders `pages` (1-based, inclusive) of the PDF at `path`. The outer error is about the
    /// document (cannot open, encrypted, too many pages, range outside it); each page then
    /// succeeds or fails on its own. Holds all pages in memory: see [`Self::render_stream`].
    pub fn render(
        &self,
        path: &Path,
        pages: RangeInclusive<u32>,
        opts: &RenderOptions,
    ) -> Result<Vec<Result<Page, InputError>>, InputError> {
        Ok(self.render_stream(path, pages, opts)?.collect())
    }

    /// Like [`Self::render`], but hands pages over one at a time while the pdfium thread renders
    /// ahead by at most two pages (bounded memory, overlap with the consumer). Dropping the
    /// stream stops the rendering. The pdfium thread serves one request at a time: do not keep
    /// an unconsumed stream around while waiting on another call to the same renderer from the
    /// same thread.
    pub fn render_stream(
        &self,
        path: &Path,
        pages: RangeInclusive<u32>,
        opts: &RenderOptions,
    ) -> Result<PageStream, InputError> {
        let (reply, rx) = mpsc::sync_channel(2);
        self.send(Job::Render {
            path: path.to_path_buf(),
            pages: pages.clone(),
            opts: opts.clone(),
            reply,
        })?;
        match rx.recv() {
            Ok(Msg::Opened(Ok(page_count))) => Ok(PageStream {
                rx,
                page_count,
                next: *pages.start(),
                last: *pages.end(),
            }),
            Ok(Msg::Opened(Err(e))) => Err(e),
            Ok(Msg::Page(_)) | Err(_) => Err(worker_gone()),
        }
    }

    fn send(&self, job: Job) -> Result<(), InputError> {
        self.tx.send(job).map_err(|_| worker_gone())
    }
}

/// Pages of one [`PdfRenderer::render_stream`] call, in order.
pub struct PageStream {
    rx: Receiver<Msg>,
    page_count: u32,
    next: u32,
    last: u32,
}

impl PageStream {
    /// Pages in the whole document.
    pub fn page_count(&self) -> u32 {
        self.page_count
    }
}

impl Iterator for PageStream {
    type Item = Result<Page, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next > self.last {
            return None;
        }
        self.next += 1;
        Some(match self.rx.recv() {
            Ok(Msg::Page(r)) => r,
            _ => Err(worker_gone()),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.last + 1).saturating_sub(self.next) as usize;
        (n, Some(n))
    }
}

pub(crate) fn worker_gone() -> InputError {
    InputError::new(ErrorKind::Io, "the pdfium thread has stopped")
}

/// Finds and binds libpdfium (once per process) and initialises it.
pub(crate) fn load_pdfium() -> Result<Pdfium, InputError> {
    let lib = find_pdfium()?;
    let bindings = match &lib {
        Some(path) => Pdfium::bind_to_library(path).map_err(|e| {
            InputError::new(
                ErrorKind::PdfiumMissing,
                format!("cannot load libpdfium from {}: {e:?}; {SETUP_HINT}", path.display()),
            )
        }),
        None => Pdfium::bind_to_system_library().map_err(|e| {
            InputError::new(
                ErrorKind::PdfiumMissing,
                format!(
                    "libpdfium not found (not in ${PDFIUM_ENV}, not next to {}, not on the system library path: {e:?}); {SETUP_HINT}",
                    std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default()
                ),
            )
        }),
    }?;
    tracing::debug!(library = ?lib, "pdfium loaded");
    Ok(Pdfium::new(bindings))
}

fn worker_main(rx: Receiver<Job>, ready: SyncSender<Result<(), InputError>>) {
    let pdfium = match load_pdfium() {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);

    while let Ok(job) = rx.recv() {
        match job {
            Job::PageCount { path, reply } => {
                let _ = reply.send(count_job(&pdfium, &path));
            }
            Job::Render {
                path,
                pages,
                opts,
                reply,
            } => {
                render_job(&pdfium, &path, pages, &opts, &mut |m| reply.send(m).is_ok());
            }
        }
    }
}

pub(crate) fn count_job(pdfium: &Pdfium, path: &Path) -> Result<u32, InputError> {
    catch_unwind(AssertUnwindSafe(|| page_count(pdfium, path)))
        .unwrap_or_else(|p| Err(panicked(path, p)))
}

pub(crate) fn panicked(path: &Path, p: Box<dyn std::any::Any + Send>) -> InputError {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    InputError::new(
        ErrorKind::Corrupt,
        format!("{}: renderer panicked: {what}", path.display()),
    )
}

fn open<'a>(
    pdfium: &'a Pdfium,
    path: &Path,
    limits: &Limits,
) -> Result<PdfDocument<'a>, InputError> {
    let (kind, _) = open_checked(path, limits)?;
    if kind != InputKind::Pdf {
        return Err(InputError::new(
            ErrorKind::Unsupported,
            format!(
                "{}: a {} image, not a PDF (use decode_image)",
                path.display(),
                kind.as_str()
            ),
        ));
    }
    pdfium
        .load_pdf_from_file(path, None)
        .map_err(|e| open_error(path, e))
}

fn open_error(path: &Path, e: PdfiumError) -> InputError {
    use PdfiumInternalError as I;
    let p = path.display();
    match e {
        PdfiumError::PdfiumLibraryInternalError(I::PasswordError) => InputError::new(
            ErrorKind::Encrypted,
            format!("{p}: the PDF needs a password to open"),
        ),
        PdfiumError::PdfiumLibraryInternalError(I::SecurityError) => InputError::new(
            ErrorKind::Encrypted,
            format!("{p}: the PDF uses an unsupported security handler"),
        ),
        PdfiumError::PdfiumLibraryInternalError(I::FileError) => {
            InputError::new(ErrorKind::Io, format!("{p}: pdfium cannot read the file"))
        }
        PdfiumError::IoError(e) => io_error(path, "cannot read", e),
        other => {
            if looks_truncated(path) {
                InputError::new(
                    ErrorKind::Truncated,
                    format!("{p}: the PDF cannot be parsed and has no %%EOF near its end (truncated download?)"),
                )
            } else {
                InputError::new(
                    ErrorKind::Corrupt,
                    format!("{p}: the PDF cannot be parsed ({other:?})"),
                )
            }
        }
    }
}

/// A PDF ends with `%%EOF` (maybe followed by a little whitespace or junk); a file cut short
/// loses it. Only consulted when pdfium has already refused the file.
fn looks_truncated(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(1024))).is_err()
        || f.read_to_end(&mut tail).is_err()
    {
        return false;
    }
    !tail.windows(5).any(|w| w == b"%%EOF")
}

fn page_count(pdfium: &Pdfium, path: &Path) -> Result<u32, InputError> {
    // Page counting happens at planning time with the caller's own limits; only the
    // file-size/sniff part of the default limits would apply here, so use no size limit.
    let limits = Limits {
        max_file_bytes: u64::MAX,
        ..Limits::default()
    };
    let doc = open(pdfium, path, &limits)?;
    Ok(doc.pages().len().max(0) as u32)
}

/// Opens the document, reports `Opened`, then one `Page` per page, each to `sink`; stops early
/// when `sink` returns false (the consumer went away). Never panics.
pub(crate) fn render_job(
    pdfium: &Pdfium,
    path: &Path,
    pages: RangeInclusive<u32>,
    opts: &RenderOptions,
    sink: &mut dyn FnMut(Msg) -> bool,
) {
    let mut sent_open = false;
    let r = catch_unwind(AssertUnwindSafe(|| {
        render_pages(pdfium, path, pages, opts, sink, &mut sent_open)
    }));
    if let Err(p) = r {
        let e = panicked(path, p);
        let _ = sink(if sent_open {
            Msg::Page(Err(e))
        } else {
            Msg::Opened(Err(e))
        });
    }
}

fn render_pages(
    pdfium: &Pdfium,
    path: &Path,
    pages: RangeInclusive<u32>,
    opts: &RenderOptions,
    sink: &mut dyn FnMut(Msg) -> bool,
    sent_open: &mut bool,
) {
    let opened = open(pdfium, path, &opts.limits).and_then(|doc| {
        let n = doc.pages().len().max(0) as u32;
        if n == 0 {
            return Err(InputError::new(
                ErrorKind::Empty,
                format!("{}: the PDF has no pages", path.display()),
            ));
        }
        if n > opts.limits.max_pages {
            return Err(InputError::new(
                ErrorKind::TooManyPages,
                format!(
                    "{}: {n} pages, more than the limit of {}",
                    path.display(),
                    opts.limits.max_pages
                ),
            ));
        }
        check_units(path, "pages", n, &pages)?;
        Ok((doc, n))
    });
    let doc = match opened {
        Ok((doc, n)) => {
            *sent_open = true;
            if !sink(Msg::Opened(Ok(n))) {
                return;
            }
            doc
        }
        Err(e) => {
            *sent_open = true;
            sink(Msg::Opened(Err(e)));
            return;
        }
    };
    for n in pages {
        let r = catch_unwind(AssertUnwindSafe(|| render_page(&doc, path, n, opts)))
            .unwrap_or_else(|p| Err(panicked(path, p)));
        if !sink(Msg::Page(r)) {
            return; // consumer dropped the stream
        }
    }
}

fn render_page(
    doc: &PdfDocument,
    path: &Path,
    n: u32,
    opts: &RenderOptions,
) -> Result<Page, InputError> {
    let t0 = Instant::now();
    let page_err = |what: String| {
        InputError::new(
            ErrorKind::Corrupt,
            format!("{} page {n}: {what}", path.display()),
        )
    };
    let page = doc
        .pages()
        .get((n - 1) as PdfPageIndex)
        .map_err(|e| page_err(format!("cannot load the page ({e:?})")))?;
    // Width/height as displayed, i.e. after /Rotate.
    let (w_pt, h_pt) = (page.width().value, page.height().value);
    if !(w_pt.is_finite() && h_pt.is_finite() && w_pt > 0.0 && h_pt > 0.0) {
        return Err(page_err(format!("page box is {w_pt} x {h_pt} pt")));
    }
    let (w, h) = opts.size.pixels_for(w_pt, h_pt);
    let px = w.saturating_mul(h);
    // pdfium addresses bitmaps with i32 strides: keep 3*w and the buffer well inside that.
    if px > opts.limits.max_pixels
        || w > (i32::MAX / 4) as u64
        || h > (i32::MAX / 4) as u64
        || px > (isize::MAX / 4) as u64
    {
        return Err(InputError::new(
            ErrorKind::TooManyPixels,
            format!(
                "{} page {n}: {w} x {h} px ({w_pt} x {h_pt} pt at {:?}) is more than the limit of {} pixels",
                path.display(),
                opts.size,
                opts.limits.max_pixels
            ),
        ));
    }
    let (w, h) = (w as u32, h as u32);
    let image = if opts.want_image {
        Some(rasterise(&page, w, h).map_err(|e| page_err(format!("cannot render ({e:?})")))?)
    } else {
        None
    };
    let text = if opts.want_text {
        Some(normalise_text(&page_text(&page)))
    } else {
        None
    };
    Ok(Page {
        page: n,
        image,
        alpha: None,
        width: w,
        height: h,
        text,
        render_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// Renders into a 24-bit bitmap that wraps our own buffer (no copy out of pdfium), white
/// background, annotations and form fields drawn as a viewer shows them, anti-aliased.
fn rasterise(page: &PdfPage, w: u32, h: u32) -> Result<image::RgbImage, PdfiumError> {
    let row = w as usize * 3;
    let stride = row.div_ceil(4) * 4; // pdfium's pitch for 24-bit bitmaps
    let mut buf = vec![0u8; stride * h as usize];
    {
        let mut bitmap =
            PdfBitmap::from_bytes(w as Pixels, h as Pixels, PdfBitmapFormat::BGR, &mut buf)?;
        // Defaults: clear to white, render annotations + form data, and
        // FPDF_REVERSE_BYTE_ORDER so the 24-bit pixels come out as R,G,B.
        let config = PdfRenderConfig::new()
            .set_fixed_size(w as Pixels, h as Pixels)
            .set_format(PdfBitmapFormat::BGR);
        page.render_into_bitmap_with_config(&mut bitmap, &config)?;
    }
    if stride != row {
        for y in 1..h as usize {
            buf.copy_within(y * stride..y * stride + row, y * row);
        }
        buf.truncate(row * h as usize);
    }
    Ok(image::RgbImage::from_raw(w, h, buf).expect("buffer sized for w*h*3"))
}

/// All characters of the page in pdfium's text order (FPDFText_GetText, not a bounded query:
/// that one would miss text outside a (0,0)-based box on rotated or offset pages).
fn page_text(page: &PdfPage) -> String {
    let b = page.bindings();
    let handle = b.get_handle_from_page(page);
    unsafe {
        let tp = b.FPDFText_LoadPage(handle);
        if tp.is_null() {
            return String::new();
        }
        let count = b.FPDFText_CountChars(tp);
        let mut out = String::new();
        if count > 0 {
            let mut buf = vec![0u16; count as usize + 1];
            let written = b.FPDFText_GetText(tp, 0, count, buf.as_mut_ptr());
            let len = (written.max(1) as usize - 1).min(count as usize);
            out = String::from_utf16_lossy(&buf[..len]);
        }
        b.FPDFText_ClosePage(tp);
        out
    }
}

/// `\r\n`/`\r` to `\n`, pdfium's soft-hyphen marker (U+0002) to `-`, NULs and U+FFFE dropped,
/// trailing spaces on each line and trailing blank lines removed.
pub(crate) fn normalise_text(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(s.len());
    for line in s.split('\n') {
        for c in line.trim_end().chars() {
            match c {
                '\u{2}' => out.push('-'),
                '\0' | '\u{FFFE}' | '\u{FEFF}' => {}
                c => out.push(c),
            }
        }
        out.push('\n');
    }
    let end = out.trim_end().len();
    out.truncate(end);
    out
}

#[cfg(test)]
mod tests {
    use super::normalise_text;

    #[test]
    fn text_normalised() {
        assert_eq!(
            normalise_text("a  \r\nb\rc\u{2}\r\nd \r\n\r\n"),
            "a\nb\nc-\nd"
        );
        assert_eq!(normalise_text(""), "");
    }
}
