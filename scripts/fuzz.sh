#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (libFuzzer, nightly toolchain) for a while.
#
#   scripts/fuzz.sh [decode|process|all] [SECONDS] [-- LIBFUZZER ARGS...]   (defaults: all, 60)
#
#   decode   arbitrary bytes as one record value through the Avro codec
#   process  arbitrary bytes split into records, through the five processors with a moving clock
#            (admission, processing and timers through orderflow_runtime::step, as live)
#   (what each checks: fuzz/src/lib.rs; the seed corpus also runs on stable in `cargo test`,
#   tests/fuzz_corpus.rs, and is regenerated with
#   `cargo run --release -p orderflow --example write_fuzz_seed_corpus`)
#
# Installs cargo-fuzz when missing (`cargo install cargo-fuzz --locked`) and uses the nightly
# toolchain (`cargo +nightly`; `rustup toolchain install nightly` if `cargo +nightly --version`
# fails). Builds with optimisations and debug assertions (integer overflow panics), without a
# sanitizer by default: the code under test is safe Rust, and AddressSanitizer would cost about
# half the executions (FUZZ_SANITIZER=address to use it anyway). libFuzzer
# reads the committed seeds in fuzz/corpus/<target>/ and writes what it finds to
# target/fuzz-corpus/<target>/ (kept between runs, not committed). A crash is saved under
# fuzz/artifacts/<target>/ and the script exits non-zero; replay it with
#   cargo +nightly fuzz run -a <target> fuzz/artifacts/<target>/crash-<sha1>
# and minimise it with `cargo +nightly fuzz tmin -a <target> <file>`.
# Each run ends with libFuzzer's figures (executions, exec/s, coverage `cov`, features `ft`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { echo "fuzz.sh: $*" >&2; }

target="${1:-all}"
seconds="${2:-60}"
shift $(( $# > 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
extra=("$@")

case "$target" in
  decode|process) targets=("$target") ;;
  all) targets=(decode process) ;;
  *) say "unknown target '$target' (decode, process or all)"; exit 2 ;;
esac
case "$seconds" in ''|*[!0-9]*) say "SECONDS must be a whole number, got '$seconds'"; exit 2 ;; esac

if ! cargo +nightly --version >/dev/null 2>&1; then
  say "the nightly toolchain is missing: rustup toolchain install nightly"
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

status=0
for t in "${targets[@]}"; do
  found="$ROOT/target/fuzz-corpus/$t"
  mkdir -p "$found" "$ROOT/fuzz/artifacts/$t"
  say "$t for ${seconds}s (seeds fuzz/corpus/$t, findings target/fuzz-corpus/$t)"
  set +e
  cargo +nightly fuzz run --fuzz-dir "$ROOT/fuzz" -O -a -s "${FUZZ_SANITIZER:-none}" "$t" "$found" "$ROOT/fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${extra[@]+"${extra[@]}"}"
  rc=$?
  set -e
  if [ "$rc" != 0 ]; then
    say "$t FAILED (exit $rc): see the crash above and fuzz/artifacts/$t/"
    status=$rc
  fi
done
exit "$status"
