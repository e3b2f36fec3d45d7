//! Helpers shared by the integration tests: a private tansu broker per test (fresh SQLite
//! database, free port), started and stopped through `scripts/broker.sh`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Repository root (two levels above the orderflow crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// A running broker; stopped when dropped.
pub struct Broker {
    pub bootstrap: String,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a fresh SQLite-engine broker on a free port.
    pub fn start() -> Broker {
        let dir = tempfile::Builder::new().prefix("orderflow-test-broker-").tempdir().expect("temp dir");
        let out = Command::new(repo_root().join("scripts/broker.sh"))
            .arg("start")
            .env("ORDERFLOW_BROKER_DIR", dir.path())
            .env_remove("ORDERFLOW_BROKER_PORT")
            .output()
            .expect("run scripts/broker.sh");
        assert!(out.status.success(), "broker did not start:\n{}", String::from_utf8_lossy(&out.stderr));
        let bootstrap = String::from_utf8_lossy(&out.stdout).lines().last().expect("bootstrap line").trim().to_string();
        Broker { bootstrap, dir }
    }

    /// The broker's state directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/broker.sh")).arg("stop").env("ORDERFLOW_BROKER_DIR", self.dir.path()).output();
    }
}

/// The release or debug `orderflow` binary built for this test run.
pub fn orderflow_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orderflow"))
}
