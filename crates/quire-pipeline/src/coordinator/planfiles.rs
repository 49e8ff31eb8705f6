//! The files the coordinator keeps under the output: `JOB/job.json`, `JOB/plan/NNNNNN.jsonl`,
//! and the sets of task ids present under `results/` and `splits/`.

use crate::stage::split::split_key;
use crate::stage::split::splits_prefix;
use crate::stage::split::Split;
use anyhow::Context as _;
use quire_core::{
    job_prefix, JobSettings, ObjectTask, UnitKind,
};
use quire_store::BlobStore;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

/// One planned document in `JOB/plan/NNNNNN.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanLine {
    /// The whole-document task's id (or the image group's).
    pub task_id: String,
    pub uri: String,
    pub rel: String,
    /// [`UnitKind::Images`] for a group of loose images (`uri` and `rel` name the input root
    /// they were listed from); absent for a whole document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<UnitKind>,
    /// Images in the group.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub units: u32,
    /// The document's tasks when the job manifest knew them (an unchanged object of an
    /// earlier run): no split needs to be read for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<ObjectTask>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `JOB/job.json`: what the coordinator submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub settings: JobSettings,
    pub inputs: Vec<String>,
    /// Unix seconds of the (latest) submission.
    pub submitted_at: f64,
    pub documents: u64,
    /// The run (`--run`) of the latest submission.
    #[serde(default)]
    pub run: String,
    /// `JOB/plan/000000.jsonl` … in order; parts beyond are stale.
    pub plan_parts: u32,
    pub published: u64,
    pub skipped: u64,
    pub duplicates: u64,
}

/// Documents per plan part: bounds the coordinator's memory whatever the
/// corpus size.
pub const PLAN_PART_LINES: usize = 10_000;

pub fn plan_part_key(job: &str, part: u32) -> String {
    format!("{}plan/{part:06}.jsonl", job_prefix(job))
}

pub fn job_file_key(job: &str) -> String {
    format!("{}job.json", job_prefix(job))
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Writes the plan in parts of [`PLAN_PART_LINES`] documents.
pub(crate) struct PlanWriter<'a> {
    pub(crate) store: &'a dyn BlobStore,
    pub(crate) job: String,
    pub(crate) part: u32,
    pub(crate) buf: Vec<u8>,
    pub(crate) lines: usize,
}

impl PlanWriter<'_> {
    pub(crate) async fn push(&mut self, line: &PlanLine) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.buf, line)?;
        self.buf.push(b'\n');
        self.lines += 1;
        if self.lines == PLAN_PART_LINES {
            self.flush().await?;
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        if self.lines > 0 {
            let body = std::mem::take(&mut self.buf);
            self.store.put(&plan_part_key(&self.job, self.part), body).await?;
            self.part += 1;
            self.lines = 0;
        }
        Ok(())
    }
}

/// The planned documents of `job`, in plan order.
pub async fn read_plan(store: &dyn BlobStore, job: &str, jf: &JobFile) -> anyhow::Result<Vec<PlanLine>> {
    let mut out = Vec::with_capacity(jf.documents as usize);
    for part in 0..jf.plan_parts {
        let key = plan_part_key(job, part);
        let bytes = store.get(&key).await?.with_context(|| format!("{key} is missing"))?;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            out.push(serde_json::from_slice(line).with_context(|| format!("malformed {key}"))?);
        }
    }
    Ok(out)
}

pub async fn read_job_file(store: &dyn BlobStore, job: &str) -> anyhow::Result<Option<JobFile>> {
    let Some(bytes) = store.get(&job_file_key(job)).await? else {
        return Ok(None);
    };
    Ok(Some(
        serde_json::from_slice(&bytes).context("malformed job.json (written by an older quire? resubmit the job)")?,
    ))
}

/// A set of task ids held as 128-bit numbers (16 bytes each instead of a
/// 32-character string): the coordinator checks every document against it.
#[derive(Debug, Default, Clone)]
pub struct IdSet(HashSet<u128>);

impl IdSet {
    fn bits(id: &str) -> Option<u128> {
        if id.len() == 32 {
            u128::from_str_radix(id, 16).ok()
        } else {
            None
        }
    }

    pub fn insert(&mut self, id: &str) {
        if let Some(b) = Self::bits(id) {
            self.0.insert(b);
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        Self::bits(id).is_some_and(|b| self.0.contains(&b))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Ids named by the keys under `prefix` that end in `suffix`.
async fn ids_under(store: &dyn BlobStore, prefix: &str, suffix: &str) -> anyhow::Result<IdSet> {
    let mut set = IdSet::default();
    for k in store.list(prefix).await? {
        if let Some(id) = k.strip_prefix(prefix).and_then(|r| r.strip_suffix(suffix)) {
            set.insert(id);
        }
    }
    Ok(set)
}

/// Ids of the tasks of `job` with stored results.
pub async fn results_present(store: &dyn BlobStore, job: &str) -> anyhow::Result<IdSet> {
    ids_under(store, &format!("{}results/", job_prefix(job)), ".jsonl").await
}

/// Ids of the documents of `job` that a worker has split.
pub async fn splits_present(store: &dyn BlobStore, job: &str) -> anyhow::Result<IdSet> {
    ids_under(store, &splits_prefix(job), ".json").await
}

pub async fn read_split(store: &dyn BlobStore, job: &str, document_task_id: &str) -> anyhow::Result<Option<Split>> {
    let key = split_key(job, document_task_id);
    match store.get(&key).await? {
        None => Ok(None),
        Some(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("malformed {key}"))?)),
    }
}
