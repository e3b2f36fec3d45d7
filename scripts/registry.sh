#!/usr/bin/env bash
# Runs a local schema registry in the background: Apicurio Registry with its Confluent-compatible
# API ("ccompat"), which schema_registry_converter and confluent-kafka speak, for the
# registry-backed paths (broker.registry_url, ORDERFLOW_REGISTRY_URL).
#
#   scripts/registry.sh start    start it, installing it first if missing (scripts/install-tools.sh
#                                registry); prints the Confluent API base URL
#                                http://127.0.0.1:PORT/apis/ccompat/v7 as the last line on stdout
#                                (progress goes to stderr). Already running: prints its URL.
#   scripts/registry.sh stop     stop it (SIGTERM, SIGKILL after 20 s)
#   scripts/registry.sh status   exit 0 and print the URL if running, else exit 1
#
# Environment:
#   ORDERFLOW_REGISTRY_PORT     port on 127.0.0.1 (default 8081)
#   ORDERFLOW_REGISTRY_DIR      state directory (default ~/.cache/orderflow/registry): pid, port,
#                               registry.log, tmp/ and the JVM's class-data archive (*.jsa)
#   ORDERFLOW_REGISTRY_COMPATIBILITY  global compatibility level (default BACKWARD, Confluent's
#                               default; Apicurio's own is none). PUT /config and
#                               PUT /config/{subject} still change it at run time.
#   ORDERFLOW_REGISTRY_HEAP     JVM max heap (default 256m)
#   ORDERFLOW_REGISTRY_TIMEOUT  seconds to wait until the API answers (default 60)
#   ORDERFLOW_REGISTRY_PROPERTIES  extra Quarkus/Apicurio properties, whitespace-separated k=v
#                               (e.g. quarkus.http.access-log.enabled=true)
#   ORDERFLOW_REGISTRY_VERSION  Apicurio Registry version (default 3.3.3; 3.x)
#   ORDERFLOW_REGISTRY_JAVA     the java to run it with (default: Temurin 25, else the newest JDK
#                               21+ under /usr/lib/jvm, else `java` if it is 21+)
#   ORDERFLOW_TOOLS             tools directory (default ~/.cache/orderflow/tools)
#
# Storage is Apicurio's default SQL storage on an in-memory H2 database: nothing is written to
# disk, and every start begins empty (schema ids restart at 1). It counts as started when
# GET /apis/ccompat/v7/subjects answers 200. Quarkus' management interface (health, metrics) is
# on a random port of 127.0.0.1 (see the log).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TOOLS="${ORDERFLOW_TOOLS:-$HOME/.cache/orderflow/tools}"
VERSION="${ORDERFLOW_REGISTRY_VERSION:-3.3.3}"
HOME_DIR="$TOOLS/apicurio-registry-$VERSION"
API_PATH="/apis/ccompat/v7"

die() { echo "registry.sh: error: $*" >&2; exit 1; }
say() { echo "registry.sh: $*" >&2; }
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

DIR="${ORDERFLOW_REGISTRY_DIR:-$HOME/.cache/orderflow/registry}"
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
PID_FILE="$DIR/pid"
PORT_FILE="$DIR/port"
LOG_FILE="$DIR/registry.log"
# The command line of the process the pid file names, when it really is the registry's JVM and
# not a recycled pid.
REGISTRY_CMDLINE='apicurio-registry-.*quarkus-run\.jar'

url_for() { echo "http://127.0.0.1:$1$API_PATH"; }

# --- HTTP --------------------------------------------------------------------------------------
# Prints the HTTP status of GET $1 (000 when nothing answers).
http_status() {
  if command -v curl >/dev/null 2>&1; then
    curl -s -o /dev/null -m 5 -w '%{http_code}' "$1" 2>/dev/null || true
  else
    python3 - "$1" <<'EOF' 2>/dev/null || echo 000
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
  fi
}

# True when GET $1 answers 200.
answers_200() { [ "$(http_status "$1")" = 200 ]; }

# --- subcommands -------------------------------------------------------------------------------
cmd_start() {
  local pid port java major offset
  if pid="$(running_pid "$PID_FILE" "$REGISTRY_CMDLINE")"; then
    port="$(tr -dc '0-9' <"$PORT_FILE" 2>/dev/null || true)"
    if [ -n "${ORDERFLOW_REGISTRY_PORT:-}" ] && [ "$ORDERFLOW_REGISTRY_PORT" != "$port" ]; then
      say "warning: already running on port $port (not ORDERFLOW_REGISTRY_PORT=$ORDERFLOW_REGISTRY_PORT); stop it first to move it"
    fi
    say "already running (pid $pid, dir $DIR)"
    url_for "$port"
    return 0
  fi
  port="${ORDERFLOW_REGISTRY_PORT:-8081}"
  valid_port "$port" || die "ORDERFLOW_REGISTRY_PORT='$port' is not a TCP port number"
  port_bindable "$port" \
    || die "port 127.0.0.1:$port is already in use by another program; set ORDERFLOW_REGISTRY_PORT to a free one"

  if [ ! -f "$HOME_DIR/.complete" ]; then
    ORDERFLOW_REGISTRY_VERSION="$VERSION" "$ROOT/scripts/install-tools.sh" registry >/dev/null \
      || die "scripts/install-tools.sh registry failed"
    [ -f "$HOME_DIR/.complete" ] || die "scripts/install-tools.sh did not install Apicurio Registry into $HOME_DIR"
  fi
  # The same search as scripts/install-tools.sh registry.
  case "$VERSION" in
    2.*) java="$(find_java 17 ORDERFLOW_REGISTRY_JAVA "Apicurio Registry $VERSION")" ;;
    *) java="$(find_java 21 ORDERFLOW_REGISTRY_JAVA "Apicurio Registry $VERSION")" ;;
  esac
  major="$(java_major "$java")"

  mkdir -p "$DIR/tmp"
  rm -f "$PID_FILE"
  echo "$port" >"$PORT_FILE"
  local compat="${ORDERFLOW_REGISTRY_COMPATIBILITY:-BACKWARD}"
  compat="$(echo "$compat" | tr '[:lower:]' '[:upper:]')"
  case "$compat" in
    NONE|BACKWARD|BACKWARD_TRANSITIVE|FORWARD|FORWARD_TRANSITIVE|FULL|FULL_TRANSITIVE) ;;
    *) die "ORDERFLOW_REGISTRY_COMPATIBILITY='$compat' is not a Confluent compatibility level" ;;
  esac
  # Small machine (2 cores, Kafka beside it): serial GC, a heap that starts small, C1 only
  # (startup ~3 s instead of ~4-5 s, ~190 MB RSS instead of ~280 MB; a test registry's load is a
  # few lookups per schema, the clients cache the rest) and a JDK 19+ dynamic class-data archive
  # in $DIR, written when the JVM exits and reused by the next start (~0.5-1 s faster).
  local jvm=("$java" -Xms32m "-Xmx${ORDERFLOW_REGISTRY_HEAP:-256m}" -XX:+UseSerialGC
    -XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=64m -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true)
  if (( major >= 19 )); then
    # One archive per java and installation (the JVM does not always notice moved jars); its
    # "Skipping class ..." warnings while dumping would only fill the log.
    local jsa
    jsa="$DIR/apicurio-registry-$VERSION-java$major-$(printf '%s' "$java:$HOME_DIR" | cksum | cut -d' ' -f1).jsa"
    jvm+=(-XX:+AutoCreateSharedArchive "-XX:SharedArchiveFile=$jsa" '-Xlog:cds*=off')
  fi
  jvm+=(
    "-Dquarkus.http.host=127.0.0.1" "-Dquarkus.http.port=$port"
    # The management interface (health, metrics) is compiled in; keep it off 0.0.0.0:9000.
    "-Dquarkus.management.host=127.0.0.1" "-Dquarkus.management.port=0"
    # The in-memory H2 database needs no pool of 20 connections.
    "-Dapicurio.datasource.jdbc.initial-size=2" "-Dapicurio.datasource.jdbc.min-size=2"
    "-Dapicurio.datasource.jdbc.max-size=10"
    "-Dapicurio.storage.snapshot.location=$DIR/tmp" "-Dapicurio.import.work-dir=$DIR/tmp"
    "-Dquarkus.http.access-log.enabled=false"
    "-Dquarkus.log.console.format=%d{yyyy-MM-dd HH:mm:ss,SSS} %-5p [%c{3.}] (%t) %s%e%n"
  )
  # The global COMPATIBILITY rule from the start (GET /config shows it), so an incompatible
  # version is refused with 409 as by a Confluent registry with its default BACKWARD.
  [ "$compat" = NONE ] || jvm+=("-Dapicurio.rules.global.compatibility=$compat")
  local kv
  for kv in ${ORDERFLOW_REGISTRY_PROPERTIES:-}; do
    case "$kv" in *=*) jvm+=("-D$kv") ;; *) die "ORDERFLOW_REGISTRY_PROPERTIES: '$kv' is not k=v" ;; esac
  done
  jvm+=(-jar "$HOME_DIR/quarkus-run.jar")

  offset=0
  [ -f "$LOG_FILE" ] && offset="$(wc -c <"$LOG_FILE")"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) registry.sh start: Apicurio Registry $VERSION on port $port, java $java, compatibility $compat" >>"$LOG_FILE"
  say "starting Apicurio Registry $VERSION on 127.0.0.1:$port (dir $DIR)"
  local began=$SECONDS
  # Own session (setsid): a Ctrl-C in the calling terminal does not reach it; the wrapper shell
  # writes its own pid and then execs java, so the pid file holds the JVM's pid.
  (
    cd "$DIR"
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner sh
    exec setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$PID_FILE" "${jvm[@]}"
  ) </dev/null >>"$LOG_FILE" 2>&1 &
  disown 2>/dev/null || true

  local url
  url="$(url_for "$port")"
  wait_started "answers_200 $url/subjects" "$PID_FILE" "$LOG_FILE" "$offset" "${ORDERFLOW_REGISTRY_TIMEOUT:-60}" \
    "answer 200 to GET $url/subjects" "the registry" 40
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  say "ready in $(( SECONDS - began )) s (pid $pid, log $LOG_FILE)"
  echo "$url"
}

cmd_stop() {
  local pid port=""
  [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  if ! pid="$(running_pid "$PID_FILE" "$REGISTRY_CMDLINE")"; then
    say "no registry running for $DIR"
    rm -f "$PID_FILE"
    return 0
  fi
  say "stopping the registry (pid $pid)"
  # It stops in well under a second, then the JVM writes its class-data archive (a few seconds
  # the first time).
  stop_pid "$pid" 20 "the registry"
  rm -f "$PID_FILE"
  [ -n "$port" ] && { wait_port_free "$port" 15 "the registry" || true; }
  say "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid "$PID_FILE" "$REGISTRY_CMDLINE")"; then
    url_for "$(tr -dc '0-9' <"$PORT_FILE")"
    say "running (pid $pid, dir $DIR)"
    return 0
  fi
  say "not running (dir $DIR)"
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h|--help|help) usage 0 ;;
  *) usage 2 ;;
esac
