//! Bench helper: uploads files, or N synthetic objects, under an `s3://` prefix.
//!
//!   s3_put s3://bucket/prefix FILE...          # each file under prefix/<file name>
//!   s3_put s3://bucket/prefix --synthetic N    # N small objects prefix/dNN/objNNNNNNN.pdf
//!
//! Endpoint and credentials: QUIRE_S3_ENDPOINT (path-style) and the AWS environment.
//! Imports: `quire_store::s3` only (of this crate).

use quire_store::s3::{client, parse_s3_uri, S3Options};
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(uri) = args.first() else { anyhow::bail!("usage: s3_put s3://bucket/prefix (FILE... | --synthetic N)") };
    let (bucket, prefix) = parse_s3_uri(uri)?;
    let prefix = prefix.trim_matches('/').to_string();
    let mut o = S3Options::new(bucket.clone(), prefix.clone());
    o.endpoint_url = std::env::var("QUIRE_S3_ENDPOINT").ok();
    o.force_path_style = o.endpoint_url.is_some();
    let c = client(&o).await;
    let mut items: Vec<(String, Vec<u8>)> = Vec::new();
    if args.get(1).map(String::as_str) == Some("--synthetic") {
        let n: usize = args.get(2).ok_or_else(|| anyhow::anyhow!("--synthetic N"))?.parse()?;
        for i in 0..n {
            // Not opened by the coordinator: any bytes do; keep them PDF-looking.
            items.push((format!("{prefix}/d{:02}/obj{i:07}.pdf", i % 100), format!("%PDF-1.4\n% synthetic {i}\n").into_bytes()));
        }
    } else {
        for f in &args[1..] {
            let name = std::path::Path::new(f).file_name().and_then(|n| n.to_str()).unwrap_or("file").to_string();
            items.push((format!("{prefix}/{name}"), std::fs::read(f)?));
        }
    }
    let n = items.len();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = tokio::task::JoinSet::new();
    let t0 = std::time::Instant::now();
    for (key, body) in items {
        let permit = sem.clone().acquire_owned().await?;
        let (c, bucket) = (c.clone(), bucket.clone());
        set.spawn(async move {
            let r = c.put_object().bucket(bucket).key(&key).body(body.into()).send().await;
            drop(permit);
            r.map(|_| ()).map_err(|e| anyhow::anyhow!("{key}: {e:?}"))
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    eprintln!("s3_put: {n} objects in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}
