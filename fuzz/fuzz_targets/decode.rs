//! `decode`: arbitrary bytes as one record value through `Codec::decode_local` (single-object
//! encoding, schemas from the repository's `avro/`, no registry). See `orderflow_fuzz::Fuzz::decode`.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static FUZZ: LazyLock<orderflow_fuzz::Fuzz> = LazyLock::new(|| {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    orderflow_fuzz::Fuzz::load(&root).unwrap_or_else(|e| panic!("loading the topology and schemas: {e}"))
});

fuzz_target!(|data: &[u8]| {
    let _ = FUZZ.decode(data);
});
