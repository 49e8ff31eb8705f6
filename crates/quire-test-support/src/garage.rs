//! A real single-node Garage (S3) on loopback for the tests, with a default key
//! ([`ACCESS_KEY`], [`SECRET_KEY`]) and bucket: [`start_garage_at`] (a given folder and ports;
//! starting it again on the same ones brings the store back after an outage), [`start_garage`]
//! (free ports) and [`Garage`] (its own temporary folder).

use crate::{find_service, free_port, Proc};
use std::path::Path;
use std::process::Command;

pub const ACCESS_KEY: &str = "GKquiretest0123456789abcdef";
pub const SECRET_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Garage with its config and data under `dir/garage` (log in `dir/garage.log`), S3 API on
/// 127.0.0.1:`s3_port`, the default key and `bucket` made at start, once it listens. Starting
/// it again with the same folder and ports brings the store back after an outage.
pub fn start_garage_at(dir: &Path, bucket: &str, s3_port: u16, rpc_port: u16) -> Proc {
    let bin = find_service("QUIRE_GARAGE", "garage", "bin/garage");
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
    p.wait_listening(s3_port, "garage");
    p
}

/// [`start_garage_at`] on free ports, with the S3 endpoint URL.
pub fn start_garage(dir: &Path, bucket: &str) -> (Proc, String) {
    let (s3_port, rpc_port) = (free_port(), free_port());
    (start_garage_at(dir, bucket, s3_port, rpc_port), format!("http://127.0.0.1:{s3_port}"))
}

/// A Garage in its own temporary folder on free ports. It listens once started; its layout
/// and default bucket may take a moment more (retry the first request).
pub struct Garage {
    // Before `dir`: the server is killed before its folder is removed.
    proc: Proc,
    pub s3_port: u16,
    pub bucket: String,
    pub dir: tempfile::TempDir,
}

impl Garage {
    pub fn start(bucket: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (s3_port, rpc_port) = (free_port(), free_port());
        Garage {
            proc: start_garage_at(dir.path(), bucket, s3_port, rpc_port),
            s3_port,
            bucket: bucket.into(),
            dir,
        }
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}
