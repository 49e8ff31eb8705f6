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

/// `JOB/runs/RUN/manifest.json`: what one run of the job saw and did.
pub fn run_manifest_key(job: &str, run: &str) -> String {
    format!("{}runs/{}/manifest.json", job_prefix(job), safe_component(run))
}

/// `JOB/runs/RUN/started.json`: present from a run's start until it is closed, so that the
/// next run knows an earlier one ended before its manifests were written.
pub fn run_started_key(job: &str, run: &str) -> String {
    format!("{}runs/{}/started.json", job_prefix(job), safe_component(run))
}

/// `JOB/superseded/RUN/`: where a run moves the results and derived files it replaced, below
/// which they keep their path under `JOB/`.
pub fn superseded_prefix(job: &str, run: &str) -> String {
    format!("{}superseded/{}/", job_prefix(job), safe_component(run))
}

/// `JOB/markdown/<rel>.md`, `rel` being the source path below its input root.
pub fn markdown_key(job: &str, rel: &str) -> String {
    format!("{}markdown/{}", job_prefix(job), with_suffix(rel, ".md"))
}

/// The longest file name most file systems take, in bytes.
const NAME_MAX: usize = 255;

/// [`safe_relative_path`] of `rel` with `suffix` appended to its last component, every
/// component fitting [`NAME_MAX`] bytes: a name too long keeps its start and ends in `~`
/// and 16 hex digits of its SHA-256, so two long names that start alike stay apart.
pub fn with_suffix(rel: &str, suffix: &str) -> String {
    let safe = safe_relative_path(rel);
    let mut parts: Vec<String> = safe.split('/').map(str::to_string).collect();
    let n = parts.len();
    for (i, p) in parts.iter_mut().enumerate() {
        let tail = if i + 1 == n { suffix } else { "" };
        *p = fit_name(p, tail);
    }
    parts.join("/")
}

fn fit_name(name: &str, suffix: &str) -> String {
    if name.len() + suffix.len() <= NAME_MAX {
        return format!("{name}{suffix}");
    }
    use sha2::Digest;
    let digest = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..8]);
    let mut keep = NAME_MAX.saturating_sub(suffix.len() + 1 + digest.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}~{digest}{suffix}", &name[..keep])
}

/// `JOB/parquet/<rel>.parquet`: the caption dataset of the archive at `rel`.
pub fn parquet_key(job: &str, rel: &str) -> String {
    format!("{}parquet/{}", job_prefix(job), with_suffix(rel, ".parquet"))
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
    let suffix = if crate::names::TAR_SUFFIXES.iter().any(|e| lower.ends_with(e)) { "" } else { ".tar" };
    format!("{}webdataset/{}", job_prefix(job), with_suffix(&safe, suffix))
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

    #[test]
    fn overlong_names_are_shortened_and_stay_apart() {
        let a = format!("{}a.png", "é".repeat(126));
        let b = format!("{}b.png", "é".repeat(126));
        let (ka, kb) = (markdown_key("j", &format!("in/{a}")), markdown_key("j", &format!("in/{b}")));
        assert_ne!(ka, kb);
        for k in [&ka, &kb] {
            let last = k.rsplit('/').next().unwrap();
            assert!(last.len() <= NAME_MAX && last.ends_with(".md"), "{last} ({} bytes)", last.len());
            assert!(k.starts_with("j/markdown/in/éé"), "{k}");
        }
        assert_eq!(markdown_key("j", "in/short.png"), "j/markdown/in/short.png.md");
        assert_eq!(with_suffix(&"d".repeat(300), "").len(), NAME_MAX);
    }
}
