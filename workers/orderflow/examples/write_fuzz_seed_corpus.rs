//! (Re)writes the generated fuzz seed corpus, `fuzz/corpus/<target>/` (other files there are left
//! alone): run after changing the generator (`fuzz/src/seeds.rs`) or the bad-input corpus.
//!
//! ```text
//! cargo run --release -p orderflow --example write_fuzz_seed_corpus
//! ```
//!
//! `tests/fuzz_corpus.rs` (`fuzz_seed_corpus_matches_its_generator`) checks the committed seeds
//! against the same generator.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz;

use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root");
    let fuzz = fuzz::Fuzz::load(&root).unwrap_or_else(|e| panic!("loading the topology and schemas: {e}"));
    let written = fuzz::seeds::write(&fuzz, &root).unwrap_or_else(|e| panic!("writing the seeds: {e}"));
    println!("wrote {written} seeds under {}", root.join("fuzz/corpus").display());
}
