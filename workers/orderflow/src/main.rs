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

/// mimalloc's `mi_option_arena_eager_commit` and `mi_option_purge_delay` (their positions in
/// `mi_option_e`, mimalloc.h; libmimalloc-sys names neither).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Gives freed memory back to the OS at once and commits arena memory only as it is used:
/// mimalloc 3's defaults (purge after 1 s, eager arena commit on Linux) gave the stock reserver a
/// peak RSS of 431 MiB in `orderflow bench peer` against 291 MiB with glibc; the same options as
/// `MIMALLOC_PURGE_DELAY=0 MIMALLOC_ARENA_EAGER_COMMIT=0` gave 296 MiB, set here (after the
/// first arena exists) 390 MiB: one run each, BENCHMARKS.md, issue 18. `MIMALLOC_*` variables
/// are read before `main` and are overridden here.
fn tune_allocator() {
    // SAFETY: mi_option_set only stores an integer option; valid options, no pointers involved.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
    }
}

/// How long the runtime waits, after the command returned, for blocking tasks still running
/// (a client close or a store flush that hangs must not keep a stopped pod alive).
const BLOCKING_TASKS_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    tune_allocator();
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
