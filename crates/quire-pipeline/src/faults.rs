//! Fault injection for quire's own fault tests (`tests/distributed.rs`), switched on by the
//! environment variable `QUIRE_TEST_FAULTS` and off otherwise. Not a user feature.
//!
//! `QUIRE_TEST_FAULTS` is a comma list of:
//! - `page_ms=N`: every record takes N ms longer (slow inference, without a model);
//! - `crash_source=TEXT`: a worker process aborts as soon as it starts a task whose source
//!   contains TEXT (a poison task that kills its worker on every delivery);
//! - `starts_log=PATH`: each task start appends `TASK_ID DELIVERY PID UNIX_MS` to PATH;
//! - `fail_source=TEXT` with `fail_while=PATH`: while the file PATH exists, every record
//!   whose source contains TEXT becomes an error record (a transient fault that a later run
//!   with `--retry-failed` gets past once PATH is gone).

use quire_core::{ErrorInfo, ErrorKind, Record, TaskSpec};
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Default, PartialEq)]
pub struct Faults {
    pub page_ms: u64,
    pub crash_source: Option<String>,
    pub starts_log: Option<PathBuf>,
    pub fail_source: Option<String>,
    pub fail_while: Option<PathBuf>,
}

impl Faults {
    pub fn parse(spec: &str) -> Faults {
        let mut f = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("page_ms", v)) => f.page_ms = v.parse().unwrap_or(0),
                Some(("crash_source", v)) => f.crash_source = Some(v.to_string()),
                Some(("starts_log", v)) => f.starts_log = Some(PathBuf::from(v)),
                Some(("fail_source", v)) => f.fail_source = Some(v.to_string()),
                Some(("fail_while", v)) => f.fail_while = Some(PathBuf::from(v)),
                _ => tracing::warn!("QUIRE_TEST_FAULTS: ignoring {item:?}"),
            }
        }
        f
    }
}

fn faults() -> &'static Faults {
    static F: OnceLock<Faults> = OnceLock::new();
    F.get_or_init(|| std::env::var("QUIRE_TEST_FAULTS").map(|s| Faults::parse(&s)).unwrap_or_default())
}

/// Called as a worker starts a task.
pub fn task_started(task: &TaskSpec, delivery: u32) {
    let f = faults();
    if let Some(path) = &f.starts_log {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let line = format!("{} {delivery} {} {ms}\n", task.task_id, std::process::id());
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = file.write_all(line.as_bytes());
        }
    }
    if f.crash_source.as_deref().is_some_and(|s| task.source.uri.contains(s)) {
        eprintln!("QUIRE_TEST_FAULTS: crashing on {}", task.source.uri);
        std::process::abort();
    }
}

/// Called after a task's records are made, before they are stored.
pub async fn records_made(records: &mut [Record]) {
    let f = faults();
    if f.page_ms > 0 {
        tokio::time::sleep(Duration::from_millis(f.page_ms * records.len() as u64)).await;
    }
    if let (Some(text), Some(flag)) = (&f.fail_source, &f.fail_while) {
        if flag.exists() {
            for r in records.iter_mut().filter(|r| r.source.contains(text.as_str())) {
                r.error = Some(ErrorInfo { kind: ErrorKind::Io, message: "QUIRE_TEST_FAULTS: injected transient fault".into() });
                r.text.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_switches_and_ignores_the_rest() {
        let f = Faults::parse("page_ms=250, crash_source=poison.pdf,starts_log=/tmp/s,bogus,fail_source=a.pdf,fail_while=/tmp/f");
        assert_eq!(
            f,
            Faults {
                page_ms: 250,
                crash_source: Some("poison.pdf".into()),
                starts_log: Some("/tmp/s".into()),
                fail_source: Some("a.pdf".into()),
                fail_while: Some("/tmp/f".into()),
            }
        );
        assert_eq!(Faults::parse(""), Faults::default());
    }
}
