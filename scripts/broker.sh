#!/usr/bin/env bash
# Runs the local Kafka-compatible broker (tansu 0.6.0, see docs/broker.md) in the background.
#
#   scripts/broker.sh start     start a broker; prints the bootstrap address 127.0.0.1:PORT as
#                               the last line on stdout (progress goes to stderr)
#   scripts/broker.sh stop      stop it (SIGTERM, SIGKILL after 10 s) and wait for the port to be free
#   scripts/broker.sh status    exit 0 and print the bootstrap address if running, else exit 1
#   scripts/broker.sh restart   stop, then start on the same port, same engine, keeping the data
#   scripts/broker.sh install   install tansu into the tools folder if it is missing
#
# Environment:
#   ORDERFLOW_BROKER_DIR     state directory (default: $PWD/.broker); holds tansu.pid, port,
#                            engine, tansu.log and, for the SQLite engine, tansu.db
#   ORDERFLOW_BROKER_PORT    port on 127.0.0.1 (default: a free one; `restart`: the previous one)
#   ORDERFLOW_BROKER_ENGINE  sqlite (default; durable, correct offsets) or memory (fastest)
#   ORDERFLOW_BROKER_KEEP    1: keep an existing tansu.db instead of starting from an empty one
#   ORDERFLOW_BROKER_TIMEOUT seconds to wait for `ready in` (default 60)
#   ORDERFLOW_TANSU          tansu binary (default: $ORDERFLOW_TOOLS/bin/tansu, installed on
#                            demand by scripts/install-tools.sh)
#   ORDERFLOW_TOOLS          tools directory (default: ~/.cache/orderflow/tools)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TOOLS="${ORDERFLOW_TOOLS:-$HOME/.cache/orderflow/tools}"

die() { echo "broker.sh: error: $*" >&2; exit 1; }
say() { echo "broker.sh: $*" >&2; }

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

# --- state directory ---------------------------------------------------------------------------
DIR="${ORDERFLOW_BROKER_DIR:-$PWD/.broker}"
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
PID_FILE="$DIR/tansu.pid"
PORT_FILE="$DIR/port"
ENGINE_FILE="$DIR/engine"
LOG_FILE="$DIR/tansu.log"

# --- ports -------------------------------------------------------------------------------------
have_python() { command -v python3 >/dev/null 2>&1; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_accepting() {
  local port="$1"
  if have_python; then
    python3 - "$port" <<'EOF'
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

# True when a listener could bind 127.0.0.1:$1 now (SO_REUSEADDR, as tokio does, so connections
# lingering in TIME_WAIT do not count as "in use").
port_bindable() {
  local port="$1"
  if have_python; then
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
    ! port_accepting "$port"
  fi
}

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

valid_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }

# --- process -----------------------------------------------------------------------------------
# True while process $1 exists and is not a zombie (an exited broker whose new parent has not
# reaped it yet must count as gone).
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

# Prints the pid of the broker of $DIR if it is alive (and really is tansu), else fails.
running_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  [ -n "$pid" ] || return 1
  alive "$pid" || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q tansu || return 1
  fi
  echo "$pid"
}

find_tansu() {
  if [ -n "${ORDERFLOW_TANSU:-}" ]; then
    [ -x "$ORDERFLOW_TANSU" ] || die "ORDERFLOW_TANSU=$ORDERFLOW_TANSU is not an executable"
    echo "$ORDERFLOW_TANSU"
    return
  fi
  if [ ! -x "$TOOLS/bin/tansu" ]; then
    say "tansu is not installed in $TOOLS/bin; running scripts/install-tools.sh"
    ORDERFLOW_SKIP_JUST=1 "$ROOT/scripts/install-tools.sh" >/dev/null \
      || die "scripts/install-tools.sh failed"
    [ -x "$TOOLS/bin/tansu" ] || die "scripts/install-tools.sh did not produce $TOOLS/bin/tansu"
  fi
  echo "$TOOLS/bin/tansu"
}

# Prints the last lines the broker logged since byte offset $1 of the log.
log_tail() {
  if [ -f "$LOG_FILE" ]; then
    echo "---- last lines of $LOG_FILE ----" >&2
    tail -c +"$(( ${1:-0} + 1 ))" "$LOG_FILE" | tail -n 30 >&2
    echo "----" >&2
  fi
}

# --- subcommands -------------------------------------------------------------------------------
cmd_start() {
  local engine="${ORDERFLOW_BROKER_ENGINE:-sqlite}" keep="${ORDERFLOW_BROKER_KEEP:-0}"
  local timeout="${ORDERFLOW_BROKER_TIMEOUT:-60}" port storage pid

  if pid="$(running_pid)"; then
    die "a broker is already running for $DIR (pid $pid, bootstrap 127.0.0.1:$(cat "$PORT_FILE" 2>/dev/null || echo '?')); use 'stop' or 'restart'"
  fi

  case "$engine" in
    sqlite|memory) ;;
    *) die "ORDERFLOW_BROKER_ENGINE must be 'sqlite' or 'memory', not '$engine'" ;;
  esac

  if [ -n "${ORDERFLOW_BROKER_PORT:-}" ]; then
    port="$ORDERFLOW_BROKER_PORT"
    valid_port "$port" || die "ORDERFLOW_BROKER_PORT='$port' is not a TCP port number"
    port_bindable "$port" \
      || die "port 127.0.0.1:$port is already in use (another broker or program holds it); pick another ORDERFLOW_BROKER_PORT or leave it unset for a free one"
  else
    port="$(free_port)"
  fi

  local tansu
  tansu="$(find_tansu)"

  mkdir -p "$DIR"
  rm -f "$PID_FILE"

  if [ "$engine" = sqlite ]; then
    if [ "$keep" != 1 ]; then
      rm -f "$DIR"/tansu.db "$DIR"/tansu.db-*
    fi
    # tansu 0.6.0 resolves sqlite://HOST/PATH relative to its working directory (an absolute
    # path is not honoured), so the broker runs inside $DIR with a relative database name.
    storage="sqlite://tansu.db"
  else
    storage="memory://tansu/"
  fi

  local url="tcp://127.0.0.1:$port"
  local offset=0
  [ -f "$LOG_FILE" ] && offset="$(wc -c <"$LOG_FILE")"
  {
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) broker.sh start: port $port, engine $engine, keep $keep"
  } >>"$LOG_FILE"

  say "starting tansu on $url (engine $engine, dir $DIR)"
  # Run in its own session (setsid) so a Ctrl-C in the calling terminal does not reach it; the
  # wrapper shell writes its own pid and then execs tansu, so the pid file holds tansu's pid.
  # tansu also reads SCHEMA_REGISTRY (turns on schema validation) and OTEL_EXPORTER_OTLP_ENDPOINT
  # from the environment; the project's own settings must not leak into the broker.
  (
    cd "$DIR"
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner sh
    exec env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
      setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$PID_FILE" \
      "$tansu" broker \
        --cluster-id orderflow \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine "$storage"
  ) </dev/null >>"$LOG_FILE" 2>&1 &
  disown 2>/dev/null || true

  echo "$port" >"$PORT_FILE"
  echo "$engine" >"$ENGINE_FILE"

  local deadline=$(( SECONDS + timeout ))
  pid=""
  while :; do
    if [ -z "$pid" ] && [ -s "$PID_FILE" ]; then pid="$(tr -dc '0-9' <"$PID_FILE")"; fi
    if tail -c +"$((offset + 1))" "$LOG_FILE" | grep -q 'ready in'; then break; fi
    if [ -n "$pid" ] && ! alive "$pid"; then
      log_tail "$offset"
      die "tansu exited during start-up (see $LOG_FILE)"
    fi
    if (( SECONDS > deadline )); then
      log_tail "$offset"
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
      die "tansu did not print 'ready in' within ${timeout}s (see $LOG_FILE)"
    fi
    sleep 0.1
  done

  while ! port_accepting "$port"; do
    if ! alive "$pid"; then
      log_tail "$offset"
      die "tansu exited during start-up (see $LOG_FILE)"
    fi
    if (( SECONDS > deadline )); then
      log_tail "$offset"
      kill -KILL "$pid" 2>/dev/null || true
      die "tansu said ready but 127.0.0.1:$port does not accept connections within ${timeout}s"
    fi
    sleep 0.1
  done

  say "tansu is ready (pid $pid, log $LOG_FILE)"
  echo "127.0.0.1:$port"
}

wait_port_free() {
  local port="$1" deadline=$(( SECONDS + ${2:-15} ))
  while ! port_bindable "$port"; do
    if (( SECONDS >= deadline )); then
      say "warning: port $port is still in use after the broker stopped"
      return 1
    fi
    sleep 0.1
  done
}

cmd_stop() {
  local pid port=""
  [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  if ! pid="$(running_pid)"; then
    say "no broker running for $DIR"
    rm -f "$PID_FILE"
    return 0
  fi
  say "stopping tansu (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(( SECONDS + 10 ))
  while alive "$pid"; do
    if (( SECONDS > deadline )); then
      say "tansu did not exit within 10 s of SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      local kdeadline=$(( SECONDS + 5 ))
      while alive "$pid" && (( SECONDS < kdeadline )); do sleep 0.1; done
      break
    fi
    sleep 0.1
  done
  if alive "$pid"; then
    die "tansu (pid $pid) is still alive after SIGKILL"
  fi
  rm -f "$PID_FILE"
  if [ -n "$port" ]; then
    wait_port_free "$port" || true
  fi
  say "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    echo "127.0.0.1:$(cat "$PORT_FILE")"
    say "running (pid $pid, engine $(cat "$ENGINE_FILE" 2>/dev/null || echo '?'), dir $DIR)"
    return 0
  fi
  say "not running (dir $DIR)"
  return 1
}

cmd_restart() {
  local port="${ORDERFLOW_BROKER_PORT:-}" engine="${ORDERFLOW_BROKER_ENGINE:-}"
  [ -z "$port" ] && [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  [ -z "$engine" ] && [ -f "$ENGINE_FILE" ] && engine="$(cat "$ENGINE_FILE")"
  cmd_stop
  if [ -n "$port" ]; then
    # Only the same port keeps the clients' bootstrap address valid; wait for it harder.
    wait_port_free "$port" 30 || die "port $port is still in use; cannot restart on it"
  fi
  ORDERFLOW_BROKER_PORT="$port" ORDERFLOW_BROKER_ENGINE="${engine:-sqlite}" ORDERFLOW_BROKER_KEEP=1 \
    cmd_start
}

case "${1:-}" in
  start) cmd_start ;;
  install) find_tansu >/dev/null ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_restart ;;
  -h|--help|help) usage 0 ;;
  *) usage 2 ;;
esac
