//! Any bytes as a message received from the queue: the task (`TaskSpec`), the task events a
//! follower reads (`TaskEvent`), dead letters (`DeadLetter`) and the job metadata workers read
//! from the KV bucket (`JobMeta`, default feature `nats`). Decoding never panics; whatever
//! decodes re-encodes to bytes that decode to the same value (and re-encode identically).
//!
//! A decoded task then goes through what a worker derives from it before touching storage:
//! its output keys (`job_prefix`, `results_key`, `markdown_key`) must stay below the job's
//! prefix with no empty, `.` or `..` component, no backslash and no control character. With
//! the default feature `nats` it also goes through `TaskSpec::vet` and `lies_under`, the checks
//! a distributed worker applies to a task before running it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quire_core::{DeadLetter, TaskSpec};
use quire_queue::TaskEvent;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// Decodes `data` as `T`; when it decodes, checks the round trip and returns the value.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(data).ok()?;
    let bytes = serde_json::to_vec(&v).expect("a decoded value encodes");
    let w: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{} re-encoded as {} does not decode: {e}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(v, w, "round trip changed the value");
    assert_eq!(serde_json::to_vec(&w).unwrap(), bytes, "encoding is not stable");
    Some(v)
}

/// A store key built from untrusted names: relative, no component that climbs or hides.
fn assert_safe_key(key: &str, what: &str) {
    assert!(!key.starts_with('/'), "{what}: absolute key {key:?}");
    assert!(!key.contains('\\'), "{what}: backslash in {key:?}");
    assert!(!key.chars().any(char::is_control), "{what}: control character in {key:?}");
    let body = key.strip_suffix('/').unwrap_or(key);
    for part in body.split('/') {
        assert!(!matches!(part, "" | "." | ".."), "{what}: component {part:?} in {key:?}");
    }
}

fn check_task(task: &TaskSpec) {
    let job = &task.settings.job;
    let prefix = quire_core::job_prefix(job);
    assert_safe_key(&prefix, "job_prefix");
    assert!(prefix.ends_with('/') && prefix[..prefix.len() - 1].split('/').count() == 1, "job_prefix {prefix:?} is not one component");
    let results = quire_core::results_key(job, &task.task_id);
    assert_safe_key(&results, "results_key");
    assert!(results.starts_with(&prefix) && results.ends_with(".jsonl"), "{results:?}");
    assert_eq!(results[prefix.len()..].matches('/').count(), 1, "results_key {results:?} has a nested task id");
    for rel in std::iter::once(&task.source.rel).chain(task.members.iter().map(|m| &m.rel)) {
        let md = quire_core::markdown_key(job, rel);
        assert_safe_key(&md, "markdown_key");
        let below = md.strip_prefix(&prefix).and_then(|r| r.strip_prefix("markdown/"));
        let below = below.unwrap_or_else(|| panic!("markdown_key {md:?} not below {prefix:?}markdown/"));
        assert!(below.ends_with(".md"), "{md:?}");
        // with_suffix fits every component in NAME_MAX (255) bytes.
        assert!(below.split('/').all(|p| p.len() <= 255), "markdown_key {md:?} has a component over 255 bytes");
    }
    #[cfg(feature = "nats")]
    vet(task);
}

#[cfg(feature = "nats")]
fn vet(task: &TaskSpec) {
    use quire_core::lies_under;
    use quire_queue::progress::JobMeta;
    assert!(task.vet(None).is_err(), "a task of an unregistered job was accepted");
    // The job registered with the task's own input as its only input.
    let mut meta = JobMeta { settings: task.settings.clone(), documents: 1, planning_done: true, inputs: vec![task.source.uri.clone()] };
    if let Ok(()) = task.vet(Some(meta.scope())) {
        for uri in std::iter::once(&task.source.uri).chain(task.members.iter().map(|m| &m.uri)) {
            assert!(!uri.split(['/', '\\']).any(|p| p == ".."), "accepted {uri:?} with a '..' component");
        }
    }
    // Another output: always refused.
    meta.settings.out = Some(format!("{}-elsewhere", task.settings.out.as_deref().unwrap_or("")));
    assert!(task.vet(Some(meta.scope())).is_err(), "a task writing outside its job's output was accepted");
    // lies_under on the task's own strings, both ways.
    for (uri, input) in [(&task.source.uri, &task.source.rel), (&task.source.rel, &task.source.uri)] {
        if lies_under(uri, input) {
            assert!(!uri.contains('\0') && !uri.split(['/', '\\']).any(|p| p == ".."), "{uri:?} under {input:?}");
            let root = input.split('{').next().unwrap_or("");
            assert!(uri == input || (!root.is_empty() && uri.starts_with(root)), "{uri:?} under {input:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(task) = round_trip::<TaskSpec>(data) {
        check_task(&task);
    }
    round_trip::<TaskEvent>(data);
    round_trip::<DeadLetter>(data);
    #[cfg(feature = "nats")]
    round_trip::<quire_queue::progress::JobMeta>(data);
});
