//! The distributed work queue: NATS JetStream.
//!
//! # Layout on the server
//!
//! | what | name | notes |
//! |---|---|---|
//! | work stream | `QUIRE_TASKS`, subjects `quire.tasks.>` | WorkQueue retention, file storage, `Nats-Msg-Id` = job token / task id |
//! | one subject per job | `quire.tasks.<job>` | `<job>` is [`subject_token`] of the job name |
//! | worker consumer | durable pull `quire-workers`, all jobs | explicit ack, `ack_wait` / `max_deliver` from [`QueueOptions`] |
//! | dead letters | `QUIRE_DEAD`, subjects `quire.dead.<job>` | limits retention, one JSON [`DeadLetter`] per task, deduplicated by task id |
//! | task events | `quire.events.<job>`, core NATS (not stored) | one JSON [`TaskEvent`] per stored result, split or dead letter, for `--wait` |
//! | advisories | `QUIRE_ADVISORIES` captures `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.QUIRE_TASKS.quire-workers` | WorkQueue retention, so advisories wait for a forwarder that is down |
//!
//! One stream with one durable consumer over every job (rather than a
//! stream per job) lets `quire worker --nats URL` serve whatever jobs are
//! queued without being told their names, and a WorkQueue stream admits only
//! non-overlapping consumers anyway.
//!
//! # Dedup
//!
//! Publishing sets `Nats-Msg-Id` to `JOB_TOKEN/TASK_ID` (task ids leave the
//! job name out, and two jobs over the same inputs each need their own
//! results); within the stream's
//! duplicate window (default 2 h, [`JetStreamOptions::duplicate_window`]) the
//! server drops a second publish of the same id and says so in its PubAck,
//! which [`TaskQueue::publish`] reports as [`Published::Duplicate`]. The
//! window costs server memory per id, so it is not meant to span days: a job
//! re-submitted days later is deduplicated by the pipeline checking stored
//! results before publishing; the window is the second guard against two
//! coordinators planning the same job at once. A forced submission
//! (`coordinator --force`) tags its tasks ([`TaskSpec::submission`]), and the
//! tag joins the id, so it is not dropped as a repeat of an earlier
//! submission. Caveats: a dead-lettered task
//! re-published within the window is dropped as a duplicate; after a server
//! restart the window only remembers ids of tasks still in the stream (the
//! server rebuilds it from the stored messages), so an acked task can be
//! published again then.
//!
//! # Dead letters
//!
//! Two paths lead to `QUIRE_DEAD`:
//! - a worker gives up ([`Lease::term`], or [`Lease::nack`] on the last
//!   allowed delivery): the lease publishes the record with the worker's
//!   reason, terminates the delivery and deletes the message from the work
//!   stream;
//! - a lease expires on the last delivery (a crashed or hung worker): the
//!   server emits a max-deliveries advisory, captured in `QUIRE_ADVISORIES`;
//!   [`JetStreamQueue::forward_dead_letters`] (run by the coordinator) reads
//!   it, fetches the task from the work stream by sequence (with WorkQueue
//!   retention it stays there after max deliveries until deleted), publishes
//!   the record and deletes the task.
//!
//! [`JetStreamQueue::dead_letters`] lists a job's records.
//!
//! # Stopping
//!
//! For a worker the queue never ends: [`TaskQueue::pull`] waits for work
//! until [`JetStreamQueue::stop`] is called (e.g. on SIGTERM), after which
//! every pending and future `pull` returns `None`. A pull request in flight
//! at that moment may have been granted a message the worker never sees; it
//! is delivered again after `ack_wait`. While the server is unreachable
//! `pull` keeps retrying for [`JetStreamOptions::retry_for`] before it
//! returns an error (the client reconnects by itself).

use crate::{Lease, Published, QueueError, QueueOptions, TaskEvent, TaskQueue};
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    message::AckKind,
    stream::{self, RetentionPolicy, StorageType},
};
use async_trait::async_trait;
use futures_util::StreamExt;
use quire_core::{DeadLetter, TaskSpec};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How to reach and authenticate to the NATS server.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    pub user_password: Option<(String, String)>,
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey seed), as made by `nsc`.
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust in addition to the system roots.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// Insist on TLS even when the URL says `nats://`.
    pub require_tls: bool,
    /// How long the first connection may keep failing for reasons that pass (nothing
    /// listening yet, a timeout, a name that does not resolve yet) before connecting fails:
    /// a Pod that starts before the broker, or before a NetworkPolicy controller admits its
    /// new address, waits instead of exiting. Refused credentials and TLS errors fail at once.
    pub connect_wait: Duration,
}

/// Where the queue lives and what it is called there.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// One or more server URLs, comma separated (`nats://host:4222`, `tls://...`).
    pub url: String,
    pub auth: NatsAuth,
    pub queue: QueueOptions,
    /// Work stream name; its subjects are `<subject_prefix>.>`.
    pub stream: String,
    pub subject_prefix: String,
    /// Durable pull consumer all workers share.
    pub consumer: String,
    pub dead_stream: String,
    pub dead_prefix: String,
    pub advisory_stream: String,
    /// Task events go to `<events_prefix>.<job>` (core NATS, not stored).
    pub events_prefix: String,
    /// Stream dedup window for task ids (see the module docs).
    pub duplicate_window: Duration,
    /// Replicas of the streams and the worker consumer (and of the job bucket,
    /// see [`crate::progress::JobProgress::open`]): `Some(n)` sets n (NATS
    /// allows 1 to 5, more than 1 only on a cluster), `None` keeps what an
    /// existing stream has and gives a new one 1, so a process started
    /// without the setting (a `quire status` from a laptop) changes nothing.
    pub replicas: Option<usize>,
    /// How long a single pull request waits on the server.
    pub poll: Duration,
    /// How long `pull` and the forwarder retry while the server is unreachable.
    pub retry_for: Duration,
    /// Whether connecting sets the worker consumer's `ack_wait` and
    /// `max_deliver` to `queue` (the coordinator does). When `false` (workers,
    /// `quire status`) an existing consumer's rules are adopted instead, so a
    /// worker started with other defaults does not change them for everyone;
    /// `queue` only applies when the consumer does not exist yet.
    pub set_delivery_rules: bool,
}

impl JetStreamOptions {
    pub fn new(url: impl Into<String>) -> Self {
        JetStreamOptions {
            url: url.into(),
            auth: NatsAuth::default(),
            queue: QueueOptions::default(),
            stream: "QUIRE_TASKS".into(),
            subject_prefix: "quire.tasks".into(),
            consumer: "quire-workers".into(),
            dead_stream: "QUIRE_DEAD".into(),
            dead_prefix: "quire.dead".into(),
            advisory_stream: "QUIRE_ADVISORIES".into(),
            events_prefix: "quire.events".into(),
            duplicate_window: Duration::from_secs(2 * 3600),
            replicas: None,
            poll: Duration::from_secs(5),
            retry_for: Duration::from_secs(120),
            set_delivery_rules: true,
        }
    }
}

/// Makes a job name usable as one subject token and KV key part: ASCII
/// letters, digits, `-` and `_` are kept, every other byte becomes `=XX`.
pub fn subject_token(job: &str) -> String {
    let mut out = String::with_capacity(job.len());
    for b in job.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("=00");
    }
    out
}

/// The replicas a stream gets: `want`, or else what the stream has now (1
/// when it does not exist yet).
pub(crate) async fn stream_replicas(js: &jetstream::Context, name: &str, want: Option<usize>) -> usize {
    match want {
        Some(n) => n,
        None => match js.get_stream(name).await {
            Ok(s) => s.cached_info().config.num_replicas.max(1),
            Err(_) => 1,
        },
    }
}

pub(crate) fn backend(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(format!("{what}: {e}"))
}

/// Reads once every message of `stream` that `config` selects, `batch` at a time, through a
/// throwaway consumer deleted afterwards (listings and counts: dead letters, task states);
/// `each` sees every message. `what` names the operation in errors.
pub(crate) async fn scan_stream(
    stream: &jetstream::stream::Stream,
    config: pull::Config,
    batch: usize,
    what: &str,
    mut each: impl FnMut(&jetstream::Message),
) -> Result<(), QueueError> {
    let consumer: jetstream::consumer::Consumer<pull::Config> =
        stream.create_consumer(config).await.map_err(|e| backend(what, e))?;
    loop {
        let mut messages = consumer.fetch().max_messages(batch).messages().await.map_err(|e| backend(what, e))?;
        let mut got = 0;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| backend(what, e))?;
            got += 1;
            each(&m);
        }
        if got == 0 {
            break;
        }
    }
    let name = consumer.cached_info().name.clone();
    let _ = stream.delete_consumer(&name).await;
    Ok(())
}

struct Inner {
    opts: JetStreamOptions,
    client: async_nats::Client,
    js: jetstream::Context,
    work: stream::Stream,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    stop: watch::Sender<bool>,
    /// The delivery rules in force and when they were read: a coordinator may change them
    /// while workers run, and a worker must renew its leases by the lease time in force.
    rules: std::sync::Mutex<(Instant, QueueOptions)>,
}

/// How old a reading of the delivery rules may be when a task is leased: none, since a
/// coordinator sets its rules before it publishes, so a reading taken after a task arrived
/// is never older than the task's rules (one consumer-info request per task).
const RULES_MAX_AGE: Duration = Duration::ZERO;

/// The JetStream task queue; cheap to clone.
#[derive(Clone)]
pub struct JetStreamQueue {
    inner: Arc<Inner>,
}

/// Connects to NATS with the given auth settings.
pub async fn connect_client(url: &str, auth: &NatsAuth) -> Result<async_nats::Client, QueueError> {
    let mut o = async_nats::ConnectOptions::new()
        .name("quire")
        .connection_timeout(Duration::from_secs(10))
        .max_reconnects(None);
    if let Some((u, p)) = &auth.user_password {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &auth.token {
        o = o.token(t.clone());
    }
    if let Some(path) = &auth.creds_file {
        o = o
            .credentials_file(path)
            .await
            .map_err(|e| backend(&format!("reading NATS credentials {}", path.display()), e))?;
    }
    if let Some(path) = &auth.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| backend(&format!("reading nkey seed {}", path.display()), e))?;
        o = o.nkey(seed.trim().to_string());
    }
    if let Some(ca) = &auth.tls_ca {
        o = o.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &auth.tls_client_cert {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if auth.require_tls {
        o = o.require_tls(true);
    }
    let deadline = Instant::now() + auth.connect_wait;
    let mut pause = Duration::from_millis(250);
    loop {
        match o.clone().connect(url).await {
            Ok(client) => return Ok(client),
            Err(e) if passing(e.kind()) && Instant::now() + pause < deadline => {
                tracing::warn!(
                    "connecting to NATS at {url}: {e}; trying again in {:.1} s (for up to {} s in all: --nats-connect-wait)",
                    pause.as_secs_f64(),
                    auth.connect_wait.as_secs()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(backend(&format!("connecting to NATS at {url}"), e)),
        }
    }
}

/// Connection failures that time may cure: the server not (yet) listening or reachable, or
/// its name not (yet) resolving. Not: refused credentials, TLS, a malformed URL.
fn passing(kind: async_nats::ConnectErrorKind) -> bool {
    use async_nats::ConnectErrorKind as K;
    matches!(kind, K::Io | K::TimedOut | K::Dns)
}

impl JetStreamQueue {
    /// Connects and makes sure the streams and the worker consumer exist
    /// (creating them, or updating `ack_wait`/`max_deliver`/the dedup window
    /// to these options).
    pub async fn connect(opts: JetStreamOptions) -> Result<Self, QueueError> {
        let client = connect_client(&opts.url, &opts.auth).await?;
        Self::with_client(client, opts).await
    }

    pub async fn with_client(
        client: async_nats::Client,
        mut opts: JetStreamOptions,
    ) -> Result<Self, QueueError> {
        let js = jetstream::new(client.clone());
        let work_replicas = stream_replicas(&js, &opts.stream, opts.replicas).await;
        let work_cfg = stream::Config {
            name: opts.stream.clone(),
            subjects: vec![format!("{}.>", opts.subject_prefix)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            duplicate_window: opts.duplicate_window,
            num_replicas: work_replicas,
            allow_direct: true,
            description: Some("quire tasks, one subject per job".into()),
            ..Default::default()
        };
        js.create_or_update_stream(work_cfg)
            .await
            .map_err(|e| backend(&format!("creating stream {}", opts.stream), e))?;
        let dead_cfg = stream::Config {
            name: opts.dead_stream.clone(),
            subjects: vec![format!("{}.>", opts.dead_prefix)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            duplicate_window: opts.duplicate_window,
            num_replicas: stream_replicas(&js, &opts.dead_stream, opts.replicas).await,
            allow_direct: true,
            description: Some("quire dead-lettered tasks, one subject per job".into()),
            ..Default::default()
        };
        js.create_or_update_stream(dead_cfg)
            .await
            .map_err(|e| backend(&format!("creating stream {}", opts.dead_stream), e))?;
        let adv_cfg = stream::Config {
            name: opts.advisory_stream.clone(),
            subjects: vec![advisory_subject(&opts)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: stream_replicas(&js, &opts.advisory_stream, opts.replicas).await,
            description: Some("max-deliveries advisories of the quire worker consumer".into()),
            ..Default::default()
        };
        js.create_or_update_stream(adv_cfg)
            .await
            .map_err(|e| backend(&format!("creating stream {}", opts.advisory_stream), e))?;

        let work = js
            .get_stream(&opts.stream)
            .await
            .map_err(|e| backend("opening the work stream", e))?;
        let consumer_cfg = pull::Config {
            durable_name: Some(opts.consumer.clone()),
            description: Some("quire workers".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: opts.queue.ack_wait,
            max_deliver: opts.queue.max_deliver as i64,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: -1,
            num_replicas: work_replicas,
            ..Default::default()
        };
        let mut consumer = if opts.set_delivery_rules {
            work.create_consumer(consumer_cfg)
                .await
                .map_err(|e| backend(&format!("creating consumer {}", opts.consumer), e))?
        } else {
            adopt_or_create_consumer(&work, consumer_cfg).await?
        };
        // The rules in force are the consumer's, whoever set them.
        let info = consumer
            .info()
            .await
            .map_err(|e| backend(&format!("reading consumer {}", opts.consumer), e))?;
        opts.queue.ack_wait = info.config.ack_wait;
        opts.queue.max_deliver = u32::try_from(info.config.max_deliver).unwrap_or(u32::MAX);
        let (stop, _) = watch::channel(false);
        let rules = std::sync::Mutex::new((Instant::now(), opts.queue));
        Ok(JetStreamQueue {
            inner: Arc::new(Inner {
                opts,
                client,
                js,
                work,
                consumer,
                stop,
                rules,
            }),
        })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    pub fn options(&self) -> &JetStreamOptions {
        &self.inner.opts
    }

    /// Ends the queue for this process: pending and future `pull`s return
    /// `None`, the forwarder returns.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    fn stopped(&self) -> bool {
        *self.inner.stop.borrow()
    }

    /// The subject tasks of `job` are published on.
    pub fn task_subject(&self, job: &str) -> String {
        format!("{}.{}", self.inner.opts.subject_prefix, subject_token(job))
    }

    fn events_subject_token(&self, token: &str) -> String {
        format!("{}.{}", self.inner.opts.events_prefix, token)
    }

    /// Follows the task events of `job` from now on (see [`TaskEvent`]:
    /// events published before this call, or while the connection is
    /// down, are not seen).
    pub async fn task_events(&self, job: &str) -> Result<TaskEvents, QueueError> {
        let sub = self
            .inner
            .client
            .subscribe(self.events_subject_token(&subject_token(job)))
            .await
            .map_err(|e| backend("subscribing to task events", e))?;
        // The subscription is live on the server once a round trip has passed.
        self.inner.client.flush().await.map_err(|e| backend("subscribing to task events", e))?;
        Ok(TaskEvents(sub))
    }

    async fn announce_token(&self, token: &str, event: &TaskEvent) {
        let mut body = match serde_json::to_vec(event) {
            Ok(b) => b,
            Err(e) => return tracing::warn!("encoding a task event: {e}"),
        };
        // Records too big for one message stay behind: followers read them
        // from the store.
        if body.len() > self.inner.client.server_info().max_payload {
            if let TaskEvent::Done { task_id, records: Some(_) } = event {
                let slim = TaskEvent::Done { task_id: task_id.clone(), records: None };
                body = serde_json::to_vec(&slim).unwrap_or_default();
            }
        }
        if let Err(e) = self.inner.client.publish(self.events_subject_token(token), body.into()).await {
            tracing::debug!("task event not sent: {e}");
        }
    }

    fn dead_subject(&self, job: &str) -> String {
        format!("{}.{}", self.inner.opts.dead_prefix, subject_token(job))
    }

    /// Tasks of `job` still in the work stream (queued, leased or waiting
    /// out a nack delay; dead tasks not yet forwarded included).
    pub async fn pending(&self, job: &str) -> Result<u64, QueueError> {
        let subject = self.task_subject(job);
        let mut info = self
            .inner
            .work
            .info_with_subjects(&subject)
            .await
            .map_err(|e| backend("reading stream info", e))?;
        let mut n = 0;
        while let Some(x) = info.next().await {
            let (s, c) = x.map_err(|e| backend("reading stream info", e))?;
            if s == subject {
                n += c as u64;
            }
        }
        Ok(n)
    }

    /// Publishes a dead-letter record (deduplicated by task id).
    async fn publish_dead(&self, job: &str, dead: &DeadLetter) -> Result<(), QueueError> {
        self.publish_dead_token(&subject_token(job), dead).await
    }

    /// Every dead-letter record of `job`, oldest first.
    pub async fn dead_letters(&self, job: &str) -> Result<Vec<DeadLetter>, QueueError> {
        let stream = self
            .inner
            .js
            .get_stream(&self.inner.opts.dead_stream)
            .await
            .map_err(|e| backend("opening the dead-letter stream", e))?;
        let config = pull::Config {
            filter_subject: self.dead_subject(job),
            ack_policy: AckPolicy::None,
            deliver_policy: DeliverPolicy::All,
            inactive_threshold: Duration::from_secs(60),
            memory_storage: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        scan_stream(&stream, config, 256, "listing dead letters", |m| match serde_json::from_slice::<DeadLetter>(&m.payload) {
            Ok(d) => out.push(d),
            Err(e) => tracing::warn!(subject = %m.subject, "skipping malformed dead letter: {e}"),
        })
        .await?;
        Ok(out)
    }

    /// Deletes a task from the work stream by sequence; a task already gone
    /// is fine.
    async fn delete_task(&self, seq: u64) -> Result<(), QueueError> {
        match self.inner.work.delete_message(seq).await {
            Ok(_) => Ok(()),
            Err(e)
                // A terminated delivery may already have removed it
                // (the server answers 10057 "no message found" then).
                if matches!(e.kind(), jetstream::stream::DeleteMessageErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
                        || j.error_code() == jetstream::ErrorCode::SEQUENCE_NOT_FOUND
                        || j.to_string().contains("no message found")) =>
            {
                Ok(())
            }
            Err(e) => Err(backend("deleting a dead task from the work stream", e)),
        }
    }

    /// Forwards max-deliveries advisories to dead letters until [`stop`]
    /// is called. Run it in the coordinator (several may run at once).
    ///
    /// [`stop`]: JetStreamQueue::stop
    pub async fn forward_dead_letters(&self) -> Result<(), QueueError> {
        let mut stop = self.inner.stop.subscribe();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            tokio::select! {
                r = self.forward_dead_letters_once(self.inner.opts.poll) => { r?; }
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }

    /// Forwards the advisories waiting now (waiting up to `wait` for the
    /// first) and returns how many tasks were dead-lettered.
    pub async fn forward_dead_letters_once(&self, wait: Duration) -> Result<usize, QueueError> {
        let o = &self.inner.opts;
        let adv = self
            .inner
            .js
            .get_stream(&o.advisory_stream)
            .await
            .map_err(|e| backend("opening the advisory stream", e))?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = adv
            .get_or_create_consumer(
                "dead-letter-forwarder",
                pull::Config {
                    durable_name: Some("dead-letter-forwarder".into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| backend("creating the dead-letter forwarder consumer", e))?;
        let mut batch = consumer
            .batch()
            .max_messages(64)
            .expires(wait.max(Duration::from_millis(100)))
            .messages()
            .await
            .map_err(|e| backend("reading advisories", e))?;
        let mut n = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| backend("reading advisories", e))?;
            let advisory: MaxDeliveriesAdvisory = match serde_json::from_slice(&m.payload) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("skipping malformed max-deliveries advisory: {e}");
                    let _ = m.ack().await;
                    continue;
                }
            };
            if self.forward_one(&advisory).await? {
                n += 1;
            }
            m.double_ack()
                .await
                .map_err(|e| backend("acking advisory", e))?;
        }
        Ok(n)
    }

    async fn forward_one(&self, a: &MaxDeliveriesAdvisory) -> Result<bool, QueueError> {
        let msg = match self.inner.work.get_raw_message(a.stream_seq).await {
            Ok(m) => m,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                // Acked late or dead-lettered by the worker itself.
                return Ok(false);
            }
            Err(e) => return Err(backend("fetching a dead task", e)),
        };
        let dead = match serde_json::from_slice::<TaskSpec>(&msg.payload) {
            Ok(t) => {
                let d = DeadLetter {
                    task_id: t.task_id.clone(),
                    source: t.source.uri.clone(),
                    first: t.first,
                    last: t.last,
                    deliveries: a.deliveries as u32,
                    reason: "lease expired without ack on the last allowed delivery".into(),
                };
                (subject_token(&t.settings.job), d)
            }
            Err(e) => malformed_dead_letter(
                &msg.subject,
                &msg.headers,
                &self.inner.opts,
                a.deliveries as u32,
                &e.to_string(),
            ),
        };
        self.publish_dead_token(&dead.0, &dead.1).await?;
        self.delete_task(a.stream_seq).await?;
        tracing::warn!(task = %dead.1.task_id, deliveries = a.deliveries, "task dead-lettered after its last lease expired");
        Ok(true)
    }
}

fn advisory_subject(o: &JetStreamOptions) -> String {
    format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        o.stream, o.consumer
    )
}

#[derive(serde::Deserialize)]
struct MaxDeliveriesAdvisory {
    stream_seq: u64,
    deliveries: u64,
}

/// A dead letter for a message that is not a task: the id comes from the
/// `Nats-Msg-Id` header, the job's subject token from the subject.
fn malformed_dead_letter(
    subject: &str,
    headers: &async_nats::HeaderMap,
    o: &JetStreamOptions,
    deliveries: u32,
    err: &str,
) -> (String, DeadLetter) {
    let id = headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().rsplit('/').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let job = subject
        .strip_prefix(&format!("{}.", o.subject_prefix))
        .unwrap_or("unknown")
        .to_string();
    let d = DeadLetter {
        task_id: id,
        source: String::new(),
        first: 0,
        last: 0,
        deliveries,
        reason: format!("malformed task message: {err}"),
    };
    (job, d)
}

/// Counts of a [`Publisher`]'s acknowledged publishes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PublishCounts {
    pub new: u64,
    pub duplicates: u64,
}

/// Publishes many tasks with up to `window` of them awaiting the server's
/// ack at once, instead of one round trip each.
pub struct Publisher {
    queue: JetStreamQueue,
    window: usize,
    in_flight: tokio::task::JoinSet<Result<bool, QueueError>>,
    counts: PublishCounts,
}

impl Publisher {
    fn settle(&mut self, r: Result<Result<bool, QueueError>, tokio::task::JoinError>) -> Result<(), QueueError> {
        match r.map_err(|e| backend("publishing task", e))?? {
            true => self.counts.duplicates += 1,
            false => self.counts.new += 1,
        }
        Ok(())
    }

    pub async fn send(&mut self, task: &TaskSpec) -> Result<(), QueueError> {
        while self.in_flight.len() >= self.window {
            if let Some(r) = self.in_flight.join_next().await {
                self.settle(r)?;
            }
        }
        let ack = self.queue.send_task(task).await?;
        self.in_flight.spawn(async move {
            ack.await
                .map(|a| a.duplicate)
                .map_err(|e| backend("publishing task (no PubAck)", e))
        });
        Ok(())
    }

    /// Waits for every ack.
    pub async fn finish(mut self) -> Result<PublishCounts, QueueError> {
        while let Some(r) = self.in_flight.join_next().await {
            self.settle(r)?;
        }
        Ok(self.counts)
    }
}

impl JetStreamQueue {
    /// A [`Publisher`] for bulk submission.
    pub fn publisher(&self, window: usize) -> Publisher {
        Publisher { queue: self.clone(), window: window.max(1), in_flight: Default::default(), counts: Default::default() }
    }

    async fn send_task(&self, task: &TaskSpec) -> Result<jetstream::context::PublishAckFuture, QueueError> {
        let body = serde_json::to_vec(task).map_err(|e| backend("encoding task", e))?;
        // Dedup is stream-wide: the id names the job too, since two jobs may
        // share task ids (the job name does not change what a task outputs)
        // while each needs its own results.
        let mut msg_id = format!("{}/{}", subject_token(&task.settings.job), task.task_id);
        if let Some(s) = &task.submission {
            msg_id = format!("{msg_id}/{s}");
        }
        let publish = jetstream::message::PublishMessage::build()
            .message_id(msg_id)
            .payload(body.into());
        self.inner
            .js
            .send_publish(self.task_subject(&task.settings.job), publish)
            .await
            .map_err(|e| backend("publishing task", e))
    }
}

#[async_trait]
impl TaskQueue for JetStreamQueue {
    async fn publish(&self, task: &TaskSpec) -> Result<Published, QueueError> {
        let ack = self
            .send_task(task)
            .await?
            .await
            .map_err(|e| backend("publishing task (no PubAck)", e))?;
        Ok(if ack.duplicate {
            Published::Duplicate
        } else {
            Published::New
        })
    }

    async fn announce(&self, job: &str, event: TaskEvent) {
        self.announce_token(&subject_token(job), &event).await
    }

    async fn pull(&self) -> Result<Option<Box<dyn Lease>>, QueueError> {
        let mut stop = self.inner.stop.subscribe();
        let mut failing_since: Option<Instant> = None;
        loop {
            if self.stopped() {
                return Ok(None);
            }
            let next = async {
                let mut batch = self
                    .inner
                    .consumer
                    .batch()
                    .max_messages(1)
                    .expires(self.inner.opts.poll)
                    .messages()
                    .await
                    .map_err(|e| backend("requesting a task", e))?;
                batch
                    .next()
                    .await
                    .transpose()
                    .map_err(|e| backend("receiving a task", e))
            };
            let got = tokio::select! {
                r = next => r,
                _ = stop.wait_for(|s| *s) => return Ok(None),
            };
            match got {
                Ok(Some(msg)) => {
                    failing_since = None;
                    match self.lease(msg).await? {
                        Some(l) => return Ok(Some(l)),
                        None => continue,
                    }
                }
                Ok(None) => failing_since = None,
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.inner.opts.retry_for {
                        return Err(e);
                    }
                    tracing::warn!("{e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(None),
                    }
                }
            }
        }
    }
}

/// The worker consumer as it is, or created with `cfg` when there is none yet. Never an
/// update: a coordinator may create it (with its rules) between a worker's look and the
/// worker's creation, and a create-or-update there would put the worker's defaults over
/// the coordinator's rules (seen in the fault drill: a 30 s lease where the job set 2 s,
/// so a killed worker's task waited 30 s to be taken over).
async fn adopt_or_create_consumer(
    work: &jetstream::stream::Stream,
    cfg: pull::Config,
) -> Result<jetstream::consumer::PullConsumer, QueueError> {
    let name = cfg.durable_name.clone().unwrap_or_default();
    // A strict create changes nothing that exists: it succeeds on an identical consumer
    // and fails on one with other rules, which is then taken as it is.
    match work.create_consumer_strict(cfg).await {
        Ok(c) => Ok(c),
        Err(e) if e.kind() == jetstream::stream::ConsumerCreateStrictErrorKind::AlreadyExists => work
            .get_consumer(&name)
            .await
            .map_err(|e| backend(&format!("reading consumer {name}"), e)),
        Err(e) => Err(backend(&format!("creating consumer {name}"), e)),
    }
}

impl JetStreamQueue {
    /// The delivery rules in force now: the consumer's, read again when the last reading is
    /// older than a few seconds (a coordinator that started after this worker may have
    /// changed them). On a failed reading the last one stands.
    pub async fn rules(&self) -> QueueOptions {
        let (at, rules) = *self.inner.rules.lock().unwrap_or_else(|p| p.into_inner());
        if at.elapsed() < RULES_MAX_AGE && !RULES_MAX_AGE.is_zero() {
            return rules;
        }
        match self.inner.consumer.get_info().await {
            Ok(info) => {
                let now = QueueOptions {
                    ack_wait: info.config.ack_wait,
                    max_deliver: u32::try_from(info.config.max_deliver).unwrap_or(u32::MAX),
                };
                if now != rules {
                    tracing::info!("delivery rules in force now: lease {:?}, {} deliveries", now.ack_wait, now.max_deliver);
                }
                *self.inner.rules.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), now);
                now
            }
            Err(e) => {
                tracing::debug!("reading the delivery rules: {e}");
                rules
            }
        }
    }

    /// Turns a delivered message into a lease; a message that is not a task
    /// is dead-lettered on the spot and `None` returned.
    async fn lease(&self, msg: jetstream::Message) -> Result<Option<Box<dyn Lease>>, QueueError> {
        let (delivery, seq) = match msg.info() {
            Ok(i) => (i.delivered.max(1) as u32, i.stream_sequence),
            Err(e) => return Err(backend("reading delivery info", e)),
        };
        match serde_json::from_slice::<TaskSpec>(&msg.payload) {
            Ok(task) => Ok(Some(Box::new(JetStreamLease {
                queue: self.clone(),
                msg,
                task,
                delivery,
                seq,
                rules: std::sync::Mutex::new(self.rules().await),
            }))),
            Err(e) => {
                let (job, dead) = malformed_dead_letter(
                    &msg.subject,
                    &msg.headers.clone().unwrap_or_default(),
                    &self.inner.opts,
                    delivery,
                    &e.to_string(),
                );
                tracing::warn!(subject = %msg.subject, "dead-lettering a malformed task message: {e}");
                self.publish_dead_token(&job, &dead).await?;
                let _ = msg.ack_with(AckKind::Term).await;
                self.delete_task(seq).await?;
                Ok(None)
            }
        }
    }

    /// Like `publish_dead` for a job known only by its subject token.
    async fn publish_dead_token(&self, token: &str, dead: &DeadLetter) -> Result<(), QueueError> {
        let body = serde_json::to_vec(dead).map_err(|e| backend("encoding dead letter", e))?;
        let subject = format!("{}.{}", self.inner.opts.dead_prefix, token);
        let mut publish = jetstream::message::PublishMessage::build().payload(body.into());
        if !dead.task_id.is_empty() {
            publish = publish.message_id(format!("{token}/{}", dead.task_id));
        }
        self.inner
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| backend("publishing dead letter", e))?
            .await
            .map_err(|e| backend("publishing dead letter", e))?;
        if !dead.task_id.is_empty() {
            self.announce_token(token, &TaskEvent::Dead { task_id: dead.task_id.clone() }).await;
        }
        Ok(())
    }
}

/// A job's task events as they happen ([`JetStreamQueue::task_events`]).
pub struct TaskEvents(async_nats::Subscriber);

impl TaskEvents {
    /// The next event; `None` once the subscription has ended. Malformed
    /// messages are skipped.
    pub async fn next(&mut self) -> Option<TaskEvent> {
        loop {
            let m = self.0.next().await?;
            match serde_json::from_slice(&m.payload) {
                Ok(ev) => return Some(ev),
                Err(e) => tracing::debug!(subject = %m.subject, "skipping a malformed task event: {e}"),
            }
        }
    }
}

struct JetStreamLease {
    queue: JetStreamQueue,
    msg: jetstream::Message,
    task: TaskSpec,
    delivery: u32,
    seq: u64,
    /// The delivery rules in force: read when the task was pulled and again at every
    /// heartbeat (a coordinator may change them while the task runs).
    rules: std::sync::Mutex<QueueOptions>,
}

impl JetStreamLease {
    fn rules(&self) -> QueueOptions {
        *self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dead-letter first (so that a failure leaves the task leased and it
    /// comes back), then stop deliveries and remove the task.
    async fn give_up(&self, reason: &str) -> Result<(), QueueError> {
        let t = &self.task;
        let dead = DeadLetter {
            task_id: t.task_id.clone(),
            source: t.source.uri.clone(),
            first: t.first,
            last: t.last,
            deliveries: self.delivery,
            reason: reason.to_string(),
        };
        self.queue.publish_dead(&t.settings.job, &dead).await?;
        self.msg
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| backend("terminating task", e))?;
        // With WorkQueue retention the terminated delivery removes the task
        // already; deleting it is a second guard, so a failure only warns.
        if let Err(e) = self.queue.delete_task(self.seq).await {
            tracing::warn!(task = %t.task_id, "{e}");
        }
        Ok(())
    }
}

#[async_trait]
impl Lease for JetStreamLease {
    fn task(&self) -> &TaskSpec {
        &self.task
    }

    fn delivery(&self) -> u32 {
        self.delivery
    }

    fn lease_time(&self) -> Duration {
        self.rules().ack_wait
    }

    async fn heartbeat(&self) -> Result<(), QueueError> {
        self.msg
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| backend("extending lease", e))?;
        let now = self.queue.rules().await;
        *self.rules.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(())
    }

    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        self.msg
            .double_ack()
            .await
            .map_err(|e| backend(&format!("acking task {}", self.task.task_id), e))
    }

    async fn nack(self: Box<Self>, delay: Duration, reason: &str) -> Result<(), QueueError> {
        if self.delivery >= self.rules().max_deliver {
            return self.give_up(reason).await;
        }
        tracing::debug!(task = %self.task.task_id, delivery = self.delivery, "nack: {reason}");
        self.msg
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| backend("nacking task", e))
    }

    async fn term(self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        self.give_up(reason).await
    }
}

#[cfg(test)]
mod tests {
    use quire_test_support::NatsServer;
    use super::*;
    use quire_core::{JobSettings, SourceRef, UnitKind};
    use std::collections::HashSet;
    use std::sync::Mutex;

    fn task(job: &str, id: &str) -> TaskSpec {
        TaskSpec::new(id.into(), JobSettings::new(job), SourceRef { uri: format!("s3://b/{id}.pdf"), rel: format!("{id}.pdf"), size: 1, version: "etag:x".into() }, UnitKind::Pdf, (1, 4), 4)
    }

    fn opts(server: &NatsServer, ack_ms: u64, max: u32) -> JetStreamOptions {
        let mut o = JetStreamOptions::new(server.url());
        o.queue = QueueOptions {
            ack_wait: Duration::from_millis(ack_ms),
            max_deliver: max,
        };
        o.poll = Duration::from_millis(500);
        o.retry_for = Duration::from_secs(30);
        o
    }

    async fn pull_within(q: &JetStreamQueue, d: Duration) -> Option<Box<dyn Lease>> {
        tokio::time::timeout(d, q.pull())
            .await
            .ok()
            .map(|r| r.unwrap().expect("queue not stopped"))
    }

    #[test]
    fn subject_tokens_are_safe() {
        assert_eq!(subject_token("job-1_a"), "job-1_a");
        assert_eq!(subject_token("a.b *>"), "a=2Eb=20=2A=3E");
        assert_eq!(subject_token(""), "=00");
    }

    #[tokio::test]
    async fn publish_dedups_and_pull_acks_and_stop_ends_pulls() {
        let server = NatsServer::start();
        let q = JetStreamQueue::connect(opts(&server, 5000, 3))
            .await
            .unwrap();
        assert_eq!(q.publish(&task("j1", "a")).await.unwrap(), Published::New);
        assert_eq!(
            q.publish(&task("j1", "a")).await.unwrap(),
            Published::Duplicate
        );
        assert_eq!(
            q.publish(&task("other job", "b")).await.unwrap(),
            Published::New
        );
        assert_eq!(q.pending("j1").await.unwrap(), 1);
        assert_eq!(q.pending("other job").await.unwrap(), 1);
        let l = q.pull().await.unwrap().unwrap();
        assert_eq!((l.task().task_id.as_str(), l.delivery()), ("a", 1));
        assert_eq!(l.task(), &task("j1", "a"));
        l.ack().await.unwrap();
        let l = q.pull().await.unwrap().unwrap();
        assert_eq!(l.task().task_id, "b");
        l.ack().await.unwrap();
        assert_eq!(q.pending("j1").await.unwrap(), 0);
        // Acked and gone, but still inside the dedup window.
        assert_eq!(
            q.publish(&task("j1", "a")).await.unwrap(),
            Published::Duplicate
        );
        // A worker waiting for work is released by stop().
        let q2 = q.clone();
        let waiting = tokio::spawn(async move { q2.pull().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        q.stop();
        let r = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("stop releases pull")
            .unwrap();
        assert!(r.unwrap().is_none());
        assert!(q.pull().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_first_connection_waits_for_a_broker_that_starts_late() {
        let mut server = NatsServer::start();
        server.stop();
        let mut o = opts(&server, 5000, 3);
        // Nothing listening and no wait: fails at once, saying where.
        let t0 = Instant::now();
        let err = JetStreamQueue::connect(o.clone()).await.err().expect("nothing listens");
        assert!(err.to_string().contains("connecting to NATS at"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        // With a wait, the broker starting 2 s later is found.
        o.auth.connect_wait = Duration::from_secs(30);
        let starter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            server.spawn();
            server
        });
        let t0 = Instant::now();
        let q = JetStreamQueue::connect(o).await.expect("connects once the broker is up");
        assert!(t0.elapsed() >= Duration::from_secs(2), "connected before the broker started?");
        assert_eq!(q.publish(&task("late", "a")).await.unwrap(), Published::New);
        drop(starter.join().unwrap());
    }

    #[tokio::test]
    async fn user_password_and_token_auth_are_used_and_refusals_are_clear() {
        let server = NatsServer::start_with(&["--user", "quire", "--pass", "s3cret"]);
        let mut o = opts(&server, 5000, 3);
        // A refusal is final: no waiting it out, however long the connect wait.
        o.auth.connect_wait = Duration::from_secs(60);
        let t0 = Instant::now();
        let err = JetStreamQueue::connect(o.clone()).await.err().expect("no credentials: refused");
        assert!(err.to_string().contains("connecting to NATS at"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "a refusal was retried for {:?}", t0.elapsed());
        o.auth.user_password = Some(("quire".into(), "wrong".into()));
        assert!(JetStreamQueue::connect(o.clone()).await.is_err());
        o.auth.user_password = Some(("quire".into(), "s3cret".into()));
        let q = JetStreamQueue::connect(o).await.unwrap();
        assert_eq!(q.publish(&task("auth", "a")).await.unwrap(), Published::New);
        let tok = NatsServer::start_with(&["--auth", "t0ken"]);
        let mut o = opts(&tok, 5000, 3);
        o.auth.token = Some("t0ken".into());
        JetStreamQueue::connect(o).await.unwrap();
    }

    #[tokio::test]
    async fn stream_replicas_are_asked_for_as_set() {
        let server = NatsServer::start();
        // A single server cannot hold 3 replicas: the setting reaches NATS and is refused there.
        let mut o = opts(&server, 5000, 3);
        o.replicas = Some(3);
        let err = JetStreamQueue::connect(o.clone()).await.err().expect("3 replicas on one server");
        assert!(err.to_string().contains(&format!("creating stream {}", o.stream)), "{err}");
        o.replicas = Some(1);
        let q = JetStreamQueue::connect(o.clone()).await.unwrap();
        let mut work = q.inner.work.clone();
        assert_eq!(work.info().await.unwrap().config.num_replicas, 1);
        // Unset: the existing stream's replicas are kept.
        o.replicas = None;
        JetStreamQueue::connect(o).await.unwrap();
    }

    #[tokio::test]
    async fn same_task_id_in_two_jobs_is_two_tasks_and_bulk_publish_counts_acks() {
        let server = NatsServer::start();
        let q = JetStreamQueue::connect(opts(&server, 5000, 3)).await.unwrap();
        let mut p = q.publisher(8);
        for i in 0..50 {
            p.send(&task("bulk", &format!("t{i}"))).await.unwrap();
        }
        // The same ids again (duplicates), and under another job (new work:
        // that job needs its own results).
        for i in 0..50 {
            p.send(&task("bulk", &format!("t{i}"))).await.unwrap();
            p.send(&task("bulk copy", &format!("t{i}"))).await.unwrap();
        }
        assert_eq!(p.finish().await.unwrap(), PublishCounts { new: 100, duplicates: 50 });
        assert_eq!((q.pending("bulk").await.unwrap(), q.pending("bulk copy").await.unwrap()), (50, 50));
    }

    #[tokio::test]
    async fn workers_adopt_the_consumer_rules_instead_of_overwriting_them() {
        let server = NatsServer::start();
        let coord = JetStreamQueue::connect(opts(&server, 30_000, 7)).await.unwrap();
        let mut w = opts(&server, 2_000, 2);
        w.set_delivery_rules = false;
        let worker = JetStreamQueue::connect(w).await.unwrap();
        for q in [&worker, &coord] {
            assert_eq!((q.options().queue.ack_wait, q.options().queue.max_deliver), (Duration::from_secs(30), 7));
        }
        // A worker alone on a fresh server creates the consumer with its own rules.
        let fresh = NatsServer::start();
        let mut w = opts(&fresh, 2_000, 2);
        w.set_delivery_rules = false;
        let q = JetStreamQueue::connect(w).await.unwrap();
        assert_eq!((q.options().queue.ack_wait, q.options().queue.max_deliver), (Duration::from_secs(2), 2));
    }

    #[tokio::test]
    async fn leases_follow_rules_a_coordinator_changed_after_the_worker_started() {
        let server = NatsServer::start();
        let mut w = opts(&server, 30_000, 3);
        w.set_delivery_rules = false;
        let worker = JetStreamQueue::connect(w).await.unwrap();
        let _coord = JetStreamQueue::connect(opts(&server, 2_000, 2)).await.unwrap();
        worker.publish(&task("j", "a")).await.unwrap();
        tokio::time::sleep(RULES_MAX_AGE + Duration::from_millis(200)).await;
        let lease = pull_within(&worker, Duration::from_secs(10)).await.expect("a task");
        assert_eq!(lease.lease_time(), Duration::from_secs(2), "the worker renews by the lease in force");
        // The last delivery allowed now is the 2nd: a failure on it is a dead letter.
        lease.nack(Duration::ZERO, "first failure").await.unwrap();
        let again = pull_within(&worker, Duration::from_secs(10)).await.expect("redelivered");
        assert_eq!(again.delivery(), 2);
        again.nack(Duration::ZERO, "second failure").await.unwrap();
        assert!(pull_within(&worker, Duration::from_millis(1500)).await.is_none());
        assert_eq!(worker.dead_letters("j").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_running_lease_learns_a_shorter_lease_at_its_next_heartbeat() {
        let server = NatsServer::start();
        let mut w = opts(&server, 30_000, 3);
        w.set_delivery_rules = false;
        let worker = JetStreamQueue::connect(w).await.unwrap();
        worker.publish(&task("j", "a")).await.unwrap();
        let lease = pull_within(&worker, Duration::from_secs(10)).await.expect("a task");
        assert_eq!(lease.lease_time(), Duration::from_secs(30));
        // A coordinator shortens the lease while the task runs: renewing every 10 s
        // would lose it.
        let _coord = JetStreamQueue::connect(opts(&server, 2_000, 3)).await.unwrap();
        lease.heartbeat().await.unwrap();
        assert_eq!(lease.lease_time(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_worker_that_loses_the_race_to_create_the_consumer_keeps_the_coordinators_rules() {
        // The race itself (worker looks, coordinator creates, worker creates) is too narrow to
        // hit on purpose; its last step is what matters: the worker's create changes nothing.
        let server = NatsServer::start();
        let coord = JetStreamQueue::connect(opts(&server, 2_000, 8)).await.unwrap();
        let w = opts(&server, 30_000, 3);
        let cfg = pull::Config {
            durable_name: Some(w.consumer.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: w.queue.ack_wait,
            max_deliver: w.queue.max_deliver as i64,
            ..Default::default()
        };
        let mut c = adopt_or_create_consumer(&coord.inner.work, cfg).await.unwrap();
        let info = c.info().await.unwrap();
        assert_eq!((info.config.ack_wait, info.config.max_deliver), (Duration::from_secs(2), 8));
    }

    #[tokio::test]
    async fn a_jobs_followers_hear_its_results_splits_and_dead_letters_and_no_other_jobs() {
        let server = NatsServer::start();
        let q = JetStreamQueue::connect(opts(&server, 5000, 3)).await.unwrap();
        let mut events = q.task_events("j.1").await.unwrap();
        let mut other = q.task_events("j-2").await.unwrap();
        q.announce("j.1", TaskEvent::Split { task_id: "d".into(), published: vec!["p1".into(), "p2".into()] }).await;
        q.announce("j-2", TaskEvent::Done { task_id: "elsewhere".into(), records: None }).await;
        q.announce("j.1", TaskEvent::Done { task_id: "p1".into(), records: Some("{\"page\":1}\n".into()) }).await;
        // Records bigger than the server takes in one message are left out.
        let big = "x".repeat(q.client().server_info().max_payload + 1);
        q.announce("j.1", TaskEvent::Done { task_id: "p3".into(), records: Some(big) }).await;
        // A task given up on tells its job's followers too.
        q.publish(&task("j.1", "p2")).await.unwrap();
        let lease = pull_within(&q, Duration::from_secs(5)).await.expect("a task");
        lease.term("poison").await.unwrap();
        let mut heard = Vec::new();
        for _ in 0..4 {
            heard.push(tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("an event").unwrap());
        }
        assert_eq!(
            heard,
            vec![
                TaskEvent::Split { task_id: "d".into(), published: vec!["p1".into(), "p2".into()] },
                TaskEvent::Done { task_id: "p1".into(), records: Some("{\"page\":1}\n".into()) },
                TaskEvent::Done { task_id: "p3".into(), records: None },
                TaskEvent::Dead { task_id: "p2".into() },
            ]
        );
        let e = tokio::time::timeout(Duration::from_secs(5), other.next()).await.unwrap().unwrap();
        assert_eq!(e, TaskEvent::Done { task_id: "elsewhere".into(), records: None });
        assert!(tokio::time::timeout(Duration::from_millis(300), other.next()).await.is_err(), "j-2 hears only its own events");
    }

    #[tokio::test]
    async fn nack_redelivers_after_its_delay() {
        let server = NatsServer::start();
        let q = JetStreamQueue::connect(opts(&server, 10_000, 3))
            .await
            .unwrap();
        q.publish(&task("j", "p")).await.unwrap();
        let l = q.pull().await.unwrap().unwrap();
        let t0 = Instant::now();
        l.nack(Duration::from_millis(700), "flaky").await.unwrap();
        let l = pull_within(&q, Duration::from_secs(5))
            .await
            .expect("redelivered");
        assert!(
            t0.elapsed() >= Duration::from_millis(650),
            "redelivered after {:?}",
            t0.elapsed()
        );
        assert_eq!(l.delivery(), 2);
        l.ack().await.unwrap();
        assert!(q.dead_letters("j").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn heartbeats_keep_a_lease_past_ack_wait() {
        let server = NatsServer::start();
        let q = JetStreamQueue::connect(opts(&server, 1000, 5))
            .await
            .unwrap();
        q.publish(&task("j", "slow")).await.unwrap();
        q.publish(&task("j", "lost")).await.unwrap();
        let slow = q.pull().await.unwrap().unwrap();
        let lost = q.pull().await.unwrap().unwrap();
        assert_eq!(lost.task().task_id, "lost");
        drop(lost); // a worker that died holding the lease
        let t0 = Instant::now();
        let q2 = q.clone();
        let redelivered =
            tokio::spawn(async move { pull_within(&q2, Duration::from_secs(6)).await });
        while t0.elapsed() < Duration::from_millis(3000) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            slow.heartbeat().await.unwrap();
        }
        let again = redelivered.await.unwrap().expect("lost task redelivered");
        assert_eq!(
            (again.task().task_id.as_str(), again.delivery()),
            ("lost", 2)
        );
        slow.ack().await.unwrap();
        again.ack().await.unwrap();
        assert!(
            pull_within(&q, Duration::from_millis(1500)).await.is_none(),
            "slow task was redelivered"
        );
        assert_eq!(q.pending("j").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn given_up_tasks_are_dead_lettered_and_listed() {
        let server = NatsServer::start();
        let q = JetStreamQueue::connect(opts(&server, 1000, 2))
            .await
            .unwrap();
        for id in ["termed", "nacked", "crashed"] {
            q.publish(&task("dj", id)).await.unwrap();
        }
        let mut dropped = 0;
        let mut done = HashSet::new();
        while done.len() < 2 || dropped < 2 {
            let l = pull_within(&q, Duration::from_secs(5))
                .await
                .expect("a delivery");
            match l.task().task_id.as_str() {
                "termed" => {
                    l.term("not a PDF").await.unwrap();
                    done.insert("termed");
                }
                "nacked" => {
                    let last = l.delivery() == 2;
                    l.nack(
                        Duration::ZERO,
                        &format!("failed on delivery {}", if last { 2 } else { 1 }),
                    )
                    .await
                    .unwrap();
                    if last {
                        done.insert("nacked");
                    }
                }
                "crashed" => {
                    dropped += 1;
                    drop(l);
                }
                other => panic!("unexpected {other}"),
            }
        }
        // The last lease of "crashed" expires while a worker is pulling:
        // the server gives up and sends the max-deliveries advisory.
        let q2 = q.clone();
        let puller = tokio::spawn(async move {
            pull_within(&q2, Duration::from_secs(3))
                .await
                .map(|l| l.task().task_id.clone())
        });
        let mut forwarded = 0;
        let t0 = Instant::now();
        while forwarded == 0 && t0.elapsed() < Duration::from_secs(10) {
            forwarded += q
                .forward_dead_letters_once(Duration::from_millis(500))
                .await
                .unwrap();
        }
        assert_eq!(forwarded, 1);
        assert_eq!(
            puller.await.unwrap(),
            None,
            "a dead task was delivered again"
        );
        let mut dead = q.dead_letters("dj").await.unwrap();
        dead.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        let got: Vec<_> = dead
            .iter()
            .map(|d| (d.task_id.as_str(), d.deliveries, d.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "crashed",
                    2,
                    "lease expired without ack on the last allowed delivery"
                ),
                ("nacked", 2, "failed on delivery 2"),
                ("termed", 1, "not a PDF"),
            ]
        );
        assert_eq!(
            (dead[0].source.as_str(), dead[0].first, dead[0].last),
            ("s3://b/crashed.pdf", 1, 4)
        );
        assert_eq!(
            q.pending("dj").await.unwrap(),
            0,
            "dead tasks left in the work stream"
        );
        assert!(q.dead_letters("other").await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_share_the_work_without_duplicates() {
        let server = NatsServer::start();
        let producer = JetStreamQueue::connect(opts(&server, 10_000, 3))
            .await
            .unwrap();
        let n = 30;
        for i in 0..n {
            producer
                .publish(&task("share", &format!("t{i:02}")))
                .await
                .unwrap();
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for w in 0..2 {
            // Separate connections, the same durable consumer.
            let q = JetStreamQueue::connect(opts(&server, 10_000, 3))
                .await
                .unwrap();
            let seen = seen.clone();
            workers.push(tokio::spawn(async move {
                let mut mine = 0;
                while let Some(l) = pull_within(&q, Duration::from_secs(2)).await {
                    seen.lock().unwrap().push(l.task().task_id.clone());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    l.ack().await.unwrap();
                    mine += 1;
                }
                (w, mine)
            }));
        }
        for h in workers {
            let (w, mine) = h.await.unwrap();
            assert!(mine > 0, "worker {w} got no work");
        }
        let seen = seen.lock().unwrap();
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(
            (seen.len(), unique.len()),
            (n, n),
            "duplicates or losses: {seen:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_tasks_survive_a_broker_restart() {
        let mut server = NatsServer::start();
        let q = JetStreamQueue::connect(opts(&server, 10_000, 3))
            .await
            .unwrap();
        for id in ["r1", "r2", "r3"] {
            q.publish(&task("restart", id)).await.unwrap();
        }
        let l = q.pull().await.unwrap().unwrap();
        assert_eq!(l.task().task_id, "r1");
        l.ack().await.unwrap();
        server.stop();
        // A worker pulling while the broker is down waits for it.
        let q2 = q.clone();
        let waiting = tokio::spawn(async move { q2.pull().await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.spawn();
        let l = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("pull resumed after restart")
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(l.task().task_id, "r2");
        l.ack().await.unwrap();
        let l = pull_within(&q, Duration::from_secs(5))
            .await
            .expect("r3 survived");
        assert_eq!(l.task().task_id, "r3");
        l.ack().await.unwrap();
        assert_eq!(
            q.publish(&task("restart", "r4")).await.unwrap(),
            Published::New
        );
        assert_eq!(
            q.publish(&task("restart", "r4")).await.unwrap(),
            Published::Duplicate
        );
        // The server rebuilds its dedup table from the messages still in
        // the stream: r4 is remembered across a second restart, acked tasks
        // are not (the pipeline's stored-results check covers those).
        server.stop();
        server.spawn();
        let t0 = Instant::now();
        let again = loop {
            match q.publish(&task("restart", "r4")).await {
                Ok(p) => break p,
                Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                    eprintln!("publish after restart: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(
            again,
            Published::Duplicate,
            "dedup of a queued task lost in a restart"
        );
        assert_eq!(q.pending("restart").await.unwrap(), 1);
    }
}
