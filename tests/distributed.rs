//! End-to-end test of the distributed mode: a real nats-server (JetStream)
//! and a real Garage (S3) on loopback, `quire coordinator --wait` and two
//! `quire worker` processes.
//!
//! Needs libpdfium (`QUIRE_PDFIUM`), nats-server (`QUIRE_NATS_SERVER`, PATH
//! or ~/.cache/quire-tools) and Garage (`QUIRE_GARAGE`, PATH or
//! ~/.cache/quire-tools): `eval "$(scripts/install-services.sh)"` installs
//! both; scripts/test.sh does it all.

use quire_store::s3::{S3Options, S3Store};
use quire_store::BlobStore;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ACCESS_KEY: &str = "GKquiretest0123456789abcdef";
const SECRET_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `env` if set, else `name` on PATH, else below ~/.cache/quire-tools.
fn find_service(env: &str, name: &str, cached: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/quire-tools").join(cached));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{name} not found ({env} unset, none on PATH or in ~/.cache/quire-tools): install it with `eval \"$(scripts/install-services.sh)\"`")
    })
}

/// A child process killed when dropped, with its output in a log file.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn wait_for(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- {} log ---\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        }
    }
}

fn wait_listening(p: &mut Proc, port: u16, what: &str) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            p.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "{what} exited:\n{}",
            p.log()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} did not listen on {port}:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_nats(dir: &Path) -> (Proc, String) {
    let bin = find_service(
        "QUIRE_NATS_SERVER",
        "nats-server",
        "nats-venv/bin/nats-server",
    );
    let port = free_port();
    let mut p = Proc::spawn(
        "nats-server",
        Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.join("nats")),
        dir,
    );
    let t0 = Instant::now();
    while !p.log().contains("Server is ready") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "nats-server not ready:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_listening(&mut p, port, "nats-server");
    (p, format!("nats://127.0.0.1:{port}"))
}

fn start_garage(dir: &Path, bucket: &str) -> (Proc, String) {
    let bin = find_service("QUIRE_GARAGE", "garage", "bin/garage");
    let (s3_port, rpc_port) = (free_port(), free_port());
    let d = dir.join("garage");
    std::fs::create_dir_all(&d).unwrap();
    let dd = d.display();
    let conf = d.join("garage.toml");
    std::fs::write(
        &conf,
        format!(
            "metadata_dir = \"{dd}/meta\"\ndata_dir = \"{dd}/data\"\ndb_engine = \"lmdb\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\nrpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{SECRET_KEY}\"\n\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\nroot_domain = \".s3.garage.localhost\"\n"
        ),
    )
    .unwrap();
    let mut p = Proc::spawn(
        "garage",
        Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
            .env("GARAGE_DEFAULT_BUCKET", bucket)
            .env("RUST_LOG", "garage=warn"),
        dir,
    );
    wait_listening(&mut p, s3_port, "garage");
    (p, format!("http://127.0.0.1:{s3_port}"))
}

fn s3_options(endpoint: &str, bucket: &str, prefix: &str) -> S3Options {
    let mut o = S3Options::new(bucket, prefix);
    o.endpoint_url = Some(endpoint.into());
    o.region = Some("garage".into());
    o.force_path_style = true;
    o.credentials = Some((ACCESS_KEY.into(), SECRET_KEY.into()));
    o
}

fn quire_cmd(endpoint: &str, args: &[&str]) -> Command {
    assert!(
        std::env::var_os("QUIRE_PDFIUM").is_some(),
        "QUIRE_PDFIUM is not set: run scripts/setup-pdfium.sh and export the path it prints"
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_quire"));
    c.args(args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "garage")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("QUIRE_NATS")
        .env("QUIRE_S3_ENDPOINT", endpoint)
        .env("QUIRE_S3_PATH_STYLE", "true");
    c
}

fn run_quire(endpoint: &str, args: &[&str], limit: Duration) -> Output {
    let mut child = quire_cmd(endpoint, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run quire");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "quire {} ran past {limit:?}:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "quire {}\n--- stderr ---\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn coordinator_and_two_workers_process_a_bucket_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = format!("quire-dist-{}", std::process::id());
    let (_nats, nats_url) = start_nats(tmp.path());
    let (_garage, endpoint) = start_garage(tmp.path(), &bucket);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async {
        let t0 = Instant::now();
        loop {
            match S3Store::new(s3_options(&endpoint, &bucket, "")).await {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => panic!("garage not ready: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/docs");
    rt.block_on(async {
        for name in ["born_digital.pdf", "mixed.pdf", "corrupt.pdf"] {
            store
                .put(
                    &format!("in/{name}"),
                    std::fs::read(docs.join(name)).unwrap(),
                )
                .await
                .unwrap();
        }
    });

    let metrics_port = free_port();
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| {
            let addr = format!("127.0.0.1:{metrics_port}");
            let mut args = vec![
                "worker",
                "--nats",
                &nats_url,
                "--workers",
                "2",
                "--grace-s",
                "5",
            ];
            if i == 0 {
                args.extend(["--metrics-addr", addr.as_str()]);
            }
            Proc::spawn(
                &format!("worker{i}"),
                &mut quire_cmd(&endpoint, &args),
                tmp.path(),
            )
        })
        .collect();

    let input = format!("s3://{bucket}/in");
    let out = format!("s3://{bucket}/out");
    let job_args = [
        "--input",
        &input,
        "--out",
        &out,
        "--job",
        "dist",
        "--engine",
        "text-layer",
        "--pages-per-task",
        "2",
    ];
    let mut args = vec!["coordinator", "--nats", &nats_url];
    args.extend(job_args);
    // The output is looked at once, then again only when the workers'
    // task events (splits, stored results) say every task is done: with a
    // 10-minute poll the job ends within the limit only through them.
    args.extend(["--wait", "--poll-ms", "600000"]);
    let o = run_quire(&endpoint, &args, Duration::from_secs(60));
    assert_eq!(
        o.status.code(),
        Some(3),
        "corrupt.pdf is corrupt: some pages failed"
    );
    let submitted: Value = serde_json::from_slice(&o.stdout).expect("a JSON summary on stdout");
    // One whole-document task per object; workers open and split them.
    assert_eq!(
        (submitted["documents"].as_u64(), submitted["published"].as_u64()),
        (Some(3), Some(3)),
        "{submitted}"
    );

    // Every page of every input has exactly one record.
    let (recs, manifest, tasks) = rt.block_on(async {
        let mut recs: BTreeMap<(String, u64), Value> = BTreeMap::new();
        let keys = store.list("out/dist/results/").await.unwrap();
        // born_digital.pdf and mixed.pdf have more than 2 pages: split by a
        // worker into page-range tasks; corrupt.pdf is one task.
        let splits = store.list("out/dist/splits/").await.unwrap();
        assert_eq!(splits.len(), 2, "{splits:?}");
        let tasks = keys.len() as u64;
        assert!(tasks > 3, "split documents give several result files: {keys:?}");
        for k in keys {
            let body = store.get(&k).await.unwrap().unwrap();
            for line in String::from_utf8(body).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                let key = (
                    v["source"].as_str().unwrap().to_string(),
                    v["page"].as_u64().unwrap(),
                );
                assert!(
                    recs.insert(key.clone(), v).is_none(),
                    "duplicate record {key:?}"
                );
            }
        }
        let m: Value = serde_json::from_slice(
            &store
                .get("out/dist/manifest.json")
                .await
                .unwrap()
                .expect("manifest"),
        )
        .unwrap();
        assert!(store
            .exists("out/dist/markdown/in/born_digital.pdf.md")
            .await
            .unwrap());
        (recs, m, tasks)
    });
    let sources: BTreeSet<String> = recs.keys().map(|(s, _)| s.clone()).collect();
    let expected: BTreeSet<String> = ["born_digital.pdf", "corrupt.pdf", "mixed.pdf"]
        .iter()
        .map(|n| format!("{input}/{n}"))
        .collect();
    assert_eq!(sources, expected);
    for src in &sources {
        let pages: Vec<u64> = recs
            .keys()
            .filter(|(s, _)| s == src)
            .map(|(_, p)| *p)
            .collect();
        let count = recs[&(src.clone(), 1)]["page_count"]
            .as_u64()
            .unwrap()
            .max(1);
        assert_eq!(
            pages,
            (1..=count).collect::<Vec<_>>(),
            "{src}: one record per page"
        );
    }
    assert!(recs[&(format!("{input}/corrupt.pdf"), 1)]["error"]["kind"].is_string());
    let c = &manifest["counts"];
    let failed = recs.values().filter(|r| !r["error"].is_null()).count() as u64;
    assert_eq!(c["documents"].as_u64(), Some(3));
    assert_eq!(c["tasks"].as_u64(), Some(tasks));
    assert_eq!(c["tasks_done"].as_u64(), Some(tasks));
    assert_eq!(c["tasks_dead_lettered"].as_u64(), Some(0));
    assert_eq!(c["records"].as_u64(), Some(recs.len() as u64));
    assert_eq!(c["pages_failed"].as_u64(), Some(failed));
    assert_eq!(c["pages_ok"].as_u64(), Some(recs.len() as u64 - failed));
    assert!(failed >= 1, "corrupt.pdf has an error record");

    // Status agrees; the metrics endpoint counts what worker 0 did.
    let st = run_quire(
        &endpoint,
        &["status", "dist", "--nats", &nats_url, "--json"],
        Duration::from_secs(20),
    );
    assert_eq!(st.status.code(), Some(0));
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(
        (
            st["tasks"].as_u64(),
            st["done"].as_u64(),
            st["pending"].as_u64()
        ),
        (Some(tasks), Some(tasks), Some(0))
    );
    assert_eq!(st["pages_ok"].as_u64(), Some(recs.len() as u64 - failed));
    let m = http_get(metrics_port, "/metrics");
    assert!(
        m.starts_with("HTTP/1.1 200") && m.contains("quire_tasks_total"),
        "{m}"
    );
    assert!(http_get(metrics_port, "/readyz").starts_with("HTTP/1.1 200"));

    // Submitting again publishes nothing.
    let mut args = vec!["coordinator", "--nats", &nats_url];
    args.extend(job_args);
    let again = run_quire(&endpoint, &args, Duration::from_secs(30));
    assert_eq!(again.status.code(), Some(0));
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (again["published"].as_u64(), again["skipped"].as_u64()),
        (Some(0), Some(3)),
        "{again}"
    );

    // --force redoes the job at once, although the queue saw the same task
    // ids moments ago; results are replaced, not duplicated.
    let mut args = vec!["coordinator", "--nats", &nats_url];
    args.extend(job_args);
    args.extend(["--force", "--wait", "--poll-ms", "600000"]);
    let forced = run_quire(&endpoint, &args, Duration::from_secs(60));
    assert_eq!(forced.status.code(), Some(3), "{}", String::from_utf8_lossy(&forced.stderr));
    let forced: Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(
        (forced["published"].as_u64(), forced["duplicates"].as_u64()),
        (Some(3), Some(0)),
        "{forced}"
    );
    rt.block_on(async {
        assert_eq!(store.list("out/dist/results/").await.unwrap().len() as u64, tasks);
        let m: Value = serde_json::from_slice(&store.get("out/dist/manifest.json").await.unwrap().unwrap()).unwrap();
        assert_eq!(m["counts"]["records"].as_u64(), Some(recs.len() as u64));
        assert!(m["throughput"]["pages_per_second"].as_f64().unwrap() > 0.0, "pages were redone: {m}");
    });

    // A task no worker can run (its model is not loaded anywhere) is
    // handed back until it runs out of deliveries, then dead-lettered; the
    // job still finishes, and says so.
    let one = format!("{input}/born_digital.pdf");
    let args = [
        "coordinator",
        "--nats",
        &nats_url,
        "--input",
        &one,
        "--out",
        &out,
        "--job",
        "dead",
        "--engine",
        "vlm",
        "--model",
        "no-such-model",
        "--pages-per-task",
        "100",
        "--max-deliver",
        "1",
        "--wait",
        "--poll-ms",
        "600000", // the dead letter's event ends the wait
    ];
    let o = run_quire(&endpoint, &args, Duration::from_secs(40));
    assert_eq!(
        o.status.code(),
        Some(3),
        "a dead-lettered task is a failure"
    );
    let m: Value = rt.block_on(async {
        serde_json::from_slice(&store.get("out/dead/manifest.json").await.unwrap().unwrap())
            .unwrap()
    });
    assert_eq!(
        (
            m["counts"]["tasks"].as_u64(),
            m["counts"]["tasks_dead_lettered"].as_u64()
        ),
        (Some(1), Some(1)),
        "{m}"
    );
    assert_eq!(m["dead_lettered"][0]["source"].as_str(), Some(one.as_str()));
    let st = run_quire(
        &endpoint,
        &[
            "status", "dead", "--out", &out, "--nats", &nats_url, "--json",
        ],
        Duration::from_secs(20),
    );
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(
        (st["dead_lettered"].as_u64(), st["pending"].as_u64()),
        (Some(1), Some(0)),
        "{st}"
    );

    // SIGTERM: each worker stops pulling and exits 0.
    for w in &mut workers {
        let status = Command::new("kill")
            .args(["-TERM", &w.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let code = w.wait_for(Duration::from_secs(15));
        assert_eq!(code, Some(0), "worker exit after SIGTERM:\n{}", w.log());
    }
}

/// (source file name, member, page) → (text, tokens_in, error kind) of every record.
fn rows(records: impl IntoIterator<Item = Value>) -> BTreeMap<(String, String, u64), (Value, Value, Value)> {
    let mut map = BTreeMap::new();
    for v in records {
        let name = v["source"].as_str().unwrap().rsplit('/').next().unwrap().to_string();
        let member = v["member"].as_str().unwrap_or("").to_string();
        let key = (name, member, v["page"].as_u64().unwrap());
        let row = (v["text"].clone(), v["tokens_in"].clone(), v["error"]["kind"].clone());
        assert!(map.insert(key.clone(), row).is_none(), "duplicate record {key:?}");
    }
    map
}

#[test]
fn archives_and_image_groups_through_workers_give_the_rows_of_quire_run() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = format!("quire-wds-{}", std::process::id());
    let (_nats, nats_url) = start_nats(tmp.path());
    let (_garage, endpoint) = start_garage(tmp.path(), &bucket);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(async {
        let t0 = Instant::now();
        loop {
            match S3Store::new(s3_options(&endpoint, &bucket, "")).await {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => panic!("garage not ready: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let model = fixtures.join("idefics3/split_sf2_gqa");
    let model = model.to_str().unwrap();
    // The same inputs on disk (for quire run) and in the bucket.
    let local = tmp.path().join("local");
    std::fs::create_dir_all(local.join("wds")).unwrap();
    std::fs::create_dir_all(local.join("loose")).unwrap();
    let mut files: Vec<(PathBuf, String)> = (0..4)
        .map(|i| (fixtures.join(format!("archives/shard-{i:06}.tar")), format!("wds/shard-{i:06}.tar")))
        .collect();
    files.push((fixtures.join("archives/pictures.zip"), "wds/pictures.zip".into()));
    for name in ["photo.jpg", "gray.png", "multipage.tif"] {
        files.push((fixtures.join("docs").join(name), format!("loose/{name}")));
    }
    rt.block_on(async {
        for (from, to) in &files {
            std::fs::copy(from, local.join(to)).unwrap();
            store.put(&format!("in/{to}"), std::fs::read(from).unwrap()).await.unwrap();
        }
    });
    let _workers: Vec<Proc> = (0..2)
        .map(|i| {
            let args = ["worker", "--nats", &nats_url, "--workers", "2", "--grace-s", "5", "--model", model];
            Proc::spawn(&format!("wds-worker{i}"), &mut quire_cmd(&endpoint, &args), tmp.path())
        })
        .collect();
    let shards = format!("s3://{bucket}/in/wds/shard-{{000000..000003}}.tar");
    let zip = format!("s3://{bucket}/in/wds/pictures.zip");
    let loose = format!("s3://{bucket}/in/loose");
    let out = format!("s3://{bucket}/out");
    let settings = ["--task", "caption", "--model", model, "--max-new-tokens", "3", "--images-per-task", "2"];
    let mut args = vec!["coordinator", "--nats", &nats_url, "--input", &shards, "--input", &zip, "--input", &loose, "--out", &out, "--job", "wds"];
    args.extend(settings);
    args.extend(["--wait", "--poll-ms", "600000"]);
    let o = run_quire(&endpoint, &args, Duration::from_secs(240));
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let submitted: Value = serde_json::from_slice(&o.stdout).unwrap();
    // Four shards and the zip as whole objects (nothing downloaded), the three loose images
    // in two groups.
    assert_eq!((submitted["documents"].as_u64(), submitted["published"].as_u64()), (Some(8), Some(7)), "{submitted}");
    let (dist, splits, manifest) = rt.block_on(async {
        let mut recs = Vec::new();
        for k in store.list("out/wds/results/").await.unwrap() {
            let body = store.get(&k).await.unwrap().unwrap();
            recs.extend(String::from_utf8(body).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
        }
        assert!(store.exists("out/wds/markdown/loose/photo.jpg.md").await.unwrap());
        assert!(store.exists("out/wds/markdown/shard-000003.tar.md").await.unwrap());
        let m: Value = serde_json::from_slice(&store.get("out/wds/manifest.json").await.unwrap().unwrap()).unwrap();
        (recs, store.list("out/wds/splits/").await.unwrap(), m)
    });
    assert_eq!(splits.len(), 5, "each archive split by a worker into sample ranges: {splits:?}");
    for r in dist.iter().filter(|r| r["member"].is_string()) {
        assert!(r["source"].as_str().unwrap().starts_with(&format!("s3://{bucket}/in/wds/")), "{r}");
    }
    assert_eq!(manifest["counts"]["records"].as_u64(), Some(dist.len() as u64));
    // quire run on the same files: the same rows.
    let local_out = tmp.path().join("run-out");
    let shards_local = format!("{}/shard-{{000000..000003}}.tar", local.join("wds").display());
    let (zip_local, loose_local) = (local.join("wds/pictures.zip"), local.join("loose"));
    let mut args = vec![
        "run", &shards_local, zip_local.to_str().unwrap(), loose_local.to_str().unwrap(), "--out", local_out.to_str().unwrap(), "--job", "wds",
    ];
    args.extend(settings);
    let o = run_quire(&endpoint, &args, Duration::from_secs(240));
    assert_eq!(o.status.code(), Some(0));
    let mut local_recs = Vec::new();
    for e in std::fs::read_dir(local_out.join("wds/results")).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        local_recs.extend(text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
    }
    let (d, l) = (rows(dist), rows(local_recs));
    assert_eq!(d.len(), 19 + 3 + 1 + 1 + 3, "every image member and every loose frame has one record");
    assert_eq!(d, l);
}
