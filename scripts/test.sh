#!/usr/bin/env bash
# The project's test command: runs the whole workspace's tests, each integration test on a private
# broker of its own.
#
#   scripts/test.sh [CARGO TEST ARGS...] [-- TEST BINARY ARGS...]
#
# Installs the brokers if missing (scripts/install-tools.sh kafka tansu: Apache Kafka from Maven
# Central, tansu from crates.io), the schema registry and the interop clients (registry interop:
# Apicurio Registry from Maven Central, the Java and Python Avro clients of tests/interop), the
# database servers the tests start through scripts/db.sh (postgres mariadb: Debian packages),
# validates deploy/, builds the tests and runs
#   cargo test --workspace --release [ARGS...] -- --test-threads=1 [TEST BINARY ARGS...]
# (without --workspace when ARGS select packages with -p/--package; --test-threads=1 is left out
# when the test binary args set --test-threads themselves). The exit status is cargo's.
#
# Each integration test starts its own broker through scripts/broker.sh (tests/common): Apache
# Kafka under exactly_once unless ORDERFLOW_BROKER=tansu is set, which runs the broker-neutral
# tests on tansu under its profile (effectively_once). The tests that exist for one broker (the
# chaos test's tansu variant, fencing, broker restart mid-transaction, the transaction probe)
# start that broker whatever ORDERFLOW_BROKER says. README "Tests" lists which run where.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$ROOT"

say() { echo "test.sh: $*" >&2; }

# Install the brokers, the schema registry, the foreign-language interop clients and the database
# servers now if they are missing, before the long build.
ORDERFLOW_SKIP_JUST=1 "$ROOT/scripts/install-tools.sh" kafka tansu registry interop postgres mariadb >/dev/null

# Split the arguments: those before `--` go to cargo, those after to the test binaries.
cargo_args=()
bin_args=()
seen_sep=0
for arg in "$@"; do
  if [ "$seen_sep" = 0 ] && [ "$arg" = "--" ]; then seen_sep=1; continue; fi
  if [ "$seen_sep" = 0 ]; then cargo_args+=("$arg"); else bin_args+=("$arg"); fi
done
# `--workspace` would override a `-p`/`--package` selection, so it is only added without one.
scope=(--workspace)
for arg in "${cargo_args[@]+"${cargo_args[@]}"}"; do
  case "$arg" in -p|-p*|--package|--package=*) scope=() ;; esac
done
threads_given=0
for arg in "${bin_args[@]+"${bin_args[@]}"}"; do
  case "$arg" in --test-threads|--test-threads=*) threads_given=1 ;; esac
done
[ "$threads_given" = 1 ] || bin_args=(--test-threads=1 "${bin_args[@]+"${bin_args[@]}"}")

# The deployment artefacts (manifests, alert rules, dashboard) are checked on a whole-suite run.
if [ "${#scope[@]}" -gt 0 ]; then
  say "validating deploy/ (scripts/validate-deploy.sh)"
  "$ROOT/scripts/validate-deploy.sh"
fi

# Build first, so compile errors fail fast and the broker does not idle through the build.
say "building tests: cargo test ${scope[*]+"${scope[*]}"} --release --no-run ${cargo_args[*]+"${cargo_args[*]}"}"
cargo test "${scope[@]+"${scope[@]}"}" --release --no-run "${cargo_args[@]+"${cargo_args[@]}"}"

say "tests run on ${ORDERFLOW_BROKER:-kafka} (ORDERFLOW_BROKER), one private broker per test"

set +e
# --no-fail-fast: every test binary runs, so one failure does not hide the others.
cargo test "${scope[@]+"${scope[@]}"}" --release --no-fail-fast "${cargo_args[@]+"${cargo_args[@]}"}" -- "${bin_args[@]}"
status=$?
set -e
exit "$status"
