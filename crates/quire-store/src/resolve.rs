//! Where a job's inputs and outputs live, from their URI: [`S3Access`] (how S3 is reached
//! beyond the standard AWS environment) and [`open_store`] (a folder or `s3://bucket/prefix`,
//! behind the retrying store). Imports the crate root, `local`, `s3` and `retry`.

use crate::local::LocalStore;
use crate::s3::{self, S3Options, S3Store};
use crate::{BlobStore, Retry, RetryingStore, StoreError};
use std::sync::Arc;

/// How to reach S3 beyond the standard AWS environment.
#[derive(Debug, Clone, Default)]
pub struct S3Access {
    /// Endpoint of an S3-compatible service (else `AWS_ENDPOINT_URL` or AWS).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (most S3-compatible services need it).
    pub path_style: bool,
    /// How long transient faults of the output store and of input downloads are ridden out
    /// (with backoff) before an operation fails: a store's bad minutes must not dead-letter
    /// tasks or end a waiting coordinator.
    pub retry: Retry,
}

impl S3Access {
    pub fn options(&self, uri: &str) -> Result<S3Options, StoreError> {
        let mut o = S3Options::from_uri(uri)?;
        o.endpoint_url = self.endpoint.clone();
        o.region = self.region.clone();
        o.force_path_style = self.path_style;
        Ok(o)
    }

    /// A client for any bucket.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let mut o = S3Options::new("", "");
        o.endpoint_url = self.endpoint.clone();
        o.region = self.region.clone();
        o.force_path_style = self.path_style;
        s3::client(&o).await
    }
}

/// Whether `uri` names an S3 location (`s3://bucket/...`) rather than a local path.
pub fn is_s3(uri: &str) -> bool {
    uri.starts_with("s3://")
}

/// Opens the output store named by `uri`: `s3://bucket/prefix` (the bucket
/// is checked) or a folder.
/// Every operation of the store retries transient faults for `access.retry`.
pub async fn open_store(uri: &str, access: &S3Access) -> Result<Arc<dyn BlobStore>, StoreError> {
    let retry = access.retry;
    if is_s3(uri) {
        let opts = access.options(uri)?;
        let client = s3::client(&opts).await;
        let store = S3Store::from_client(client, &opts);
        retry.run(&format!("opening {uri}"), || store.check_bucket()).await.map_err(|e| {
            let m = format!("opening {uri}: {e}");
            if e.is_transient() {
                StoreError::Transient(m)
            } else {
                StoreError::Permanent(m)
            }
        })?;
        Ok(Arc::new(RetryingStore { inner: store, retry }))
    } else {
        Ok(Arc::new(RetryingStore { inner: LocalStore::new(uri), retry }))
    }
}
