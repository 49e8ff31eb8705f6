//! Archive inputs: tar (plain or gzip) and zip files, read member by member and never
//! unpacked to disk.
//!
//! Members become *samples* the way WebDataset groups them: a member's key is its path up to
//! the first dot of its base name, its extension the rest (lower-cased), and consecutive
//! members with the same key form one sample. A sample's image is its member with an image
//! extension ([`IMAGE_EXTENSIONS`]); the decoder still checks the bytes. Samples without an
//! image are counted and skipped, other members (`txt`, `json`, …) are left alone. In a zip
//! (read through its central directory) every image member is a sample of its own.
//!
//! Samples are numbered from 1 in archive order; those numbers are the units of archive
//! tasks. [`walk`] reads an archive once, from the start, and hands over the entries of the
//! samples in a range: the bytes of their images, or why a sample or member is refused (a
//! member name with `..`, an absolute path, a NUL or bytes that are not UTF-8; a key seen
//! before in the shard; an archive inside the archive; an encrypted or oversized member; a
//! zip member whose compression ratio is a bomb's, refused before it is inflated). A
//! truncated archive gives what was read and one `truncated` entry numbered after the last
//! complete sample.
//!
//! Memory: one member's bytes at a time (at most `max_member_bytes`), plus the set of keys
//! seen (for duplicates); a plain tar skips unwanted members by seeking, a gzip'd one by
//! inflating through them.
//!
//! Sources: [`walk_reader`] reads any `Read + Seek` source (an `s3://` object read by ranged
//! requests, say); [`walk`] and [`scan`] open a local file. A tar is read from its start up
//! to the end of the range. A zip is read through its central directory: its members are
//! classified from the names listed there, and only the members of the wanted samples are
//! opened (their local header and data), so a task on a large zip reads the directory and
//! its own members only. Sample numbers (the units of task ids and ranges) therefore depend
//! on names alone, the same for a scan and a walk, a local file and a remote object. Two
//! consequences for zip: a name is what the zip crate decodes (UTF-8 when the entry is
//! flagged so, else CP437, which is a legitimate name), and a name flagged UTF-8 whose bytes
//! are not UTF-8 (decoded with U+FFFD) is refused; and a scan's `images` counts the
//! image-named members that pass the name checks, as a member's encryption, size,
//! compression ratio and link flag are checked only when a task opens it.
//!
//! Imports: nothing of this crate (only `quire_core` and outside crates).

use quire_core::{ArchiveResume, ErrorKind, InputError, Limits};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::RangeInclusive;
use std::path::Path;

// A member is a sample's image by its extension ([`IMAGE_EXTENSIONS`]), an archive itself (not
// opened: `unsupported`) by [`quire_core::names::ARCHIVE_EXTENSIONS`].
pub use quire_core::names::{is_archive_ext, is_image_ext, IMAGE_EXTENSIONS};

/// How many first bytes [`sniff_archive`] wants (a tar's `ustar` magic is at offset 257).
pub const ARCHIVE_SNIFF_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Tar,
    /// gzip-compressed tar (`.tar.gz`, `.tgz`).
    TarGz,
    Zip,
}

impl ArchiveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveKind::Tar => "tar",
            ArchiveKind::TarGz => "tar.gz",
            ArchiveKind::Zip => "zip",
        }
    }
}

/// The archive kind from the first bytes of a file, `None` for anything else.
pub fn sniff_archive(head: &[u8]) -> Option<ArchiveKind> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Some(ArchiveKind::Zip);
    }
    if head.starts_with(b"\x1f\x8b") {
        return Some(ArchiveKind::TarGz);
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Some(ArchiveKind::Tar);
    }
    None
}

/// Reads the head of `path` and sniffs it; `None` when it is no archive or cannot be read.
pub fn sniff_archive_file(path: &Path) -> Option<ArchiveKind> {
    let mut head = Vec::with_capacity(ARCHIVE_SNIFF_LEN);
    File::open(path).ok()?.take(ARCHIVE_SNIFF_LEN as u64).read_to_end(&mut head).ok()?;
    sniff_archive(&head)
}

/// What [`walk`] hands over for a sample in the asked range, in archive order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The sample's image member and its bytes.
    Image { unit: u32, key: String, member: String, data: Vec<u8> },
    /// A sample, or one member of it, refused; becomes an error record. `key` and `member` are
    /// `None` only for the `truncated` entry of a damaged archive.
    Refused { unit: u32, key: Option<String>, member: Option<String>, kind: ErrorKind, message: String },
}

impl Entry {
    pub fn unit(&self) -> u32 {
        match self {
            Entry::Image { unit, .. } | Entry::Refused { unit, .. } => *unit,
        }
    }
}

/// What one pass over an archive found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Samples (units), including a final `truncated` one.
    pub units: u32,
    /// Samples with an image.
    pub images: u32,
    /// Samples without an image (and without a refused member): skipped.
    pub without_image: u32,
    /// Refused entries (members or samples), the `truncated` one included.
    pub refused: u32,
    /// Members of any kind, directories included.
    pub members: u64,
    /// The archive ends early or its directory is damaged.
    pub truncated: bool,
    /// A plain tar read whole (a scan): the byte offset of each sample's first header block,
    /// by unit (`sample_offsets[u - 1]`), where a task can start reading
    /// ([`ArchiveResume`]). Empty for other archives and for walks over a range.
    pub sample_offsets: Vec<u64>,
    /// Units refused because an earlier sample of the archive has their key.
    pub duplicates: Vec<u32>,
}

impl Scan {
    /// Where a task whose range starts at `first` can start reading: `None` at the start of
    /// the archive, or where the scan did not record sample offsets (compressed and zip
    /// archives, a unit past the end).
    pub fn resume_at(&self, first: u32, last: u32) -> Option<ArchiveResume> {
        if first <= 1 {
            return None;
        }
        let offset = *self.sample_offsets.get(first as usize - 1)?;
        let duplicates = self.duplicates.iter().copied().filter(|u| (first..=last).contains(u)).collect();
        Some(ArchiveResume { offset, duplicates })
    }
}

/// The limits that apply inside archives.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    /// Largest uncompressed member (`--max-file-mb`).
    pub max_member_bytes: u64,
    pub max_members: u32,
    pub max_zip_ratio: u32,
}

impl From<&Limits> for ArchiveLimits {
    fn from(l: &Limits) -> Self {
        ArchiveLimits { max_member_bytes: l.max_file_bytes, max_members: l.max_archive_members, max_zip_ratio: l.max_zip_ratio }
    }
}

/// WebDataset key and extension of a member path: `dir/000123.seg.png` gives
/// (`dir/000123`, `seg.png`). The extension is lower-cased.
pub fn split_key(name: &str) -> (&str, String) {
    let base_start = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    match name[base_start..].find('.') {
        Some(dot) => (&name[..base_start + dot], name[base_start + dot + 1..].to_ascii_lowercase()),
        None => (name, String::new()),
    }
}

/// Why a member name is refused, if it is: quire never writes members out, but their names
/// travel on into datasets, where such a name could point outside a folder.
fn bad_name(raw: &[u8]) -> Option<String> {
    let Ok(name) = std::str::from_utf8(raw) else {
        return Some("member name is not UTF-8".into());
    };
    if name.contains('\0') {
        return Some("member name contains a NUL byte".into());
    }
    if name.starts_with('/') || name.starts_with('\\') || name.as_bytes().get(1) == Some(&b':') {
        return Some("member name is an absolute path".into());
    }
    if name.split(['/', '\\']).any(|c| c == "..") {
        return Some("member name contains '..'".into());
    }
    None
}

/// The sample being read: members with the same key, so far.
struct Sample {
    unit: u32,
    key: String,
    /// First member's name (named by a duplicate-key refusal).
    first_member: String,
    duplicate: bool,
    has_image: bool,
    /// Its image passed the checks (read or not: a scan reads no data).
    image_ok: bool,
    entries: Vec<Entry>,
}

/// Numbering, duplicate detection and counting shared by the tar and zip readers.
struct Walker<'a> {
    range: Option<RangeInclusive<u32>>,
    on_entry: &'a mut dyn FnMut(Entry),
    seen: HashSet<String>,
    current: Option<Sample>,
    scan: Scan,
    /// Stop reading once the range is passed (a task needs nothing further; a scan does).
    stop_after_range: bool,
    /// Units known to be duplicates of keys before where this walk started.
    known_duplicates: HashSet<u32>,
}

impl<'a> Walker<'a> {
    /// A walk over `range` (`None`: a scan) that starts with `scan`'s counts, knowing the
    /// units that repeat keys from before where it starts.
    fn new(range: Option<RangeInclusive<u32>>, on_entry: &'a mut dyn FnMut(Entry), scan: Scan, known_duplicates: HashSet<u32>) -> Self {
        let stop_after_range = range.is_some();
        Walker { range, on_entry, seen: HashSet::new(), current: None, scan, stop_after_range, known_duplicates }
    }

    fn wants(&self, unit: u32) -> bool {
        self.range.as_ref().is_some_and(|r| r.contains(&unit))
    }

    fn past_range(&self) -> bool {
        self.stop_after_range && self.range.as_ref().is_some_and(|r| self.scan.units >= *r.end())
    }

    /// Ends the current sample and hands over its entries when in range.
    fn finish_sample(&mut self) {
        let Some(s) = self.current.take() else { return };
        self.scan.units = s.unit;
        let entries = if s.duplicate {
            vec![Entry::Refused {
                unit: s.unit,
                key: Some(s.key.clone()),
                member: Some(s.first_member.clone()),
                kind: ErrorKind::Corrupt,
                message: format!("duplicate key {:?}: an earlier sample of this shard has the same key", s.key),
            }]
        } else {
            s.entries
        };
        if entries.is_empty() && !s.has_image {
            self.scan.without_image += 1;
        }
        if s.image_ok && !s.duplicate {
            self.scan.images += 1;
        }
        if s.duplicate {
            self.scan.duplicates.push(s.unit);
        }
        for e in entries {
            if let Entry::Refused { .. } = e {
                self.scan.refused += 1;
            }
            if self.wants(s.unit) {
                (self.on_entry)(e);
            }
        }
    }

    /// The member `raw` name with extension `ext` opens a new sample or joins the current one;
    /// returns its sample's unit. `group` is false for zip (every member its own sample).
    fn member(&mut self, raw: &[u8], group: bool) -> u32 {
        let name = String::from_utf8_lossy(raw).into_owned();
        let (key, _) = split_key(&name);
        let same = group && self.current.as_ref().is_some_and(|s| s.key == key);
        if !same {
            self.finish_sample();
            let unit = self.scan.units + 1;
            let duplicate = !self.seen.insert(key.to_string()) || self.known_duplicates.contains(&unit);
            self.current = Some(Sample {
                unit,
                key: key.to_string(),
                first_member: name,
                duplicate,
                has_image: false,
                image_ok: false,
                entries: Vec::new(),
            });
        }
        self.current.as_ref().expect("a sample").unit
    }

    fn sample(&mut self) -> &mut Sample {
        self.current.as_mut().expect("a sample")
    }

    fn refuse(&mut self, member: &str, kind: ErrorKind, message: String) {
        let s = self.sample();
        let (unit, key) = (s.unit, s.key.clone());
        s.entries.push(Entry::Refused { unit, key: Some(key), member: Some(member.to_string()), kind, message });
    }

    /// Ends the walk after the archive broke off: the sample being read is lost, and one
    /// `truncated` entry stands for it and the rest.
    fn truncated(&mut self, message: String) {
        self.current = None;
        let unit = self.scan.units + 1;
        self.scan.units = unit;
        self.scan.truncated = true;
        self.scan.refused += 1;
        if self.wants(unit) {
            (self.on_entry)(Entry::Refused { unit, key: None, member: None, kind: ErrorKind::Truncated, message });
        }
    }

    fn count_member(&mut self, limits: &ArchiveLimits) -> Result<(), InputError> {
        self.scan.members += 1;
        if self.scan.members > u64::from(limits.max_members) {
            return Err(InputError::new(
                ErrorKind::TooLarge,
                format!("more than {} members, the limit (--max-archive-members)", limits.max_members),
            ));
        }
        Ok(())
    }
}

/// Anything an archive can be read from: a file, or an object read by ranged requests.
pub trait ReadSeek: Read + Seek + Send {}

impl<T: Read + Seek + Send + ?Sized> ReadSeek for T {}

/// Reads the archive at `path` from the start: [`walk_reader`] on the opened file.
pub fn walk(
    path: &Path,
    limits: &ArchiveLimits,
    range: Option<RangeInclusive<u32>>,
    on_entry: &mut dyn FnMut(Entry),
) -> Result<Scan, InputError> {
    walk_from(path, limits, range, None, on_entry)
}

/// [`walk`], starting at `resume` when given (see [`walk_reader_from`]).
pub fn walk_from(
    path: &Path,
    limits: &ArchiveLimits,
    range: Option<RangeInclusive<u32>>,
    resume: Option<&ArchiveResume>,
    on_entry: &mut dyn FnMut(Entry),
) -> Result<Scan, InputError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    walk_reader_from(file, limits, range, resume, on_entry).map_err(|e| match e.kind {
        ErrorKind::Io => InputError::new(ErrorKind::Io, format!("{}: {}", path.display(), e.message)),
        _ => e,
    })
}

/// Reads the archive in `src` from the start. Entries of the samples in `range` go to
/// `on_entry` in archive order (`None`: a scan that reads no member data). With a range, the
/// walk stops after the range's last sample; the returned [`Scan`] then covers only what was
/// read. An error (an [`InputError`], as render's) is about the whole archive (unreadable,
/// not an archive, too many members): one error record for it.
///
/// A tar is read from its start up to the range's end (a plain one seeks over unwanted
/// member data); a zip reads its central directory and then only the local headers and data
/// of the wanted members.
pub fn walk_reader<R: Read + Seek>(
    src: R,
    limits: &ArchiveLimits,
    range: Option<RangeInclusive<u32>>,
    on_entry: &mut dyn FnMut(Entry),
) -> Result<Scan, InputError> {
    walk_reader_from(src, limits, range, None, on_entry)
}

/// [`walk_reader`] for a range that starts where a scan found its first sample (`resume`,
/// from [`Scan::resume_at`]): a plain tar is read from that offset on, so a task reads its
/// own samples and not the shard before them. When the bytes at the offset are no tar header
/// (a resume point that does not fit this archive), the walk starts at the beginning as
/// without one.
pub fn walk_reader_from<R: Read + Seek>(
    mut src: R,
    limits: &ArchiveLimits,
    range: Option<RangeInclusive<u32>>,
    resume: Option<&ArchiveResume>,
    on_entry: &mut dyn FnMut(Entry),
) -> Result<Scan, InputError> {
    let io = |e: std::io::Error| InputError::new(ErrorKind::Io, format!("reading the archive: {e}"));
    let len = src.seek(SeekFrom::End(0)).map_err(io)?;
    if len == 0 {
        return Err(InputError::new(ErrorKind::Empty, "empty file (0 bytes)"));
    }
    if let (Some(r), Some(first)) = (resume, range.as_ref().map(|r| *r.start())) {
        if first > 1 && r.offset < len && sniff_at(&mut src, r.offset).map_err(io)? == Some(ArchiveKind::Tar) {
            let scan = Scan { units: first - 1, ..Scan::default() };
            let mut w = Walker::new(range, on_entry, scan, r.duplicates.iter().copied().collect());
            walk_tar(tar::Archive::new(Seekable { inner: src, base: r.offset }), r.offset, len, limits, &mut w)?;
            return Ok(w.scan);
        }
    }
    let kind = sniff_at(&mut src, 0)
        .map_err(io)?
        .ok_or_else(|| InputError::new(ErrorKind::Unsupported, "not a tar or zip archive by its first bytes"))?;
    let mut w = Walker::new(range, on_entry, Scan::default(), HashSet::new());
    match kind {
        ArchiveKind::Tar => walk_tar(tar::Archive::new(Seekable { inner: src, base: 0 }), 0, len, limits, &mut w)?,
        ArchiveKind::TarGz => {
            let gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, src));
            walk_tar(tar::Archive::new(gz), 0, 0, limits, &mut w)?
        }
        ArchiveKind::Zip => walk_zip(src, limits, &mut w)?,
    }
    Ok(w.scan)
}

/// Counts the samples of an archive (reading no member data where it can be skipped).
pub fn scan(path: &Path, limits: &ArchiveLimits) -> Result<Scan, InputError> {
    walk(path, limits, None, &mut |_| {})
}

/// [`scan`] over any source.
pub fn scan_reader<R: Read + Seek>(src: R, limits: &ArchiveLimits) -> Result<Scan, InputError> {
    walk_reader(src, limits, None, &mut |_| {})
}

/// The kind of archive whose first bytes (or, for a resume point, whose member header) sit
/// at `at`; leaves `src` at `at`.
fn sniff_at<R: Read + Seek>(src: &mut R, at: u64) -> std::io::Result<Option<ArchiveKind>> {
    src.seek(SeekFrom::Start(at))?;
    let mut head = Vec::with_capacity(ARCHIVE_SNIFF_LEN);
    src.by_ref().take(ARCHIVE_SNIFF_LEN as u64).read_to_end(&mut head)?;
    src.seek(SeekFrom::Start(at))?;
    Ok(sniff_archive(&head))
}

fn io_error(path: &Path, e: std::io::Error) -> InputError {
    InputError::new(ErrorKind::Io, format!("{}: {e}", path.display()))
}

/// Reads up to `limit + 1` bytes: more than `limit` means the header lied about the size.
fn read_member(r: &mut dyn Read, size: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(size.min(limit).min(64 << 20) as usize);
    r.take(limit.saturating_add(1)).read_to_end(&mut data)?;
    Ok(data)
}

fn too_large(size: u64, limit: u64) -> String {
    format!("{size} bytes uncompressed, more than the limit of {limit} (--max-file-mb)")
}

/// Walks the tar entries of `archive`, whose reading starts at byte `base` of the file (a
/// resume point, else 0); `file_len` is 0 for a compressed stream.
fn walk_tar<R: MaybeSeek>(
    mut archive: tar::Archive<R>,
    base: u64,
    file_len: u64,
    limits: &ArchiveLimits,
    w: &mut Walker<'_>,
) -> Result<(), InputError> {
    // Plain tar: unwanted member data is seeked over, so the end of the last member is checked
    // against the file's length to catch a shard cut off inside a member's data.
    let mut end_of_data = 0u64;
    // Where the next entry's header blocks (long-name and pax headers included) begin: the
    // end of the previous entry's data, rounded up to the 512-byte block.
    let mut next_header = base;
    let record_offsets = file_len > 0 && w.range.is_none();
    let entries = R::entries(&mut archive).map_err(|e| InputError::new(ErrorKind::Corrupt, format!("not a tar archive: {e}")))?;
    for entry in entries {
        if w.past_range() {
            return Ok(());
        }
        let mut e = match entry {
            Ok(e) => e,
            Err(err) => {
                // A tar cannot tell whether the sample being read was complete: it is lost
                // with the rest.
                w.current = None;
                w.truncated(format!("the archive breaks off or is damaged after sample {}: {err}", w.scan.units));
                return Ok(());
            }
        };
        let header_at = next_header;
        let stored = e.header().entry_size().unwrap_or_else(|_| e.size());
        next_header = (base + e.raw_file_position()).saturating_add(stored).saturating_add(511) / 512 * 512;
        w.count_member(limits)?;
        let etype = e.header().entry_type();
        if etype.is_dir() {
            continue;
        }
        let raw = e.path_bytes().into_owned();
        let size = e.size();
        end_of_data = end_of_data.max((base + e.raw_file_position()).saturating_add(size));
        let before = w.current.as_ref().map(|s| s.unit);
        let unit = w.member(&raw, true);
        if record_offsets && before != Some(unit) {
            w.scan.sample_offsets.push(header_at);
        }
        let name = String::from_utf8_lossy(&raw).into_owned();
        let (_, ext) = split_key(&name);
        if let Some(why) = bad_name(&raw) {
            w.refuse(&name, ErrorKind::Unsupported, why);
            continue;
        }
        if !(etype.is_file() || etype == tar::EntryType::Continuous) {
            if is_image_ext(&ext) || is_archive_ext(&ext) {
                w.refuse(&name, ErrorKind::Unsupported, format!("a link or special file ({etype:?}), not a regular file"));
            }
            continue;
        }
        if is_archive_ext(&ext) {
            w.refuse(&name, ErrorKind::Unsupported, "an archive inside the archive is not opened".into());
            continue;
        }
        if !is_image_ext(&ext) {
            continue;
        }
        if w.sample().has_image {
            w.refuse(&name, ErrorKind::Unsupported, "a second image in the sample; only its first image is read".into());
            continue;
        }
        w.sample().has_image = true;
        if size > limits.max_member_bytes {
            w.refuse(&name, ErrorKind::TooLarge, too_large(size, limits.max_member_bytes));
            continue;
        }
        w.sample().image_ok = true;
        if !w.wants(unit) || w.sample().duplicate {
            continue;
        }
        match read_member(&mut e, size, limits.max_member_bytes) {
            Ok(data) if data.len() as u64 == size => {
                let key = w.sample().key.clone();
                w.sample().entries.push(Entry::Image { unit, key, member: name, data });
            }
            Ok(data) => {
                w.truncated(format!("the archive breaks off inside member {name:?} ({} of {size} bytes)", data.len()));
                return Ok(());
            }
            Err(err) => {
                w.truncated(format!("the archive breaks off inside member {name:?}: {err}"));
                return Ok(());
            }
        }
    }
    if file_len > 0 && end_of_data > file_len {
        w.current = None;
        w.truncated(format!("the archive breaks off: its last member's data ends at byte {end_of_data}, the file has {file_len}"));
        return Ok(());
    }
    w.finish_sample();
    Ok(())
}

/// Plain tar files seek over unwanted member data; compressed streams read through it.
pub trait MaybeSeek: Read + Sized {
    fn entries(a: &mut tar::Archive<Self>) -> std::io::Result<tar::Entries<'_, Self>>;
}

/// A plain tar's source, read with seeks over unwanted member data. The tar reader starts
/// at byte `base` of the file (a resume point) and sees positions counted from there.
pub struct Seekable<R> {
    inner: R,
    base: u64,
}

impl<R: Read> Read for Seekable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<R: Seek> Seek for Seekable<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let pos = match pos {
            SeekFrom::Start(n) => SeekFrom::Start(self.base.saturating_add(n)),
            other => other,
        };
        let at = self.inner.seek(pos)?;
        at.checked_sub(self.base).ok_or_else(|| std::io::Error::other("seek before the resume point"))
    }
}

impl<R: Read + Seek> MaybeSeek for Seekable<R> {
    fn entries(a: &mut tar::Archive<Self>) -> std::io::Result<tar::Entries<'_, Self>> {
        a.entries_with_seek()
    }
}

impl<R: Read> MaybeSeek for flate2::read::MultiGzDecoder<R> {
    fn entries(a: &mut tar::Archive<Self>) -> std::io::Result<tar::Entries<'_, Self>> {
        a.entries()
    }
}

/// What opening a wanted zip member (its local header) tells before its data is read.
struct ZipMember {
    is_link: bool,
    encrypted: bool,
    size: u64,
    csize: u64,
}

/// Whether a zip member name is a directory's (the zip crate's rule).
fn zip_dir_name(name: &str) -> bool {
    name.ends_with('/') || name.ends_with('\\')
}

/// Why a zip member name is refused. The name is the zip crate's decoding of it (UTF-8
/// when the entry says so, lossily; CP437 otherwise), so a name flagged UTF-8 that is not
/// shows U+FFFD.
fn bad_zip_name(name: &str) -> Option<String> {
    if name.contains('\u{fffd}') {
        return Some("member name is not valid UTF-8".into());
    }
    bad_name(name.as_bytes())
}

/// Classifies a zip member by its name alone (so a scan and every task number the samples
/// alike without opening anything); returns its unit when its sample is wanted and the
/// member is to be opened with [`zip_read`].
fn zip_classify(name: &str, w: &mut Walker<'_>) -> Option<u32> {
    if zip_dir_name(name) {
        return None;
    }
    let (_, ext) = split_key(name);
    let named_badly = bad_zip_name(name);
    if !(is_image_ext(&ext) || is_archive_ext(&ext) || named_badly.is_some()) {
        return None;
    }
    let unit = w.member(name.as_bytes(), false);
    if let Some(why) = named_badly {
        w.refuse(name, ErrorKind::Unsupported, why);
        return None;
    }
    if is_archive_ext(&ext) {
        w.refuse(name, ErrorKind::Unsupported, "an archive inside the archive is not opened".into());
        return None;
    }
    let s = w.sample();
    s.has_image = true;
    s.image_ok = true;
    (w.wants(unit) && !w.sample().duplicate).then_some(unit)
}

/// Checks an opened zip member (link, encryption, size, ratio) and reads it with `read`.
fn zip_read(
    unit: u32,
    name: &str,
    m: ZipMember,
    limits: &ArchiveLimits,
    w: &mut Walker<'_>,
    read: &mut dyn FnMut() -> std::io::Result<Vec<u8>>,
) {
    if m.is_link {
        return w.refuse(name, ErrorKind::Unsupported, "a symbolic link, not a regular file".into());
    }
    if m.encrypted {
        return w.refuse(name, ErrorKind::Encrypted, "the zip member is encrypted".into());
    }
    let (size, csize) = (m.size, m.csize);
    if size > limits.max_member_bytes {
        return w.refuse(name, ErrorKind::TooLarge, too_large(size, limits.max_member_bytes));
    }
    if size > csize.max(1).saturating_mul(u64::from(limits.max_zip_ratio)) {
        return w.refuse(
            name,
            ErrorKind::TooLarge,
            format!(
                "compression ratio {}:1 ({size} bytes from {csize}) is more than the limit of {}:1 (a zip bomb?); not inflated",
                size / csize.max(1),
                limits.max_zip_ratio
            ),
        );
    }
    match read() {
        Ok(data) if data.len() as u64 == size => {
            let key = w.sample().key.clone();
            w.sample().entries.push(Entry::Image { unit, key, member: name.to_string(), data });
        }
        Ok(data) => w.refuse(name, ErrorKind::Corrupt, format!("member holds {} bytes or more, its header says {size}", data.len())),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            w.refuse(name, ErrorKind::Truncated, format!("member data ends early: {err}"))
        }
        Err(err) => w.refuse(name, ErrorKind::Corrupt, format!("cannot inflate: {err}")),
    }
}

/// A zip read through its central directory: members are classified by the names listed
/// there, and only the wanted ones are opened (a seek to their local header and data).
fn walk_zip<R: Read + Seek>(mut src: R, limits: &ArchiveLimits, w: &mut Walker<'_>) -> Result<(), InputError> {
    let mut zip = match zip::ZipArchive::new(BufReader::new(&mut src)) {
        Ok(z) => z,
        Err(err) => {
            src.seek(SeekFrom::Start(0)).map_err(|e| InputError::new(ErrorKind::Io, format!("reading the archive: {e}")))?;
            return walk_zip_stream(src, err, limits, w);
        }
    };
    if zip.len() as u64 > u64::from(limits.max_members) {
        return Err(InputError::new(
            ErrorKind::TooLarge,
            format!("{} members, more than the limit of {} (--max-archive-members)", zip.len(), limits.max_members),
        ));
    }
    let max = limits.max_member_bytes;
    for i in 0..zip.len() {
        if w.past_range() {
            return Ok(());
        }
        w.scan.members += 1;
        let name = zip.name_for_index(i).unwrap_or_default().to_string();
        let Some(unit) = zip_classify(&name, w) else { continue };
        let m = match zip.by_index_raw(i) {
            Ok(f) => ZipMember { is_link: f.is_symlink(), encrypted: f.encrypted(), size: f.size(), csize: f.compressed_size() },
            Err(err) => {
                let kind = match &err {
                    zip::result::ZipError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => ErrorKind::Truncated,
                    _ => ErrorKind::Corrupt,
                };
                w.refuse(&name, kind, format!("the member's local header cannot be read: {err}"));
                continue;
            }
        };
        zip_read(unit, &name, m, limits, w, &mut || {
            let mut f = zip.by_index(i).map_err(std::io::Error::other)?;
            read_member(&mut f, 0, max)
        });
    }
    w.finish_sample();
    Ok(())
}

/// A zip whose central directory cannot be read (typically one cut off at the end): its
/// members are read from their local headers in file order, then one `truncated` entry
/// stands for whatever the damage hides.
fn walk_zip_stream<R: Read>(src: R, cd_error: zip::result::ZipError, limits: &ArchiveLimits, w: &mut Walker<'_>) -> Result<(), InputError> {
    let mut r = BufReader::new(src);
    let max = limits.max_member_bytes;
    let why = loop {
        if w.past_range() {
            return Ok(());
        }
        match zip::read::read_zipfile_from_stream(&mut r) {
            Ok(Some(mut f)) => {
                w.count_member(limits)?;
                let name = f.name().to_string();
                let Some(unit) = zip_classify(&name, w) else { continue };
                let m = ZipMember { is_link: f.is_symlink(), encrypted: f.encrypted(), size: f.size(), csize: f.compressed_size() };
                zip_read(unit, &name, m, limits, w, &mut || read_member(&mut f, 0, max));
            }
            Ok(None) => break "its central directory is damaged".to_string(),
            Err(err) => break format!("it breaks off after sample {}: {err}", w.scan.units),
        }
    };
    w.finish_sample();
    w.truncated(format!("the zip cannot be read to its end ({why}; {cd_error})"));
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/archives").join(name)
    }

    fn limits() -> ArchiveLimits {
        ArchiveLimits::from(&Limits::default())
    }

    /// (unit, key, member, error kind or "image")
    type Row = (u32, Option<String>, Option<String>, &'static str);

    fn entries(name: &str, range: RangeInclusive<u32>, l: &ArchiveLimits) -> (Scan, Vec<Row>) {
        let mut out = Vec::new();
        let scan = walk(&fixture(name), l, Some(range), &mut |e| {
            out.push(match e {
                Entry::Image { unit, key, member, data } => {
                    assert!(!data.is_empty());
                    (unit, Some(key), Some(member), "image")
                }
                Entry::Refused { unit, key, member, kind, .. } => (unit, key, member, kind.as_str()),
            })
        })
        .unwrap();
        (scan, out)
    }

    #[test]
    fn sniffs_archives_by_their_bytes() {
        assert_eq!(sniff_archive_file(&fixture("shard-000000.tar")), Some(ArchiveKind::Tar));
        assert_eq!(sniff_archive_file(&fixture("gz-000000.tar.gz")), Some(ArchiveKind::TarGz));
        assert_eq!(sniff_archive_file(&fixture("pictures.zip")), Some(ArchiveKind::Zip));
        assert_eq!(sniff_archive_file(&fixture("bad/empty.tar")), None);
        assert_eq!(sniff_archive(b"%PDF-1.7"), None);
        assert_eq!(split_key("dir/000123.seg.PNG"), ("dir/000123", "seg.png".to_string()));
        assert_eq!(split_key("a.b/c"), ("a.b/c", String::new()));
        assert!(bad_name(b"a/../b.jpg").is_some() && bad_name(b"/x.jpg").is_some() && bad_name(b"a\0.jpg").is_some());
        assert!(bad_name(b"\xff.jpg").is_some() && bad_name(b"ok/x..y.jpg").is_none());
    }

    #[test]
    fn img2dataset_shards_give_one_image_per_sample_in_order() {
        let s = scan(&fixture("shard-000000.tar"), &limits()).unwrap();
        assert_eq!((s.units, s.images, s.without_image, s.refused, s.members, s.truncated), (5, 5, 0, 0, 15, false));
        let (_, all) = entries("shard-000000.tar", 1..=5, &limits());
        let keys: Vec<_> = all.iter().map(|e| (e.0, e.1.clone().unwrap(), e.2.clone().unwrap(), e.3)).collect();
        assert_eq!(keys[0], (1, "000000000".into(), "000000000.jpg".into(), "image"));
        assert_eq!(keys[4], (5, "000000004".into(), "000000004.jpg".into(), "image"));
        // A range reads only its samples and stops after them.
        let (_, mid) = entries("shard-000000.tar", 2..=3, &limits());
        assert_eq!(mid.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3]);
        // A sample whose download failed has no image: counted, no entry.
        let (s, one) = entries("shard-000001.tar", 1..=5, &limits());
        assert_eq!((s.units, s.images, s.without_image), (5, 4, 1));
        assert_eq!(one.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 4, 5]);
        let (s, gz) = entries("gz-000000.tar.gz", 1..=3, &limits());
        assert_eq!((s.units, gz.len(), gz[2].1.as_deref()), (3, 3, Some("000070002")));
        let (s, z) = entries("pictures.zip", 1..=9, &limits());
        assert_eq!(s.units, 3, "the .txt member is left alone");
        assert_eq!(z.iter().map(|e| e.2.clone().unwrap()).collect::<Vec<_>>(), vec!["pics/000.png", "pics/001.png", "pics/002.png"]);
        assert_eq!(z[1].1.as_deref(), Some("pics/001"));
    }

    #[test]
    fn truncated_archives_give_what_was_read_and_one_truncated_entry() {
        let s = scan(&fixture("bad/truncated.tar"), &limits()).unwrap();
        assert_eq!((s.units, s.images, s.truncated), (3, 2, true));
        let (_, e) = entries("bad/truncated.tar", 1..=3, &limits());
        assert_eq!(e.iter().map(|e| (e.0, e.3)).collect::<Vec<_>>(), vec![(1, "image"), (2, "image"), (3, "truncated")]);
        let s = scan(&fixture("bad/truncated.zip"), &limits()).unwrap();
        assert!(s.truncated && s.units >= 4, "{s:?}");
        let (_, e) = entries("bad/truncated.zip", 1..=s.units, &limits());
        assert_eq!(&e[..3].iter().map(|e| (e.0, e.3)).collect::<Vec<_>>(), &[(1, "image"), (2, "image"), (3, "image")]);
        assert_eq!(e.last().unwrap().3, "truncated");
        assert_eq!(e.last().unwrap().0, s.units);
        let err = scan(&fixture("bad/empty.tar"), &limits()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Empty);
    }

    #[test]
    fn hostile_members_are_refused_one_by_one() {
        let (s, e) = entries("bad/names.tar", 1..=99, &limits());
        let got: Vec<_> = e.iter().map(|e| (e.0, e.2.clone().unwrap(), e.3)).collect();
        assert_eq!(
            got,
            vec![
                (1, "000000000.jpg".into(), "image"),
                (2, "../escape.jpg".into(), "unsupported"),
                (3, "/abs/000000002.jpg".into(), "unsupported"),
                (4, "caf\u{fffd}.jpg".into(), "unsupported"),
                (5, "link.jpg".into(), "unsupported"),
                (6, "000000005.tar".into(), "unsupported"),
                (7, "000000006.jpg".into(), "image"),
            ]
        );
        assert_eq!((s.units, s.images, s.refused), (7, 2, 5));
        let (s, e) = entries("bad/duplicates.tar", 1..=9, &limits());
        assert_eq!(e.iter().map(|e| (e.0, e.1.clone().unwrap(), e.3)).collect::<Vec<_>>(), vec![
            (1, "000000000".into(), "image"),
            (2, "000000001".into(), "image"),
            (3, "000000002".into(), "image"),
            (4, "000000001".into(), "corrupt"),
        ]);
        assert_eq!(s.units, 4);
        let (_, e) = entries("bad/hostile.zip", 1..=9, &limits());
        assert_eq!(e.iter().map(|e| (e.2.clone().unwrap(), e.3)).collect::<Vec<_>>(), vec![
            ("000.jpg".into(), "image"),
            ("bomb.bmp".into(), "too_large"),
            ("secret.jpg".into(), "encrypted"),
            ("inner.zip".into(), "unsupported"),
            ("002.jpg".into(), "image"),
        ]);
        let s = scan(&fixture("bad/noimages.tar"), &limits()).unwrap();
        assert_eq!((s.units, s.images, s.without_image, s.refused), (3, 0, 3, 0));
    }

    #[test]
    fn limits_apply_to_members() {
        let small = ArchiveLimits { max_member_bytes: 500, ..limits() };
        let (_, e) = entries("shard-000000.tar", 1..=5, &small);
        assert!(e.iter().all(|e| e.3 == "too_large"), "{e:?}");
        let few = ArchiveLimits { max_members: 14, ..limits() };
        assert_eq!(scan(&fixture("shard-000000.tar"), &few).unwrap_err().kind, ErrorKind::TooLarge);
        assert_eq!(scan(&fixture("pictures.zip"), &ArchiveLimits { max_members: 3, ..limits() }).unwrap_err().kind, ErrorKind::TooLarge);
        let lax = ArchiveLimits { max_zip_ratio: 2000, ..limits() };
        let (_, e) = entries("bad/hostile.zip", 2..=2, &lax);
        assert_eq!(e[0].3, "image", "within the ratio limit the member is inflated (and judged by the decoder)");
    }

    /// A source that records every read (position, length).
    struct Counting<R> {
        inner: R,
        reads: std::rc::Rc<std::cell::RefCell<Vec<(u64, usize)>>>,
    }

    impl<R: Read + Seek> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let pos = self.inner.stream_position()?;
            let n = self.inner.read(buf)?;
            self.reads.borrow_mut().push((pos, n));
            Ok(n)
        }
    }

    impl<R: Seek> Seek for Counting<R> {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    /// A zip of `n` stored members `s/NNN.jpg` of `size` bytes each (distinct bytes), with a
    /// caption member now and then, and each member's name and local header offset.
    pub(crate) fn many_member_zip(n: usize, size: usize) -> (Vec<u8>, Vec<(String, u64)>) {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for i in 0..n {
            w.start_file(format!("s/{i:03}.jpg"), opts).unwrap();
            let data: Vec<u8> = (0..size).map(|j| (j * 7 + i * 13) as u8).collect();
            w.write_all(&data).unwrap();
            if i % 10 == 3 {
                w.start_file(format!("s/{i:03}.txt"), opts).unwrap();
                w.write_all(b"a caption").unwrap();
            }
        }
        let bytes = w.finish().unwrap().into_inner();
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
        let offsets = (0..z.len())
            .map(|i| {
                let f = z.by_index_raw(i).unwrap();
                (f.name().to_string(), f.header_start())
            })
            .collect();
        (bytes, offsets)
    }

    fn collect_reader<R: Read + Seek>(src: R, range: RangeInclusive<u32>) -> (Scan, Vec<Entry>) {
        let mut out = Vec::new();
        let scan = walk_reader(src, &limits(), Some(range), &mut |e| out.push(e)).unwrap();
        (scan, out)
    }

    #[test]
    fn a_zip_task_opens_only_its_own_members() {
        let (bytes, offsets) = many_member_zip(40, 32 << 10);
        let reads = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let src = Counting { inner: std::io::Cursor::new(bytes.clone()), reads: reads.clone() };
        // A range late in the zip: the members before it are classified from the central
        // directory, never opened (opening each would be a request per member on S3).
        let (_, got) = collect_reader(src, 30..=31);
        let members: Vec<_> = got
            .iter()
            .map(|e| match e {
                Entry::Image { unit, member, data, .. } => (*unit, member.clone(), data.len()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(members, vec![(30, "s/029.jpg".to_string(), 32 << 10), (31, "s/030.jpg".to_string(), 32 << 10)]);
        let at = |name: &str| offsets.iter().find(|(n, _)| n == name).unwrap().1;
        let (from, to) = (at("s/001.jpg"), at("s/028.jpg"));
        let stray: Vec<_> = reads.borrow().iter().filter(|(p, n)| *p < to && p + *n as u64 > from).cloned().collect();
        assert!(stray.is_empty(), "reads inside the members before the range: {stray:?}");
        let total: usize = reads.borrow().iter().map(|r| r.1).sum();
        assert!(total < bytes.len() / 4, "read {total} of {} bytes", bytes.len());
        // The same samples as a scan counts, and as a walk of everything gives.
        let s = scan_reader(std::io::Cursor::new(bytes.clone()), &limits()).unwrap();
        assert_eq!((s.units, s.images, s.members), (40, 40, 44));
        let (_, all) = collect_reader(std::io::Cursor::new(bytes), 1..=40);
        assert_eq!(&all[29..31], &got[..]);
    }

    /// A plain tar of 30 samples `s/NNN.jpg` (4 KiB each) in GNU format: a directory entry,
    /// captions now and then, a member with a pax header, one with a GNU long name, and
    /// sample 21 repeating sample 6's key. Its 30 samples end with the long-named one.
    fn resumable_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], kind: tar::EntryType| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).unwrap();
        };
        add(&mut b, "s/", b"", tar::EntryType::Directory);
        for i in 0..29 {
            let key = if i == 20 { 5 } else { i };
            let data: Vec<u8> = (0..4096).map(|j| (j * 7 + i * 13) as u8).collect();
            if i == 12 {
                // A pax header of its own before the image.
                let rec = b"15 comment=abc\n";
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::XHeader);
                h.set_size(rec.len() as u64);
                b.append_data(&mut h, "PaxHeader/012.jpg", &rec[..]).unwrap();
            }
            add(&mut b, &format!("s/{key:03}.jpg"), &data, tar::EntryType::Regular);
            if i % 4 == 1 {
                add(&mut b, &format!("s/{key:03}.txt"), b"a caption", tar::EntryType::Regular);
            }
        }
        let long = format!("s/{}.jpg", "n".repeat(150));
        add(&mut b, &long, &[9u8; 4096], tar::EntryType::Regular);
        b.into_inner().unwrap()
    }

    /// Every range of `per` samples read from its resume point gives what the same range read
    /// from the start gives, and (`check_reads`) reads nothing before the resume point.
    fn resumed_ranges_match(bytes: &[u8], per: u32, check_reads: bool) {
        let s = scan_reader(std::io::Cursor::new(bytes), &limits()).unwrap();
        for first in (1..=s.units).step_by(per as usize) {
            let last = (first + per - 1).min(s.units);
            let (_, want) = collect_reader(std::io::Cursor::new(bytes), first..=last);
            let resume = s.resume_at(first, last);
            let reads = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let src = Counting { inner: std::io::Cursor::new(bytes), reads: reads.clone() };
            let mut got = Vec::new();
            walk_reader_from(src, &limits(), Some(first..=last), resume.as_ref(), &mut |e| got.push(e)).unwrap();
            assert_eq!(got, want, "samples {first}-{last} from {resume:?}");
            if let (true, Some(r)) = (check_reads, &resume) {
                let before: Vec<_> = reads.borrow().iter().filter(|(p, _)| *p < r.offset).cloned().collect();
                assert!(before.is_empty(), "samples {first}-{last} read before offset {}: {before:?}", r.offset);
            }
        }
    }

    #[test]
    fn a_tar_task_starts_reading_at_its_first_sample() {
        let bytes = resumable_tar();
        let s = scan_reader(std::io::Cursor::new(&bytes), &limits()).unwrap();
        assert_eq!((s.units, s.images, s.duplicates.clone()), (30, 29, vec![21]));
        assert_eq!(s.sample_offsets.len(), 30, "one offset per sample");
        assert_eq!(s.sample_offsets[0], 512, "after the directory entry");
        assert!(s.sample_offsets.iter().all(|o| o % 512 == 0) && s.sample_offsets.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s.resume_at(1, 5), None, "the first range starts at the start");
        assert_eq!(s.resume_at(19, 24).unwrap().duplicates, vec![21]);
        for per in [1, 4, 7] {
            resumed_ranges_match(&bytes, per, true);
        }
        // A late range reads about its own share of the shard, not everything before it.
        let r = s.resume_at(28, 30).unwrap();
        let reads = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let src = Counting { inner: std::io::Cursor::new(&bytes), reads: reads.clone() };
        walk_reader_from(src, &limits(), Some(28..=30), Some(&r), &mut |_| {}).unwrap();
        let total: usize = reads.borrow().iter().map(|r| r.1).sum();
        assert!(total < bytes.len() / 5, "read {total} of {} bytes", bytes.len());
        // A resume point that is no header (here: inside a member's data) is not trusted: the
        // walk starts at the beginning and gives the same samples.
        let wrong = quire_core::ArchiveResume { offset: s.sample_offsets[27] + 1024, duplicates: Vec::new() };
        let mut got = Vec::new();
        walk_reader_from(std::io::Cursor::new(&bytes), &limits(), Some(28..=30), Some(&wrong), &mut |e| got.push(e)).unwrap();
        assert_eq!(got, collect_reader(std::io::Cursor::new(&bytes), 28..=30).1);
        // The fixtures: img2dataset's layout, hostile names, duplicates, a shard cut off.
        for name in ["shard-000001.tar", "bad/names.tar", "bad/duplicates.tar", "bad/truncated.tar"] {
            let bytes = std::fs::read(fixture(name)).unwrap();
            for per in [1, 2] {
                resumed_ranges_match(&bytes, per, !name.contains("truncated"));
            }
        }
        // Compressed tars and zips have no resume points.
        assert!(scan(&fixture("gz-000000.tar.gz"), &limits()).unwrap().sample_offsets.is_empty());
        assert!(scan(&fixture("pictures.zip"), &limits()).unwrap().sample_offsets.is_empty());
    }

    #[test]
    fn zip_names_are_decoded_by_their_flag() {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        // ASCII names carry no UTF-8 flag; non-ASCII ones do.
        for name in ["cafX.jpg", "caf\u{e9}.jpg", "ok.jpg"] {
            w.start_file(name, opts).unwrap();
            w.write_all(b"not really a jpeg").unwrap();
        }
        let mut bytes = w.finish().unwrap().into_inner();
        let patch = |bytes: &mut Vec<u8>, from: &[u8], to: &[u8]| {
            let mut n = 0;
            let mut i = 0;
            while let Some(at) = bytes[i..].windows(from.len()).position(|x| x == from) {
                bytes[i + at..i + at + from.len()].copy_from_slice(to);
                i += at + from.len();
                n += 1;
            }
            assert_eq!(n, 2, "a name is in its local header and the central directory");
        };
        // 0x82 is é in CP437 (no flag: a legitimate name); a flagged name that is not UTF-8 is refused.
        patch(&mut bytes, b"cafX", b"caf\x82");
        patch(&mut bytes, "caf\u{e9}".as_bytes(), b"caf\xff\xfe");
        let (s, got) = collect_reader(std::io::Cursor::new(bytes), 1..=3);
        let got: Vec<_> = got
            .iter()
            .map(|e| match e {
                Entry::Image { member, .. } => (member.clone(), "image"),
                Entry::Refused { member, kind, .. } => (member.clone().unwrap(), kind.as_str()),
            })
            .collect();
        assert_eq!(got[0], ("caf\u{e9}.jpg".to_string(), "image"));
        assert_eq!(got[1].1, "unsupported", "{got:?}");
        assert!(got[1].0.contains('\u{fffd}'));
        assert_eq!(got[2], ("ok.jpg".to_string(), "image"));
        assert_eq!((s.units, s.refused), (3, 1));

        // A zip without image-named members: no samples, nothing refused (planned as one
        // task whose record says the archive has no images).
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for name in ["a.txt", "b.json", "dir/"] {
            if name.ends_with('/') {
                w.add_directory(name, opts).unwrap();
            } else {
                w.start_file(name, opts).unwrap();
                w.write_all(b"{}").unwrap();
            }
        }
        let s = scan_reader(w.finish().unwrap(), &limits()).unwrap();
        assert_eq!((s.units, s.images, s.refused, s.members), (0, 0, 0, 3));
    }
}
