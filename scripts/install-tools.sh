#!/usr/bin/env bash
# Installs the tools orderflow needs outside the Rust workspace, once per machine, into
# $ORDERFLOW_TOOLS (default ~/.cache/orderflow/tools), so fresh clones and CI runs on the same
# machine reuse them. Idempotent: a tool already present is left alone.
#
#   scripts/install-tools.sh [TOOL...]     TOOL: kafka | tansu | just (default: kafka tansu just)
#
#   kafka  Apache Kafka $ORDERFLOW_KAFKA_VERSION (default 4.1.1), the reference broker: the jars of
#          org.apache.kafka:kafka_2.13 and a log4j2 SLF4J binding from Maven Central
#          (scripts/kafka/pom.xml) into $ORDERFLOW_TOOLS/kafka-<version>/libs. Needs java (17+)
#          and mvn. ~10 s with a warm ~/.m2, under a minute without.
#   tansu  tansu 0.6.0, the transaction-less second broker (docs/broker.md), built from
#          crates.io with cargo: ~9 minutes on 2 cores the first time.
#   just   the task runner (Justfile); skipped when ORDERFLOW_SKIP_JUST=1 or already on PATH.
#
# Prints the tools' bin directory on stdout.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="${ORDERFLOW_TOOLS:-$HOME/.cache/orderflow/tools}"
KAFKA_VERSION="${ORDERFLOW_KAFKA_VERSION:-4.1.1}"
mkdir -p "$TOOLS"

say() { echo "install-tools.sh: $*" >&2; }
die() { echo "install-tools.sh: error: $*" >&2; exit 1; }

install_kafka() {
  local home="$TOOLS/kafka-$KAFKA_VERSION"
  [ -f "$home/.complete" ] && return 0
  command -v java >/dev/null 2>&1 || die "java is not on PATH (Kafka $KAFKA_VERSION needs Java 17+)"
  command -v mvn >/dev/null 2>&1 || die "mvn is not on PATH (Kafka's jars come from Maven Central through Maven)"
  say "installing Apache Kafka $KAFKA_VERSION from Maven Central into $home"
  rm -rf "$home"
  mkdir -p "$home"
  mvn -B -q -f "$SCRIPT_DIR/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -Dkafka.version="$KAFKA_VERSION" -DoutputDirectory="$home/libs" >&2 \
    || die "mvn could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION"
  ls "$home/libs"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || die "kafka_2.13-$KAFKA_VERSION.jar is missing from $home/libs"
  cp "$SCRIPT_DIR/kafka/log4j2.properties" "$home/log4j2.properties"
  echo "$KAFKA_VERSION" >"$home/.complete"
}

install_tansu() {
  [ -x "$TOOLS/bin/tansu" ] && return 0
  say "installing tansu 0.6.0 into $TOOLS (takes ~9 minutes on 2 cores)"
  # --locked: newer dependency versions break the build.
  # --features dynostore,libsql: the default build has no storage engine at all.
  cargo install tansu --locked --version 0.6.0 --features dynostore,libsql --root "$TOOLS" >&2
}

install_just() {
  [ "${ORDERFLOW_SKIP_JUST:-0}" = 1 ] && return 0
  command -v just >/dev/null 2>&1 && return 0
  [ -x "$TOOLS/bin/just" ] && return 0
  say "installing just into $TOOLS"
  cargo install just --locked --root "$TOOLS" >&2
}

[ "$#" -gt 0 ] || set -- kafka tansu just
for tool in "$@"; do
  case "$tool" in
    kafka) install_kafka ;;
    tansu) install_tansu ;;
    just) install_just ;;
    *) die "unknown tool '$tool' (kafka, tansu or just)" ;;
  esac
done
echo "$TOOLS/bin"
