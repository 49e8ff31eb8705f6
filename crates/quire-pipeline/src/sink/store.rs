//! Opening a job's output: a local folder or an `s3://` prefix, behind the retrying store.

use crate::source::s3::S3Access;
use quire_store::local::LocalStore;
use anyhow::Context as _;
use quire_store::s3::{self, S3Store};
use quire_store::{BlobStore, RetryingStore};
use std::sync::Arc;

pub fn is_s3(uri: &str) -> bool {
    uri.starts_with("s3://")
}

/// Opens the output store named by `uri`: `s3://bucket/prefix` (the bucket
/// is checked) or a folder.
/// Every operation of the store retries transient faults for `access.retry`.
pub async fn open_store(uri: &str, access: &S3Access) -> anyhow::Result<Arc<dyn BlobStore>> {
    let retry = access.retry;
    if is_s3(uri) {
        let opts = access.options(uri)?;
        let client = s3::client(&opts).await;
        let store = S3Store::from_client(client, &opts);
        retry
            .run(&format!("opening {uri}"), || store.check_bucket())
            .await
            .with_context(|| format!("opening {uri}"))?;
        Ok(Arc::new(RetryingStore { inner: store, retry }))
    } else {
        Ok(Arc::new(RetryingStore { inner: LocalStore::new(uri), retry }))
    }
}
