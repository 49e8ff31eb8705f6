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

#[cfg(test)]
mod tests {
    use super::*;

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
