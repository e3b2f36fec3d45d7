#!/usr/bin/env bash
# Runs a private SQL server in the background for the tests and the demo: PostgreSQL or MariaDB,
# with its data in a directory of its own, on 127.0.0.1 only. Any number of them can run at once
# (one per directory, each on its own port).
#
#   scripts/db.sh start KIND    start a server; creates the database `orderflow` and the user
#                               `orderflow` (password `orderflow`) owning it, and prints the URL
#                               as the last line on stdout (progress goes to stderr):
#                                 postgres://orderflow:orderflow@127.0.0.1:PORT/orderflow
#                                 mysql://orderflow:orderflow@127.0.0.1:PORT/orderflow
#   scripts/db.sh stop [KIND]   stop it (PostgreSQL: SIGINT, its "fast" shutdown, which ends the
#                               open sessions; MariaDB: SIGTERM), SIGKILL to the whole server after
#                               ORDERFLOW_DB_STOP_TIMEOUT seconds, and wait for the port to be free
#   scripts/db.sh status [KIND] exit 0 and print the URL if running, else exit 1
#   scripts/db.sh restart [KIND] stop, then start on the same port keeping the data: every
#                               connection is cut, clients must reconnect
#   scripts/db.sh kill [KIND]   SIGKILL the server and all its processes at once (a crash: the
#                               next `start` with ORDERFLOW_DB_KEEP=1 runs crash recovery)
#   scripts/db.sh install KIND  install the server if missing (scripts/install-tools.sh KIND)
#
#   KIND: postgres or mariadb. `start` and `install` need it; the others read it from the
#   directory (the `kind` file) when ORDERFLOW_DB_DIR is set.
#
# Environment:
#   ORDERFLOW_DB_DIR      state directory (default: $PWD/.db/KIND); holds kind, port, pid,
#                         server.log and data/ (the server's files; PostgreSQL's unix socket is in
#                         data/; MariaDB's is mariadb.sock, its temporary files are in tmp/)
#   ORDERFLOW_DB_PORT     port on 127.0.0.1 (default: a free one; `restart`: the previous one)
#   ORDERFLOW_DB_KEEP     1: keep the existing data instead of starting from an empty server
#   ORDERFLOW_DB_TIMEOUT  seconds to wait until the server accepts connections (default 60); on
#                         failure the tail of server.log is printed and the exit status is 1
#   ORDERFLOW_DB_STOP_TIMEOUT  seconds `stop` waits before SIGKILL (default 30)
#   ORDERFLOW_PG_BINDIR   PostgreSQL only: the directory of postgres and initdb (default: the
#                         newest /usr/lib/postgresql/<version>/bin, else postgres on PATH)
#
# PostgreSQL refuses to run as root: when this script runs as root, initdb and postgres run as the
# `postgres` system user (created when absent), which owns data/ (mode 0700); the state
# directory is then made traversable for it (o+x). Settings: listen_addresses=127.0.0.1,
# max_connections=200, fsync and synchronous_commit left on (the defaults), local connections
# trusted (only root and `postgres` can reach the socket), TCP ones by scram-sha-256 password.
# MariaDB runs with --no-defaults (no /etc/mysql/*.cnf), as root (--user=root) when this script
# runs as root, InnoDB, --skip-name-resolve, max_connections=200; root@localhost has no password
# and connects through the socket only. Either counts as started when it answers on its socket
# (pg_isready / mariadb-admin ping) and accepts TCP connections on 127.0.0.1:PORT.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

die() { echo "db.sh: error: $*" >&2; exit 1; }
say() { echo "db.sh: $*" >&2; }
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

CMD="${1:-}"
KIND_ARG="${2:-}"
case "$CMD" in -h|--help|help) usage 0 ;; start|stop|status|restart|kill|install) ;; *) usage 2 ;; esac
case "$KIND_ARG" in ""|postgres|mariadb) ;; *) die "KIND must be 'postgres' or 'mariadb', not '$KIND_ARG'" ;; esac

# --- state directory ---------------------------------------------------------------------------
if [ -n "${ORDERFLOW_DB_DIR:-}" ]; then
  DIR="$ORDERFLOW_DB_DIR"
elif [ -n "$KIND_ARG" ]; then
  DIR="$PWD/.db/$KIND_ARG"
else
  die "'$CMD' needs KIND (postgres or mariadb) or ORDERFLOW_DB_DIR"
fi
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
DATA="$DIR/data"
PID_FILE="$DIR/pid"
PORT_FILE="$DIR/port"
KIND_FILE="$DIR/kind"
LOG_FILE="$DIR/server.log"
MARIADB_SOCKET="$DIR/mariadb.sock"

# The kind: the argument, else the one this directory ran.
KIND="$KIND_ARG"
if [ -z "$KIND" ] && [ -f "$KIND_FILE" ]; then KIND="$(cat "$KIND_FILE")"; fi
case "$KIND" in
  postgres|mariadb) ;;
  "") [ "$CMD" = install ] || [ "$CMD" = start ] && die "'$CMD' needs KIND (postgres or mariadb)"
      [ "$CMD" = status ] && { say "not running (no server ever ran in $DIR)"; exit 1; }
      say "no server ever ran in $DIR"; exit 0 ;;
  *) die "$KIND_FILE names '$KIND', not postgres or mariadb" ;;
esac
if [ -n "$KIND_ARG" ] && [ -f "$KIND_FILE" ] && [ "$(cat "$KIND_FILE")" != "$KIND_ARG" ] && [ "$CMD" != start ]; then
  die "$DIR holds a $(cat "$KIND_FILE") server, not $KIND_ARG"
fi

# The command line of the process the pid file names, when it really is the server and not a
# recycled pid.
case "$KIND" in
  postgres) SERVER_CMDLINE='postgres' ;;
  mariadb) SERVER_CMDLINE='mariadbd|mysqld' ;;
esac

url_for() {
  case "$KIND" in
    postgres) echo "postgres://orderflow:orderflow@127.0.0.1:$1/orderflow" ;;
    mariadb) echo "mysql://orderflow:orderflow@127.0.0.1:$1/orderflow" ;;
  esac
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

# --- installation ------------------------------------------------------------------------------
pg_bindir() {
  if [ -n "${ORDERFLOW_PG_BINDIR:-}" ]; then echo "$ORDERFLOW_PG_BINDIR"; return; fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$d" ] && [ -x "$d/postgres" ]; then echo "$d"; return; fi
  d="$(command -v postgres 2>/dev/null || true)"
  [ -n "$d" ] && dirname "$d"
  return 0
}

mariadbd_bin() {
  if [ -x /usr/sbin/mariadbd ]; then echo /usr/sbin/mariadbd; return; fi
  command -v mariadbd 2>/dev/null || true
}

installed() {
  case "$KIND" in
    postgres) local b; b="$(pg_bindir)"; [ -n "$b" ] && [ -x "$b/postgres" ] && [ -x "$b/initdb" ] \
                && command -v psql >/dev/null 2>&1 && command -v pg_isready >/dev/null 2>&1 ;;
    mariadb) [ -n "$(mariadbd_bin)" ] && command -v mariadb-install-db >/dev/null 2>&1 \
                && command -v mariadb >/dev/null 2>&1 && command -v mariadb-admin >/dev/null 2>&1 ;;
  esac
}

ensure_installed() {
  installed && return 0
  [ -n "${ORDERFLOW_PG_BINDIR:-}" ] && [ "$KIND" = postgres ] \
    && die "ORDERFLOW_PG_BINDIR=$ORDERFLOW_PG_BINDIR has no postgres and initdb (or psql/pg_isready are not on PATH)"
  say "$KIND is not installed; running scripts/install-tools.sh $KIND"
  ORDERFLOW_SKIP_JUST=1 "$ROOT/scripts/install-tools.sh" "$KIND" >/dev/null || die "scripts/install-tools.sh $KIND failed"
  installed || die "scripts/install-tools.sh $KIND did not install the $KIND programs"
}

# A unix socket path must fit sockaddr_un (107 bytes).
check_socket_path() {
  [ "${#1}" -le 100 ] || die "the unix socket path $1 is ${#1} bytes, over the ~100 a socket path may have; use a shorter ORDERFLOW_DB_DIR"
}

# --- PostgreSQL --------------------------------------------------------------------------------
# Runs a command as the PostgreSQL server's user: `postgres` when we are root (setpriv execs it,
# so the pid stays the same), else ourselves.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups env HOME="$DATA" "$@"
  else
    "$@"
  fi
}

pg_user_setup() {
  [ "$(id -u)" = 0 ] || return 0
  command -v setpriv >/dev/null 2>&1 || die "setpriv (util-linux) is not installed; it runs PostgreSQL as the postgres user"
  if ! id postgres >/dev/null 2>&1; then
    say "creating the system user postgres (PostgreSQL refuses to run as root)"
    # Parallel starts: a concurrent useradd may win; that is fine.
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres 2>/dev/null \
      || id postgres >/dev/null 2>&1 || die "could not create the system user postgres"
  fi
  # postgres must reach $DATA: every directory above it needs search permission for it.
  chmod o+x "$DIR"
  local d="$DIR"
  while [ "$d" != / ]; do
    d="$(dirname "$d")"
    setpriv --reuid=postgres --regid=postgres --init-groups test -x "$d" \
      || die "the postgres user cannot enter $d (above ORDERFLOW_DB_DIR=$DIR); PostgreSQL runs as postgres: pick a directory it can reach (e.g. under /tmp) or chmod o+x $d"
  done
}

# psql as the superuser through the socket in $DATA; the SQL on stdin.
pg_sql() {
  local port="$1"; shift
  psql -X -q -v ON_ERROR_STOP=1 -h "$DATA" -p "$port" -U postgres -d postgres "$@"
}

start_postgres() {
  local port="$1" keep="$2" bin offset
  bin="$(pg_bindir)"
  check_socket_path "$DATA/.s.PGSQL.$port"
  pg_user_setup
  offset=0
  [ -f "$LOG_FILE" ] && offset="$(wc -c <"$LOG_FILE")"
  if [ "$keep" != 1 ] || [ ! -f "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"
    mkdir -m 0700 "$DATA"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) db.sh: initdb" >>"$LOG_FILE"
    as_pg "$bin/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 >>"$LOG_FILE" 2>&1 \
      || { log_tail "$LOG_FILE" "$offset"; die "initdb failed"; }
  fi
  # A server killed with SIGKILL leaves its lock files behind (postmaster.pid and the socket's
  # .s.PGSQL.PORT.lock, both naming its pid). postgres removes them itself when that pid is gone,
  # but not when it is a zombie (kill -0 succeeds): in a container whose init does not reap
  # orphans the killed postmaster stays one. All its processes are dead (cmd_kill killed the
  # whole tree), so such files are stale.
  local lock old_pid
  for lock in "$DATA/postmaster.pid" "$DATA"/.s.PGSQL.*.lock; do
    [ -f "$lock" ] || continue
    old_pid="$(head -n 1 "$lock" | tr -dc '0-9')"
    if [ -z "$old_pid" ] || ! alive "$old_pid"; then rm -f "$lock" "${lock%.lock}"; fi
  done
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) db.sh start: PostgreSQL ($bin) on port $port, keep $keep" >>"$LOG_FILE"
  say "starting PostgreSQL $("$bin/postgres" --version | awk '{ print $3 }') on 127.0.0.1:$port (dir $DIR)"
  local as_user=()
  [ "$(id -u)" = 0 ] && as_user=(setpriv --reuid=postgres --regid=postgres --init-groups env "HOME=$DATA")
  (
    cd "$DATA"
    # setpriv execs postgres (it does not fork, unlike su/runuser): the pid file names the
    # postmaster.
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner sh
    exec setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$PID_FILE" \
      "${as_user[@]+"${as_user[@]}"}" "$bin/postgres" -D "$DATA" -k "$DATA" -p "$port" \
        -c listen_addresses=127.0.0.1 -c max_connections=200 -c logging_collector=off \
        -c unix_socket_permissions=0700
  ) </dev/null >>"$LOG_FILE" 2>&1 &
  disown 2>/dev/null || true
  wait_until "pg_isready -q -h '$DATA' -p $port -U postgres -d postgres" "$offset" "answer from pg_isready on $DATA/.s.PGSQL.$port"
  wait_until "port_accepting $port" "$offset" "connection accepted on 127.0.0.1:$port"
  # The role and the database (again after a KEEP start: no-ops when they exist).
  pg_sql "$port" >>"$LOG_FILE" 2>&1 <<'SQL' || { log_tail "$LOG_FILE" "$offset"; die "creating the orderflow user and database failed"; }
SELECT 'CREATE ROLE orderflow LOGIN PASSWORD ''orderflow'''
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'orderflow') \gexec
SELECT 'CREATE DATABASE orderflow OWNER orderflow'
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'orderflow') \gexec
GRANT ALL PRIVILEGES ON DATABASE orderflow TO orderflow;
SQL
}

# --- MariaDB -----------------------------------------------------------------------------------
# The options every mariadbd and mariadb-install-db run gets (--no-defaults must come first).
mariadb_opts() {
  # A tmpdir of its own: parallel mariadb-install-db runs sharing /tmp trip over each other's
  # temporary tables ("Unknown table 'mysql.tmp_user_sys'").
  local opts=(--no-defaults "--datadir=$DATA" "--socket=$MARIADB_SOCKET" "--tmpdir=$DIR/tmp")
  [ "$(id -u)" = 0 ] && opts+=(--user=root)
  printf '%s\n' "${opts[@]}"
}

mariadb_sql() {
  mariadb --no-defaults --protocol=socket "--socket=$MARIADB_SOCKET" -uroot "$@"
}

start_mariadb() {
  local port="$1" keep="$2" bin offset opts
  bin="$(mariadbd_bin)"
  check_socket_path "$MARIADB_SOCKET"
  mapfile -t opts < <(mariadb_opts)
  mkdir -p "$DIR/tmp"
  offset=0
  [ -f "$LOG_FILE" ] && offset="$(wc -c <"$LOG_FILE")"
  if [ "$keep" != 1 ] || [ ! -d "$DATA/mysql" ]; then
    rm -rf "$DATA"
    mkdir -m 0700 "$DATA"
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) db.sh: mariadb-install-db" >>"$LOG_FILE"
    # --auth-root-authentication-method=normal: root@localhost gets a (blank) password instead of
    # unix_socket authentication, so a non-root run can use it too; it exists for localhost only.
    mariadb-install-db "${opts[@]}" --auth-root-authentication-method=normal --skip-test-db \
      --skip-name-resolve --innodb-log-file-size=16M >>"$LOG_FILE" 2>&1 \
      || { log_tail "$LOG_FILE" "$offset"; die "mariadb-install-db failed"; }
  fi
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) db.sh start: MariaDB ($bin) on port $port, keep $keep" >>"$LOG_FILE"
  say "starting MariaDB $("$bin" --version | awk '{ print $3 }') on 127.0.0.1:$port (dir $DIR)"
  rm -f "$MARIADB_SOCKET"
  (
    cd "$DIR"
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner sh
    exec setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$PID_FILE" \
      "$bin" "${opts[@]}" "--port=$port" --bind-address=127.0.0.1 --skip-name-resolve \
        "--pid-file=$DIR/mariadbd.pid" --max-connections=200 --innodb-log-file-size=16M \
        --innodb-buffer-pool-size=64M --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci
  ) </dev/null >>"$LOG_FILE" 2>&1 &
  disown 2>/dev/null || true
  wait_until "mariadb-admin --no-defaults --protocol=socket '--socket=$MARIADB_SOCKET' -uroot --connect-timeout=2 ping >/dev/null 2>&1" \
    "$offset" "answer from mariadb-admin ping on $MARIADB_SOCKET"
  wait_until "port_accepting $port" "$offset" "connection accepted on 127.0.0.1:$port"
  mariadb_sql >>"$LOG_FILE" 2>&1 <<'SQL' || { log_tail "$LOG_FILE" "$offset"; die "creating the orderflow user and database failed"; }
CREATE DATABASE IF NOT EXISTS orderflow;
CREATE USER IF NOT EXISTS 'orderflow'@'%' IDENTIFIED BY 'orderflow';
CREATE USER IF NOT EXISTS 'orderflow'@'localhost' IDENTIFIED BY 'orderflow';
GRANT ALL PRIVILEGES ON orderflow.* TO 'orderflow'@'%';
GRANT ALL PRIVILEGES ON orderflow.* TO 'orderflow'@'localhost';
DROP USER IF EXISTS ''@'localhost';
FLUSH PRIVILEGES;
SQL
}

# --- subcommands -------------------------------------------------------------------------------
wait_until() {
  wait_started "$1" "$PID_FILE" "$LOG_FILE" "$2" "${ORDERFLOW_DB_TIMEOUT:-60}" "$3" "the $KIND server" 40
}

cmd_start() {
  local keep="${ORDERFLOW_DB_KEEP:-0}" port pid
  ensure_installed
  if pid="$(running_pid "$PID_FILE" "$SERVER_CMDLINE")"; then
    die "a server is already running for $DIR (pid $pid, $(url_for "$(cat "$PORT_FILE" 2>/dev/null || echo '?')")); use 'stop' or 'restart'"
  fi
  if [ -f "$KIND_FILE" ] && [ "$(cat "$KIND_FILE")" != "$KIND" ] && [ "$keep" = 1 ]; then
    die "$DIR holds $(cat "$KIND_FILE") data; ORDERFLOW_DB_KEEP=1 cannot start $KIND on it"
  fi
  if [ -n "${ORDERFLOW_DB_PORT:-}" ]; then
    port="$ORDERFLOW_DB_PORT"
    valid_port "$port" || die "ORDERFLOW_DB_PORT='$port' is not a TCP port number"
    port_bindable "$port" \
      || die "port 127.0.0.1:$port is already in use; pick another ORDERFLOW_DB_PORT or leave it unset for a free one"
  else
    port="$(free_port)"
  fi
  mkdir -p "$DIR"
  rm -f "$PID_FILE"
  echo "$port" >"$PORT_FILE"
  echo "$KIND" >"$KIND_FILE"
  local began=$SECONDS
  case "$KIND" in
    postgres) start_postgres "$port" "$keep" ;;
    mariadb) start_mariadb "$port" "$keep" ;;
  esac
  say "$KIND is ready in $(( SECONDS - began )) s (pid $(cat "$PID_FILE"), log $LOG_FILE)"
  url_for "$port"
}

# Prints the pid $1 and the pids of all its descendants. (Not a process group: PostgreSQL's
# children each call setsid, so a group or session kill would leave them running.)
process_tree() {
  ps -eo pid=,ppid= | awk -v root="$1" '
    { kids[$2] = kids[$2] " " $1 }
    END {
      n = 1; queue[1] = root
      for (i = 1; i <= n; i++) {
        print queue[i]
        m = split(kids[queue[i]], k, " ")
        for (j = 1; j <= m; j++) queue[++n] = k[j]
      }
    }'
}

# SIGKILL to the server $1 and every process it started, at once (stopped first, so it forks no
# new one meanwhile); then waits up to 10 s until they are gone.
kill_tree() {
  local pids p
  kill -STOP "$1" 2>/dev/null || true
  mapfile -t pids < <(process_tree "$1")
  kill -KILL "${pids[@]}" 2>/dev/null || true
  local deadline=$(( SECONDS + 10 ))
  for p in "${pids[@]}"; do
    while alive "$p"; do
      (( SECONDS < deadline )) || die "process $p of the $KIND server is still alive after SIGKILL"
      sleep 0.1
    done
  done
}

cmd_stop() {
  local pid port="" limit="${ORDERFLOW_DB_STOP_TIMEOUT:-30}" sig
  [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  if ! pid="$(running_pid "$PID_FILE" "$SERVER_CMDLINE")"; then
    say "no $KIND server running for $DIR"
    rm -f "$PID_FILE"
    return 0
  fi
  # PostgreSQL's SIGTERM ("smart" shutdown) waits for every client to disconnect; SIGINT ("fast")
  # ends the sessions, like MariaDB's SIGTERM does.
  case "$KIND" in postgres) sig=INT ;; mariadb) sig=TERM ;; esac
  say "stopping $KIND (pid $pid, SIG$sig)"
  kill -"$sig" "$pid" 2>/dev/null || true
  local deadline=$(( SECONDS + limit ))
  while alive "$pid"; do
    if (( SECONDS > deadline )); then
      say "$KIND did not exit within $limit s of SIG$sig; sending SIGKILL"
      kill_tree "$pid"
      break
    fi
    sleep 0.1
  done
  rm -f "$PID_FILE"
  [ -n "$port" ] && { wait_port_free "$port" 15 "the $KIND server" || true; }
  say "stopped"
}

cmd_kill() {
  local pid port=""
  [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  if ! pid="$(running_pid "$PID_FILE" "$SERVER_CMDLINE")"; then
    say "no $KIND server running for $DIR"
    rm -f "$PID_FILE"
    return 0
  fi
  say "killing $KIND (pid $pid and its processes, SIGKILL)"
  kill_tree "$pid"
  rm -f "$PID_FILE"
  [ -n "$port" ] && { wait_port_free "$port" 15 "the $KIND server" || true; }
  say "killed"
}

cmd_status() {
  local pid
  if pid="$(running_pid "$PID_FILE" "$SERVER_CMDLINE")"; then
    url_for "$(cat "$PORT_FILE")"
    say "running: $KIND (pid $pid, dir $DIR)"
    return 0
  fi
  say "not running (dir $DIR)"
  return 1
}

cmd_restart() {
  local port="${ORDERFLOW_DB_PORT:-}"
  [ -z "$port" ] && [ -f "$PORT_FILE" ] && port="$(tr -dc '0-9' <"$PORT_FILE")"
  cmd_stop
  if [ -n "$port" ]; then
    # Only the same port keeps the clients' URL valid; wait for it harder.
    wait_port_free "$port" 30 "the $KIND server" || die "port $port is still in use; cannot restart on it"
  fi
  ORDERFLOW_DB_PORT="$port" ORDERFLOW_DB_KEEP=1 cmd_start
}

case "$CMD" in
  start) cmd_start ;;
  install) ensure_installed ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_restart ;;
  kill) cmd_kill ;;
esac
