# shellcheck shell=bash
# Shell functions shared by scripts/broker.sh, scripts/registry.sh and scripts/install-tools.sh.
# Sourced, not executed: `source "$SCRIPT_DIR/lib/common.sh"`. Bash only; safe under
# `set -euo pipefail`; defines functions and nothing else (no variables, no side effects).
#
# The sourcing script defines `die MESSAGE` (prints MESSAGE with its own prefix on stderr, exits 1)
# and `say MESSAGE` (prints it on stderr); the functions below use both for their messages. No
# function prints on stdout except where it says so.
#
# Ports (127.0.0.1 only)
#   have_python              exit 0 when python3 is on PATH
#   valid_port VALUE         exit 0 when VALUE is a TCP port number (1-65535)
#   port_accepting PORT      exit 0 when something accepts TCP connections on PORT now
#   port_bindable PORT       exit 0 when a listener could bind PORT now (SO_REUSEADDR, as tokio and
#                            the JVM do: connections in TIME_WAIT do not count as "in use")
#   wait_port_free PORT [SECONDS] [WHAT]
#                            waits until port_bindable PORT (default 15 s); exit 0 once it is, else
#                            says "warning: port PORT is still in use after WHAT stopped" (WHAT
#                            default "the process") and exits 1
#
# Processes
#   alive PID                exit 0 while PID exists and is not a zombie (an exited daemon whose
#                            new parent has not reaped it yet counts as gone)
#   running_pid PID_FILE CMDLINE_ERE
#                            prints the pid PID_FILE holds and exits 0 if that process is alive
#                            and (where /proc shows it) its command line matches the extended
#                            regex CMDLINE_ERE (a recycled pid is not the daemon); else exits 1
#                            printing nothing
#   stop_pid PID DEADLINE WHAT
#                            SIGTERM to PID, then waits for it to exit; after DEADLINE seconds
#                            says so and sends SIGKILL, then waits up to 5 s more. Exits 0 once
#                            PID is gone; dies ("WHAT (pid PID) is still alive after SIGKILL")
#                            if it survives. WHAT words the messages ("the broker").
#   log_tail LOG_FILE [OFFSET] [LINES]
#                            prints on stderr the last LINES (default 30) lines LOG_FILE got
#                            after byte OFFSET (default 0), framed; nothing if there is no file
#   wait_started CHECK PID_FILE LOG_FILE OFFSET TIMEOUT WHAT NAME [LINES]
#                            start-up wait of a daemon that writes its pid to PID_FILE and logs
#                            to LOG_FILE from byte OFFSET on: every 0.1 s evaluates CHECK (a shell
#                            command string, `eval`ed in the caller's shell) and exits 0 once it
#                            succeeds. Dies, after log_tail LOG_FILE OFFSET LINES, when the
#                            process exits first ("NAME exited during start-up") or TIMEOUT
#                            seconds pass ("no WHAT within TIMEOUTs"; the process gets SIGKILL).
#
# Java
#   java_major JAVA          prints the major version of the java binary JAVA (8, 17, 21, 25);
#                            prints nothing if it does not run. Exit 0 either way.
#   find_java MIN VAR NEEDED_BY
#                            prints a java binary of version MIN or newer and exits 0: the one
#                            the environment variable named VAR holds if it is set (it must
#                            qualify, else dies), else Temurin 25, else the newest qualifying JDK
#                            under /usr/lib/jvm, else `java` on PATH. Dies when none qualifies;
#                            NEEDED_BY ("Apicurio Registry 3.3.3") words that message. Meant for
#                            `java="$(find_java 21 ORDERFLOW_REGISTRY_JAVA "...")"` (die ends the
#                            command substitution; set -e then ends the script).

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "${BASH_SOURCE[0]}: a library of shell functions; source it, do not run it" >&2
  exit 2
fi

# --- ports -------------------------------------------------------------------------------------
have_python() { command -v python3 >/dev/null 2>&1; }

valid_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }

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

wait_port_free() {
  local port="$1" deadline=$(( SECONDS + ${2:-15} )) what="${3:-the process}"
  while ! port_bindable "$port"; do
    if (( SECONDS >= deadline )); then
      say "warning: port $port is still in use after $what stopped"
      return 1
    fi
    sleep 0.1
  done
}

# --- processes ---------------------------------------------------------------------------------
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

running_pid() {
  local pid_file="$1" cmdline_re="$2" pid
  [ -f "$pid_file" ] || return 1
  pid="$(tr -dc '0-9' <"$pid_file")"
  [ -n "$pid" ] || return 1
  alive "$pid" || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Eq "$cmdline_re" || return 1
  fi
  echo "$pid"
}

stop_pid() {
  local pid="$1" limit="$2" what="$3" deadline
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$(( SECONDS + limit ))
  while alive "$pid"; do
    if (( SECONDS > deadline )); then
      say "$what did not exit within $limit s of SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      local kdeadline=$(( SECONDS + 5 ))
      while alive "$pid" && (( SECONDS < kdeadline )); do sleep 0.1; done
      break
    fi
    sleep 0.1
  done
  if alive "$pid"; then die "$what (pid $pid) is still alive after SIGKILL"; fi
}

log_tail() {
  local log_file="$1" offset="${2:-0}" lines="${3:-30}"
  if [ -f "$log_file" ]; then
    echo "---- last lines of $log_file ----" >&2
    tail -c +"$(( offset + 1 ))" "$log_file" | tail -n "$lines" >&2
    echo "----" >&2
  fi
}

wait_started() {
  local check="$1" pid_file="$2" log_file="$3" offset="$4" timeout="$5" what="$6" name="$7"
  local lines="${8:-30}" pid=""
  local deadline=$(( SECONDS + timeout ))
  while :; do
    if [ -z "$pid" ] && [ -s "$pid_file" ]; then pid="$(tr -dc '0-9' <"$pid_file")"; fi
    if eval "$check"; then return 0; fi
    if [ -n "$pid" ] && ! alive "$pid"; then
      log_tail "$log_file" "$offset" "$lines"
      die "$name exited during start-up (see $log_file)"
    fi
    if (( SECONDS > deadline )); then
      log_tail "$log_file" "$offset" "$lines"
      if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
      die "no $what within ${timeout}s (see $log_file)"
    fi
    sleep 0.1
  done
}

# --- java --------------------------------------------------------------------------------------
java_major() {
  "$1" -XshowSettings:properties -version 2>&1 \
    | awk -F'= *' '/java\.specification\.version/ { v = $2; sub(/^1\./, "", v); sub(/\..*/, "", v); print v; exit }'
}

find_java() {
  local min="$1" var="$2" needed_by="$3" j v best="" best_v=0 on_path
  if [ -n "${!var:-}" ]; then
    v="$(java_major "${!var}")"
    if [ -z "$v" ] || (( v < min )); then
      die "$var=${!var} is not a Java $min+ (version '${v:-none}')"
    fi
    echo "${!var}"
    return
  fi
  for j in /usr/lib/jvm/temurin-25-jdk-amd64/bin/java /usr/lib/jvm/*/bin/java "$(command -v java 2>/dev/null || true)"; do
    [ -n "$j" ] && [ -x "$j" ] || continue
    v="$(java_major "$j")"
    [ -n "$v" ] && (( v >= min && v > best_v )) || continue
    best="$j" best_v="$v"
    [[ "$j" == */temurin-25-jdk-amd64/* ]] && break
  done
  if [ -z "$best" ]; then
    on_path="none"
    command -v java >/dev/null 2>&1 && on_path="$(java -version 2>&1 | head -n 1)"
    die "no Java $min+ found ($needed_by needs it): looked at /usr/lib/jvm/temurin-25-jdk-amd64, /usr/lib/jvm/*/bin/java and \`java\` on PATH ($on_path); install a JDK $min+ or set $var"
  fi
  echo "$best"
}
