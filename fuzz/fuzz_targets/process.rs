//! `process`: arbitrary bytes split into records (`orderflow_fuzz::split_records`), admitted and fed
//! through the five processors with an advancing clock, by the runtime's step
//! (`orderflow_runtime::step`). See `orderflow_fuzz::Fuzz::process`.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static FUZZ: LazyLock<orderflow_fuzz::Fuzz> = LazyLock::new(|| {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    orderflow_fuzz::Fuzz::load(&root).unwrap_or_else(|e| panic!("loading the topology and schemas: {e}"))
});

fuzz_target!(|data: &[u8]| {
    let _ = FUZZ.process(data);
});
