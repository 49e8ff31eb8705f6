//! Stable task ids: the same input planned with the same output-relevant
//! settings always gives the same id, which is what dedup and resume rest on.

use crate::settings::{JobSettings, SourceRef};
use sha2::{Digest, Sha256};

/// Hash of the settings that change what a task outputs. The job name, the
/// task split size and limits that only refuse inputs are left out on purpose
/// except where they change records (limits do: a refused page is an error).
pub fn settings_fingerprint(s: &JobSettings) -> String {
    let v = serde_json::json!({
        "task": s.task,
        "engine": s.engine,
        "model": s.model,
        "prompt": s.prompt,
        "max_new_tokens": s.max_new_tokens,
        "render": s.render,
        "limits": s.limits,
        "text_min_chars": s.text_min_chars,
    });
    let mut h = Sha256::new();
    h.update(v.to_string().as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Task id from the settings fingerprint, the object's identity and the unit range.
pub fn task_id(fingerprint: &str, src: &SourceRef, first: u32, last: u32) -> String {
    let mut h = Sha256::new();
    for part in [fingerprint, &src.uri, &src.size.to_string(), &src.version] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(first.to_le_bytes());
    h.update(last.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Id of a group of loose images: the settings and every member's identity (path, size,
/// mtime or ETag), in order.
pub fn images_task_id(fingerprint: &str, members: &[SourceRef]) -> String {
    let mut h = Sha256::new();
    h.update(b"images\0");
    h.update((fingerprint.len() as u64).to_le_bytes());
    h.update(fingerprint.as_bytes());
    for m in members {
        for part in [&m.uri, &m.size.to_string(), &m.version] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    hex::encode(&h.finalize()[..16])
}

/// Id of the task for a whole, unopened object (see `UnitKind::Document`):
/// a range no page-range task can have.
pub fn document_task_id(fingerprint: &str, src: &SourceRef) -> String {
    task_id(fingerprint, src, 0, u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(version: &str) -> SourceRef {
        SourceRef { uri: "in/a.pdf".into(), rel: "a.pdf".into(), size: 10, version: version.into() }
    }

    #[test]
    fn same_inputs_same_id_and_changes_change_it() {
        let s = JobSettings::new("j");
        let fp = settings_fingerprint(&s);
        let a = task_id(&fp, &src("1"), 1, 4);
        assert_eq!(a, task_id(&fp, &src("1"), 1, 4));
        assert_eq!(a.len(), 32);
        assert_ne!(a, task_id(&fp, &src("2"), 1, 4), "a modified file is new work");
        assert_ne!(a, task_id(&fp, &src("1"), 5, 8));
        let mut s2 = s.clone();
        s2.prompt = Some("other".into());
        assert_ne!(a, task_id(&settings_fingerprint(&s2), &src("1"), 1, 4));
        let mut s3 = s.clone();
        s3.job = "another-name".into();
        assert_eq!(fp, settings_fingerprint(&s3), "the job name does not change output");
        s3.out = Some("s3://bucket/elsewhere".into());
        assert_eq!(fp, settings_fingerprint(&s3), "the output location does not change ids");
        s3.datasets = vec![crate::DatasetFormat::Parquet, crate::DatasetFormat::Webdataset];
        assert_eq!(fp, settings_fingerprint(&s3), "dataset outputs are derived from records: same ids");
    }

    #[test]
    fn image_group_ids_follow_every_member() {
        let fp = settings_fingerprint(&JobSettings::new("j"));
        let m = |uri: &str, v: &str| SourceRef { uri: uri.into(), rel: uri.into(), size: 3, version: v.into() };
        let g = images_task_id(&fp, &[m("a.png", "1"), m("b.png", "1")]);
        assert_eq!(g, images_task_id(&fp, &[m("a.png", "1"), m("b.png", "1")]));
        assert_ne!(g, images_task_id(&fp, &[m("a.png", "1"), m("b.png", "2")]), "a changed member is new work");
        assert_ne!(g, images_task_id(&fp, &[m("a.png", "1")]));
        assert_ne!(g, images_task_id(&fp, &[m("b.png", "1"), m("a.png", "1")]));
        let mut s = JobSettings::new("j");
        s.limits.max_archive_members = 5;
        assert_ne!(fp, settings_fingerprint(&s), "a non-default member limit changes records");
        let v = serde_json::to_value(JobSettings::new("j").limits).unwrap();
        assert!(v.get("max_archive_members").is_none(), "default archive limits leave ids of earlier jobs alone: {v}");
    }
}
