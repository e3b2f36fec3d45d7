//! `orderflow replay --through WORKER`: runs a replayed range through a worker (placeholder; its
//! implementation is another change).

use anyhow::Result;
use orderflow_runtime::topology::Loaded;
use serde_json::Value;

use crate::replay::{ReplayArgs, Resolved};

/// Runs the records of `resolved` through worker `args.through` (`--dry-run` or `--diff`) and
/// returns the JSON summary `orderflow replay` prints.
///
/// Errors: always, for now: `--through` is not implemented yet.
pub async fn run(args: &ReplayArgs, loaded: &Loaded, resolved: &Resolved) -> Result<Value> {
    let _ = (args, loaded, resolved);
    anyhow::bail!("--through is not implemented yet")
}
