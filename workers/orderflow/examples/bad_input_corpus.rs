//! Rewrites the bad-input corpus `tests/corpus/bad_input/` from its generator
//! (`tests/bad_input_corpus/mod.rs`, the same code the `bad_input` test checks the committed
//! files against). Run it after changing the generator, then commit the files:
//!
//! ```text
//! cargo run --release -p orderflow --example bad_input_corpus
//! ```

#[path = "../../../tests/bad_input_corpus/mod.rs"]
mod bad_input_corpus;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root");
    let n = bad_input_corpus::write(&root);
    println!("wrote {n} cases to {}", root.join(bad_input_corpus::CORPUS_DIR).display());
}
