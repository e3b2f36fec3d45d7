//! `orderflow`: run saga workers, check and draw the topology, create topics, run the demo.
//!
//! The binary parses the command line; the commands are the library's (`orderflow::cli`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

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
