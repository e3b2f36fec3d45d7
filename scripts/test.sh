#!/usr/bin/env bash
# The project's test command: runs the whole workspace's tests against a fresh local broker.
#
#   scripts/test.sh [CARGO TEST ARGS...] [-- TEST BINARY ARGS...]
#
# Installs the tools if missing (scripts/install-tools.sh), builds the tests, starts a fresh
# SQLite-backed tansu broker on a free port in its own directory under target/, and runs
#   cargo test --workspace --release [ARGS...] -- --test-threads=1 [TEST BINARY ARGS...]
# (without --workspace when ARGS select packages with -p/--package; --test-threads=1 is left out
# when the test binary args set --test-threads themselves)
# with these variables exported for the tests:
#   ORDERFLOW_BOOTSTRAP      127.0.0.1:PORT of the broker
#   ORDERFLOW_BROKER_DIR     the broker's state directory (tansu.log, tansu.db, port, pid)
#   ORDERFLOW_BROKER_SCRIPT  absolute path of scripts/broker.sh; with ORDERFLOW_BROKER_DIR
#                            set, `$ORDERFLOW_BROKER_SCRIPT restart` restarts this broker on the
#                            same port keeping its data (outage tests)
# The broker is always stopped on exit; the exit status is cargo's. The broker directory is
# removed after a passing run and kept (its path is printed) after a failing one, unless
# ORDERFLOW_KEEP_BROKER_DIR=1 keeps it always.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$ROOT"

say() { echo "test.sh: $*" >&2; }

# Install tansu now if it is missing, before the long build (broker.sh knows where it goes).
"$ROOT/scripts/broker.sh" install

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

mkdir -p "$ROOT/target"
BROKER_DIR="$(mktemp -d "$ROOT/target/test-broker.XXXXXX")"
export ORDERFLOW_BROKER_DIR="$BROKER_DIR"
export ORDERFLOW_BROKER_SCRIPT="$ROOT/scripts/broker.sh"

status=1
cleanup() {
  "$ORDERFLOW_BROKER_SCRIPT" stop || true
  if [ "$status" = 0 ] && [ "${ORDERFLOW_KEEP_BROKER_DIR:-0}" != 1 ]; then
    rm -rf "$BROKER_DIR"
  else
    say "broker state and log kept in $BROKER_DIR"
  fi
}
trap cleanup EXIT

# A fresh SQLite broker on a free port, whatever the caller's environment says.
bootstrap="$(env -u ORDERFLOW_BROKER_PORT -u ORDERFLOW_BROKER_KEEP ORDERFLOW_BROKER_ENGINE=sqlite \
  "$ORDERFLOW_BROKER_SCRIPT" start | tail -n 1)"
export ORDERFLOW_BOOTSTRAP="$bootstrap"
say "broker at $ORDERFLOW_BOOTSTRAP (dir $BROKER_DIR)"

set +e
# --no-fail-fast: every test binary runs, so one failure does not hide the others.
cargo test "${scope[@]+"${scope[@]}"}" --release --no-fail-fast "${cargo_args[@]+"${cargo_args[@]}"}" -- "${bin_args[@]}"
status=$?
set -e
exit "$status"
