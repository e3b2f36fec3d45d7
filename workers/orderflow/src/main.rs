//! `orderflow`: run saga workers, check and draw the topology, create topics, run the demo.
//!
//! The binary parses the command line; the commands are the library's (`orderflow::cli`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

/// mimalloc instead of glibc's malloc: issue 18's profile of the stock reserver on Kafka found
/// ~45 % of its CPU in glibc's malloc, free and their chunk consolidation (sled copies a tree
/// node on every update; the unit's records are many small buffers). BENCHMARKS.md gives the
/// before and after.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long the runtime waits, after the command returned, for blocking tasks still running
/// (a client close or a store flush that hangs must not keep a stopped pod alive).
const BLOCKING_TASKS_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = orderflow::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("cannot start the tokio runtime");
    let result = runtime.block_on(orderflow::cli::run(cli));
    runtime.shutdown_timeout(BLOCKING_TASKS_WAIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}
