//! Job progress in a JetStream key-value bucket (`quire-jobs`), for the
//! distributed mode: the coordinator records what it planned, workers
//! record how each task ended, `quire status` and the coordinator count.
//!
//! Keys (`<job>` is [`subject_token`] of the job name):
//! - `<job>.meta`: [`JobMeta`] as JSON (settings, planned task and unit counts);
//! - `<job>.task.<task_id>`: `done`, `failed` or `dead` ([`TaskState`]).
//!
//! A task's key is overwritten when a later delivery ends differently (a
//! `failed` task that succeeds on redelivery becomes `done`), so counts are
//! of tasks, not of attempts. Counting scans the job's keys (last value per
//! key) with a throw-away consumer; a cheap "is anything left" check is
//! [`JetStreamQueue::pending`](crate::jetstream::JetStreamQueue::pending).

use crate::jetstream::{backend, scan_stream, subject_token};
use crate::QueueError;
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    kv,
};
use quire_core::JobSettings;
use serde::{Deserialize, Serialize};

pub const BUCKET: &str = "quire-jobs";

/// What the coordinator planned for a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    pub settings: JobSettings,
    /// Documents planned (each one task until a worker splits it).
    pub documents: u64,
    /// `false` while the coordinator is still listing and planning.
    pub planning_done: bool,
    /// The job's inputs as given to the coordinator: workers take only tasks whose source
    /// lies below one of them.
    #[serde(default)]
    pub inputs: Vec<String>,
}

impl JobMeta {
    /// What the job's tasks may read and write, for [`TaskSpec::vet`](quire_core::TaskSpec::vet).
    pub fn scope(&self) -> quire_core::JobScope<'_> {
        quire_core::JobScope { out: self.settings.out.as_deref(), inputs: &self.inputs }
    }
}

/// How a task ended (its latest delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Results stored; no page had an error.
    Done,
    /// Results stored, with at least one page error record.
    Failed,
    /// Dead-lettered: no results.
    Dead,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Dead => "dead",
        }
    }

    fn parse(s: &[u8]) -> Option<Self> {
        match s {
            b"done" => Some(TaskState::Done),
            b"failed" => Some(TaskState::Failed),
            b"dead" => Some(TaskState::Dead),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskCounts {
    pub done: u64,
    pub failed: u64,
    pub dead: u64,
}

impl TaskCounts {
    /// Tasks that reached an end.
    pub fn settled(&self) -> u64 {
        self.done + self.failed + self.dead
    }
}

/// The `quire-jobs` bucket; cheap to clone.
#[derive(Clone)]
pub struct JobProgress {
    js: jetstream::Context,
    kv: kv::Store,
}

impl JobProgress {
    /// Opens the bucket, creating it when missing, with `replicas` as for
    /// the queue streams ([`crate::jetstream::JetStreamOptions::replicas`]):
    /// `Some(n)` also changes an existing bucket to n, `None` keeps its own.
    pub async fn open(client: &async_nats::Client, replicas: Option<usize>) -> Result<Self, QueueError> {
        let js = jetstream::new(client.clone());
        let stream = format!("KV_{BUCKET}");
        if let (Some(n), Ok(mut s)) = (replicas, js.get_stream(&stream).await) {
            let mut cfg = s.info().await.map_err(|e| backend("reading the quire-jobs bucket", e))?.config.clone();
            if cfg.num_replicas != n {
                cfg.num_replicas = n;
                js.update_stream(cfg).await.map_err(|e| backend("changing the quire-jobs bucket's replicas", e))?;
            }
        }
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: BUCKET.into(),
                    description: "quire job settings and per-task outcomes".into(),
                    history: 1,
                    num_replicas: crate::jetstream::stream_replicas(&js, &stream, replicas).await,
                    ..Default::default()
                })
                .await
                .map_err(|e| backend("creating the quire-jobs bucket", e))?,
        };
        Ok(JobProgress { js, kv })
    }

    pub async fn put_meta(&self, job: &str, meta: &JobMeta) -> Result<(), QueueError> {
        let body = serde_json::to_vec(meta).map_err(|e| backend("encoding job meta", e))?;
        self.kv
            .put(format!("{}.meta", subject_token(job)), body.into())
            .await
            .map_err(|e| backend("writing job meta", e))?;
        Ok(())
    }

    pub async fn meta(&self, job: &str) -> Result<Option<JobMeta>, QueueError> {
        let v = self
            .kv
            .get(format!("{}.meta", subject_token(job)))
            .await
            .map_err(|e| backend("reading job meta", e))?;
        v.map(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| QueueError::Malformed(format!("job meta of {job}: {e}")))
        })
        .transpose()
    }

    /// Records how a task ended (task ids are hex, usable as key tokens).
    pub async fn mark(&self, job: &str, task_id: &str, state: TaskState) -> Result<(), QueueError> {
        self.kv
            .put(
                format!("{}.task.{}", subject_token(job), subject_token(task_id)),
                state.as_str().into(),
            )
            .await
            .map_err(|e| backend("recording task state", e))?;
        Ok(())
    }

    /// Counts the job's task states (one scan over its keys).
    pub async fn counts(&self, job: &str) -> Result<TaskCounts, QueueError> {
        let stream = self
            .js
            .get_stream(format!("KV_{BUCKET}"))
            .await
            .map_err(|e| backend("opening the quire-jobs bucket", e))?;
        let config = pull::Config {
            filter_subject: format!("$KV.{BUCKET}.{}.task.>", subject_token(job)),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(60),
            memory_storage: true,
            ..Default::default()
        };
        let mut c = TaskCounts::default();
        scan_stream(&stream, config, 1000, "counting tasks", |m| match TaskState::parse(&m.payload) {
            Some(TaskState::Done) => c.done += 1,
            Some(TaskState::Failed) => c.failed += 1,
            Some(TaskState::Dead) => c.dead += 1,
            None => {} // deleted or purged key
        })
        .await?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_test_support::NatsServer;

    #[tokio::test]
    async fn records_meta_and_counts_task_states() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let p = JobProgress::open(&client, None).await.unwrap();
        assert_eq!(p.meta("my job").await.unwrap(), None);
        let meta = JobMeta {
            settings: JobSettings::new("my job"),
            documents: 4,
            planning_done: true,
            inputs: vec!["s3://in/scans/".into()],
        };
        p.put_meta("my job", &meta).await.unwrap();
        assert_eq!(p.meta("my job").await.unwrap(), Some(meta));
        assert_eq!(p.counts("my job").await.unwrap(), TaskCounts::default());
        p.mark("my job", "t1", TaskState::Failed).await.unwrap();
        p.mark("my job", "t1", TaskState::Done).await.unwrap(); // retried, now fine
        p.mark("my job", "t2", TaskState::Failed).await.unwrap();
        p.mark("my job", "t3", TaskState::Dead).await.unwrap();
        p.mark("other", "t9", TaskState::Done).await.unwrap();
        let c = p.counts("my job").await.unwrap();
        assert_eq!(
            c,
            TaskCounts {
                done: 1,
                failed: 1,
                dead: 1
            }
        );
        assert_eq!(c.settled(), 3);
        // Re-opening finds the same bucket.
        let p2 = JobProgress::open(&client, None).await.unwrap();
        assert_eq!(p2.counts("other").await.unwrap().done, 1);
        // Replicas asked for reach the existing bucket: one server cannot hold 3.
        let err = JobProgress::open(&client, Some(3)).await.err().expect("3 replicas on one server");
        assert!(err.to_string().contains("replicas"), "{err}");
        let p3 = JobProgress::open(&client, Some(1)).await.unwrap();
        assert_eq!(p3.counts("other").await.unwrap().done, 1);
    }
}
