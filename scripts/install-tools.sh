#!/usr/bin/env bash
# Installs the tools orderflow needs outside the Rust workspace, once per machine:
#   tansu 0.6.0 (the local Kafka-compatible broker; see docs/broker.md) and `just`.
# They go into $ORDERFLOW_TOOLS (default ~/.cache/orderflow/tools) so that fresh clones and
# CI runs on the same machine reuse them. Idempotent: a tool already present is left alone.
set -euo pipefail
TOOLS="${ORDERFLOW_TOOLS:-$HOME/.cache/orderflow/tools}"
mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/bin/tansu" ]; then
  echo "installing tansu 0.6.0 into $TOOLS (takes ~9 minutes on 2 cores)" >&2
  # --locked: newer dependency versions break the build.
  # --features dynostore,libsql: the default build has no storage engine at all.
  cargo install tansu --locked --version 0.6.0 --features dynostore,libsql --root "$TOOLS"
fi
if [ "${ORDERFLOW_SKIP_JUST:-0}" != 1 ] && ! command -v just >/dev/null 2>&1 && [ ! -x "$TOOLS/bin/just" ]; then
  echo "installing just into $TOOLS" >&2
  cargo install just --locked --root "$TOOLS"
fi
echo "$TOOLS/bin"
