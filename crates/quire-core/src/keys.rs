//! Where things go under `--out`. Every key is built here, and every part
//! that comes from an input name passes through [`safe_relative_path`], so no
//! file name can make quire write outside the output root.

/// `JOB/`
pub fn job_prefix(job: &str) -> String {
    format!("{}/", safe_component(job))
}

/// `JOB/results/TASK_ID.jsonl`
pub fn results_key(job: &str, task_id: &str) -> String {
    format!("{}results/{}.jsonl", job_prefix(job), safe_component(task_id))
}

/// `JOB/manifest.json`
pub fn manifest_key(job: &str) -> String {
    format!("{}manifest.json", job_prefix(job))
}

/// `JOB/markdown/<rel>.md`, `rel` being the source path below its input root.
pub fn markdown_key(job: &str, rel: &str) -> String {
    format!("{}markdown/{}.md", job_prefix(job), safe_relative_path(rel))
}

/// `JOB/parquet/<rel>.parquet`: the caption dataset of the archive at `rel`.
pub fn parquet_key(job: &str, rel: &str) -> String {
    format!("{}parquet/{}.parquet", job_prefix(job), safe_relative_path(rel))
}

/// `JOB/parquet/images-TASK_ID.parquet`: the caption dataset of one task of loose images.
pub fn images_parquet_key(job: &str, task_id: &str) -> String {
    format!("{}parquet/images-{}.parquet", job_prefix(job), safe_component(task_id))
}

/// `JOB/webdataset/<rel>`: the caption shard of the archive at `rel`. A tar (`.tar`, and
/// `.tar.gz`/`.tgz`, written gzip-compressed) keeps its name; any other archive (zip) gets
/// `.tar` appended, since a caption shard is always a tar.
pub fn webdataset_key(job: &str, rel: &str) -> String {
    let safe = safe_relative_path(rel);
    let lower = safe.to_ascii_lowercase();
    let suffix = if [".tar", ".tar.gz", ".tgz"].iter().any(|e| lower.ends_with(e)) { "" } else { ".tar" };
    format!("{}webdataset/{safe}{suffix}", job_prefix(job))
}

/// One path component with nothing that could climb out or hide.
fn safe_component(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => format!("_{cleaned}"),
        _ => cleaned,
    }
}

/// A relative path made safe: separators normalised to `/`, empty, `.` and
/// `..` components and control characters neutralised, no leading `/`.
/// Spaces and non-ASCII letters are kept as they are.
pub fn safe_relative_path(rel: &str) -> String {
    let parts: Vec<String> = rel
        .split(['/', '\\'])
        .filter(|p| !p.is_empty() && *p != ".")
        .map(|p| if p == ".." { "__".to_string() } else { safe_component(p) })
        .collect();
    if parts.is_empty() {
        "_".to_string()
    } else {
        parts.join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_stay_inside() {
        assert_eq!(safe_relative_path("../../etc/passwd"), "__/__/etc/passwd");
        assert_eq!(safe_relative_path("/abs/x.pdf"), "abs/x.pdf");
        assert_eq!(safe_relative_path("a\\..\\b.pdf"), "a/__/b.pdf");
        assert_eq!(safe_relative_path("scan été 01.png"), "scan été 01.png");
        assert_eq!(safe_relative_path("bad\nname.pdf"), "bad_name.pdf");
        assert_eq!(job_prefix(".."), "_../");
        assert_eq!(markdown_key("j", "../x.pdf"), "j/markdown/__/x.pdf.md");
        assert_eq!(results_key("j", "abc"), "j/results/abc.jsonl");
        assert_eq!(parquet_key("j", "../shards/s-000.tar"), "j/parquet/__/shards/s-000.tar.parquet");
        assert_eq!(images_parquet_key("j", "../x"), "j/parquet/images-.._x.parquet");
        assert_eq!(webdataset_key("j", "shards/s-000.tar"), "j/webdataset/shards/s-000.tar");
        assert_eq!(webdataset_key("j", "s.TGZ"), "j/webdataset/s.TGZ");
        assert_eq!(webdataset_key("j", "/abs/s.zip"), "j/webdataset/abs/s.zip.tar");
    }
}
