#!/usr/bin/env bash
# Runs the orderflow demo (the main job) end to end against a fresh local broker.
#
#   scripts/demo.sh [ARGS...]
#
# Installs the broker if missing (Apache Kafka from Maven Central, ~10 s; with
# ORDERFLOW_BROKER=tansu, tansu from crates.io, ~9 min), builds the release binary
# (cargo build --release -p orderflow), starts a fresh broker in .broker/demo (Kafka: workers
# under exactly_once; tansu: its topology profile, effectively_once), and runs
#   target/release/orderflow demo --bootstrap 127.0.0.1:PORT --topology topology.toml [ARGS...]
# from the repository root. The broker is stopped on exit unless ORDERFLOW_DEMO_KEEP_BROKER=1
# (then stop it with `ORDERFLOW_BROKER_DIR=.broker/demo scripts/broker.sh stop`).
# ORDERFLOW_BROKER_PORT picks the broker's port (default: a free one). The exit status is the
# demo's.
#
# The demo's orders go through the reference order service into an outbox table that the outbox
# relay publishes (README "The reference order service (outbox)"). Its database:
#   (default)                     SQLite, outbox.db in the run's state folder (.state/demo-*)
#   ORDERFLOW_DEMO_DB=postgres    a private PostgreSQL started with scripts/db.sh in .db/demo-postgres
#   ORDERFLOW_DEMO_DB=mariadb     a private MariaDB, likewise in .db/demo-mariadb
# (installed on first use by scripts/db.sh, stopped on exit unless ORDERFLOW_DEMO_KEEP_BROKER=1;
# ORDERFLOW_DB_DIR picks another folder). The server's URL is passed as ORDERFLOW_DATABASE_URL,
# which an ORDERFLOW_DATABASE_URL already set otherwise does itself. `--direct` skips the outbox.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$ROOT"

say() { echo "demo.sh: $*" >&2; }

BROKER_KIND="${ORDERFLOW_BROKER:-kafka}"
export ORDERFLOW_BROKER="$BROKER_KIND"
# Install the broker now if it is missing, before the long build (broker.sh knows where it goes).
"$ROOT/scripts/broker.sh" install
if [ "$BROKER_KIND" = tansu ]; then
  # The per-broker settings of topology.toml's [profiles.tansu] (no transactions).
  export ORDERFLOW_PROFILE=tansu
fi

say "building: cargo build --release -p orderflow"
cargo build --release -p orderflow

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/release/orderflow"
[ -x "$BIN" ] || { echo "demo.sh: error: $BIN was not built" >&2; exit 1; }

export ORDERFLOW_BROKER_DIR="$ROOT/.broker/demo"
BROKER="$ROOT/scripts/broker.sh"

DEMO_DB="${ORDERFLOW_DEMO_DB:-}"
case "$DEMO_DB" in
  ""|sqlite) DEMO_DB="" ;;
  postgres|mariadb) ;;
  *) echo "demo.sh: error: ORDERFLOW_DEMO_DB must be postgres, mariadb or sqlite, not '$DEMO_DB'" >&2; exit 2 ;;
esac
DB_DIR="${ORDERFLOW_DB_DIR:-$ROOT/.db/demo-$DEMO_DB}"

cleanup() {
  if [ "${ORDERFLOW_DEMO_KEEP_BROKER:-0}" = 1 ]; then
    say "broker left running (ORDERFLOW_DEMO_KEEP_BROKER=1): $("$BROKER" status 2>/dev/null || true)," \
      "dir $ORDERFLOW_BROKER_DIR"
    [ -z "$DEMO_DB" ] || say "$DEMO_DB left running: stop it with ORDERFLOW_DB_DIR=$DB_DIR scripts/db.sh stop"
  else
    "$BROKER" stop || true
    [ -z "$DEMO_DB" ] || ORDERFLOW_DB_DIR="$DB_DIR" "$ROOT/scripts/db.sh" stop "$DEMO_DB" >&2 || true
  fi
}
# A broker left over from an interrupted earlier demo would hold the directory.
"$BROKER" stop >/dev/null 2>&1 || true
trap cleanup EXIT

bootstrap="$(env -u ORDERFLOW_BROKER_KEEP "$BROKER" start | tail -n 1)"
say "$BROKER_KIND at $bootstrap (log $ORDERFLOW_BROKER_DIR/broker.log)"

if [ -n "$DEMO_DB" ]; then
  # A server left over from an interrupted earlier demo would hold the directory.
  ORDERFLOW_DB_DIR="$DB_DIR" "$ROOT/scripts/db.sh" stop "$DEMO_DB" >/dev/null 2>&1 || true
  ORDERFLOW_DATABASE_URL="$(ORDERFLOW_DB_DIR="$DB_DIR" "$ROOT/scripts/db.sh" start "$DEMO_DB" | tail -n 1)"
  export ORDERFLOW_DATABASE_URL
  say "$DEMO_DB at ${ORDERFLOW_DATABASE_URL//:orderflow@/:***@} (log $DB_DIR/server.log)"
fi

set +e
"$BIN" demo --bootstrap "$bootstrap" --topology topology.toml "$@"
status=$?
set -e
exit "$status"
