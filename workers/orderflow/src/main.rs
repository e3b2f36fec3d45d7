//! `orderflow`: run saga workers, check and draw the topology, create topics, run the demo.
//!
//! The binary parses the command line; the commands are the library's (`orderflow::cli`).

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orderflow::cli::run(orderflow::cli::Cli::parse()).await
}
