//! [`S3Store`]: the [`BlobStore`] behind `--out s3://bucket/prefix`, results in a bucket below
//! a prefix, written by plain PUTs of deterministic keys. Its tests start a real Garage
//! (`test_server`, on `quire-test-support`, also used by the tests of `source.rs`).
//! Imports: `super::client` and the crate root only.

use super::client::{classify, client, is_status, S3Options};
use crate::{BlobStore, StoreError};
use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

fn join_key(prefix: &str, key: &str) -> String {
    let p = prefix.trim_matches('/');
    let k = key.trim_start_matches('/');
    if p.is_empty() {
        k.to_string()
    } else {
        format!("{p}/{k}")
    }
}

/// Results in a bucket below a prefix.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    page_size: i32,
}

impl S3Store {
    /// Connects and checks that the bucket exists and is reachable with
    /// these credentials.
    pub async fn new(opts: S3Options) -> Result<Self, StoreError> {
        let c = client(&opts).await;
        let store = S3Store::from_client(c, &opts);
        store.check_bucket().await?;
        Ok(store)
    }

    /// A store on an existing client; nothing is checked.
    pub fn from_client(client: Client, opts: &S3Options) -> Self {
        S3Store {
            client,
            bucket: opts.bucket.clone(),
            prefix: opts.prefix.trim_matches('/').to_string(),
            page_size: opts.page_size,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `HeadBucket`: a missing bucket or denied access is permanent.
    pub async fn check_bucket(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Err(StoreError::Permanent(format!(
                "s3://{}: bucket does not exist",
                self.bucket
            ))),
            Err(e) if is_status(&e, 403) => Err(StoreError::Permanent(format!(
                "s3://{}: access denied (check the credentials and the bucket policy)",
                self.bucket
            ))),
            Err(e) => Err(classify(&format!("s3://{}", self.bucket), e)),
        }
    }

    fn key(&self, key: &str) -> String {
        join_key(&self.prefix, key)
    }
}

#[async_trait]
impl BlobStore for S3Store {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let full = self.key(key);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify(&format!("writing s3://{}/{full}", self.bucket), e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.key(key);
        let what = || format!("reading s3://{}/{full}", self.bucket);
        let resp = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(classify(&what(), e)),
        };
        let body = resp
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Transient(format!("{}: {e}", what())))?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let full = self.key(key);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            // HEAD has no body: a missing bucket also reads as 404; `new`
            // checked the bucket.
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_not_found()) || is_status(&e, 404) =>
            {
                Ok(false)
            }
            Err(e) => Err(classify(
                &format!("checking s3://{}/{full}", self.bucket),
                e,
            )),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let full = self.key(prefix);
        // `key("")` has no trailing slash; keep what the caller asked for.
        let full = if prefix.is_empty() && !self.prefix.is_empty() {
            format!("{}/", self.prefix)
        } else {
            full
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .max_keys(self.page_size)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify(&format!("listing s3://{}/{full}", self.bucket), e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push(k[strip.min(k.len())..].to_string());
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.key(key);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify(&format!("deleting s3://{}/{full}", self.bucket), e))?;
        Ok(())
    }

    fn locate(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(key))
    }
}

#[cfg(test)]
pub(crate) mod test_server {
    //! A real single-node Garage for the tests (launched by `quire-test-support`), with
    //! [`S3Options`](super::S3Options) and a ready [`S3Store`](super::S3Store) for it.
    use quire_test_support::{ACCESS_KEY, SECRET_KEY};
    use std::time::{Duration, Instant};

    pub use quire_test_support::free_port;

    pub const BUCKET: &str = "quire-test";

    pub struct Garage(quire_test_support::Garage);

    impl Garage {
        pub fn start() -> Self {
            Garage(quire_test_support::Garage::start(BUCKET))
        }

        pub fn log(&self) -> String {
            self.0.log()
        }

        pub fn options(&self, prefix: &str) -> super::S3Options {
            let mut o = super::S3Options::new(BUCKET, prefix);
            o.endpoint_url = Some(self.0.endpoint());
            o.region = Some("garage".into());
            o.force_path_style = true;
            o.credentials = Some((ACCESS_KEY.into(), SECRET_KEY.into()));
            o
        }

        /// A store, once Garage has its layout and default bucket ready.
        pub async fn store(&self, prefix: &str) -> super::S3Store {
            let t0 = Instant::now();
            loop {
                match super::S3Store::new(self.options(prefix)).await {
                    Ok(s) => return s,
                    Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                        panic!("garage not ready: {e}\n{}", self.log())
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{free_port, Garage, BUCKET};
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn blob_store_put_get_exists_list_with_pagination() {
        let g = Garage::start();
        let mut store = g.store("out/run1").await;
        store.page_size = 7;
        store
            .put("job/results/a.jsonl", b"one".to_vec())
            .await
            .unwrap();
        store
            .put("job/results/a.jsonl", b"two".to_vec())
            .await
            .unwrap(); // idempotent overwrite
        assert_eq!(
            store.get("job/results/a.jsonl").await.unwrap().unwrap(),
            b"two"
        );
        assert_eq!(store.get("job/results/missing.jsonl").await.unwrap(), None);
        assert!(store.exists("job/results/a.jsonl").await.unwrap());
        assert!(!store.exists("job/results/missing.jsonl").await.unwrap());
        for i in 0..24 {
            store
                .put(&format!("job/markdown/d{i:02}.md"), vec![b'x'; i])
                .await
                .unwrap();
        }
        store
            .put("job/manifest.json", b"{}".to_vec())
            .await
            .unwrap();
        let md = store.list("job/markdown/").await.unwrap();
        assert_eq!(md.len(), 24);
        assert_eq!(md[0], "job/markdown/d00.md");
        assert_eq!(store.list("").await.unwrap().len(), 26);
        assert_eq!(
            store.list("job/results/").await.unwrap(),
            vec!["job/results/a.jsonl"]
        );
        assert_eq!(
            store.locate("job/manifest.json"),
            format!("s3://{BUCKET}/out/run1/job/manifest.json")
        );
        // Keys outside the prefix are not listed.
        let other = g.store("out/run10").await;
        other.put("x", b"y".to_vec()).await.unwrap();
        assert_eq!(store.list("").await.unwrap().len(), 26);
    }

    #[tokio::test]
    async fn errors_are_transient_or_permanent() {
        // Nobody listens: transient, and quickly.
        let mut o = S3Options::new("b", "p");
        o.endpoint_url = Some(format!("http://127.0.0.1:{}", free_port()));
        o.force_path_style = true;
        o.region = Some("garage".into());
        o.credentials = Some(("k".into(), "s".into()));
        o.connect_timeout = Duration::from_secs(1);
        let t0 = Instant::now();
        match S3Store::new(o.clone()).await {
            Err(StoreError::Transient(_)) => {}
            other => panic!("expected a transient error, got {:?}", other.err()),
        }
        let store = S3Store::from_client(client(&o).await, &o);
        assert!(store
            .put("k", b"v".to_vec())
            .await
            .unwrap_err()
            .is_transient());
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t0.elapsed()
        );

        let g = Garage::start();
        g.store("").await; // ready
        let mut missing = g.options("p");
        missing.bucket = "no-such-bucket".into();
        match S3Store::new(missing.clone()).await {
            Err(StoreError::Permanent(m)) => assert!(m.contains("does not exist"), "{m}"),
            other => panic!("expected a permanent error, got {:?}", other.err()),
        }
        let store = S3Store::from_client(client(&missing).await, &missing);
        assert!(!store.get("k").await.unwrap_err().is_transient());
        assert!(!store
            .put("k", b"v".to_vec())
            .await
            .unwrap_err()
            .is_transient());
        let mut bad_key = g.options("p");
        bad_key.credentials = Some(("GKnotakey000000000000000".into(), "x".repeat(64)));
        match S3Store::new(bad_key).await {
            Err(StoreError::Permanent(_)) => {}
            other => panic!("expected a permanent error, got {:?}", other.err()),
        }
    }
}
