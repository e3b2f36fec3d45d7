#!/usr/bin/env bash
# Runs a local broker in the background: Apache Kafka (the reference broker, default) or tansu
# 0.6.0 (the transaction-less second broker, docs/broker.md).
#
#   scripts/broker.sh start     start a broker; prints the bootstrap address 127.0.0.1:PORT as
#                               the last line on stdout (progress goes to stderr)
#   scripts/broker.sh stop      stop it (SIGTERM, SIGKILL after 30 s) and wait for the port to be free
#   scripts/broker.sh status    exit 0 and print the bootstrap address if running, else exit 1
#   scripts/broker.sh restart   stop, then start on the same port(s) keeping the data
#   scripts/broker.sh install   install the chosen broker into the tools folder if it is missing
#
# Environment:
#   ORDERFLOW_BROKER         kafka (default) or tansu; `restart` keeps the one the directory ran
#   ORDERFLOW_BROKER_DIR     state directory (default: $PWD/.broker); holds pid, port, kind,
#                            broker.log and the broker's data (Kafka: server.properties, data/;
#                            tansu: tansu.db)
#   ORDERFLOW_BROKER_PORT    client port on 127.0.0.1 (default: a free one; `restart`: the previous one)
#   ORDERFLOW_BROKER_KEEP    1: keep the existing data instead of starting from an empty broker
#   ORDERFLOW_BROKER_TIMEOUT seconds to wait until the broker answers (default 90)
#   ORDERFLOW_BROKER_PROPERTIES  Kafka only: extra server properties, whitespace-separated k=v
#                            (they override the defaults below)
#   ORDERFLOW_KAFKA_HEAP     Kafka only: JVM heap (default 512m; -Xms = -Xmx)
#   ORDERFLOW_KAFKA_VERSION  Kafka only: the installed version to run (default 4.1.1)
#   ORDERFLOW_BROKER_ENGINE  tansu only: sqlite (default; durable, correct offsets) or memory
#   ORDERFLOW_TANSU          tansu only: binary (default: $ORDERFLOW_TOOLS/bin/tansu)
#   ORDERFLOW_TOOLS          tools directory (default: ~/.cache/orderflow/tools); missing
#                            brokers are installed there by scripts/install-tools.sh
#
# Kafka runs as one combined KRaft node (process.roles=broker,controller) formatted with a fresh
# cluster id on `start` (unless ORDERFLOW_BROKER_KEEP=1), the controller on a second free port. It
# counts as started when it logged "Kafka Server started" and answered a Metadata request that
# lists itself. See README "The local brokers" for the settings and why.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TOOLS="${ORDERFLOW_TOOLS:-$HOME/.cache/orderflow/tools}"
KAFKA_VERSION="${ORDERFLOW_KAFKA_VERSION:-4.1.1}"

die() { echo "broker.sh: error: $*" >&2; exit 1; }
say() { echo "broker.sh: $*" >&2; }
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

# --- state directory ---------------------------------------------------------------------------
DIR="${ORDERFLOW_BROKER_DIR:-$PWD/.broker}"
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
PID_FILE="$DIR/pid"
PORT_FILE="$DIR/port"
CONTROLLER_PORT_FILE="$DIR/controller_port"
KIND_FILE="$DIR/kind"
ENGINE_FILE="$DIR/engine"
LOG_FILE="$DIR/broker.log"
# The command line of the process the pid file names, when it really is the broker it started
# (tansu or Kafka's JVM) and not a recycled pid.
BROKER_CMDLINE='tansu|kafka\.Kafka'

# The broker kind: the environment's, else the one this directory last ran, else kafka.
kind() {
  local k="${ORDERFLOW_BROKER:-}"
  [ -z "$k" ] && [ -f "$KIND_FILE" ] && k="$(cat "$KIND_FILE")"
  k="${k:-kafka}"
  case "$k" in kafka|tansu) echo "$k" ;; *) die "ORDERFLOW_BROKER must be 'kafka' or 'tansu', not '$k'" ;; esac
}

# --- ports -------------------------------------------------------------------------------------
free_port() {
  if have_python; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local port i
  for i in $(seq 1 100); do
    port=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
    if port_bindable "$port"; then echo "$port"; return; fi
  done
  die "could not find a free TCP port on 127.0.0.1 (tried 100)"
}

# Prints the path of an installed tool, installing it on demand with scripts/install-tools.sh.
ensure_installed() {
  case "$1" in
    tansu)
      if [ -n "${ORDERFLOW_TANSU:-}" ]; then
        [ -x "$ORDERFLOW_TANSU" ] || die "ORDERFLOW_TANSU=$ORDERFLOW_TANSU is not an executable"
        echo "$ORDERFLOW_TANSU"
        return
      fi
      [ -x "$TOOLS/bin/tansu" ] || ORDERFLOW_SKIP_JUST=1 "$ROOT/scripts/install-tools.sh" tansu >/dev/null \
        || die "scripts/install-tools.sh tansu failed"
      [ -x "$TOOLS/bin/tansu" ] || die "scripts/install-tools.sh did not produce $TOOLS/bin/tansu"
      echo "$TOOLS/bin/tansu"
      ;;
    kafka)
      local home="$TOOLS/kafka-$KAFKA_VERSION"
      [ -f "$home/.complete" ] || ORDERFLOW_KAFKA_VERSION="$KAFKA_VERSION" "$ROOT/scripts/install-tools.sh" kafka >/dev/null \
        || die "scripts/install-tools.sh kafka failed"
      [ -f "$home/.complete" ] || die "scripts/install-tools.sh did not install Kafka into $home"
      echo "$home"
      ;;
  esac
}

# True when the Kafka broker on 127.0.0.1:$1 answers a Metadata request (v4: the oldest version
# Kafka 4.x still serves, KIP-896) listing at least one broker.
kafka_answers_metadata() {
  python3 - "$1" <<'PY'
import socket, struct, sys
client = b"orderflow-broker-sh"
# Request header v1 (api key 3 = Metadata, version 4, correlation id 1, client id), then the v4
# body: topics = null (all topics), allow_auto_topic_creation = false.
req = struct.pack(">hhih", 3, 4, 1, len(client)) + client + struct.pack(">ib", -1, 0)
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
    s.settimeout(5)
    s.sendall(struct.pack(">i", len(req)) + req)
    buf = b""
    while len(buf) < 16:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(1)
        buf += chunk
    # size, correlation id, throttle_time_ms, brokers count
    _, corr, _, brokers = struct.unpack(">iiii", buf[:16])
    sys.exit(0 if corr == 1 and brokers > 0 else 1)
except OSError:
    sys.exit(1)
PY
}

# Waits until $1 (a shell test of readiness) succeeds, the broker process dies or the deadline
# passes. $2: offset of the log at start, $3: what is awaited (for messages).
wait_until() {
  wait_started "$1" "$PID_FILE" "$LOG_FILE" "$2" "${ORDERFLOW_BROKER_TIMEOUT:-90}" "$3" "the broker"
}

# Writes $DIR/server.properties for a combined KRaft node on 127.0.0.1:$1 (clients) and
# 127.0.0.1:$2 (controller).
kafka_properties() {
  local port="$1" cport="$2"
  cat >"$DIR/server.properties" <<PROPS
# Written by scripts/broker.sh: one combined KRaft node (broker + controller) on loopback.
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$cport
log.dirs=$DIR/data
# One node: the internal topics cannot have the default replication factor 3 / min ISR 2
# (__transaction_state could not be created and InitProducerId would never succeed). Few
# partitions keep their creation on first use fast on 2 cores.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
default.replication.factor=1
num.partitions=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# KIP-848 (group.protocol=consumer): the session and heartbeat are the broker's, not the
# client's. 10 s / 1 s like the classic protocol's settings in the chaos test; the minimums are
# lowered so a group may set its own (consumer.session.timeout.ms) down to 6 s.
group.consumer.session.timeout.ms=10000
group.consumer.min.session.timeout.ms=6000
group.consumer.heartbeat.interval.ms=1000
group.consumer.min.heartbeat.interval.ms=500
# Small machine: fewer threads, and a 16 MiB (not 128 MiB) log-cleaner buffer inside the heap.
num.network.threads=2
num.io.threads=4
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.threads=1
PROPS
  local kv
  for kv in ${ORDERFLOW_BROKER_PROPERTIES:-}; do
    case "$kv" in *=*) echo "$kv" >>"$DIR/server.properties" ;; *) die "ORDERFLOW_BROKER_PROPERTIES: '$kv' is not k=v" ;; esac
  done
}

start_kafka() {
  local port="$1" keep="$2" home cport offset java_cp
  home="$(ensure_installed kafka)"
  command -v java >/dev/null 2>&1 || die "java is not on PATH (Kafka needs Java 17+)"
  command -v python3 >/dev/null 2>&1 || die "python3 is not on PATH (broker.sh asks Kafka for metadata with it)"
  if [ "$keep" = 1 ] && [ -f "$CONTROLLER_PORT_FILE" ]; then
    cport="$(tr -dc '0-9' <"$CONTROLLER_PORT_FILE")"
  else
    cport="$(free_port)"
    while [ "$cport" = "$port" ]; do cport="$(free_port)"; done
  fi
  port_bindable "$cport" || die "controller port 127.0.0.1:$cport is in use"
  echo "$cport" >"$CONTROLLER_PORT_FILE"
  kafka_properties "$port" "$cport"
  java_cp="$home/libs/*"
  local jvm=(java "-Xms${ORDERFLOW_KAFKA_HEAP:-512m}" "-Xmx${ORDERFLOW_KAFKA_HEAP:-512m}" -XX:+UseG1GC
    -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$home/log4j2.properties" -cp "$java_cp")
  offset=0
  [ -f "$LOG_FILE" ] && offset="$(wc -c <"$LOG_FILE")"
  if [ "$keep" != 1 ] || [ ! -f "$DIR/data/meta.properties" ]; then
    rm -rf "$DIR/data"
    local cluster_id
    cluster_id="$("${jvm[@]}" kafka.tools.StorageTool random-uuid 2>>"$LOG_FILE" | tail -n 1)"
    [ -n "$cluster_id" ] || { log_tail "$LOG_FILE" "$offset"; die "kafka.tools.StorageTool random-uuid printed nothing"; }
    "${jvm[@]}" kafka.tools.StorageTool format --standalone --cluster-id "$cluster_id" \
      --config "$DIR/server.properties" >>"$LOG_FILE" 2>&1 \
      || { log_tail "$LOG_FILE" "$offset"; die "kafka.tools.StorageTool format failed"; }
  fi
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) broker.sh start: Kafka $KAFKA_VERSION on port $port (controller $cport), keep $keep" >>"$LOG_FILE"
  say "starting Kafka $KAFKA_VERSION on 127.0.0.1:$port (controller $cport, dir $DIR)"
  # Own session (setsid): a Ctrl-C in the calling terminal does not reach it; the wrapper shell
  # writes its own pid and then execs java, so the pid file holds the JVM's pid.
  (
    cd "$DIR"
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner sh
    exec setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$PID_FILE" \
      "${jvm[@]}" kafka.Kafka "$DIR/server.properties"
  ) </dev/null >>"$LOG_FILE" 2>&1 &
  disown 2>/dev/null || true
  wait_until "tail -c +$((offset + 1)) '$LOG_FILE' | grep -q 'Kafka Server started'" "$offset" "'Kafka Server started'"
  wait_until "kafka_answers_metadata $port" "$offset" "Metadata answer on 127.0.0.1:$port"
}

start_tansu() {
  local port="$1" keep="$2" tansu storage offset
  local engine="${ORDERFLOW_BROKER_ENGINE:-sqlite}"
  case "$engine" in sqlite|memory) ;; *) die "ORDERFLOW_BROKER_ENGINE must be 'sqlite' or 'memory', not '$engine'" ;; esac
  tansu="$(ensure_installed tansu)"
  if [ "$engine" = sqlite ]; then
    [ "$keep" = 1 ] || rm -f "$DIR"/tansu.db "$DIR"/tansu.db-*
    # tansu 0.6.0 resolves sqlite://HOST/PATH relative to its working directory (an absolute
    # path is not honoured), so the broker runs inside $DIR with a relative database name.
    storage="sqlite://tansu.db"
  else
    storage="memory://tansu/"
  fi
  echo "$engine" >"$ENGINE_FILE"
  local url="tcp://127.0.0.1:$port"
  offset=0
  [ -f "$LOG_FILE" ] && offset="$(wc -c <"$LOG_FILE")"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) broker.sh start: tansu on port $port, engine $engine, keep $keep" >>"$LOG_FILE"
  say "starting tansu on $url (engine $engine, dir $DIR)"
  # tansu also reads SCHEMA_REGISTRY (turns on schema validation) and OTEL_EXPORTER_OTLP_ENDPOINT
  # from the environment; the project's own settings must not leak into the broker.
  (
    cd "$DIR"
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner sh
    exec env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
      setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$PID_FILE" \
      "$tansu" broker --cluster-id orderflow --listener-url "$url" --advertised-listener-url "$url" \
        --storage-engine "$storage"
  ) </dev/null >>"$LOG_FILE" 2>&1 &
  disown 2>/dev/null || true
  wait_until "tail -c +$((offset + 1)) '$LOG_FILE' | grep -q 'ready in'" "$offset" "'ready in' from tansu"
  wait_until "port_accepting $port" "$offset" "connection accepted on 127.0.0.1:$port"
}

# --- subcommands -------------------------------------------------------------------------------
cmd_start() {
  local keep="${ORDERFLOW_BROKER_KEEP:-0}" port pid k
  k="$(kind)"
  if pid="$(running_pid "$PID_FILE" "$BROKER_CMDLINE")"; then
    die "a broker is already running for $DIR (pid $pid, bootstrap 127.0.0.1:$(cat "$PORT_FILE" 2>/dev/null || echo '?')); use 'stop' or 'restart'"
  fi
  if [ -n "${ORDERFLOW_BROKER_PORT:-}" ]; then
    port="$ORDERFLOW_BROKER_PORT"
    valid_port "$port" || die "ORDERFLOW_BROKER_PORT='$port' is not a TCP port number"
    port_bindable "$port" \
      || die "port 127.0.0.1:$port is already in use (another broker or program holds it); pick another ORDERFLOW_BROKER_PORT or leave it unset for a free one"
  else
    port="$(free_port)"
  fi
  mkdir -p "$DIR"
  rm -f "$PID_FILE"
  echo "$port" >"$PORT_FILE"
  echo "$k" >"$KIND_FILE"
  local began=$SECONDS
  case "$k" in
    kafka) start_kafka "$port" "$keep" ;;
    tansu) start_tansu "$port" "$keep" ;;
  esac
  say "$k is ready in $(( SECONDS - began )) s (pid $(cat "$PID_FILE"), log $LOG_FILE)"
  echo "127.0.0.1:$port"
}

cmd_stop() {
  local pid port=""
  [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  if ! pid="$(running_pid "$PID_FILE" "$BROKER_CMDLINE")"; then
    say "no broker running for $DIR"
    rm -f "$PID_FILE"
    return 0
  fi
  say "stopping $(kind) (pid $pid)"
  # Kafka's controlled shutdown takes a few seconds (it closes its logs cleanly, so the next
  # start needs no recovery); tansu stops at once.
  stop_pid "$pid" 30 "the broker"
  rm -f "$PID_FILE"
  [ -n "$port" ] && { wait_port_free "$port" 15 "the broker" || true; }
  say "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid "$PID_FILE" "$BROKER_CMDLINE")"; then
    echo "127.0.0.1:$(cat "$PORT_FILE")"
    say "running: $(kind) (pid $pid, dir $DIR)"
    return 0
  fi
  say "not running (dir $DIR)"
  return 1
}

cmd_restart() {
  local port="${ORDERFLOW_BROKER_PORT:-}"
  [ -z "$port" ] && [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  cmd_stop
  if [ -n "$port" ]; then
    # Only the same port keeps the clients' bootstrap address valid; wait for it harder.
    wait_port_free "$port" 30 "the broker" || die "port $port is still in use; cannot restart on it"
  fi
  [ -z "${ORDERFLOW_BROKER_ENGINE:-}" ] && [ -f "$ENGINE_FILE" ] && export ORDERFLOW_BROKER_ENGINE="$(cat "$ENGINE_FILE")"
  ORDERFLOW_BROKER_PORT="$port" ORDERFLOW_BROKER_KEEP=1 cmd_start
}

case "${1:-}" in
  start) cmd_start ;;
  install) ensure_installed "$(kind)" >/dev/null ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_restart ;;
  -h|--help|help) usage 0 ;;
  *) usage 2 ;;
esac
