//! `orderflow bench saga`: whole-saga throughput and latency (issue 7, items 3 and 4).

use anyhow::Result;

/// `orderflow bench saga` flags.
#[derive(clap::Args, Debug)]
pub struct SagaArgs {}

/// Runs the scenario; its JSON object is printed by the caller.
pub async fn run(_args: SagaArgs) -> Result<serde_json::Value> {
    anyhow::bail!("bench saga: not built yet")
}
