//! End-to-end test of the distributed mode: a real nats-server (JetStream)
//! and a real Garage (S3) on loopback, `quire coordinator --wait` and two
//! `quire worker` processes.
//!
//! Needs libpdfium (`QUIRE_PDFIUM`), nats-server (`QUIRE_NATS_SERVER`, PATH
//! or ~/.cache/quire-tools) and Garage (`QUIRE_GARAGE`, PATH or
//! ~/.cache/quire-tools): `eval "$(scripts/install-services.sh)"` installs
//! both; scripts/test.sh does it all. `quire-test-support` launches them.

use quire_store::s3::{S3Options, S3Store};
use quire_store::BlobStore;
use quire_test_support::{free_port, start_garage, start_garage_at, start_nats, start_nats_at, Proc, ACCESS_KEY, SECRET_KEY};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// Sends `sig` (`-9`, `-TERM`, ...) to a process.
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A small deterministic generator (xorshift), seeded per run and printed so a failure can be
/// replayed with `QUIRE_FAULT_SEED`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn s3_store(rt: &tokio::runtime::Runtime, endpoint: &str, bucket: &str) -> S3Store {
    rt.block_on(async {
        let t0 = Instant::now();
        loop {
            match S3Store::new(s3_options(endpoint, bucket, "")).await {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => panic!("garage not ready: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
}

/// Every record of a job's stored results, keyed by (source, page); a second record for the
/// same page, or an object that does not parse to the end, fails the test.
fn stored_records(rt: &tokio::runtime::Runtime, store: &S3Store, prefix: &str) -> BTreeMap<(String, u64), Value> {
    rt.block_on(async {
        let mut recs = BTreeMap::new();
        for k in store.list(prefix).await.unwrap() {
            let body = store.get(&k).await.unwrap().unwrap();
            let text = String::from_utf8(body).unwrap();
            assert!(text.ends_with('\n'), "partial object {k}");
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("partial object {k}: {e}"));
                let key = (v["source"].as_str().unwrap().to_string(), v["page"].as_u64().unwrap());
                assert!(recs.insert(key.clone(), v).is_none(), "duplicate record {key:?}");
            }
        }
        recs
    })
}

/// The fault drill of the distributed mode, on loopback: a text-layer job whose pages are
/// made slower than the lease (so only heartbeats keep them), while workers are killed with
/// SIGKILL and restarted again and again, the broker is restarted, the coordinator is killed
/// during `--wait` and started again, the S3 store goes away for a while, and one poison
/// document kills every worker that starts it. The job must finish with exactly one record
/// per page, the poison document dead-lettered and nothing else.
///
/// `QUIRE_FAULTS_LONG=1` is the long variant (100 kills, 10 s broker and 30 s store outages).
#[test]
fn kills_restarts_outages_and_a_poison_task_lose_and_duplicate_nothing() {
    let long = std::env::var_os("QUIRE_FAULTS_LONG").is_some();
    let (kills, broker_down, store_down) = if long { (100, 10, 30) } else { (20, 4, 8) };
    // Between kills: a minimum and a random extra, in ms (QUIRE_FAULT_KILL_GAP_MS=MIN,EXTRA).
    let kill_gap_ms: (u64, u64) = std::env::var("QUIRE_FAULT_KILL_GAP_MS")
        .ok()
        .and_then(|v| v.split_once(',').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))))
        .unwrap_or((1000, 1500));
    let seed = std::env::var("QUIRE_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| unix_ms() | 1);
    eprintln!("fault drill: seed {seed}, {kills} kills, broker down {broker_down}s, store down {store_down}s");
    let mut rng = Rng(seed);
    // QUIRE_KEEP_TMP=1 keeps the services' data and every process's log for a post-mortem.
    let keep = std::env::var_os("QUIRE_KEEP_TMP").is_some();
    let tmp = tempfile::Builder::new().prefix("quire-drill-").disable_cleanup(keep).tempdir().unwrap();
    eprintln!("fault drill: files in {}", tmp.path().display());
    let bucket = format!("quire-faults-{}", std::process::id());
    let nats_port = free_port();
    let mut nats = start_nats_at(tmp.path(), nats_port, &[]);
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let (s3_port, rpc_port) = (free_port(), free_port());
    let mut garage = start_garage_at(tmp.path(), &bucket, s3_port, rpc_port);
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = s3_store(&rt, &endpoint, &bucket);
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/docs");
    let copies = if long { 60 } else { 24 };
    rt.block_on(async {
        for i in 0..copies {
            let name = if i % 2 == 0 { "born_digital.pdf" } else { "mixed.pdf" };
            store.put(&format!("in/{i:03}-{name}"), std::fs::read(docs.join(name)).unwrap()).await.unwrap();
        }
        store.put("in/poison.pdf", std::fs::read(docs.join("born_digital.pdf")).unwrap()).await.unwrap();
    });
    let starts = tmp.path().join("starts.log");
    let faults = format!("page_ms=2500,crash_source=poison.pdf,starts_log={}", starts.display());
    let spawn_worker = |name: &str| {
        let mut c = quire_cmd(&endpoint, &["worker", "--nats", &nats_url, "--workers", "2", "--render-procs", "1", "--grace-s", "2"]);
        c.env("QUIRE_TEST_FAULTS", &faults);
        Proc::spawn(name, &mut c, tmp.path())
    };
    let mut workers: Vec<Proc> = (0..3).map(|i| spawn_worker(&format!("w{i}-0"))).collect();
    let mut spawned = 3;
    let (input, out) = (format!("s3://{bucket}/in"), format!("s3://{bucket}/out"));
    let coordinator_args = [
        "coordinator", "--nats", &nats_url, "--input", &input, "--out", &out, "--job", "drill", "--engine", "text-layer",
        "--pages-per-task", "1", "--ack-wait-s", "2", "--max-deliver", "8", "--wait", "--poll-ms", "1000", "--run", "night", "--run-lease-s", "5",
    ];
    let mut coordinator = Proc::spawn("coordinator-0", &mut quire_cmd(&endpoint, &coordinator_args), tmp.path());

    // Keeps three workers running: a worker the poison task killed is started again.
    let keep_three = |workers: &mut Vec<Proc>, spawned: &mut usize, died: &mut Vec<(u32, u64)>| {
        for w in workers.iter_mut() {
            if w.exited() {
                died.push((w.pid(), unix_ms()));
                *spawned += 1;
                *w = spawn_worker(&format!("w-{spawned}"));
            }
        }
    };
    let t_start = Instant::now();
    while !starts.exists() {
        assert!(t_start.elapsed() < Duration::from_secs(60), "no task started:\n{}", coordinator.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGKILL a random worker, again and again, restarting it each time.
    let mut killed: Vec<(u32, u64)> = Vec::new();
    // Workers the poison task crashed (their other running task is handed over too).
    let mut died: Vec<(u32, u64)> = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(kill_gap_ms.0 + rng.below(kill_gap_ms.1)));
        keep_three(&mut workers, &mut spawned, &mut died);
        let i = rng.below(3) as usize;
        let pid = workers[i].pid();
        signal(pid, "-9");
        killed.push((pid, unix_ms()));
        let _ = workers[i].wait_for(Duration::from_secs(5));
        spawned += 1;
        workers[i] = spawn_worker(&format!("w{i}-{spawned}"));
    }
    let kills_done_ms = unix_ms();
    // The broker stops and comes back on the same store.
    signal(nats.pid(), "-TERM");
    assert!(nats.wait_for(Duration::from_secs(15)).is_some(), "nats-server did not stop");
    std::thread::sleep(Duration::from_secs(broker_down));
    nats = start_nats_at(tmp.path(), nats_port, &[]);
    // The waiting coordinator is killed and another one takes over the wait.
    std::thread::sleep(Duration::from_secs(2));
    keep_three(&mut workers, &mut spawned, &mut died);
    signal(coordinator.pid(), "-9");
    let _ = coordinator.wait_for(Duration::from_secs(5));
    coordinator = Proc::spawn("coordinator-1", &mut quire_cmd(&endpoint, &coordinator_args), tmp.path());
    // The store goes away; status says so instead of failing.
    std::thread::sleep(Duration::from_secs(2));
    signal(garage.pid(), "-TERM");
    assert!(garage.wait_for(Duration::from_secs(15)).is_some(), "garage did not stop");
    let st = run_quire(&endpoint, &["status", "drill", "--nats", &nats_url, "--out", &out, "--json"], Duration::from_secs(60));
    assert_eq!(st.status.code(), Some(0), "status during a store outage");
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(st["store_error"].is_string(), "status names the outage: {st}");
    let t_down = Instant::now();
    while t_down.elapsed() < Duration::from_secs(store_down) {
        keep_three(&mut workers, &mut spawned, &mut died);
        std::thread::sleep(Duration::from_millis(200));
    }
    garage = start_garage_at(tmp.path(), &bucket, s3_port, rpc_port);

    // The job finishes by itself.
    let code = loop {
        if let Some(c) = coordinator.wait_for(Duration::from_millis(500)) {
            break c;
        }
        keep_three(&mut workers, &mut spawned, &mut died);
        assert!(t_start.elapsed() < Duration::from_secs(if long { 900 } else { 300 }), "the job did not finish:\n{}", coordinator.log());
    };
    let wall = t_start.elapsed().as_secs_f64();
    let log = coordinator.log();
    assert_eq!(code, 3, "the poison task is a failure of the job:\n{log}");

    // Every dead letter of the job, with its reason (for the messages below).
    let dead = rt.block_on(async {
        let q = quire_queue::jetstream::JetStreamQueue::connect(quire_queue::jetstream::JetStreamOptions {
            set_delivery_rules: false,
            ..quire_queue::jetstream::JetStreamOptions::new(&nats_url)
        })
        .await
        .unwrap();
        eprintln!("lease in force: {:?}", q.options().queue.ack_wait);
        q.dead_letters("drill").await.unwrap()
    });
    eprintln!("dead letters: {dead:#?}");
    // Starts: (time, task, pid), from the workers' fault hook.
    let starts: Vec<(u64, String, u32)> = std::fs::read_to_string(&starts)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() == 4).then(|| (f[3].parse().unwrap(), f[0].to_string(), f[2].parse().unwrap()))
        })
        .collect();
    let m: Value = rt.block_on(async { serde_json::from_slice(&store.get("out/drill/manifest.json").await.unwrap().unwrap()).unwrap() });
    let listed: Vec<&Value> = m["dead_lettered"].as_array().unwrap().iter().collect();
    let poison = listed.iter().find(|d| d["source"].as_str().unwrap().ends_with("poison.pdf")).expect("the poison task is given up");
    let poison = poison["task_id"].as_str().unwrap();
    // Any other task given up must have used every delivery it had (8): kills, poison crashes
    // and the broker's outage each cost the tasks a worker held a delivery, started or still
    // waiting for their turn (a second start while the first worker lived is checked below).
    // The issue allows that, and the manifest must list it; with 100 kills it happens now and then.
    let unlucky: Vec<&str> = listed.iter().map(|d| d["task_id"].as_str().unwrap()).filter(|t| *t != poison).collect();
    for d in listed.iter().filter(|d| d["task_id"].as_str() != Some(poison)) {
        let starts_of = starts.iter().filter(|s| Some(s.1.as_str()) == d["task_id"].as_str()).count();
        assert!(d["deliveries"].as_u64() >= Some(8), "given up before its 8 deliveries: {d} ({starts_of} starts)");
        eprintln!("fault drill: given up after all its deliveries ({starts_of} of them started): {d}");
    }
    // The same task may be in the dead letters twice (its max-deliveries advisory forwarded
    // again by the coordinator that replaced a killed one); the manifest lists it once.
    let distinct: std::collections::BTreeSet<&str> = dead.iter().map(|d| d.task_id.as_str()).collect();
    if distinct.len() != dead.len() {
        eprintln!("fault drill: {} dead letters for {} tasks", dead.len(), distinct.len());
    }
    // The manifest lists every task given up whose results are missing. One whose last worker
    // still stored its results before the job finished (its lease lost while it worked) is
    // done, not lost, and counted so.
    let listed_ids: std::collections::BTreeSet<&str> = listed.iter().map(|d| d["task_id"].as_str().unwrap()).collect();
    assert!(listed_ids.is_subset(&distinct), "the manifest lists only tasks the queue gave up: {m}");
    for id in distinct.difference(&listed_ids) {
        let stored = rt.block_on(store.exists(&format!("out/drill/results/{id}.jsonl"))).unwrap();
        assert!(stored, "task {id} was given up, has no results, and the manifest does not list it: {m}");
        eprintln!("fault drill: task {id} given up, but its results were stored before the finish: counted done");
    }
    eprintln!("fault drill: given up besides the poison task (every delivery used): {unlucky:?}");
    // Exactly one record per page of every document but the poison one; a task given up may
    // still have written its page when its last worker finished after the give-up (its lease
    // lost while the broker was down), never twice.
    let recs = stored_records(&rt, &store, "out/drill/results/");
    let unlucky_pages: Vec<(String, u64)> = listed
        .iter()
        .filter(|d| unlucky.contains(&d["task_id"].as_str().unwrap()))
        .flat_map(|d| (d["first"].as_u64().unwrap()..=d["last"].as_u64().unwrap()).map(move |p| (d["source"].as_str().unwrap().to_string(), p)))
        .collect();
    for i in 0..copies {
        let name = if i % 2 == 0 { "born_digital.pdf" } else { "mixed.pdf" };
        let src = format!("{input}/{i:03}-{name}");
        let pages: Vec<u64> = recs.keys().filter(|(s, _)| *s == src).map(|(_, p)| *p).collect();
        let want: Vec<u64> = (1..=3).filter(|p| !unlucky_pages.contains(&(src.clone(), *p))).collect();
        let maybe: Vec<u64> = (1..=3).collect();
        assert!(pages == want || pages == maybe, "{src}: pages {pages:?}");
    }
    assert!(!recs.keys().any(|(s, _)| s.ends_with("poison.pdf")));
    let late = recs.len() as u64 - m["counts"]["records"].as_u64().unwrap();
    assert!(late as usize <= unlucky_pages.len(), "the manifest counts {} of {} records: {m}", m["counts"]["records"], recs.len());
    assert_eq!(m["counts"]["tasks_dead_lettered"].as_u64(), Some(1 + unlucky.len() as u64), "{m}");

    // A task runs twice only after its worker was killed (or once the broker restarted);
    // heartbeats kept every slower-than-the-lease task on its worker.
    let ended: BTreeMap<u32, u64> = killed.iter().chain(&died).copied().collect();
    let mut by_task: BTreeMap<&str, Vec<(u64, u32)>> = BTreeMap::new();
    for (t, task, pid) in starts.iter().filter(|s| s.1 != poison) {
        by_task.entry(task).or_default().push((*t, *pid));
    }
    let mut recover = Vec::new();
    for runs in by_task.values() {
        for pair in runs.windows(2) {
            let ((t0, pid0), (t1, _)) = (pair[0], pair[1]);
            if t1 > kills_done_ms {
                continue; // the broker restart and the outage may hand tasks over too
            }
            assert!(
                ended.get(&pid0).is_some_and(|k| *k >= t0 && *k <= t1),
                "a task was started again while its first worker was alive: {runs:?}"
            );
            if let Some(k) = killed.iter().find(|(p, _)| *p == pid0).map(|k| k.1) {
                recover.push(t1.saturating_sub(k) as f64 / 1000.0);
            }
        }
    }
    recover.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let worst = recover.last().copied().unwrap_or(0.0);
    eprintln!(
        "fault drill: {wall:.1}s, {} starts of {} tasks, {} kills, {} workers started; time to take over a killed worker's task: median {:.1}s, worst {worst:.1}s over {} tasks",
        starts.len(),
        by_task.len(),
        killed.len(),
        spawned,
        recover.get(recover.len() / 2).copied().unwrap_or(0.0),
        recover.len(),
    );
    assert!(!recover.is_empty(), "the kills hit no running task: the drill proved nothing");
    // With a 2 s lease a killed worker's task is free 2 s after its last renewal; the rest
    // is waiting for a free slot (6 slots, 2.5 s pages), and a redelivered task waits for its
    // process's running tasks before it runs alone. A 30 s wait is the workers' default lease
    // in force instead of the job's.
    assert!(worst < 25.0, "a killed worker's task waited {worst:.1}s to be taken over");
    drop(garage);
    drop(nats);
}

/// Workers check every task message against its job's registration: a message that points
/// at another output, at an input outside the job's, or at a job no coordinator registered is
/// dead-lettered with the reason, and nothing is read or written for it. Meanwhile no secret
/// (the NATS token, the S3 secret key) shows up in any log at the most verbose level, in the
/// metrics or in any file of the job; and a worker with a wrong token is refused clearly.
#[test]
fn forged_task_messages_are_dead_lettered_and_secrets_stay_out_of_every_output() {
    use quire_queue::TaskQueue;
    const TOKEN: &str = "s3cr3t-nats-token-9f8e7d6c";
    let tmp = tempfile::tempdir().unwrap();
    let bucket = format!("quire-forged-{}", std::process::id());
    let nats_port = free_port();
    let _nats = start_nats_at(tmp.path(), nats_port, &["--auth", TOKEN]);
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let (_garage, endpoint) = start_garage(tmp.path(), &bucket);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = s3_store(&rt, &endpoint, &bucket);
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/docs");
    rt.block_on(async {
        store.put("in/born_digital.pdf", std::fs::read(docs.join("born_digital.pdf")).unwrap()).await.unwrap();
        store.put("private/secret.pdf", std::fs::read(docs.join("mixed.pdf")).unwrap()).await.unwrap();
    });
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut wc = quire_cmd(&endpoint, &["worker", "--nats", &nats_url, "--render-procs", "1", "--metrics-addr", &metrics_addr]);
    wc.env("QUIRE_NATS_TOKEN", TOKEN).env("QUIRE_LOG", "trace");
    let worker = Proc::spawn("worker", &mut wc, tmp.path());

    let (input, out) = (format!("s3://{bucket}/in"), format!("s3://{bucket}/out"));
    let mut cc = quire_cmd(&endpoint, &[
        "-vv", "coordinator", "--nats", &nats_url, "--input", &input, "--out", &out, "--job", "legit", "--engine", "text-layer", "--wait",
    ]);
    cc.env("QUIRE_NATS_TOKEN", TOKEN).env("QUIRE_LOG", "trace");
    let legit = cc.output().unwrap();
    assert_eq!(legit.status.code(), Some(0), "{}", String::from_utf8_lossy(&legit.stderr));

    // Forged messages, published straight onto the queue by someone holding the token.
    let (dead, queue) = rt.block_on(async {
        let mut o = quire_queue::jetstream::JetStreamOptions::new(&nats_url);
        o.auth.token = Some(TOKEN.into());
        o.set_delivery_rules = false;
        let q = quire_queue::jetstream::JetStreamQueue::connect(o).await.unwrap();
        let forged = |job: &str, uri: &str, out: &str, id: char| {
            let mut settings = quire_core::JobSettings::new(job);
            settings.engine = quire_core::Engine::TextLayer;
            settings.out = Some(out.into());
            quire_core::TaskSpec::new(id.to_string().repeat(32), settings, quire_core::SourceRef { uri: uri.into(), rel: "x.pdf".into(), size: 4286, version: "etag:".into() }, quire_core::UnitKind::Document, (1, 1), 0)
        };
        let evil_out = format!("s3://{bucket}/evil");
        for t in [
            forged("legit", &format!("{input}/born_digital.pdf"), &evil_out, 'a'),
            forged("legit", &format!("s3://{bucket}/private/secret.pdf"), &out, 'b'),
            forged("legit", &format!("{input}/../private/secret.pdf"), &out, 'c'),
            forged("ghost", &format!("{input}/born_digital.pdf"), &out, 'd'),
            // Legit in every place but its page range: four billion pages, one record each.
            quire_core::TaskSpec {
                unit: quire_core::UnitKind::Pdf,
                last: u32::MAX,
                ..forged("legit", &format!("{input}/born_digital.pdf"), &out, 'e')
            },
        ] {
            q.publish(&t).await.unwrap();
        }
        let t0 = Instant::now();
        loop {
            let mut dead = q.dead_letters("legit").await.unwrap();
            dead.extend(q.dead_letters("ghost").await.unwrap());
            if dead.len() >= 5 || t0.elapsed() > Duration::from_secs(30) {
                break (dead, q);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let reasons: BTreeMap<String, String> = dead.iter().map(|d| (d.task_id[..1].to_string(), d.reason.clone())).collect();
    assert_eq!(reasons.len(), 5, "every forged task is dead-lettered: {dead:?}\n{}", worker.log());
    assert!(reasons["a"].contains("output") && reasons["a"].contains("evil"), "{reasons:?}");
    assert!(reasons["b"].contains("input") && reasons["b"].contains("private/secret.pdf"), "{reasons:?}");
    assert!(reasons["c"].contains("input"), "{reasons:?}");
    assert!(reasons["d"].contains("not registered"), "{reasons:?}");
    assert!(reasons["e"].contains("goes past the 2000 units"), "{reasons:?}");
    rt.block_on(async {
        assert!(store.list("evil/").await.unwrap().is_empty(), "nothing is written where a forged task points");
        let results = store.list("out/legit/results/").await.unwrap();
        assert!(results.iter().all(|k| !k.contains("aaaa") && !k.contains("bbbb") && !k.contains("cccc")), "{results:?}");
        assert!(store.list("out/ghost/").await.unwrap().is_empty());
    });
    drop(queue);

    // A worker with a wrong token is refused, and says why.
    let mut bad = quire_cmd(&endpoint, &["worker", "--nats", &nats_url]);
    bad.env("QUIRE_NATS_TOKEN", "wrong-token");
    let t0 = Instant::now();
    let mut bad = Proc::spawn("bad-worker", &mut bad, tmp.path());
    let code = bad.wait_for(Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c != 0), "a worker with a wrong token must exit with an error: {:?}\n{}", code, bad.log());
    assert!(bad.log().to_lowercase().contains("authoriz"), "the error says the credentials were refused:\n{}", bad.log());
    eprintln!("wrong token refused after {:.1}s", t0.elapsed().as_secs_f64());

    // No secret anywhere: logs at trace level, stdout, /metrics, every object of the job.
    let wlog = worker.log();
    assert!(wlog.contains("TRACE") && wlog.matches("refusing the task for good").count() == 5, "{wlog}");
    let metrics = http_get(metrics_port, "/metrics");
    assert!(metrics.contains(r#"quire_tasks_total{outcome="rejected"} 5"#), "{metrics}");
    let mut texts = vec![
        ("worker log".to_string(), worker.log()),
        ("coordinator stderr".into(), String::from_utf8_lossy(&legit.stderr).into_owned()),
        ("coordinator stdout".into(), String::from_utf8_lossy(&legit.stdout).into_owned()),
        ("metrics".into(), metrics),
    ];
    rt.block_on(async {
        for k in store.list("out/").await.unwrap() {
            let body = store.get(&k).await.unwrap().unwrap();
            texts.push((k, String::from_utf8_lossy(&body).into_owned()));
        }
    });
    assert!(texts.iter().any(|(k, _)| k.ends_with("job.json")) && texts.iter().any(|(k, _)| k.ends_with("manifest.json")));
    for (what, text) in &texts {
        for secret in [TOKEN, SECRET_KEY] {
            assert!(!text.contains(secret), "a secret appears in {what}");
        }
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
    let metrics_ports = [free_port(), free_port()];
    let _workers: Vec<Proc> = (0..2)
        .map(|i| {
            let addr = format!("127.0.0.1:{}", metrics_ports[i]);
            let args = ["worker", "--nats", &nats_url, "--workers", "2", "--grace-s", "5", "--model", model, "--metrics-addr", &addr];
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
    // in groups that end after a name whose hash says so (the last one with the listing).
    let loose_rels = ["loose/gray.png", "loose/multipage.tif", "loose/photo.jpg"];
    let groups = loose_rels.iter().enumerate().filter(|(i, r)| *i == 2 || quire_pipeline::stage::plan::is_group_boundary(r, 2)).count() as u64;
    assert_eq!((submitted["documents"].as_u64(), submitted["published"].as_u64()), (Some(8), Some(5 + groups)), "{submitted}");
    let (dist, splits, manifest) = rt.block_on(async {
        let mut recs = Vec::new();
        for k in store.list("out/wds/results/").await.unwrap() {
            let body = store.get(&k).await.unwrap().unwrap();
            recs.extend(String::from_utf8(body).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
        }
        // Captions go to Parquet (the default for --task caption), not to Markdown files.
        let parquet = store.list("out/wds/parquet/").await.unwrap();
        assert!(parquet.iter().any(|k| k.ends_with("shard-000003.tar.parquet")), "{parquet:?}");
        assert!(parquet.iter().any(|k| k.contains("/images-")), "{parquet:?}");
        assert!(!store.exists("out/wds/markdown/loose/photo.jpg.md").await.unwrap());
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
    // The archives were read by ranged requests (opened and split, then each task), not
    // downloaded.
    let logs: String = _workers.iter().map(|w| w.log()).collect();
    assert!(logs.contains("archive scanned by ranged reads"), "{logs}");
    assert!(logs.contains("archive task read by ranged reads"), "{logs}");
    // The workers' metrics say so too: the archives and the sniffed heads by ranged reads,
    // the loose images (and nothing else) downloaded whole.
    let counter = |name: &str, how: &str| -> u64 {
        let line = format!("{name}{{how=\"{how}\"}} ");
        metrics_ports
            .iter()
            .map(|&p| {
                let m = http_get(p, "/metrics");
                m.lines().find_map(|l| l.strip_prefix(line.as_str())).map_or(0, |v| v.trim().parse::<u64>().unwrap())
            })
            .sum()
    };
    let loose_bytes: u64 = files.iter().filter(|(_, to)| to.starts_with("loose/")).map(|(f, _)| std::fs::metadata(f).unwrap().len()).sum();
    assert_eq!(counter("quire_input_fetched_bytes_total", "download"), loose_bytes);
    assert_eq!(counter("quire_input_requests_total", "download"), 3);
    assert!(counter("quire_input_fetched_bytes_total", "ranged") > 0);
    assert!(counter("quire_input_requests_total", "ranged") >= 5 + 5, "each archive's head and scan at least");
}

/// `quire check`, which the chart's `helm test` runs: exit 0 when NATS JetStream answers and
/// the output bucket takes a write it reads back; exit 2 naming what did not answer.
#[test]
fn check_says_whether_the_queue_and_the_output_bucket_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = format!("quire-check-{}", std::process::id());
    let (_nats, nats_url) = start_nats(tmp.path());
    let (_garage, endpoint) = start_garage(tmp.path(), &bucket);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = s3_store(&rt, &endpoint, &bucket);
    let out = format!("s3://{bucket}/results");
    let check = |nats: &str, out: &str| {
        run_quire(&endpoint, &["check", "--nats", nats, "--out", out, "--timeout-s", "5"], Duration::from_secs(60))
    };

    let ok = check(&nats_url, &out);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&ok.stderr));
    assert!(stdout.contains("queue ok") && stdout.contains("store ok"), "{stdout}");
    let probe = rt.block_on(store.get("results/.quire-check")).unwrap().expect("the probe object is stored");
    assert!(probe.starts_with(b"quire check "), "{}", String::from_utf8_lossy(&probe));

    // Nothing listens there: NATS is named, and the check ends within its time limit.
    let t0 = Instant::now();
    let down = check(&format!("nats://127.0.0.1:{}", free_port()), &out);
    assert_eq!(down.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&down.stderr).contains("NATS"), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    // `quire status` is a quick look too: it does not wait out the 60 s a worker would give
    // an unreachable NATS to come up (--nats-connect-wait).
    let t0 = Instant::now();
    let status = run_quire(&endpoint, &["status", "nightly", "--nats", &format!("nats://127.0.0.1:{}", free_port())], Duration::from_secs(45));
    assert_ne!(status.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&status.stderr).contains("NATS"), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(t0.elapsed() < Duration::from_secs(20), "quire status waited {:?} for NATS", t0.elapsed());

    // A bucket that does not exist: the output is named, NATS was fine.
    let missing = check(&nats_url, "s3://no-such-bucket-here/results");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stdout).contains("queue ok"));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no-such-bucket-here"), "{}", String::from_utf8_lossy(&missing.stderr));
}

/// Task ids started (in `starts_log` order) and how often each was started, from the line
/// `from` on.
fn starts_since(log: &Path, from: usize) -> (usize, BTreeMap<String, u32>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut starts = BTreeMap::new();
    for l in &lines[from.min(lines.len())..] {
        *starts.entry(l.split(' ').next().unwrap().to_string()).or_insert(0) += 1;
    }
    (lines.len(), starts)
}

/// The task ids of the objects named in the job manifest (their document task, as it is
/// written in the plan, is not in the manifest: the caller adds what it expects).
fn manifest_tasks(m: &Value, names: &[&str]) -> BTreeSet<String> {
    m["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| names.iter().any(|n| o["uri"].as_str().unwrap().ends_with(&format!("/{n}"))))
        .flat_map(|o| o["tasks"].as_array().unwrap().iter().map(|t| t["task_id"].as_str().unwrap().to_string()))
        .collect()
}

/// Three nights of one standing job over a growing prefix, with workers that stay up:
/// night 1 does everything (one object's pages fail by an injected transient fault); night 2,
/// after objects were added, replaced and removed, does only the new and changed ones while a
/// second coordinator of the same run waits for the first and then finds nothing to do; night
/// 3 with `--retry-failed`, the fault gone, redoes exactly the failed object's tasks. After
/// every night the results hold one record per page of the current inputs and nothing else.
#[test]
fn nightly_runs_of_a_standing_job_do_only_the_new_work_once() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = format!("quire-nights-{}", std::process::id());
    let (_nats, nats_url) = start_nats(tmp.path());
    let (_garage, endpoint) = start_garage(tmp.path(), &bucket);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = s3_store(&rt, &endpoint, &bucket);
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/docs");
    let put = |key: &str, fixture: &str| rt.block_on(store.put(key, std::fs::read(docs.join(fixture)).unwrap())).unwrap();
    put("in/born_digital.pdf", "born_digital.pdf");
    put("in/mixed.pdf", "mixed.pdf");
    put("in/flaky.pdf", "born_digital.pdf");
    put("in/gone.pdf", "mixed.pdf");
    let flag = tmp.path().join("flaky-fails");
    std::fs::write(&flag, b"").unwrap();
    let starts = tmp.path().join("starts.log");
    let faults = format!("page_ms=150,fail_source=flaky.pdf,fail_while={},starts_log={}", flag.display(), starts.display());
    let _workers: Vec<Proc> = (0..2)
        .map(|i| {
            let mut c = quire_cmd(&endpoint, &["worker", "--nats", &nats_url, "--workers", "2", "--grace-s", "2"]);
            c.env("QUIRE_TEST_FAULTS", &faults);
            Proc::spawn(&format!("worker{i}"), &mut c, tmp.path())
        })
        .collect();
    let (input, out) = (format!("s3://{bucket}/in"), format!("s3://{bucket}/out"));
    let coordinator = |run: &str, extra: &[&str]| {
        let mut a = vec![
            "coordinator", "--nats", &nats_url, "--input", &input, "--out", &out, "--job", "nightly", "--engine", "text-layer",
            "--pages-per-task", "2", "--wait", "--poll-ms", "1000", "--run", run,
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<String>>()
    };
    let manifest = |key: &str| -> Value { serde_json::from_slice(&rt.block_on(store.get(key)).unwrap().unwrap_or_else(|| panic!("{key} missing"))).unwrap() };
    let current_pages = |names: &[&str]| -> BTreeSet<(String, u64)> {
        let recs = stored_records(&rt, &store, "out/nightly/results/");
        let keys: BTreeSet<(String, u64)> = recs.keys().cloned().collect();
        let sources: BTreeSet<String> = keys.iter().map(|(s, _)| s.clone()).collect();
        let want: BTreeSet<String> = names.iter().map(|n| format!("{input}/{n}")).collect();
        assert_eq!(sources, want, "results hold exactly the current inputs");
        for (src, _) in &keys {
            let n = recs[&(src.clone(), 1)]["page_count"].as_u64().unwrap();
            let pages: Vec<u64> = keys.iter().filter(|(s, _)| s == src).map(|(_, p)| *p).collect();
            assert_eq!(pages, (1..=n).collect::<Vec<_>>(), "{src}: one record per page");
        }
        keys
    };
    let args_of = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<&str>>().join(" ");
    let run = |v: Vec<String>| run_quire(&endpoint, &v.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120));

    // Night 1: every object is new; flaky.pdf's pages fail.
    let o = run(coordinator("2026-12-01", &[]));
    assert_eq!(o.status.code(), Some(3), "flaky.pdf failed");
    let n1 = manifest("out/nightly/runs/2026-12-01/manifest.json");
    let c = &n1["counts"];
    assert_eq!((c["objects_new"].as_u64(), c["objects_unchanged"].as_u64(), c["objects_removed"].as_u64()), (Some(4), Some(0), Some(0)), "{c}");
    assert!(c["pages_failed"].as_u64().unwrap() > 0, "{c}");
    assert!(!rt.block_on(store.exists("out/nightly/runs/2026-12-01/started.json")).unwrap(), "a closed run leaves no start mark");
    current_pages(&["born_digital.pdf", "flaky.pdf", "gone.pdf", "mixed.pdf"]);
    let (night1_lines, _) = starts_since(&starts, 0);

    // Night 2: one object added, one replaced, one removed. A second coordinator of the same
    // run, started while the first works, waits for it and then has nothing to publish.
    put("in/new.pdf", "born_digital.pdf");
    put("in/mixed.pdf", "born_digital.pdf");
    rt.block_on(store.delete("in/gone.pdf")).unwrap();
    let night2 = coordinator("2026-12-02", &[]);
    let metrics_port = free_port();
    let mut first_args = night2.clone();
    first_args.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{metrics_port}")]);
    let mut first = Proc::spawn("coordinator-2a", &mut quire_cmd(&endpoint, &first_args.iter().map(String::as_str).collect::<Vec<_>>()), tmp.path());
    let t0 = Instant::now();
    while starts_since(&starts, night1_lines).1.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "night 2 started no task:\n{}", first.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // While it waits, the coordinator exports what the run found and where its tasks stand.
    let exported = http_get(metrics_port, "/metrics");
    assert!(exported.contains("quire_run_objects{change=\"new\"} 1") && exported.contains("quire_run_waiting 1"), "{exported}");
    let mut second = Proc::spawn("coordinator-2b", &mut quire_cmd(&endpoint, &night2.iter().map(String::as_str).collect::<Vec<_>>()), tmp.path());
    assert_eq!(first.wait_for(Duration::from_secs(120)), Some(3), "{}:\n{}", args_of(&night2), first.log());
    assert_eq!(second.wait_for(Duration::from_secs(120)), Some(3), "the second coordinator:\n{}", second.log());
    let second_log = second.log();
    assert!(second_log.contains("is running; waiting for it to end"), "the second coordinator waited:\n{second_log}");
    let joined: Value = serde_json::from_str(second_log.lines().find(|l| l.starts_with('{')).expect("its JSON summary")).unwrap();
    assert_eq!(joined["published"].as_u64(), Some(0), "nothing left for the second coordinator: {joined}");
    let n2 = manifest("out/nightly/runs/2026-12-02/manifest.json");
    let c = &n2["counts"];
    assert_eq!(
        (c["objects_new"].as_u64(), c["objects_changed"].as_u64(), c["objects_unchanged"].as_u64(), c["objects_removed"].as_u64()),
        (Some(1), Some(1), Some(2), Some(1)),
        "the run (closed twice) counts as its first attempt did: {c}"
    );
    let job = manifest("out/nightly/manifest.json");
    let (_, started2) = starts_since(&starts, night1_lines);
    let mut expected = manifest_tasks(&job, &["new.pdf", "mixed.pdf"]);
    // The whole-document tasks the workers split.
    let plan_ids: BTreeSet<String> = started2.keys().filter(|id| !expected.contains(*id)).cloned().collect();
    assert_eq!(plan_ids.len(), 2, "besides the new and changed objects' page tasks, only their two document tasks ran: {started2:?}");
    expected.extend(plan_ids);
    assert_eq!(started2.keys().cloned().collect::<BTreeSet<_>>(), expected, "night 2 ran the new and changed objects' tasks only");
    assert!(started2.values().all(|n| *n == 1), "no task ran twice: {started2:?}");
    assert_eq!(c["tasks_done"].as_u64(), Some(manifest_tasks(&job, &["new.pdf", "mixed.pdf"]).len() as u64), "{c}");
    current_pages(&["born_digital.pdf", "flaky.pdf", "mixed.pdf", "new.pdf"]);
    let moved = rt.block_on(store.list("out/nightly/superseded/2026-12-02/")).unwrap();
    assert!(moved.iter().any(|k| k.ends_with("markdown/in/gone.pdf.md")), "{moved:?}");
    assert!(moved.iter().filter(|k| k.contains("/results/")).count() >= 2, "the removed and the replaced object's results moved aside: {moved:?}");
    let (night2_lines, _) = starts_since(&starts, 0);

    // Night 3: the fault is gone; --retry-failed redoes flaky.pdf's tasks and nothing else.
    std::fs::remove_file(&flag).unwrap();
    let o = run(coordinator("2026-12-03", &["--retry-failed"]));
    assert_eq!(o.status.code(), Some(0), "every page has text now");
    let job = manifest("out/nightly/manifest.json");
    let (_, started3) = starts_since(&starts, night2_lines);
    assert_eq!(started3.keys().cloned().collect::<BTreeSet<_>>(), manifest_tasks(&job, &["flaky.pdf"]), "only the failed tasks ran again");
    assert_eq!(job["counts"]["pages_failed"].as_u64(), Some(0), "{}", job["counts"]);
    let n3 = manifest("out/nightly/runs/2026-12-03/manifest.json");
    assert_eq!(n3["counts"]["objects_unchanged"].as_u64(), Some(4), "{}", n3["counts"]);
    assert_eq!(job["runs"].as_array().unwrap().len(), 3);
    current_pages(&["born_digital.pdf", "flaky.pdf", "mixed.pdf", "new.pdf"]);
}

/// `quire run` over `s3://` on Garage, with no broker: inputs listed and downloaded through the
/// same store code as the workers', results and manifests written to the bucket, the same
/// records as a run over a local copy; the next night's run of the standing job does only the
/// new object.
#[test]
fn quire_run_reads_and_writes_s3_like_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = format!("quire-run-s3-{}", std::process::id());
    let (_garage, endpoint) = start_garage(tmp.path(), &bucket);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = s3_store(&rt, &endpoint, &bucket);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let local = tmp.path().join("in");
    std::fs::create_dir_all(local.join("shards")).unwrap();
    for (name, from) in [
        ("born_digital.pdf", "docs/born_digital.pdf"),
        ("mixed.pdf", "docs/mixed.pdf"),
        ("corrupt.pdf", "docs/corrupt.pdf"),
        ("shards/shard-000000.tar", "archives/shard-000000.tar"),
    ] {
        let bytes = std::fs::read(fixtures.join(from)).unwrap();
        std::fs::write(local.join(name), &bytes).unwrap();
        rt.block_on(store.put(&format!("in/{name}"), bytes)).unwrap();
    }
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let (input, out) = (format!("s3://{bucket}/in"), format!("s3://{bucket}/out"));
    let run = |args: &[&str]| {
        let mut c = quire_cmd(&endpoint, args);
        c.current_dir(&cwd);
        let o = c.output().unwrap();
        eprintln!("quire {}\n{}", args.join(" "), String::from_utf8_lossy(&o.stderr));
        o
    };
    let common = ["--engine", "text-layer", "--pages-per-task", "2", "--job", "s3run", "-q"];
    let mut args = vec!["run", input.as_str(), "--out", out.as_str(), "--run", "n1"];
    args.extend(common);
    assert_eq!(run(&args).status.code(), Some(3), "corrupt.pdf fails");
    let local_out = tmp.path().join("local-out");
    let mut args = vec!["run", local.to_str().unwrap(), "--out", local_out.to_str().unwrap(), "--run", "n1"];
    args.extend(common);
    assert_eq!(run(&args).status.code(), Some(3));
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0, "nothing written locally (no folder named s3:)");

    // The same records (by path below the input, page and member) as the local run's.
    let by_rel = |recs: Vec<Value>, root: &str| -> BTreeMap<(String, u64, String), (Value, Value)> {
        recs.into_iter()
            .map(|r| {
                let rel = r["source"].as_str().unwrap().strip_prefix(root).unwrap().to_string();
                ((rel, r["page"].as_u64().unwrap(), r["member"].as_str().unwrap_or("").to_string()), (r["text"].clone(), r["error"]["kind"].clone()))
            })
            .collect()
    };
    let all_records = || -> Vec<Value> {
        rt.block_on(async {
            let mut out = Vec::new();
            for k in store.list("out/s3run/results/").await.unwrap() {
                for l in String::from_utf8(store.get(&k).await.unwrap().unwrap()).unwrap().lines() {
                    out.push(serde_json::from_str::<Value>(l).unwrap());
                }
            }
            out
        })
    };
    let s3_recs = all_records();
    let mut local_recs = Vec::new();
    for e in std::fs::read_dir(local_out.join("s3run/results")).unwrap() {
        for l in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
            local_recs.push(serde_json::from_str::<Value>(l).unwrap());
        }
    }
    let n = (s3_recs.len(), local_recs.len());
    let (s3_rows, local_rows) = (by_rel(s3_recs, &input), by_rel(local_recs, local.to_str().unwrap()));
    assert_eq!(n, (s3_rows.len(), local_rows.len()), "one record per page or sample");
    assert!(s3_rows.len() > 8, "{s3_rows:?}");
    assert_eq!(s3_rows, local_rows);
    let get = |key: &str| -> Value { serde_json::from_slice(&rt.block_on(store.get(key)).unwrap().unwrap_or_else(|| panic!("{key} missing"))).unwrap() };
    assert!(rt.block_on(store.exists("out/s3run/markdown/in/born_digital.pdf.md")).unwrap());
    assert_eq!(get("out/s3run/runs/n1/manifest.json")["counts"]["objects_new"].as_u64(), Some(4));

    // Night 2: one new object; the others are neither downloaded nor redone.
    rt.block_on(store.put("in/new.pdf", std::fs::read(fixtures.join("docs/born_digital.pdf")).unwrap())).unwrap();
    let mut args = vec!["run", input.as_str(), "--out", out.as_str(), "--run", "n2"];
    args.extend(common);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(3), "corrupt.pdf still fails");
    let n2 = get("out/s3run/runs/n2/manifest.json");
    let c = &n2["counts"];
    assert_eq!((c["objects_new"].as_u64(), c["objects_unchanged"].as_u64()), (Some(1), Some(4)), "{c}");
    assert_eq!(c["tasks_done"].as_u64(), Some(2), "new.pdf's two page-range tasks only: {c}");
    let job = get("out/s3run/manifest.json");
    assert_eq!(job["objects"].as_array().unwrap().len(), 5);
    let recs = by_rel(all_records(), &input);
    assert_eq!(recs.len(), s3_rows.len() + 3, "new.pdf's three pages added, nothing else");
    // Loose images, more of them than the process may open files: every download is closed
    // once fetched (the cache keeps paths), so none fails for want of file handles.
    let png = std::fs::read(fixtures.join("docs/gray.png")).unwrap();
    rt.block_on(async {
        for i in 0..300 {
            store.put(&format!("imgs/img-{i:04}.png"), png.clone()).await.unwrap();
        }
    });
    let imgs = format!("s3://{bucket}/imgs");
    // The same environment as quire_cmd's, through a shell that lowers the limit first.
    let mut c = Command::new("sh");
    for (k, v) in quire_cmd(&endpoint, &[]).get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.current_dir(&cwd);
    let quire = env!("CARGO_BIN_EXE_quire");
    let script = format!(
        "ulimit -n 160 && exec {quire} run {imgs} --out {out} --job imgs --task caption --engine text-layer --images-per-task 100 --store-retry-s 5 -q"
    );
    let mut child = c.arg("-c").arg(&script).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(120), "300 images took over two minutes: {}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!stderr.contains("Too many open files"), "{stderr}");
    let m = get("out/imgs/manifest.json");
    assert_eq!(m["counts"]["records"].as_u64(), Some(300), "one record per image: {}", m["counts"]);
    assert!(m["failures"].as_array().unwrap().iter().all(|f| f["kind"] == "needs_model"), "{}", m["failures"]);

    // `quire status` reads the job from the bucket.
    let o = run(&["status", "s3run", "--out", out.as_str()]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("n2"), "{text}");
}
