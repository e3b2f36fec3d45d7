//! A private SQL database per test: PostgreSQL or MariaDB started through `scripts/db.sh` (fresh
//! data in a temp directory, a free port on 127.0.0.1, the database and user `orderflow`), or a
//! SQLite file, which needs no server. Stopped when dropped, like [`super::Broker`].

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::repo_root;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// PostgreSQL (Debian's package, run as a private server by `scripts/db.sh`).
    Postgres,
    /// MariaDB (Debian's package, run as a private server by `scripts/db.sh`).
    MariaDb,
    /// A SQLite file in the temp directory; no server.
    Sqlite,
}

impl DbKind {
    /// The kind's name: `scripts/db.sh`'s KIND for the servers (`postgres`, `mariadb`), `sqlite`.
    pub fn as_str(self) -> &'static str {
        match self {
            DbKind::Postgres => "postgres",
            DbKind::MariaDb => "mariadb",
            DbKind::Sqlite => "sqlite",
        }
    }
}

/// A running database (for [`DbKind::Sqlite`], a file that does not exist yet); the server is
/// stopped and the temp directory removed when dropped.
pub struct Db {
    kind: DbKind,
    url: String,
    dir: tempfile::TempDir,
}

impl Db {
    /// Starts a fresh database of `kind`: for PostgreSQL and MariaDB a private server on a free
    /// port of 127.0.0.1 (`scripts/db.sh start`, which installs the server from Debian packages
    /// first if it is missing); its URL is
    /// `postgres://orderflow:orderflow@127.0.0.1:PORT/orderflow` or
    /// `mysql://orderflow:orderflow@127.0.0.1:PORT/orderflow`. For SQLite no process is started
    /// and the URL is `sqlite://<temp dir>/outbox.db?mode=rwc` (created on first connect).
    /// Panics with the script's output if the server does not start.
    pub fn start(kind: DbKind) -> Db {
        let dir = tempfile::Builder::new().prefix(&format!("orderflow-db-{}-", kind.as_str())).tempdir().expect("temp dir");
        if kind == DbKind::Sqlite {
            let url = format!("sqlite://{}?mode=rwc", dir.path().join("outbox.db").display());
            return Db { kind, url, dir };
        }
        let out = Command::new(repo_root().join("scripts/db.sh"))
            .args(["start", kind.as_str()])
            .env("ORDERFLOW_DB_DIR", dir.path())
            .env_remove("ORDERFLOW_DB_PORT")
            .env_remove("ORDERFLOW_DB_KEEP")
            .output()
            .expect("run scripts/db.sh start");
        assert!(out.status.success(), "{} did not start:\n{}", kind.as_str(), String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8_lossy(&out.stdout).lines().last().expect("URL line").trim().to_string();
        Db { kind, url, dir }
    }

    /// The connection URL (user and password `orderflow`, database `orderflow`); the same for
    /// the database's whole life, across [`Db::restart`] and [`Db::start_again`].
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's kind.
    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// The state directory (`server.log`, `data/`, `port`, `pid`; for SQLite the database file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file (`server.log`; it does not exist for SQLite).
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Stops the server and starts it again on the same port with the same data: every open
    /// connection is cut (PostgreSQL's fast shutdown, MariaDB's SIGTERM) and clients must
    /// reconnect. Returns once it accepts connections again. Nothing to do for SQLite.
    pub fn restart(&self) {
        if self.kind == DbKind::Sqlite {
            return;
        }
        let out = self.script("restart", &[]);
        assert!(out.status.success(), "{} did not restart:\n{}", self.kind.as_str(), String::from_utf8_lossy(&out.stderr));
    }

    /// SIGKILLs the server and all its processes at once, as a crash would; its data stays for
    /// [`Db::start_again`], which then runs the server's crash recovery. Nothing to do for SQLite.
    pub fn kill(&self) {
        if self.kind == DbKind::Sqlite {
            return;
        }
        let out = self.script("kill", &[]);
        assert!(out.status.success(), "{} was not killed:\n{}", self.kind.as_str(), String::from_utf8_lossy(&out.stderr));
    }

    /// Stops the server cleanly (its data stays for [`Db::start_again`]). Nothing to do for
    /// SQLite.
    pub fn stop(&self) {
        if self.kind == DbKind::Sqlite {
            return;
        }
        let out = self.script("stop", &[]);
        assert!(out.status.success(), "{} did not stop:\n{}", self.kind.as_str(), String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the server again after [`Db::kill`] or [`Db::stop`], on the same port (so
    /// [`Db::url`] stays valid) with the same data. Nothing to do for SQLite.
    pub fn start_again(&self) {
        if self.kind == DbKind::Sqlite {
            return;
        }
        let port = self.url.rsplit(':').next().and_then(|p| p.split('/').next()).expect("URL with a port");
        let out = self.script("start", &[("ORDERFLOW_DB_PORT", port), ("ORDERFLOW_DB_KEEP", "1")]);
        assert!(out.status.success(), "{} did not start again:\n{}", self.kind.as_str(), String::from_utf8_lossy(&out.stderr));
    }

    /// Runs `scripts/db.sh <command> <kind>` on this database's directory with `env` set.
    fn script(&self, command: &str, env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(repo_root().join("scripts/db.sh"));
        cmd.args([command, self.kind.as_str()])
            .env("ORDERFLOW_DB_DIR", self.dir.path())
            .env_remove("ORDERFLOW_DB_PORT")
            .env_remove("ORDERFLOW_DB_KEEP");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap_or_else(|e| panic!("run scripts/db.sh {command}: {e}"))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if self.kind != DbKind::Sqlite {
            let _ = self.script("stop", &[]);
        }
    }
}
