//! S3 (and S3-compatible: Garage, MinIO, Ceph) as a result sink and an
//! input source.
//!
//! - [`S3Store`]: the [`BlobStore`](crate::BlobStore) behind `--out s3://bucket/prefix`.
//!   Writes are plain PUTs of deterministic keys; nothing relies on
//!   conditional PUTs (some S3-compatible stores ignore them).
//! - [`list_s3`]: streams the objects below an `s3://` input prefix into the
//!   same channel as the local listing, one `ListObjectsV2` page at a time.
//! - [`fetch_to_file`]: streams one input object to a temporary file.
//! - [`RangedReader`]: a blocking `Read + Seek` over one input object by ranged GETs
//!   (an archive task reads its members without downloading the archive); [`read_range`]
//!   is one such GET.
//! - [`download_prefix`]: copies a prefix to a folder (model checkpoints).
//!
//! Credentials come from the standard AWS chain (environment, profile,
//! web identity / IRSA, container and instance metadata); the endpoint from
//! [`S3Options::endpoint_url`] or `AWS_ENDPOINT_URL`. Errors are sorted into
//! [`StoreError::Transient`](crate::StoreError::Transient) (network, timeouts, 5xx, throttling) and
//! [`StoreError::Permanent`](crate::StoreError::Permanent) (missing bucket, denied, bad credentials).
//!
//! Files: `client.rs` (options, client, error sorting), `store.rs` ([`S3Store`]), `source.rs`
//! (listing, fetching, ranged reads, model download). This file only declares and re-exports
//! them; `store.rs` and `source.rs` import `client.rs`, never each other (but for the tests of
//! `source.rs`, which start Garage through `store.rs`).

mod client;
mod source;
mod store;

pub use client::{client, parse_s3_uri, S3Options};
pub use source::{download_prefix, fetch_to_file, list_s3, read_range, RangedReader, MODEL_RECORD};
pub use store::S3Store;
