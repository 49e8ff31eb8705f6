//! Inputs on S3: [`list_s3`] lists the objects below an `s3://` prefix, [`fetch_to_file`]
//! streams one to a temporary file, [`read_range`] and [`RangedReader`] read one by ranged
//! GETs, [`download_prefix`] copies a prefix to a folder (model checkpoints).
//! Imports: `super::client`, the crate root and `crate::inputs` (its tests also `super::store`'s
//! Garage and `crate::archive`).

use super::client::{classify, is_status, parse_s3_uri};
use crate::inputs::{ListWarning, Listed};
use crate::{ReadStats, Retry, StoreError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use quire_core::SourceRef;
use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

fn etag_version(etag: Option<&str>) -> String {
    format!("etag:{}", etag.unwrap_or("").trim_matches('"'))
}

/// Lists the objects of an `s3://bucket/prefix` input into `tx`, one page
/// at a time (the listing never sits in memory). A URI naming one object
/// lists that object; otherwise the prefix is a folder (`/` appended).
/// `rel` is the key below the prefix, prefixed with the prefix's last
/// component (the bucket name for a whole bucket), like the local listing.
/// Folder markers (keys ending in `/`) are skipped. Errors arrive as
/// warnings; the listing stops at the first failed page.
pub async fn list_s3(client: &Client, uri: &str, page_size: i32, tx: mpsc::Sender<Listed>) {
    let warn = |message: String| {
        Listed::Warning(ListWarning {
            path: uri.to_string(),
            message,
        })
    };
    let (bucket, prefix) = match parse_s3_uri(uri) {
        Ok(x) => x,
        Err(e) => {
            let _ = tx.send(warn(e.to_string())).await;
            return;
        }
    };
    // A single object?
    if !prefix.is_empty() && !prefix.ends_with('/') {
        match client
            .head_object()
            .bucket(&bucket)
            .key(&prefix)
            .send()
            .await
        {
            Ok(h) => {
                let name = prefix.rsplit('/').next().unwrap_or(&prefix).to_string();
                let r = SourceRef {
                    uri: uri.to_string(),
                    rel: name,
                    size: h.content_length().unwrap_or(0).max(0) as u64,
                    version: etag_version(h.e_tag()),
                };
                let _ = tx.send(Listed::Object(r)).await;
                return;
            }
            Err(e)
                if e.as_service_error().is_some_and(|s| s.is_not_found()) || is_status(&e, 404) => {
            }
            Err(e) => {
                let _ = tx
                    .send(warn(classify("checking the input object", e).to_string()))
                    .await;
                return;
            }
        }
    }
    let folder = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.clone()
    } else {
        format!("{prefix}/")
    };
    let base = folder
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(&bucket)
        .to_string();
    let mut token: Option<String> = None;
    let mut listed = 0usize;
    loop {
        let page = match client
            .list_objects_v2()
            .bucket(&bucket)
            .prefix(&folder)
            .max_keys(page_size)
            .set_continuation_token(token.take())
            .send()
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = tx
                    .send(warn(
                        classify(&format!("listing s3://{bucket}/{folder}"), e).to_string(),
                    ))
                    .await;
                return;
            }
        };
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            if key.ends_with('/') {
                continue;
            }
            let below = &key[folder.len()..];
            let r = SourceRef {
                uri: format!("s3://{bucket}/{key}"),
                rel: format!("{base}/{below}"),
                size: o.size().unwrap_or(0).max(0) as u64,
                version: etag_version(o.e_tag()),
            };
            listed += 1;
            if tx.send(Listed::Object(r)).await.is_err() {
                return;
            }
        }
        match page.next_continuation_token() {
            Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
            _ => break,
        }
    }
    if listed == 0 {
        let _ = tx.send(warn("no objects below this prefix".into())).await;
    }
}

async fn stream_to(
    body: &mut ByteStream,
    file: &mut tokio::fs::File,
    what: &str,
) -> Result<u64, StoreError> {
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| StoreError::Transient(format!("{what}: {e}")))?;
        n += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(n)
}

/// The `If-Match` value for the ETag a listing gave `src`, if it gave one.
fn listed_etag(src: &SourceRef) -> Option<String> {
    src.version
        .strip_prefix("etag:")
        .filter(|e| !e.is_empty())
        .map(|e| format!("\"{e}\""))
}

fn changed(what: &str) -> StoreError {
    StoreError::Permanent(format!(
        "{what}: the object changed since it was listed; plan the job again"
    ))
}

fn gone(what: &str) -> StoreError {
    StoreError::Permanent(format!("{what}: the object no longer exists"))
}

/// Streams the input object to a temporary file in `dir` (deleted when the
/// returned handle drops). The object must still have the listed ETag: a
/// changed object would not match its task id, and is a permanent error.
pub async fn fetch_to_file(
    client: &Client,
    src: &SourceRef,
    dir: &Path,
) -> Result<tempfile::NamedTempFile, StoreError> {
    let (bucket, key) = parse_s3_uri(&src.uri)?;
    let what = format!("fetching {}", src.uri);
    let req = client
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .set_if_match(listed_etag(src));
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) if is_status(&e, 412) => return Err(changed(&what)),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
            return Err(gone(&what))
        }
        Err(e) => return Err(classify(&what, e)),
    };
    let ext = Path::new(&key)
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix("quire-input-")
        .suffix(&ext)
        .tempfile_in(dir)?;
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    stream_to(&mut resp.body, &mut file, &what).await?;
    Ok(tmp)
}

/// Bytes `start..start + len` of the input object (fewer at its end; none from
/// `start` at or past it), by one ranged GET with `If-Match` on the listed ETag
/// like [`fetch_to_file`].
pub async fn read_range(
    client: &Client,
    src: &SourceRef,
    start: u64,
    len: u64,
) -> Result<Vec<u8>, StoreError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let (bucket, key) = parse_s3_uri(&src.uri)?;
    let end = start + len - 1;
    let what = format!("reading bytes {start}-{end} of {}", src.uri);
    let req = client
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .range(format!("bytes={start}-{end}"))
        .set_if_match(listed_etag(src));
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if is_status(&e, 412) => return Err(changed(&what)),
        // Not satisfiable: `start` is at or past the end (an empty object, say).
        Err(e) if is_status(&e, 416) => return Ok(Vec::new()),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
            return Err(gone(&what))
        }
        Err(e) => return Err(classify(&what, e)),
    };
    let body = resp
        .body
        .collect()
        .await
        .map_err(|e| StoreError::Transient(format!("{what}: {e}")))?;
    let data = body.into_bytes().to_vec();
    if data.len() as u64 > len {
        // A service that ignored the range: keep what was asked for.
        return Ok(data
            .get(start as usize..)
            .map(|d| d[..d.len().min(len as usize)].to_vec())
            .unwrap_or_default());
    }
    Ok(data)
}

/// A blocking `Read + Seek` over one S3 object, read by ranged GETs of
/// aligned blocks, for archive readers on blocking threads
/// (`spawn_blocking`; each GET runs on the runtime through its handle).
///
/// - Every GET carries `If-Match` on the listed ETag: an object changed since
///   it was listed is a permanent error.
/// - Transient faults are retried through [`Retry`].
/// - The last few blocks read are kept, so a zip's small header reads and a
///   tar stream coalesce into few requests; memory is `blocks` ×
///   `block_size`, whatever the object's size.
/// - [`ReadStats`] counts requests and bytes, and keeps the first error (the
///   archive reader sees only an `io::Error`; check it after the walk).
pub struct RangedReader {
    client: Client,
    handle: tokio::runtime::Handle,
    src: SourceRef,
    size: u64,
    pos: u64,
    block_size: u64,
    max_blocks: usize,
    /// Most recently used first: (block index, bytes).
    blocks: VecDeque<(u64, Vec<u8>)>,
    retry: Retry,
    stats: Arc<ReadStats>,
}

impl RangedReader {
    /// Default block size: 1 MiB.
    pub const BLOCK_SIZE: u64 = 1 << 20;
    /// Default number of blocks kept.
    pub const BLOCKS: usize = 4;

    /// A reader of `src` (an `s3://` object as listed). Its size comes from
    /// the listing, or from a HEAD when the listing says 0. Must be called in
    /// a Tokio runtime, whose handle the reader keeps.
    pub async fn open(client: Client, src: &SourceRef, retry: Retry) -> Result<Self, StoreError> {
        let size = if src.size > 0 {
            src.size
        } else {
            let (bucket, key) = parse_s3_uri(&src.uri)?;
            let what = format!("checking {}", src.uri);
            retry
                .run(&what, || async {
                    match client
                        .head_object()
                        .bucket(&bucket)
                        .key(&key)
                        .set_if_match(listed_etag(src))
                        .send()
                        .await
                    {
                        Ok(h) => Ok(h.content_length().unwrap_or(0).max(0) as u64),
                        Err(e) if is_status(&e, 412) => Err(changed(&what)),
                        Err(e) if is_status(&e, 404) => Err(gone(&what)),
                        Err(e) => Err(classify(&what, e)),
                    }
                })
                .await?
        };
        Ok(RangedReader {
            client,
            handle: tokio::runtime::Handle::current(),
            src: src.clone(),
            size,
            pos: 0,
            block_size: Self::BLOCK_SIZE,
            max_blocks: Self::BLOCKS,
            blocks: VecDeque::new(),
            retry,
            stats: Arc::default(),
        })
    }

    /// Reads in blocks of `block_size` bytes, keeping the last `blocks`.
    pub fn with_blocks(mut self, block_size: u64, blocks: usize) -> Self {
        self.block_size = block_size.max(512);
        self.max_blocks = blocks.max(1);
        self.blocks.clear();
        self
    }

    /// The object's size.
    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The counters of this reader, shared (they outlive the reader).
    pub fn stats(&self) -> Arc<ReadStats> {
        self.stats.clone()
    }

    /// Block `idx`, from the kept ones or by a GET.
    fn block(&mut self, idx: u64) -> std::io::Result<&[u8]> {
        if let Some(i) = self.blocks.iter().position(|(b, _)| *b == idx) {
            let b = self.blocks.remove(i).expect("found");
            self.blocks.push_front(b);
        } else {
            let start = idx * self.block_size;
            let len = self.block_size.min(self.size.saturating_sub(start));
            let (client, src, stats) = (&self.client, &self.src, &self.stats);
            let what = format!("reading {}", src.uri);
            let got = self.handle.block_on(self.retry.run(&what, || async move {
                stats.requests.fetch_add(1, Ordering::Relaxed);
                let data = read_range(client, src, start, len).await?;
                stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                if data.len() as u64 != len {
                    return Err(StoreError::Transient(format!(
                        "reading bytes {start}.. of {}: {} bytes came, {len} expected",
                        src.uri,
                        data.len()
                    )));
                }
                Ok(data)
            }));
            let data = match got {
                Ok(d) => d,
                Err(e) => {
                    self.stats.fail(e.clone());
                    return Err(std::io::Error::other(e));
                }
            };
            self.blocks.push_front((idx, data));
            self.blocks.truncate(self.max_blocks);
        }
        Ok(&self.blocks[0].1)
    }
}

impl Read for RangedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let (bs, pos) = (self.block_size, self.pos);
        let idx = pos / bs;
        let off = (pos - idx * bs) as usize;
        let block = self.block(idx)?;
        let n = buf.len().min(block.len().saturating_sub(off));
        buf[..n].copy_from_slice(&block[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangedReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the object",
            )
        })?;
        Ok(self.pos)
    }
}

/// Copies every object below `s3://bucket/prefix` to `local_dir`, keeping
/// the paths below the prefix; a file already there with the same size is
/// kept. Each object is streamed to a temporary file and renamed into
/// place, so an interrupted download leaves no partial file. Returns the
/// number of objects downloaded.
pub async fn download_prefix(
    client: &Client,
    uri: &str,
    local_dir: &Path,
) -> Result<usize, StoreError> {
    let (bucket, prefix) = parse_s3_uri(uri)?;
    let folder = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.clone()
    } else {
        format!("{prefix}/")
    };
    tokio::fs::create_dir_all(local_dir).await?;
    // What was downloaded here before: path below the folder → (size, ETag). A file is used
    // again only when its object still has the same size and ETag (a checkpoint replaced by
    // one of the same size is downloaded again); files of objects gone from the prefix are
    // deleted, so that a stale shard cannot be loaded beside the new ones.
    let record = local_dir.join(MODEL_RECORD);
    let before: std::collections::BTreeMap<String, (i64, String)> = tokio::fs::read(&record)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut now = std::collections::BTreeMap::new();
    let mut token: Option<String> = None;
    let mut downloaded = 0;
    let mut seen = 0;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(&bucket)
            .prefix(&folder)
            .set_continuation_token(token.take())
            .send()
            .await
            .map_err(|e| classify(&format!("listing {uri}"), e))?;
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            if key.ends_with('/') {
                continue;
            }
            seen += 1;
            let below = &key[folder.len()..];
            let dest = safe_join(local_dir, below).ok_or_else(|| {
                StoreError::Permanent(format!("s3://{bucket}/{key}: unsafe path below {uri}"))
            })?;
            let size = o.size().unwrap_or(-1);
            let etag = o.e_tag().unwrap_or("").to_string();
            now.insert(below.to_string(), (size, etag.clone()));
            if let Ok(m) = tokio::fs::metadata(&dest).await {
                let same = before.get(below).is_some_and(|(s, e)| *s == size && *e == etag && !e.is_empty());
                if m.is_file() && m.len() as i64 == size && same {
                    continue;
                }
            }
            let parent = dest.parent().expect("joined below local_dir");
            tokio::fs::create_dir_all(parent).await?;
            let what = format!("downloading s3://{bucket}/{key}");
            let mut resp = client
                .get_object()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| classify(&what, e))?;
            let tmp = tempfile::Builder::new()
                .prefix(".quire-download-")
                .tempfile_in(parent)?;
            let mut file = tokio::fs::File::from_std(tmp.reopen()?);
            stream_to(&mut resp.body, &mut file, &what).await?;
            file.sync_all().await?;
            tmp.persist(&dest).map_err(|e| StoreError::from(e.error))?;
            downloaded += 1;
        }
        match page.next_continuation_token() {
            Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
            _ => break,
        }
    }
    if seen == 0 {
        return Err(StoreError::Permanent(format!(
            "{uri}: no objects below this prefix"
        )));
    }
    for gone in before.keys().filter(|k| !now.contains_key(*k)) {
        if let Some(p) = safe_join(local_dir, gone) {
            let _ = tokio::fs::remove_file(p).await;
        }
    }
    let body = serde_json::to_vec_pretty(&now).map_err(|e| StoreError::Permanent(format!("recording the download: {e}")))?;
    tokio::fs::write(&record, body).await?;
    Ok(downloaded)
}

/// The file in a model cache folder that says which object versions its files are.
pub const MODEL_RECORD: &str = ".quire-model.json";

/// `dir/rel` when `rel` is a plain relative path (no `..`, not absolute).
fn safe_join(dir: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = dir.to_path_buf();
    let mut any = false;
    for part in rel.split('/') {
        match part {
            "" | "." => continue,
            ".." => return None,
            p => {
                out.push(p);
                any = true;
            }
        }
    }
    any.then_some(out)
}

#[cfg(test)]
mod tests {
    use crate::s3::store::test_server::{Garage, BUCKET};
    use super::*;
    use crate::BlobStore;

    #[test]
    fn parses_s3_uris() {
        assert_eq!(
            parse_s3_uri("s3://b/p/q/").unwrap(),
            ("b".into(), "p/q/".into())
        );
        assert_eq!(parse_s3_uri("s3://b").unwrap(), ("b".into(), "".into()));
        assert!(parse_s3_uri("s3:///x").is_err());
        assert!(parse_s3_uri("/local/x").is_err());
        assert_eq!(
            safe_join(Path::new("/m"), "a/./b.json"),
            Some(PathBuf::from("/m/a/b.json"))
        );
        assert_eq!(safe_join(Path::new("/m"), "a/../../b"), None);
    }

    async fn collect(client: &Client, uri: &str, page: i32) -> (Vec<SourceRef>, Vec<String>) {
        let (tx, mut rx) = mpsc::channel(2);
        let (c, u) = (client.clone(), uri.to_string());
        let h = tokio::spawn(async move { list_s3(&c, &u, page, tx).await });
        let (mut objs, mut warns) = (vec![], vec![]);
        while let Some(x) = rx.recv().await {
            match x {
                Listed::Object(o) => objs.push(o),
                Listed::Warning(w) => warns.push(w.message),
            }
        }
        h.await.unwrap();
        (objs, warns)
    }

    #[tokio::test]
    async fn inputs_are_listed_fetched_and_downloaded() {
        let g = Garage::start();
        let store = g.store("").await;
        let c = store.client().clone();
        let keys = [
            "corpus/scans/a.pdf",
            "corpus/scans/sub/b.png",
            "corpus/scans/sub/c d.tif",
            "corpus/scansx/no.pdf",
        ];
        for k in keys {
            store
                .put(k, format!("body of {k}").into_bytes())
                .await
                .unwrap();
        }
        store.put("corpus/scans/empty/", vec![]).await.unwrap(); // a folder marker
        let (objs, warns) = collect(&c, &format!("s3://{BUCKET}/corpus/scans"), 2).await;
        assert!(warns.is_empty(), "{warns:?}");
        let rels: Vec<_> = objs.iter().map(|o| o.rel.as_str()).collect();
        assert_eq!(
            rels,
            vec!["scans/a.pdf", "scans/sub/b.png", "scans/sub/c d.tif"]
        );
        assert_eq!(objs[0].uri, format!("s3://{BUCKET}/corpus/scans/a.pdf"));
        assert_eq!(objs[0].size, "body of corpus/scans/a.pdf".len() as u64);
        assert!(
            objs[0].version.starts_with("etag:") && objs[0].version.len() > 10,
            "{}",
            objs[0].version
        );
        assert!(!objs[0].version.contains('"'));
        // Trailing slash, whole bucket, one object, nothing.
        assert_eq!(
            collect(&c, &format!("s3://{BUCKET}/corpus/scans/"), 1000)
                .await
                .0,
            objs
        );
        let (all, _) = collect(&c, &format!("s3://{BUCKET}"), 1000).await;
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].rel, format!("{BUCKET}/corpus/scans/a.pdf"));
        let (one, _) = collect(&c, &format!("s3://{BUCKET}/corpus/scans/sub/b.png"), 1000).await;
        assert_eq!(
            (one.len(), one[0].rel.as_str(), one[0].version.as_str()),
            (1, "b.png", objs[1].version.as_str())
        );
        let (none, warns) = collect(&c, &format!("s3://{BUCKET}/nothing/here"), 1000).await;
        assert!(none.is_empty() && warns.len() == 1, "{warns:?}");
        let (none, warns) = collect(&c, "s3://no-such-bucket/x", 1000).await;
        assert!(none.is_empty() && warns.len() == 1, "{warns:?}");

        // Fetch streams to a temp file keeping the extension.
        let dir = tempfile::tempdir().unwrap();
        let f = fetch_to_file(&c, &objs[2], dir.path()).await.unwrap();
        assert_eq!(
            std::fs::read(f.path()).unwrap(),
            b"body of corpus/scans/sub/c d.tif"
        );
        assert!(f.path().to_string_lossy().ends_with(".tif"));
        // An object changed since listing is refused.
        store
            .put("corpus/scans/a.pdf", b"new content".to_vec())
            .await
            .unwrap();
        match fetch_to_file(&c, &objs[0], dir.path()).await {
            Err(StoreError::Permanent(m)) => assert!(m.contains("changed"), "{m}"),
            other => panic!(
                "expected a permanent error, got {:?}",
                other.map(|f| f.path().to_path_buf())
            ),
        }
        drop(f);

        // Download a prefix (a model checkpoint) into a cache folder.
        let cache = dir.path().join("model");
        assert_eq!(
            download_prefix(&c, &format!("s3://{BUCKET}/corpus/scans"), &cache)
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            std::fs::read(cache.join("sub/b.png")).unwrap(),
            b"body of corpus/scans/sub/b.png"
        );
        assert!(!cache.join("empty").exists());
        assert_eq!(
            download_prefix(&c, &format!("s3://{BUCKET}/corpus/scans/"), &cache)
                .await
                .unwrap(),
            0,
            "cached"
        );
        // An object replaced by one of the same size has another ETag: downloaded again. An
        // object gone from the prefix leaves the cache.
        store.put("corpus/scans/sub/b.png", b"BODY OF CORPUS/SCANS/SUB/B.PNG".to_vec()).await.unwrap();
        store.put("corpus/scans/extra.bin", b"x".to_vec()).await.unwrap();
        assert_eq!(download_prefix(&c, &format!("s3://{BUCKET}/corpus/scans"), &cache).await.unwrap(), 2);
        assert_eq!(std::fs::read(cache.join("sub/b.png")).unwrap(), b"BODY OF CORPUS/SCANS/SUB/B.PNG");
        store.delete("corpus/scans/extra.bin").await.unwrap();
        assert_eq!(download_prefix(&c, &format!("s3://{BUCKET}/corpus/scans"), &cache).await.unwrap(), 0);
        assert!(!cache.join("extra.bin").exists(), "a file of an object gone from the prefix is removed");
        assert!(matches!(
            download_prefix(&c, &format!("s3://{BUCKET}/nothing"), &cache).await,
            Err(StoreError::Permanent(_))
        ));
    }

    /// The entries of `range` of an archive read from `src`.
    fn walk_all<R: Read + Seek>(
        src: R,
        range: std::ops::RangeInclusive<u32>,
    ) -> (
        crate::archive::Scan,
        Vec<crate::archive::Entry>,
    ) {
        let limits = crate::archive::ArchiveLimits::from(&quire_core::Limits::default());
        let mut out = Vec::new();
        let scan = crate::archive::walk_reader(src, &limits, Some(range), &mut |e| out.push(e))
            .unwrap();
        (scan, out)
    }

    async fn listed(c: &Client, key: &str) -> SourceRef {
        let (objs, warns) = collect(c, &format!("s3://{BUCKET}/{key}"), 1000).await;
        assert!(warns.is_empty(), "{warns:?}");
        objs.into_iter().next().unwrap()
    }

    /// Archives on S3 are read by ranged GETs: a zip task fetches its central
    /// directory and its own members, a tar task the shard up to its range's
    /// end; both give what the local file gives.
    #[test]
    fn ranged_reads_fetch_only_what_an_archive_task_needs() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let g = Garage::start();
        let store = rt.block_on(g.store(""));
        let c = store.client().clone();

        // A zip of 40 images of 48 KiB (and a few captions), in 64 KiB blocks.
        let (zip, _) = crate::archive::tests::many_member_zip(40, 48 << 10);
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("pictures.zip");
        std::fs::write(&local, &zip).unwrap();
        rt.block_on(store.put("in/pictures.zip", zip.clone())).unwrap();
        let src = rt.block_on(listed(&c, "in/pictures.zip"));
        assert_eq!(src.size, zip.len() as u64);
        let open = |src: &SourceRef| {
            rt.block_on(RangedReader::open(c.clone(), src, Retry::none()))
                .unwrap()
                .with_blocks(64 << 10, 4)
        };
        let reader = open(&src);
        let stats = reader.stats();
        // A range late in the zip: the members before it are not opened.
        let (_, remote) = walk_all(reader, 30..=31);
        let (_, here) = walk_all(std::fs::File::open(&local).unwrap(), 30..=31);
        assert_eq!(remote.len(), 2);
        assert_eq!(remote, here, "the same entries as the local file");
        eprintln!(
            "zip task 30..=31 of 40: {} requests, {} of {} bytes",
            stats.requests(),
            stats.bytes(),
            zip.len()
        );
        assert!(
            stats.bytes() * 4 < zip.len() as u64,
            "fetched {} of {} bytes",
            stats.bytes(),
            zip.len()
        );
        assert!(stats.failure().is_none());
        // A scan reads the central directory only, and counts what the local scan counts.
        let reader = open(&src);
        let stats = reader.stats();
        let limits = crate::archive::ArchiveLimits::from(&quire_core::Limits::default());
        assert_eq!(
            crate::archive::scan_reader(reader, &limits).unwrap(),
            crate::archive::scan(&local, &limits).unwrap()
        );
        eprintln!(
            "zip scan: {} requests, {} bytes",
            stats.requests(),
            stats.bytes()
        );
        assert!(stats.bytes() <= 2 * (64 << 10), "{}", stats.bytes());
        // Without a listed size the reader asks with a HEAD.
        let no_size = SourceRef {
            size: 0,
            ..src.clone()
        };
        assert_eq!(open(&no_size).len(), zip.len() as u64);

        // A tar (and the same tar gzip'd): 30 samples of an image and a caption.
        // Incompressible bytes (xorshift), so the gzip'd shard is as large as the plain one.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..30u32 {
            for (ext, len) in [("jpg", 20_000usize), ("txt", 40)] {
                let data = noise(len);
                let mut h = tar::Header::new_gnu();
                h.set_size(len as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, format!("{i:06}.{ext}"), &data[..])
                    .unwrap();
            }
        }
        let tar_bytes = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
        let gz_bytes = gz.finish().unwrap();
        for (name, bytes) in [("shard.tar", tar_bytes), ("shard.tar.gz", gz_bytes)] {
            let local = dir.path().join(name);
            std::fs::write(&local, &bytes).unwrap();
            rt.block_on(store.put(&format!("in/{name}"), bytes.clone()))
                .unwrap();
            let src = rt.block_on(listed(&c, &format!("in/{name}")));
            let reader = open(&src);
            let stats = reader.stats();
            let (_, remote) = walk_all(reader, 4..=6);
            let (_, here) = walk_all(std::fs::File::open(&local).unwrap(), 4..=6);
            assert_eq!(remote.len(), 3, "{name}");
            assert_eq!(remote, here, "{name}: the same entries as the local file");
            eprintln!(
                "{name} task 4..=6 of 30: {} requests, {} of {} bytes",
                stats.requests(),
                stats.bytes(),
                bytes.len()
            );
            assert!(stats.bytes() < bytes.len() as u64, "{name}: stops after its range");
            // A late range from the resume point its scan found: a plain tar task fetches the
            // blocks of its own samples only (a gzip'd one has no resume points).
            let scan = crate::archive::scan_reader(open(&src), &limits).unwrap();
            let resume = scan.resume_at(25, 26);
            assert_eq!(resume.is_some(), name == "shard.tar", "{name}");
            let reader = open(&src);
            let stats = reader.stats();
            let mut remote = Vec::new();
            crate::archive::walk_reader_from(reader, &limits, Some(25..=26), resume.as_ref(), &mut |e| remote.push(e)).unwrap();
            assert_eq!(remote, walk_all(std::fs::File::open(&local).unwrap(), 25..=26).1, "{name}");
            eprintln!("{name} task 25..=26 of 30: {} requests, {} of {} bytes", stats.requests(), stats.bytes(), bytes.len());
            if resume.is_some() {
                assert!(stats.bytes() <= 2 * (64 << 10), "{name}: {} bytes for two samples", stats.bytes());
            }
        }

        // An object replaced after listing: a permanent error, kept in the stats.
        let mut reader = open(&src);
        rt.block_on(store.put("in/pictures.zip", b"other bytes".to_vec()))
            .unwrap();
        let mut buf = [0u8; 16];
        let err = reader.read(&mut buf).unwrap_err();
        assert!(err.to_string().contains("changed"), "{err}");
        match reader.stats().failure() {
            Some(StoreError::Permanent(m)) => assert!(m.contains("changed"), "{m}"),
            other => panic!("expected a permanent error, got {other:?}"),
        }
        let reader = open(&src);
        let stats = reader.stats();
        let _ = crate::archive::scan_reader(reader, &limits);
        assert!(matches!(stats.failure(), Some(StoreError::Permanent(_))));
    }
}
