//! Job settings and the task a worker receives.

use serde::{Deserialize, Serialize};

/// What the user wants out of each page or image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Transcribe the page's text (scanned documents).
    Ocr,
    /// Describe the image.
    Caption,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Ocr => "ocr",
            TaskKind::Caption => "caption",
        }
    }
}

/// Which engine turns a page into text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// The PDF's own text layer when it is usable, the VLM otherwise.
    Auto,
    /// Always the vision-language model.
    Vlm,
    /// Only the PDF's text layer (no model needed).
    TextLayer,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Vlm => "vlm",
            Engine::TextLayer => "text-layer",
        }
    }
}

/// Input limits, checked before the expensive work.
///
/// Defaults (see [`Limits::default`]) are chosen so a legitimate document passes and a hostile
/// one costs bounded memory:
/// * `max_file_bytes` 512 MiB: larger than nearly any real PDF or scan; the file is never read
///   whole into memory by pdfium (it seeks), but images are decoded whole.
/// * `max_pages` 2000: more than a long book; larger "documents" are usually concatenated
///   dumps that are better split upstream. Also caps TIFF frames.
/// * `max_pixels` 50 Mpx per image/page: an A4 or US-Letter scan at 600 dpi is ~35 Mpx and an
///   A3 scan at 400 dpi ~31 Mpx; the decode buffer stays below 200 MB (RGBA8) / 400 MB (RGBA16).
///   Rendered PDF pages are normally far smaller (long side 1536–2048 px ≈ 2–3 Mpx); the check
///   catches a giant media box rendered at a fixed DPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub max_pages: u32,
    pub max_pixels: u64,
    /// Most members (entries of any type) one tar or zip archive may hold; a larger archive
    /// gets one `too_large` error record. Left out of the serialised settings (and so of task
    /// ids) at its default, so jobs without archives keep their ids.
    #[serde(default = "default_archive_members", skip_serializing_if = "is_default_archive_members")]
    pub max_archive_members: u32,
    /// Largest uncompressed/compressed size ratio of a zip member before it is inflated (zip
    /// bombs); serialised like `max_archive_members`.
    #[serde(default = "default_zip_ratio", skip_serializing_if = "is_default_zip_ratio")]
    pub max_zip_ratio: u32,
}

/// Default of [`Limits::max_archive_members`]: img2dataset writes about 10,000 samples of three
/// members per shard; a hundred times that still lists in well under a second.
pub const DEFAULT_MAX_ARCHIVE_MEMBERS: u32 = 1_000_000;
/// Default of [`Limits::max_zip_ratio`]: JPEG, PNG and WebP barely deflate (ratio ~1) and an
/// uncompressed bitmap of a scan rarely passes 50:1, while deflate's own ceiling is ~1030:1,
/// where a zip bomb sits.
pub const DEFAULT_MAX_ZIP_RATIO: u32 = 200;

fn default_archive_members() -> u32 {
    DEFAULT_MAX_ARCHIVE_MEMBERS
}
fn is_default_archive_members(n: &u32) -> bool {
    *n == DEFAULT_MAX_ARCHIVE_MEMBERS
}
fn default_zip_ratio() -> u32 {
    DEFAULT_MAX_ZIP_RATIO
}
fn is_default_zip_ratio(n: &u32) -> bool {
    *n == DEFAULT_MAX_ZIP_RATIO
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 512 << 20,
            max_pages: 2000,
            max_pixels: 50_000_000,
            max_archive_members: DEFAULT_MAX_ARCHIVE_MEMBERS,
            max_zip_ratio: DEFAULT_MAX_ZIP_RATIO,
        }
    }
}

/// The pixel size a PDF page is rendered at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RenderSize {
    /// The longer side of the rendered page is exactly this many pixels; the other side keeps
    /// the page's aspect ratio (rounded, at least 1).
    LongSide(u32),
    /// Dots per inch (72 = one pixel per PDF point). A number too large for an f32 (which
    /// would become infinite, and be written back as `null`) does not decode.
    Dpi(#[serde(deserialize_with = "finite_f32")] f32),
    /// The long side the job's model reads images at (its processor's
    /// resize target), so pages are not resampled twice; resolved by the
    /// process that holds the model ([`RenderSize::resolve`]).
    Model,
}

/// The long side pages are rendered at when nothing else decides.
pub const DEFAULT_LONG_SIDE: u32 = 1536;

impl RenderSize {
    /// A concrete size: [`RenderSize::Model`] becomes the model's long side
    /// (or [`DEFAULT_LONG_SIDE`] without a model).
    pub fn resolve(self, model_long_side: Option<u32>) -> RenderSize {
        match self {
            RenderSize::Model => RenderSize::LongSide(model_long_side.unwrap_or(DEFAULT_LONG_SIDE)),
            other => other,
        }
    }

    /// Pixel size of a page of `w_pt` × `h_pt` points (already rotated as displayed).
    pub fn pixels_for(self, w_pt: f32, h_pt: f32) -> (u64, u64) {
        let to_px = |v: f32| (v.round() as u64).max(1);
        match self {
            RenderSize::LongSide(long) => {
                let long = u64::from(long.max(1));
                if w_pt >= h_pt {
                    (long, to_px(h_pt * long as f32 / w_pt))
                } else {
                    (to_px(w_pt * long as f32 / h_pt), long)
                }
            }
            RenderSize::Dpi(dpi) => {
                let s = dpi / 72.0;
                (to_px(w_pt * s), to_px(h_pt * s))
            }
            RenderSize::Model => self.resolve(None).pixels_for(w_pt, h_pt),
        }
    }
}

/// Everything about a job that changes its output, plus its name.
///
/// The fingerprint of the output-relevant fields goes into every task id, so
/// changing, say, the prompt gives new tasks instead of silently reusing
/// results made with the old one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSettings {
    pub job: String,
    pub task: TaskKind,
    pub engine: Engine,
    /// Model reference as given (folder, hub id or `s3://` prefix).
    pub model: Option<String>,
    /// Prompt override; `None` means the model family's default for `task`.
    pub prompt: Option<String>,
    pub max_new_tokens: usize,
    pub pages_per_task: u32,
    /// Loose images (and archive samples) per task. Like `pages_per_task` not in the settings
    /// fingerprint: the members or the sample range a task covers are part of its id.
    #[serde(default = "default_images_per_task")]
    pub images_per_task: u32,
    pub render: RenderSize,
    pub limits: Limits,
    /// Minimum count of letters and digits for a text layer to count as usable.
    pub text_min_chars: usize,
    /// Caption datasets written at the job's finish (`--dataset`): Parquet per archive and per
    /// task of loose images, WebDataset caption shards per archive. They are derived from the
    /// records, so this is not part of the settings fingerprint. Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<DatasetFormat>,
    /// Where results go (`s3://bucket/prefix` or a folder), carried in every
    /// task so a distributed worker knows where to store it. Not part of
    /// the settings fingerprint: moving the output does not change task ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<String>,
}

/// Default of [`JobSettings::images_per_task`].
pub const DEFAULT_IMAGES_PER_TASK: u32 = 256;

fn default_images_per_task() -> u32 {
    DEFAULT_IMAGES_PER_TASK
}

impl JobSettings {
    pub fn new(job: impl Into<String>) -> Self {
        JobSettings {
            job: job.into(),
            task: TaskKind::Ocr,
            engine: Engine::Auto,
            model: None,
            prompt: None,
            max_new_tokens: 1024,
            pages_per_task: 16,
            images_per_task: DEFAULT_IMAGES_PER_TASK,
            render: RenderSize::LongSide(DEFAULT_LONG_SIDE),
            limits: Limits::default(),
            text_min_chars: 32,
            datasets: Vec::new(),
            out: None,
        }
    }
}

/// A caption dataset format written from the records at the job's finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `JOB/parquet/<archive path>.parquet` and `JOB/parquet/images-TASK_ID.parquet`.
    Parquet,
    /// `JOB/webdataset/<archive path>`: `KEY.txt` and `KEY.json` per sample.
    Webdataset,
}

impl DatasetFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Parquet => "parquet",
            DatasetFormat::Webdataset => "webdataset",
        }
    }
}

/// An input object as listed: where it is and what identifies its content.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceRef {
    /// The input URI or path as the user gave it (joined with the relative
    /// path below a folder or prefix).
    pub uri: String,
    /// Path below the input root, used for Markdown output names.
    pub rel: String,
    pub size: u64,
    /// Content version: S3 ETag, or the local modification time in ns.
    pub version: String,
}

/// Whether a task's units are PDF pages or image frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    Pdf,
    Image,
    /// Probing the object failed; the worker writes one error record for it.
    Unreadable,
    /// A whole object not opened yet (distributed planning never downloads
    /// inputs). The worker that takes it opens it, processes it in one go
    /// when it fits one task, or publishes its page-range tasks.
    Document,
    /// A member range of one tar or zip archive (`source`): `first..=last` are 1-based sample
    /// indices within the archive, samples as WebDataset groups members (see
    /// `quire_store::archive`).
    Archive,
    /// A group of loose image files, in listing order, named by [`TaskSpec::members`];
    /// `first..=last` is `1..=members.len()` and `source` is the input root they were listed
    /// from.
    Images,
}

/// One unit of work: a page range of one document, or a frame range of one
/// image file. Self-contained so a worker needs nothing else to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub task_id: String,
    pub settings: JobSettings,
    pub source: SourceRef,
    pub unit: UnitKind,
    /// First unit, 1-based, inclusive.
    pub first: u32,
    /// Last unit, 1-based, inclusive.
    pub last: u32,
    /// Pages (frames) in the whole document, 0 when unknown.
    pub unit_count: u32,
    /// For a whole-document task: some of its page-range tasks may have
    /// stored results already (the job's output held results when it was
    /// submitted), so the worker that splits it checks each one and
    /// publishes only the rest. A fresh job skips those look-ups.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_stored: bool,
    /// Set by a forced submission (`--force`) and passed on to the page-range tasks of a split:
    /// the queue's duplicate detection then tells this submission's tasks apart from earlier
    /// ones with the same ids instead of dropping them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission: Option<String>,
    /// The image files of an [`UnitKind::Images`] task, in listing order (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<SourceRef>,
    /// For an [`UnitKind::Archive`] task over a plain tar: where its first sample starts,
    /// found by the scan that split the archive, so that the task reads its own samples
    /// instead of the shard from its start. Not part of the task id: it is a fact about the
    /// listed object (same size and version, same offsets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ArchiveResume>,
    /// For an [`UnitKind::Images`] task that re-forms a group of an earlier run: member URI →
    /// the earlier group task whose stored records of that member (unchanged since) are taken
    /// over instead of being made again. Not part of the task id: only members named in
    /// `members`, and task ids of 32 hex digits, are honoured.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub reuse: std::collections::BTreeMap<String, String>,
}

/// Where an archive task starts reading (see [`TaskSpec::resume`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveResume {
    /// Byte offset of the first header block of the task's first sample.
    pub offset: u64,
    /// Samples of the task's range whose key an earlier sample of the shard has: refused as
    /// duplicates, which a walk starting at `offset` cannot tell by itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<u32>,
}

fn finite_f32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let v = <f64 as serde::Deserialize>::deserialize(d)?;
    let f = v as f32;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(serde::de::Error::custom(format!("{v} is not a finite f32")))
    }
}

/// The highest resolution a job may render PDF pages at (`--render-dpi`).
pub const MAX_RENDER_DPI: f32 = 2400.0;

impl TaskSpec {
    /// A task over units `first..=last` of `source` (`unit_count` in the whole object, 0 when
    /// unknown), with none of the optional parts (members, resume point, reuse, submission).
    pub fn new(task_id: String, settings: JobSettings, source: SourceRef, unit: UnitKind, (first, last): (u32, u32), unit_count: u32) -> TaskSpec {
        TaskSpec {
            task_id,
            settings,
            source,
            unit,
            first,
            last,
            unit_count,
            check_stored: false,
            submission: None,
            members: Vec::new(),
            resume: None,
            reuse: Default::default(),
        }
    }

    /// Why this task, received from the queue, must not be run, if it must not: [`check`](Self::check)
    /// fails, its job is not registered by a coordinator (`scope` is `None`), or its input or
    /// output is not the job's. Anyone who can publish to the task subjects could otherwise
    /// make workers read and write wherever their credentials reach.
    pub fn vet(&self, scope: Option<JobScope<'_>>) -> Result<(), String> {
        let job = &self.settings.job;
        self.check()?;
        let Some(scope) = scope else {
            return Err(format!("job {job:?} is not registered by a coordinator (no entry in the quire-jobs bucket)"));
        };
        if self.settings.out.as_deref() != scope.out {
            return Err(format!(
                "the task's output {:?} is not its job's output {:?}",
                self.settings.out.as_deref().unwrap_or(""),
                scope.out.unwrap_or("")
            ));
        }
        for uri in std::iter::once(&self.source.uri).chain(self.members.iter().map(|m| &m.uri)) {
            if !scope.inputs.iter().any(|i| lies_under(uri, i)) {
                return Err(format!("the task's input {uri:?} is not below any of its job's inputs {:?}", scope.inputs));
            }
        }
        Ok(())
    }

    /// Pages or frames the task covers (0 for a document not yet opened).
    pub fn units(&self) -> u32 {
        if self.unit == UnitKind::Document {
            return 0;
        }
        self.last.saturating_sub(self.first).saturating_add(1)
    }

    /// Checks what a worker must not take on trust from a task message: a render size that
    /// is a size, and a unit range that starts at 1 or later, does not run backwards and is
    /// no longer than the job's limits allow (a range of four billion pages would have a
    /// worker build four billion records).
    pub fn check(&self) -> Result<(), String> {
        match self.settings.render {
            RenderSize::Dpi(d) if !(d.is_finite() && (1.0..=MAX_RENDER_DPI).contains(&d)) => {
                return Err(format!("render dpi {d} is not between 1 and {MAX_RENDER_DPI}"));
            }
            RenderSize::LongSide(0) => return Err("render long side 0".into()),
            _ => {}
        }
        let most = match self.unit {
            UnitKind::Document => return Ok(()),
            UnitKind::Pdf | UnitKind::Image | UnitKind::Unreadable => self.settings.limits.max_pages.max(1),
            UnitKind::Archive => self.settings.limits.max_archive_members.max(1),
            UnitKind::Images => u32::try_from(self.members.len()).unwrap_or(u32::MAX),
        };
        if self.first == 0 || self.first > self.last {
            return Err(format!("unit range {}-{} is not a range of 1-based units", self.first, self.last));
        }
        if self.last > most {
            return Err(format!("unit range {}-{} goes past the {most} units this task may have", self.first, self.last));
        }
        if let Some(r) = &self.resume {
            if self.unit != UnitKind::Archive {
                return Err("a resume point on a task that is not an archive range".into());
            }
            if r.offset >= self.source.size.max(1) || r.offset % 512 != 0 {
                return Err(format!("resume offset {} is no tar block of the {}-byte object", r.offset, self.source.size));
            }
            if r.duplicates.iter().any(|u| !(self.first..=self.last).contains(u)) {
                return Err("resume duplicates outside the task's range".into());
            }
        }
        Ok(())
    }
}

/// What a registered job's tasks may touch: its output and its inputs as the coordinator was
/// given them ([`TaskSpec::vet`]).
#[derive(Debug, Clone, Copy)]
pub struct JobScope<'a> {
    pub out: Option<&'a str>,
    pub inputs: &'a [String],
}

/// Whether `uri` names `input` itself or something below it, without `..` climbing out. A
/// brace pattern (`shard-{000..009}.tar`) admits what lies below the text before its brace.
pub fn lies_under(uri: &str, input: &str) -> bool {
    if uri.split(['/', '\\']).any(|part| part == "..") || uri.contains('\0') {
        return false;
    }
    if uri == input {
        return true;
    }
    let root = match input.find('{') {
        Some(i) => &input[..i],
        None => input,
    };
    if root.is_empty() {
        return false;
    }
    if root != input || root.ends_with('/') {
        return uri.starts_with(root);
    }
    uri.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(job: &str, uri: &str, out: &str) -> TaskSpec {
        let mut settings = JobSettings::new(job);
        settings.out = Some(out.into());
        TaskSpec::new("0".repeat(32), settings, SourceRef { uri: uri.into(), rel: String::new(), size: 1, version: String::new() }, UnitKind::Document, (1, 1), 0)
    }

    fn scope_of(inputs: &[&str]) -> Vec<String> {
        inputs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn inputs_admit_what_lies_below_them_and_nothing_else() {
        assert!(lies_under("s3://b/in/a.pdf", "s3://b/in"));
        assert!(lies_under("s3://b/in/a.pdf", "s3://b/in/"));
        assert!(lies_under("scans/x/y.pdf", "scans"));
        assert!(lies_under("one.pdf", "one.pdf"));
        assert!(lies_under("s3://b/laion/000003.tar", "s3://b/laion/{000000..000009}.tar"));
        assert!(!lies_under("s3://b/inside/a.pdf", "s3://b/in"), "a sibling prefix is not below");
        assert!(!lies_under("s3://b/in/../secret/a.pdf", "s3://b/in"));
        assert!(!lies_under("scans/../../etc/passwd", "scans"));
        assert!(!lies_under("s3://other/in/a.pdf", "s3://b/in"));
        assert!(!lies_under("anything", "{a,b}"), "a pattern with nothing before its brace admits nothing");
    }

    #[test]
    fn forged_tasks_are_told_apart_from_the_jobs_own() {
        let inputs = scope_of(&["s3://b/in"]);
        let m = JobScope { out: Some("s3://b/out"), inputs: &inputs };
        assert_eq!(task("j", "s3://b/in/a.pdf", "s3://b/out").vet(Some(m)), Ok(()));
        let e = task("j", "s3://b/in/a.pdf", "s3://evil/out").vet(Some(m)).unwrap_err();
        assert!(e.contains("output") && e.contains("s3://evil/out"), "{e}");
        let e = task("j", "s3://b/private/key.pem", "s3://b/out").vet(Some(m)).unwrap_err();
        assert!(e.contains("input") && e.contains("private/key.pem"), "{e}");
        let mut group = task("j", "s3://b/in", "s3://b/out");
        group.members = vec![SourceRef { uri: "s3://b/in/x.png".into(), rel: String::new(), size: 1, version: String::new() }];
        assert_eq!(group.vet(Some(m)), Ok(()));
        group.members.push(SourceRef { uri: "s3://b/other/y.png".into(), rel: String::new(), size: 1, version: String::new() });
        let e = group.vet(Some(m)).unwrap_err();
        assert!(e.contains("other/y.png"), "a group's every image is checked: {e}");
        let e = task("nobody", "s3://b/in/a.pdf", "s3://b/out").vet(None).unwrap_err();
        assert!(e.contains("not registered"), "{e}");
    }

    fn seed(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/task_messages").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Task messages the fuzzing turned up (fuzz/seeds/task_messages/).
    #[test]
    fn task_messages_a_worker_must_not_trust_are_refused() {
        // A DPI past f32's range used to decode as infinity and re-encode as null.
        let err = serde_json::from_slice::<TaskSpec>(&seed("dpi-overflow.json")).unwrap_err();
        assert!(err.to_string().contains("not a finite f32"), "{err}");
        // Four billion pages would be four billion records built up front.
        let huge: TaskSpec = serde_json::from_slice(&seed("huge-range.json")).unwrap();
        assert_eq!(huge.units(), u32::MAX);
        let err = huge.check().unwrap_err();
        assert!(err.contains("goes past the 2000 units"), "{err}");
        let mut ok = huge.clone();
        ok.last = 16;
        assert_eq!(ok.check(), Ok(()));
        for (first, last) in [(0, 3), (5, 4)] {
            let t = TaskSpec { first, last, ..ok.clone() };
            assert!(t.check().unwrap_err().contains("not a range"), "{first}-{last}");
        }
        let t = TaskSpec { first: 0, last: u32::MAX, ..ok.clone() };
        assert_eq!(t.units(), u32::MAX, "no overflow");
        for dpi in [0.0, -3.0, f32::NAN, 5000.0] {
            let mut t = ok.clone();
            t.settings.render = RenderSize::Dpi(dpi);
            assert!(t.check().unwrap_err().contains("render dpi"), "{dpi}");
        }
        let mut t = ok.clone();
        t.settings.render = RenderSize::Dpi(300.0);
        assert_eq!(t.check(), Ok(()));
        // Archives are bounded by their member limit, image groups by their list.
        let mut t = ok.clone();
        t.unit = UnitKind::Images;
        assert!(t.check().is_err(), "an image group of 16 with no members");
        t.members = vec![t.source.clone(); 16];
        assert_eq!(t.check(), Ok(()));
        // A tar range's resume point: a block of the object, duplicates within the range,
        // and only on archive ranges.
        let resumed: TaskSpec = serde_json::from_slice(&seed("task-archive-resume.json")).unwrap();
        assert_eq!(resumed.resume, Some(ArchiveResume { offset: 2048, duplicates: vec![4] }));
        assert_eq!(resumed.check(), Ok(()));
        let with = |offset, duplicates: Vec<u32>| TaskSpec { resume: Some(ArchiveResume { offset, duplicates }), ..resumed.clone() };
        for (t, why) in [
            (with(2049, vec![]), "no tar block"),
            (with(4608, vec![]), "no tar block"),
            (with(2048, vec![2]), "outside the task's range"),
            (TaskSpec { unit: UnitKind::Pdf, ..resumed.clone() }, "not an archive range"),
        ] {
            assert!(t.check().unwrap_err().contains(why), "{:?}", t.resume);
        }
    }
}
