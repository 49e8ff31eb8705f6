//! Test-only helpers shared by the crates' tests and the distributed integration test:
//! [`free_port`], [`find_service`] (the binaries `scripts/install-services.sh` installs),
//! the [`Proc`] guard that kills and reaps its child on drop, and launchers for a real
//! nats-server with JetStream ([`nats`]) and a real single-node Garage ([`garage`]).
//!
//! Only ever a `[dev-dependencies]` entry: no library crate depends on it.

pub mod garage;
pub mod nats;
mod proc;

pub use garage::{start_garage, start_garage_at, Garage, ACCESS_KEY, SECRET_KEY};
pub use nats::{start_nats, start_nats_at, NatsServer};
pub use proc::Proc;

use std::path::PathBuf;

/// A loopback TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The service binary `name`: the path in the environment variable `env` if set (it must be a
/// file), else `name` on PATH, else `cached` below ~/.cache/quire-tools, where
/// `eval "$(scripts/install-services.sh)"` installs it and sets `env`.
pub fn find_service(env: &str, name: &str, cached: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} is not a file. Install {name} with `eval \"$(scripts/install-services.sh)\"` and run the tests again.",
            p.display()
        );
        return p;
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/quire-tools").join(cached));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} not found ({env} unset, none on PATH or in ~/.cache/quire-tools). \
             Install it with `eval \"$(scripts/install-services.sh)\"` and run the tests again."
        )
    })
}
