//! What a file is taken for by its name, where its bytes are not at hand: the one list of image
//! and archive extensions for every crate (listing, planning, archive members, dataset files).
//! The bytes still decide once a file is opened.

/// Extensions (the last dot-separated part, lower-case) of image files.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif"];

/// Extensions of archive and compressed formats: a member of an archive with one of these is
/// an archive itself (not opened: `unsupported`).
pub const ARCHIVE_EXTENSIONS: &[&str] = &["tar", "tgz", "gz", "zip", "tbz", "tbz2", "bz2", "xz", "zst", "7z", "rar"];

/// Name endings of the tar archives quire reads and writes (a caption shard keeps such a name).
pub const TAR_SUFFIXES: &[&str] = &[".tar", ".tar.gz", ".tgz"];

/// Name endings of gzip-compressed tars.
pub const TAR_GZ_SUFFIXES: &[&str] = &[".tar.gz", ".tgz"];

/// Name endings of the archives quire opens as inputs: tars and zips.
pub const INPUT_ARCHIVE_SUFFIXES: &[&str] = &[".tar", ".tar.gz", ".tgz", ".zip"];

/// The last dot-separated part of `ext` (`tar.gz` → `gz`).
fn last_ext(ext: &str) -> &str {
    ext.rsplit('.').next().unwrap_or("")
}

/// Whether `ext` (lower-case, its last part counts) is an image's.
pub fn is_image_ext(ext: &str) -> bool {
    IMAGE_EXTENSIONS.contains(&last_ext(ext))
}

/// Whether `ext` (lower-case, its last part counts) is an archive's or a compressed file's.
pub fn is_archive_ext(ext: &str) -> bool {
    ARCHIVE_EXTENSIONS.contains(&last_ext(ext))
}

/// Whether the file name at the end of `uri` has an image extension (any case).
pub fn looks_like_image(uri: &str) -> bool {
    let name = uri.rsplit('/').next().unwrap_or(uri);
    name.rsplit_once('.').is_some_and(|(_, ext)| is_image_ext(&ext.to_ascii_lowercase()))
}

/// Whether `name` ends with one of `suffixes` (any case).
pub fn ends_with_any(name: &str, suffixes: &[&str]) -> bool {
    let lower = name.to_ascii_lowercase();
    suffixes.iter().any(|s| lower.ends_with(s))
}

/// What an input object is, as the datasets and the job manifest see it. Planning decides it and
/// it travels with the plan: from the object's bytes where planning (or the worker that split
/// it) opened the object, else from its name ([`ObjectKind::by_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A tar or zip: one dataset file per object.
    Archive,
    /// A loose image (grouped with others): one dataset file per task.
    Images,
    /// Anything else (PDF documents): Markdown only.
    Document,
}

impl ObjectKind {
    /// What an object not opened (or not readable) is taken for by its name.
    pub fn by_name(uri: &str) -> ObjectKind {
        let name = uri.rsplit('/').next().unwrap_or(uri).to_ascii_lowercase();
        if looks_like_image(&name) {
            ObjectKind::Images
        } else if name.rsplit_once('.').is_some_and(|(_, ext)| is_archive_ext(ext)) {
            ObjectKind::Archive
        } else {
            ObjectKind::Document
        }
    }

    /// The kind of an object planned as tasks of `unit`: the unit says it where the object was
    /// opened; an object that could not be read, or was not opened yet, goes by its name.
    pub fn planned(unit: crate::UnitKind, uri: &str) -> ObjectKind {
        use crate::UnitKind as U;
        match unit {
            U::Archive => ObjectKind::Archive,
            U::Image | U::Images => ObjectKind::Images,
            U::Pdf => ObjectKind::Document,
            U::Unreadable | U::Document => ObjectKind::by_name(uri),
        }
    }

    /// The name the job manifest gives an object of this kind that could be read.
    pub fn manifest_name(self) -> &'static str {
        match self {
            ObjectKind::Archive => "archive",
            ObjectKind::Images => "image",
            ObjectKind::Document => "pdf",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_not_opened_goes_by_its_name_and_an_opened_one_by_its_units() {
        use crate::UnitKind;
        assert_eq!(ObjectKind::by_name("s3://b/in/Scan.JPG"), ObjectKind::Images);
        assert_eq!(ObjectKind::by_name("in/shard-000.TAR.GZ"), ObjectKind::Archive);
        assert_eq!(ObjectKind::by_name("in/a.rar"), ObjectKind::Archive);
        assert_eq!(ObjectKind::by_name("in/a.pdf"), ObjectKind::Document);
        assert_eq!(ObjectKind::by_name("in.tar/report"), ObjectKind::Document);
        // Opened: the bytes decided the units, whatever the name says.
        assert_eq!(ObjectKind::planned(UnitKind::Archive, "in/shard-000"), ObjectKind::Archive);
        assert_eq!(ObjectKind::planned(UnitKind::Pdf, "in/a.jpg"), ObjectKind::Document);
        assert_eq!(ObjectKind::planned(UnitKind::Unreadable, "in/a.zip"), ObjectKind::Archive);
        assert_eq!(ObjectKind::planned(UnitKind::Document, "in/b.png"), ObjectKind::Images);
    }

    #[test]
    fn names_are_told_apart_by_their_last_extension_in_any_case() {
        assert!(looks_like_image("s3://b/in/Scan.JPG") && looks_like_image("a/b.tiff"));
        assert!(!looks_like_image("a/b.pdf") && !looks_like_image("a/jpg") && !looks_like_image("a.b/c"));
        assert!(is_archive_ext("tar.gz") && is_archive_ext("zip") && !is_archive_ext("png"));
        assert!(is_image_ext("x.png") && !is_image_ext("tar"));
        assert!(ends_with_any("s/Shard-000.TAR.GZ", TAR_GZ_SUFFIXES) && ends_with_any("x.zip", INPUT_ARCHIVE_SUFFIXES));
        assert!(!ends_with_any("x.zip", TAR_SUFFIXES));
    }
}
