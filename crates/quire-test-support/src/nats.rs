//! A real `nats-server -js` on loopback for the tests: [`start_nats_at`] (a given folder, port
//! and extra flags; starting it again on the same folder and port is a broker restart),
//! [`start_nats`] (a free port) and [`NatsServer`] (its own temporary folder, restartable).

use crate::{find_service, free_port, Proc};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// nats-server with JetStream (file storage under `dir/nats`, log in `dir/nats-server.log`)
/// on 127.0.0.1:`port`, with `extra` arguments (e.g. `--auth TOKEN`), once it is ready and
/// listening. Starting it again with the same `dir` and `port` is a broker restart.
pub fn start_nats_at(dir: &Path, port: u16, extra: &[&str]) -> Proc {
    let bin = find_service("QUIRE_NATS_SERVER", "nats-server", "nats-venv/bin/nats-server");
    let mut p = Proc::spawn(
        "nats-server",
        Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.join("nats"))
            .args(extra),
        dir,
    );
    let t0 = Instant::now();
    while !p.log().contains("Server is ready") {
        assert!(!p.exited(), "nats-server exited:\n{}", p.log());
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "nats-server did not become ready on port {port}:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p.wait_listening(port, "nats-server");
    p
}

/// [`start_nats_at`] on a free port, with the server's `nats://` URL.
pub fn start_nats(dir: &Path) -> (Proc, String) {
    let port = free_port();
    (start_nats_at(dir, port, &[]), format!("nats://127.0.0.1:{port}"))
}

/// A nats-server in its own temporary folder on a free port; [`stop`](Self::stop) and
/// [`spawn`](Self::spawn) restart it on the same port and store.
pub struct NatsServer {
    // Before `dir`: the server is killed before its folder is removed.
    proc: Option<Proc>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra server flags (e.g. `--user`/`--pass`).
    pub fn start_with(extra: &[&str]) -> Self {
        let mut s = NatsServer {
            proc: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again), on the same port and store folder.
    pub fn spawn(&mut self) {
        assert!(self.proc.is_none(), "already running");
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.proc = Some(start_nats_at(self.dir.path(), self.port, &extra));
    }

    /// Graceful stop (SIGTERM), waiting for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}
