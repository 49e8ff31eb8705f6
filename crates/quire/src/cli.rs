//! Command-line arguments.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "quire", version, about = "Turn PDFs and image archives into text with vision-language models.")]
#[command(after_help = "Exit codes: 0 all inputs processed; 2 usage or setup error; 3 finished, but some inputs or pages failed (see manifest.json); 1 internal error.")]
pub struct Cli {
    /// More log output (-v, -vv). QUIRE_LOG takes a tracing filter too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// pdfium worker processes for rendering PDF pages (default: CPU cores, at most 4). 0
    /// renders on a thread of this process: no crash isolation and no page time limit.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u32).range(0..64))]
    pub render_procs: Option<u32>,
    /// Longest time pdfium may spend on one page (or on opening a document) before its render
    /// process is stopped and the page gets a `timeout` error record; 0 waits for ever.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 120)]
    pub page_timeout_s: u64,
    /// The time `{date}` (YYYY-MM-DD) and `{time}` (HHMM) in a job name stand for, as an
    /// RFC 3339 timestamp; they are UTC. Default: now.
    #[arg(long, global = true, value_name = "RFC3339", env = "QUIRE_JOB_TIME")]
    pub job_time: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Process inputs in this process and write results to a local folder.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Plan a job onto the NATS JetStream queue (distributed mode); with --wait, finish it.
    Coordinator(CoordinatorArgs),
    /// Pull tasks from the NATS JetStream queue and store their results (distributed mode).
    Worker(WorkerArgs),
    /// How far a distributed job has come.
    Status(StatusArgs),
    /// Check that NATS JetStream and the output store answer with the credentials given, as a
    /// worker reaches them (exit 0; 2 with the reason when one does not), e.g. in `helm test`.
    Check(CheckArgs),
    /// Convert DocTags (SmolDocling / Granite-Docling output) to Markdown, or to layout blocks with --json.
    #[command(after_help = DOCTAGS_EXAMPLES)]
    Doctags(DoctagsArgs),
}

const DOCTAGS_EXAMPLES: &str = "\
Examples:
  # Markdown of saved model output, pages split at <page_break>
  quire doctags page1.dt page2.dt > doc.md

  # Layout blocks of the text on stdin, boxes scaled to a 1240x1754 page
  quire doctags --json --width 1240 --height 1754 < page.dt

Exit codes: 0 converted; 2 an input could not be read (nothing is printed then).";

const RUN_EXAMPLES: &str = "\
Examples:
  # Text of born-digital PDFs from their own text layer, no model needed
  quire run examples/ --out out --engine text-layer

  # Scanned PDFs and photos through a local SmolDocling checkpoint
  quire run scans/ photos/ --out out --model ./SmolDocling-256M-preview --job scans-2026-11

  # Captions for an image archive, 64 new tokens at most
  quire run archive/ --out out --task caption --model HuggingFaceTB/SmolVLM-256M-Instruct --max-new-tokens 64

Output: OUT/JOB/results/TASK_ID.jsonl (a record per page), OUT/JOB/markdown/<path>.md,
OUT/JOB/manifest.json; with --task caption OUT/JOB/parquet/*.parquet (see --dataset). Running the same command again skips finished tasks (--force redoes them).

Exit codes: 0 all inputs processed; 2 usage or setup error; 3 finished, but some inputs or
pages failed (see manifest.json); 1 internal error.";

#[derive(Clone, Copy, ValueEnum)]
pub enum TaskArg {
    Ocr,
    Caption,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum EngineArg {
    Auto,
    Vlm,
    TextLayer,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetArg {
    /// JOB/parquet/<archive path>.parquet per archive, JOB/parquet/images-TASK_ID.parquet per task of loose images.
    Parquet,
    /// JOB/webdataset/<archive path>: a caption shard (KEY.txt, KEY.json) per archive.
    Webdataset,
    /// No dataset files (Markdown for every input).
    None,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    None,
    Q8,
    Q4,
}

/// What a job produces: the options that go into its settings.
#[derive(Args, Clone)]
pub struct JobOpts {
    /// Job name: the folder under --out, and what reruns resume. `{date}` and `{time}` in it
    /// become the UTC date and time (see --job-time), e.g. nightly-{date}.
    #[arg(long, default_value = "default")]
    pub job: String,
    /// What to produce for each page or image.
    #[arg(long, value_enum, default_value = "ocr")]
    pub task: TaskArg,
    /// auto: a PDF page's own text layer when usable, else the model; vlm: always the model; text-layer: never the model.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: EngineArg,
    /// Model checkpoint: a local folder, a Hugging Face hub id, or an s3:// prefix.
    #[arg(long, value_name = "DIR|HUB_ID|s3://...")]
    pub model: Option<String>,
    /// Prompt for the model (default: the model family's own OCR or caption prompt).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Most tokens generated per page or image (default: the checkpoint's generation_config.json
    /// max_new_tokens or max_length, else 1024).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_new_tokens: Option<u64>,
    /// Pages per task (a task is the unit of scheduling, retry and resume).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub pages_per_task: u32,
    /// Loose images per task (consecutive images of a folder or prefix listing), and samples
    /// per task of a tar or zip archive.
    #[arg(long, default_value_t = quire_core::DEFAULT_IMAGES_PER_TASK, value_parser = clap::value_parser!(u32).range(1..))]
    pub images_per_task: u32,
    /// Render PDF pages with this long side in pixels (default: what the model reads, 1536 without a model).
    #[arg(long, value_name = "PX", conflicts_with = "render_dpi", value_parser = clap::value_parser!(u32).range(1..))]
    pub render_long_side: Option<u32>,
    /// Render PDF pages at this resolution (1 to 2400) instead of a fixed long side.
    #[arg(long, value_name = "DPI", value_parser = parse_dpi)]
    pub render_dpi: Option<f32>,
    /// Letters and digits a page's text layer needs to be used instead of the model (engine auto).
    #[arg(long, default_value_t = 32)]
    pub text_min_chars: usize,
    /// Largest input file, in MiB (fractions allowed).
    #[arg(long, default_value_t = 512.0)]
    pub max_file_mb: f64,
    /// Most pages (or TIFF frames) per document.
    #[arg(long, default_value_t = 2000)]
    pub max_pages: u32,
    /// Most pixels per image or rendered page (decompression bombs are refused before decoding).
    #[arg(long, default_value_t = 50_000_000)]
    pub max_pixels: u64,
    /// Most members (of any kind) in one tar or zip archive; a larger one gets one error record.
    #[arg(long, default_value_t = quire_core::DEFAULT_MAX_ARCHIVE_MEMBERS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_archive_members: u32,
    /// Largest uncompressed:compressed ratio of a zip member; a larger one is refused before it
    /// is inflated (zip bombs). --max-file-mb applies to each member's uncompressed size.
    #[arg(long, default_value_t = quire_core::DEFAULT_MAX_ZIP_RATIO, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_zip_ratio: u32,
    /// Deliveries of a failing task before it is given up on.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliver: u32,
    /// The device's price per hour (any currency; the manifest calls it USD): the manifest
    /// then gives the cost per 1,000 model pages from their device seconds.
    #[arg(long, value_name = "PRICE", env = "QUIRE_PRICE_PER_HOUR", value_parser = parse_price)]
    pub price_per_hour: Option<f64>,
    /// Caption datasets written from the records at the finish: comma list or repeated
    /// (default: parquet with --task caption, none otherwise). Images whose records go into a
    /// dataset get no Markdown.
    #[arg(long = "dataset", value_enum, value_delimiter = ',', value_name = "parquet,webdataset|none")]
    pub datasets: Vec<DatasetArg>,
}

/// How the model runs on this machine.
#[derive(Args, Clone)]
pub struct ModelOpts {
    /// Tasks worked on at the same time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,
    /// Pages per model forward pass under `--batching static` (pages from different tasks
    /// are batched together).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// `continuous`: pages join and leave the running batch between decode steps, as many
    /// as the KV-cache budget holds; `static`: batches of `--batch-size` run to the end.
    #[arg(long, value_enum, default_value = "continuous")]
    pub batching: BatchingArg,
    /// KV-cache budget in MiB for all sequences in flight (default: 70% of the GPU memory
    /// free after loading the model; on the CPU a quarter of the available memory, at most 8 GiB).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_mb: Option<u64>,
    /// Sequences in flight at most under continuous batching (default: 512 on a GPU, 16 on the CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sequences: Option<u32>,
    /// Device for the model.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: String,
    /// Model weights' dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// `q8`: the text model's linear layers in int8 with a scale per 32 weights (llama.cpp's
    /// q8_0 blocks), quantized at load. CPU only, with --dtype f32 or bf16 and AVX-512:
    /// decoding reads about half the bytes of bf16. `q4`: the same in 4 bits (a quarter of
    /// bf16's bytes plus the scales), also needing AVX512-VNNI. Text may differ from
    /// unquantized runs, more with q4.
    #[arg(long, value_enum, default_value = "none", env = "QUIRE_QUANTIZE")]
    pub quantize: QuantizeArg,
    /// A page whose output loops (the newest tokens repeat a period of at most
    /// --loop-max-period tokens over at least --loop-min-tokens): `stop` ends it at once, keeps
    /// the text up to one period and marks its record (`finish_reason` and `error.kind`
    /// `loop`); `retry` then decodes it once more with --loop-retry-penalty and keeps the
    /// better result; `off` lets it run to --max-new-tokens.
    #[arg(long, value_enum, default_value = "stop", env = "QUIRE_ON_LOOP")]
    pub on_loop: OnLoopArg,
    /// Longest repeated period, in tokens, that counts as a loop.
    #[arg(long, value_name = "TOKENS", default_value_t = quire_vlm::loops::DEFAULT_LOOP_MAX_PERIOD as u32,
          env = "QUIRE_LOOP_MAX_PERIOD", value_parser = clap::value_parser!(u32).range(1..))]
    pub loop_max_period: u32,
    /// Tokens the repetition must span before it counts as a loop (at least twice --loop-max-period).
    #[arg(long, value_name = "TOKENS", default_value_t = quire_vlm::loops::DEFAULT_LOOP_MIN_TOKENS as u32,
          env = "QUIRE_LOOP_MIN_TOKENS", value_parser = clap::value_parser!(u32).range(2..))]
    pub loop_min_tokens: u32,
    /// Repetition penalty of the second attempt under --on-loop retry (above 1).
    #[arg(long, value_name = "PENALTY", default_value_t = quire_vlm::loops::DEFAULT_LOOP_RETRY_PENALTY,
          env = "QUIRE_LOOP_RETRY_PENALTY", value_parser = parse_penalty)]
    pub loop_retry_penalty: f64,
}

fn parse_penalty(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p.is_finite() && p > 1.0 => Ok(p),
        _ => Err(format!("{s:?} is not a repetition penalty (a number above 1)")),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLoopArg {
    Stop,
    Retry,
    Off,
}

fn parse_dpi(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(d) if d.is_finite() && (1.0..=quire_core::MAX_RENDER_DPI).contains(&d) => Ok(d),
        _ => Err(format!("{s:?} is not a resolution between 1 and {} dpi", quire_core::MAX_RENDER_DPI)),
    }
}

fn parse_price(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        _ => Err(format!("{s:?} is not a price (a number, 0 or more)")),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchingArg {
    Continuous,
    Static,
}

#[derive(Args)]
pub struct RunArgs {
    /// Files, folders (recursed), tar/zip archives, or brace patterns such as
    /// shards/{000000..000099}.tar.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,
    /// Output folder or s3://bucket/prefix; results go to OUT/JOB/.
    #[arg(long, value_name = "DIR|s3://...")]
    pub out: String,
    #[command(flatten)]
    pub opts: JobOpts,
    #[command(flatten)]
    pub s3: S3Opts,
    /// Disk space (MiB, in the temp folder) for downloaded s3:// inputs, kept from planning
    /// (which opens each new object) to the task that works on it; 0 keeps none.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub doc_cache_mb: u64,
    #[command(flatten)]
    pub model_opts: ModelOpts,
    /// Redo tasks whose results already exist.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub runs: RunOpts,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Which run of the standing job an invocation is, and what it redoes (`quire run` and
/// `quire coordinator`).
#[derive(Args, Clone)]
pub struct RunOpts {
    /// This run of the job: runs of the same name are one run (a retried nightly command
    /// continues the night). `{date}` and `{time}` become the UTC date and time (see
    /// --job-time). Its manifest is OUT/JOB/runs/RUN/manifest.json; the files it replaces
    /// move to OUT/JOB/superseded/RUN/.
    #[arg(long, value_name = "RUN", default_value = "{date}T{time}", env = "QUIRE_RUN")]
    pub run: String,
    /// Also redo the tasks of earlier runs whose pages failed (by default a failed page
    /// stays failed until its input changes).
    #[arg(long)]
    pub retry_failed: bool,
    /// Delete results and derived files that no current input owns any more, instead of
    /// moving them under OUT/JOB/superseded/RUN/.
    #[arg(long)]
    pub prune: bool,
}

/// Reaching NATS and S3.
#[derive(Args, Clone)]
pub struct ServiceOpts {
    /// NATS server URL(s), comma separated.
    #[arg(long, value_name = "URL", env = "QUIRE_NATS")]
    pub nats: String,
    #[command(flatten)]
    pub nats_auth: NatsAuthOpts,
    #[command(flatten)]
    pub s3: S3Opts,
}

/// NATS authentication, TLS (secrets are best passed as environment variables) and
/// the replicas of quire's streams.
#[derive(Args, Clone, Default)]
pub struct NatsAuthOpts {
    /// NATS user name (with --nats-password).
    #[arg(long, value_name = "NAME", env = "QUIRE_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, value_name = "PASSWORD", env = "QUIRE_NATS_PASSWORD", hide_env_values = true, requires = "nats_user")]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, value_name = "TOKEN", env = "QUIRE_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT and nkey seed, as made by `nsc`).
    #[arg(long, value_name = "FILE", env = "QUIRE_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// File holding an nkey seed (`SU...`).
    #[arg(long, value_name = "FILE", env = "QUIRE_NATS_NKEY")]
    pub nats_nkey: Option<std::path::PathBuf>,
    /// PEM CA certificate to trust for the NATS server's TLS certificate.
    #[arg(long, value_name = "FILE", env = "QUIRE_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for mutual TLS (with --nats-tls-key).
    #[arg(long, value_name = "FILE", env = "QUIRE_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<std::path::PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, value_name = "FILE", env = "QUIRE_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<std::path::PathBuf>,
    /// Insist on TLS even for a nats:// URL.
    #[arg(long, env = "QUIRE_NATS_REQUIRE_TLS")]
    pub nats_require_tls: bool,
    /// How long to keep trying the first connection to NATS while it cannot be reached (not
    /// listening yet, not resolving yet, not yet admitted by a NetworkPolicy), in seconds,
    /// with backoff; refused credentials and TLS errors end it at once. 0: try once.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, env = "QUIRE_NATS_CONNECT_WAIT")]
    pub nats_connect_wait: u64,
    /// JetStream replicas of quire's streams, worker consumer and job bucket (1 to 5; more
    /// than 1 needs a NATS cluster). Unset: existing ones keep theirs, new ones get 1. Give
    /// every quire process that sets it the same value.
    #[arg(long, value_name = "N", env = "QUIRE_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: Option<u8>,
}

impl NatsAuthOpts {
    pub fn auth(&self) -> quire_queue::jetstream::NatsAuth {
        quire_queue::jetstream::NatsAuth {
            user_password: self.nats_user.clone().zip(self.nats_password.clone()),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            nkey_seed_file: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client_cert: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            require_tls: self.nats_require_tls,
            connect_wait: std::time::Duration::from_secs(self.nats_connect_wait),
        }
    }

    pub fn replicas(&self) -> Option<usize> {
        self.nats_replicas.map(usize::from)
    }
}

/// Where S3 is; credentials come from the standard AWS chain.
#[derive(Args, Clone)]
pub struct S3Opts {
    /// S3 endpoint for S3-compatible stores (default: AWS_ENDPOINT_URL or AWS).
    #[arg(long, value_name = "URL", env = "QUIRE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION).
    #[arg(long, env = "QUIRE_S3_REGION")]
    pub s3_region: Option<String>,
    /// Path-style S3 URLs (http://host/bucket/key), as most S3-compatible stores need.
    #[arg(long, env = "QUIRE_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// How long to ride out an unreachable or failing output store (and input downloads) with
    /// backoff before an operation fails, in seconds; a task is not given up on meanwhile.
    #[arg(long, value_name = "SECONDS", default_value_t = 900, env = "QUIRE_STORE_RETRY_S")]
    pub store_retry_s: u64,
}

impl S3Opts {
    /// How the S3 inputs and outputs are reached, from these flags.
    pub fn access(&self) -> quire_store::S3Access {
        quire_store::S3Access {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            retry: quire_store::Retry { budget: std::time::Duration::from_secs(self.store_retry_s), ..Default::default() },
        }
    }
}

#[derive(Args)]
pub struct CheckArgs {
    /// Output folder or s3://bucket/prefix: the object `.quire-check` is written there and read back.
    #[arg(long, value_name = "URI")]
    pub out: String,
    /// How long to wait for an answer from each service, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub timeout_s: u64,
    #[command(flatten)]
    pub services: ServiceOpts,
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Input files, folders, archives or s3://bucket/prefix, brace patterns expanded (repeatable).
    #[arg(long = "input", required = true, value_name = "URI")]
    pub inputs: Vec<String>,
    /// Output folder (shared with the workers) or s3://bucket/prefix.
    #[arg(long, value_name = "URI")]
    pub out: String,
    #[command(flatten)]
    pub opts: JobOpts,
    #[command(flatten)]
    pub runs: RunOpts,
    #[command(flatten)]
    pub services: ServiceOpts,
    /// Wait for the job to finish, then write the Markdown and the manifest.
    #[arg(long)]
    pub wait: bool,
    /// Publish tasks whose results already exist.
    #[arg(long)]
    pub force: bool,
    /// How long a task's lease lives without a heartbeat, in seconds: the time a killed
    /// worker's task waits before another worker takes it. Workers renew leases every third of
    /// it while they work, so slow pages do not need a long lease.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_wait_s: u64,
    /// With --wait: the longest time between two full looks at the output,
    /// in milliseconds (the workers' task events trigger a look as soon as
    /// every open task has reported).
    #[arg(long, default_value_t = 5000)]
    pub poll_ms: u64,
    /// How long a coordinator's hold on its job lives without renewal, in seconds (it renews
    /// every third of it): a second coordinator of the same job waits while the first holds
    /// it, and takes over this long after the first died. Set when the quire-runs bucket is
    /// created; an existing bucket keeps its own.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..), env = "QUIRE_RUN_LEASE_S")]
    pub run_lease_s: u64,
    /// Serve the run's state as Prometheus metrics (/metrics: quire_run_tasks{state},
    /// quire_run_objects{change}, quire_run_queue_pending, quire_run_last_progress_timestamp_seconds,
    /// quire_run_waiting) while the coordinator plans and waits.
    #[arg(long, value_name = "HOST:PORT", env = "QUIRE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub services: ServiceOpts,
    /// Serve Prometheus metrics (/metrics) and health checks (/healthz, /readyz) here.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// The model this worker runs (tasks that need another model are handed back).
    #[arg(long, value_name = "DIR|HUB_ID|s3://...")]
    pub model: Option<String>,
    /// Where s3:// models are downloaded (default ~/.cache/quire/models).
    #[arg(long, value_name = "DIR")]
    pub model_cache: Option<PathBuf>,
    #[command(flatten)]
    pub model_opts: ModelOpts,
    /// Seconds to finish running tasks after SIGTERM/SIGINT before handing them back.
    #[arg(long, default_value_t = 30)]
    pub grace_s: u64,
    /// Disk space (MiB, in the temp folder) for recently downloaded inputs, so that the
    /// page-range tasks of one document download it once per worker; 0 keeps none.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub doc_cache_mb: u64,
    /// Lease time without a heartbeat, in seconds, for a queue no coordinator has set up yet
    /// (otherwise the coordinator's value is in force and adopted).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_wait_s: u64,
    /// Deliveries before a failing task is given up on, for a queue no coordinator has set up
    /// yet (otherwise the coordinator's value is in force and adopted).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliver: u32,
    /// /healthz answers 503 once tasks have been running this long (seconds) with no sign of
    /// progress (no model step, no stage of a task done), so that a liveness probe restarts a
    /// worker whose model or renderer hangs; 0 never. An idle worker is always healthy.
    #[arg(long, default_value_t = 900, value_name = "SECONDS", env = "QUIRE_STALL_S")]
    pub stall_s: u64,
}

#[derive(Args)]
pub struct DoctagsArgs {
    /// DocTags files, a page each or pages split at <page_break>; `-` or nothing reads stdin.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print the layout blocks as JSON lines, one line per page: {"source", "page", "blocks"}.
    #[arg(long)]
    pub json: bool,
    /// Page width in pixels that bounding boxes are scaled to (default: DocTags' own 0..500 grid).
    #[arg(long, default_value_t = quire_doctags::LOC_GRID, value_parser = clap::value_parser!(u32).range(1..))]
    pub width: u32,
    /// Page height in pixels that bounding boxes are scaled to.
    #[arg(long, default_value_t = quire_doctags::LOC_GRID, value_parser = clap::value_parser!(u32).range(1..))]
    pub height: u32,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Job name (`{date}` and `{time}` expand as in --job).
    pub job: String,
    /// The job's output folder or s3://bucket/prefix (default: where the coordinator said, read from NATS).
    #[arg(long, value_name = "URI", required_unless_present = "nats")]
    pub out: Option<String>,
    /// NATS server, to find the job and count dead-lettered and queued tasks.
    #[arg(long, value_name = "URL", env = "QUIRE_NATS")]
    pub nats: Option<String>,
    #[command(flatten)]
    pub nats_auth: NatsAuthOpts,
    #[command(flatten)]
    pub s3: S3Opts,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
