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
    }
}
