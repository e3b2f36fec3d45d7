//! `orderflow bench recovery`: recovery after SIGKILL and peak memory (issue 7, items 5 and 6).

use anyhow::Result;

/// `orderflow bench recovery` flags.
#[derive(clap::Args, Debug)]
pub struct RecoveryArgs {}

/// Runs the scenario; its JSON object is printed by the caller.
pub async fn run(_args: RecoveryArgs) -> Result<serde_json::Value> {
    anyhow::bail!("bench recovery: not built yet")
}
