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

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

DIR="${ORDERFLOW_REGISTRY_DIR:-$HOME/.cache/orderflow/registry}"
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
PID_FILE="$DIR/pid"
PORT_FILE="$DIR/port"
LOG_FILE="$DIR/registry.log"

url_for() { echo "http://127.0.0.1:$1$API_PATH"; }
valid_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }

# --- java --------------------------------------------------------------------------------------
# The major Java version of the java binary $1 (e.g. 17, 21, 25), or nothing if it does not run.
java_major() {
  "$1" -XshowSettings:properties -version 2>&1 \
    | awk -F'= *' '/java\.specification\.version/ { v = $2; sub(/^1\./, "", v); sub(/\..*/, "", v); print v; exit }'
}

# Prints a java binary of version $1 or newer (the same search as scripts/install-tools.sh).
find_java() {
  local min="$1" j v best="" best_v=0
  if [ -n "${ORDERFLOW_REGISTRY_JAVA:-}" ]; then
    v="$(java_major "$ORDERFLOW_REGISTRY_JAVA")"
    [ -n "$v" ] && (( v >= min )) || die "ORDERFLOW_REGISTRY_JAVA=$ORDERFLOW_REGISTRY_JAVA is not a Java $min+ (version '${v:-none}')"
    echo "$ORDERFLOW_REGISTRY_JAVA"
    return
  fi
  for j in /usr/lib/jvm/temurin-25-jdk-amd64/bin/java /usr/lib/jvm/*/bin/java "$(command -v java 2>/dev/null || true)"; do
    [ -n "$j" ] && [ -x "$j" ] || continue
    v="$(java_major "$j")"
    [ -n "$v" ] && (( v >= min && v > best_v )) || continue
    best="$j" best_v="$v"
    [[ "$j" == */temurin-25-jdk-amd64/* ]] && break
  done
  [ -n "$best" ] || die "no Java $min+ found (Apicurio Registry $VERSION needs it): looked at /usr/lib/jvm/temurin-25-jdk-amd64, /usr/lib/jvm/*/bin/java and \`java\` on PATH; install a JDK $min+ or set ORDERFLOW_REGISTRY_JAVA"
  echo "$best"
}

# --- ports and HTTP ----------------------------------------------------------------------------
# True when a listener could bind 127.0.0.1:$1 now (SO_REUSEADDR: TIME_WAIT does not count).
port_bindable() {
  local port="$1"
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$port" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(1)
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
  elif command -v ss >/dev/null 2>&1; then
    ! ss -Htln "sport = :$port" 2>/dev/null | grep -q .
  else
    ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

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

# --- process -----------------------------------------------------------------------------------
# True while process $1 exists and is not a zombie.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/stat" ]; then
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != Z ] || return 1
  fi
  return 0
}

# Prints the pid of the registry of $DIR if it is alive (and really is the registry's JVM).
running_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  [ -n "$pid" ] || return 1
  alive "$pid" || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'apicurio-registry-.*quarkus-run\.jar' || return 1
  fi
  echo "$pid"
}

# Prints the last lines the registry logged since byte offset $1 of the log.
log_tail() {
  if [ -f "$LOG_FILE" ]; then
    echo "---- last lines of $LOG_FILE ----" >&2
    tail -c +"$(( ${1:-0} + 1 ))" "$LOG_FILE" | tail -n 40 >&2
    echo "----" >&2
  fi
}

wait_port_free() {
  local port="$1" deadline=$(( SECONDS + ${2:-15} ))
  while ! port_bindable "$port"; do
    if (( SECONDS >= deadline )); then
      say "warning: port $port is still in use after the registry stopped"
      return 1
    fi
    sleep 0.1
  done
}

# --- subcommands -------------------------------------------------------------------------------
cmd_start() {
  local pid port java major offset
  if pid="$(running_pid)"; then
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
  case "$VERSION" in 2.*) java="$(find_java 17)" ;; *) java="$(find_java 21)" ;; esac
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

  local url deadline=$(( SECONDS + ${ORDERFLOW_REGISTRY_TIMEOUT:-60} )) status
  url="$(url_for "$port")"
  pid=""
  while :; do
    if [ -z "$pid" ] && [ -s "$PID_FILE" ]; then pid="$(tr -dc '0-9' <"$PID_FILE")"; fi
    status="$(http_status "$url/subjects")"
    [ "$status" = 200 ] && break
    if [ -n "$pid" ] && ! alive "$pid"; then
      log_tail "$offset"
      die "the registry exited during start-up (see $LOG_FILE)"
    fi
    if (( SECONDS > deadline )); then
      log_tail "$offset"
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
      die "GET $url/subjects did not answer 200 within ${ORDERFLOW_REGISTRY_TIMEOUT:-60} s (last: $status; see $LOG_FILE)"
    fi
    sleep 0.1
  done
  say "ready in $(( SECONDS - began )) s (pid $pid, log $LOG_FILE)"
  echo "$url"
}

cmd_stop() {
  local pid port=""
  [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  if ! pid="$(running_pid)"; then
    say "no registry running for $DIR"
    rm -f "$PID_FILE"
    return 0
  fi
  say "stopping the registry (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  # It stops in well under a second, then the JVM writes its class-data archive (a few seconds
  # the first time).
  local deadline=$(( SECONDS + 20 ))
  while alive "$pid"; do
    if (( SECONDS > deadline )); then
      say "the registry did not exit within 20 s of SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      local kdeadline=$(( SECONDS + 5 ))
      while alive "$pid" && (( SECONDS < kdeadline )); do sleep 0.1; done
      break
    fi
    sleep 0.1
  done
  alive "$pid" && die "the registry (pid $pid) is still alive after SIGKILL"
  rm -f "$PID_FILE"
  [ -n "$port" ] && { wait_port_free "$port" || true; }
  say "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
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
