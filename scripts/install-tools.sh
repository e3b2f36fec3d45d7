#!/usr/bin/env bash
# Installs the tools orderflow needs outside the Rust workspace, once per machine, into
# $ORDERFLOW_TOOLS (default ~/.cache/orderflow/tools), so fresh clones and CI runs on the same
# machine reuse them. Idempotent: a tool already present is left alone.
#
#   scripts/install-tools.sh [TOOL...]     TOOL: kafka | tansu | just | interop | registry |
#                                          postgres | mariadb | wrk (default: kafka tansu just)
#
#   kafka  Apache Kafka $ORDERFLOW_KAFKA_VERSION (default 4.1.1), the reference broker: the jars of
#          org.apache.kafka:kafka_2.13 and a log4j2 SLF4J binding from Maven Central
#          (scripts/kafka/pom.xml) into $ORDERFLOW_TOOLS/kafka-<version>/libs. Needs java (17+)
#          and mvn. ~10 s with a warm ~/.m2, under a minute without.
#   tansu  tansu 0.6.0, the transaction-less second broker (docs/broker.md), built from
#          crates.io with cargo: ~9 minutes on 2 cores the first time.
#   just   the task runner (Justfile); skipped when ORDERFLOW_SKIP_JUST=1 or already on PATH.
#   registry  (not a default) Apicurio Registry $ORDERFLOW_REGISTRY_VERSION (default 3.3.3), a
#          schema registry with the Confluent-compatible API, for scripts/registry.sh: the built
#          Quarkus application Apicurio publishes on Maven Central (io.apicurio:
#          apicurio-registry-app:<version>:tar.gz:all, scripts/registry/pom.xml) unpacked into
#          $ORDERFLOW_TOOLS/apicurio-registry-<version> (quarkus-run.jar). Needs mvn, and a Java
#          21+ to run it (ORDERFLOW_REGISTRY_JAVA, else Temurin 25 or another JDK 21+ under
#          /usr/lib/jvm, else `java` if it is 21+). ~5 s with a warm ~/.m2 (160 MB download cold).
#   interop  (not a default) the foreign-language interop clients of tests/interop/: a venv at
#          $ORDERFLOW_TOOLS/interop-venv with tests/interop/python/requirements.txt (fastavro,
#          confluent-kafka) from pip, and the Java client (Avro + kafka-clients from Maven Central)
#          built with mvn into $ORDERFLOW_TOOLS/interop/orderflow-interop.jar. Each part is redone
#          only when its sources change (a hash of them in .complete). Needs python3 (venv), java
#          (17+) and mvn. ~15 s with warm caches.
#   postgres  (not a default) a PostgreSQL server for scripts/db.sh: Debian's `postgresql` package
#          (postgres, initdb under /usr/lib/postgresql/<version>/bin; psql, pg_isready) with
#          apt-get, when no server is installed yet. System-wide, not in $ORDERFLOW_TOOLS.
#   mariadb  (not a default) a MariaDB server for scripts/db.sh: Debian's `mariadb-server` package
#          (mariadbd, mariadb-install-db, mariadb, mariadb-admin) with apt-get, when missing.
#          ~12 s with its 18 dependencies (27 MB) from a Debian mirror.
#   wrk  (not a default) the HTTP load generator of the inventory API benchmark (scripts/bench-api):
#          Debian's `wrk` package (4.1, LuaJIT scripting) with apt-get, when `wrk` is not on PATH.
#          postgres, mariadb and wrk: apt-get install -y --no-install-recommends, as root (else through `sudo -n`);
#          `apt-get update` first only when the package has no install candidate, or the install
#          failed on stale package lists, and at most once an hour ($ORDERFLOW_TOOLS/.apt-updated).
#          Concurrent installs wait for each other (flock on $ORDERFLOW_TOOLS/.apt.lock). The
#          packages' own services are not left running (a policy-rc.d that denies starts is put in
#          place for the install when there is none; one that started anyway is stopped):
#          scripts/db.sh runs private servers.
#
# Prints the tools' bin directory on stdout.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="${ORDERFLOW_TOOLS:-$HOME/.cache/orderflow/tools}"
KAFKA_VERSION="${ORDERFLOW_KAFKA_VERSION:-4.1.1}"
REGISTRY_VERSION="${ORDERFLOW_REGISTRY_VERSION:-3.3.3}"
mkdir -p "$TOOLS"

say() { echo "install-tools.sh: $*" >&2; }
die() { echo "install-tools.sh: error: $*" >&2; exit 1; }
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$SCRIPT_DIR/lib/common.sh"

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

# Apicurio 3.x targets Java 21; 2.x ran on 17.
registry_java_min() { case "$REGISTRY_VERSION" in 2.*) echo 17 ;; *) echo 21 ;; esac; }

install_registry() {
  local home="$TOOLS/apicurio-registry-$REGISTRY_VERSION" java
  [ -f "$home/.complete" ] && return 0
  # ORDERFLOW_REGISTRY_JAVA if set, else Temurin 25, else the newest JDK under /usr/lib/jvm, else
  # `java` on PATH (scripts/registry.sh runs it with the same search).
  java="$(find_java "$(registry_java_min)" ORDERFLOW_REGISTRY_JAVA "Apicurio Registry $REGISTRY_VERSION")"
  command -v mvn >/dev/null 2>&1 || die "mvn is not on PATH (Apicurio Registry comes from Maven Central through Maven)"
  say "installing Apicurio Registry $REGISTRY_VERSION from Maven Central into $home (runs on $java)"
  rm -rf "$home"
  mkdir -p "$home"
  # Maven itself runs on its usual java; the registry only needs the newer one to run.
  mvn -B -q -f "$SCRIPT_DIR/registry/pom.xml" package \
    -Dapicurio.version="$REGISTRY_VERSION" -Dregistry.home="$home" >&2 \
    || die "mvn could not fetch io.apicurio:apicurio-registry-app:$REGISTRY_VERSION:tar.gz:all"
  rm -rf "$home/.markers"
  [ -f "$home/quarkus-run.jar" ] && [ -d "$home/lib/main" ] \
    || die "$home/quarkus-run.jar or lib/main is missing after unpacking"
  echo "$REGISTRY_VERSION" >"$home/.complete"
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

# The interop clients of tests/interop/ (Python venv + Java jar); each part is rebuilt only when
# the hash of its sources differs from the one its .complete holds.
install_interop() {
  local src="$SCRIPT_DIR/../tests/interop" venv="$TOOLS/interop-venv" out="$TOOLS/interop" hash
  [ -f "$src/python/requirements.txt" ] && [ -f "$src/java/pom.xml" ] || die "tests/interop is missing"
  command -v python3 >/dev/null 2>&1 || die "python3 is not on PATH (the interop venv needs it)"
  command -v java >/dev/null 2>&1 || die "java is not on PATH (the interop jar needs Java 17+)"
  command -v mvn >/dev/null 2>&1 || die "mvn is not on PATH (the interop jar is built with Maven)"

  # Python: the requirements and the interpreter the venv is made from.
  hash="$( { python3 --version; cat "$src/python/requirements.txt"; } 2>&1 | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.complete" 2>/dev/null)" != "$hash" ]; then
    say "installing the Python interop client's packages into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed"
    "$venv/bin/pip" install -q -r "$src/python/requirements.txt" >&2 \
      || die "pip could not install tests/interop/python/requirements.txt"
    "$venv/bin/python" -c 'import confluent_kafka, fastavro, confluent_kafka.schema_registry' >&2 \
      || die "the interop venv cannot import confluent_kafka and fastavro"
    echo "$hash" >"$venv/.complete"
  fi

  # Java: pom.xml and every source file (paths and contents).
  hash="$(cd "$src/java" && find pom.xml src -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$out/orderflow-interop.jar" ] || [ "$(cat "$out/.complete" 2>/dev/null)" != "$hash" ]; then
    say "building the Java interop client into $out"
    mvn -B -q -f "$src/java/pom.xml" package >&2 || die "mvn could not build tests/interop/java"
    [ -f "$src/java/target/orderflow-interop.jar" ] || die "mvn built no tests/interop/java/target/orderflow-interop.jar"
    mkdir -p "$out"
    rm -f "$out/.complete"
    cp "$src/java/target/orderflow-interop.jar" "$out/orderflow-interop.jar.tmp"
    mv -f "$out/orderflow-interop.jar.tmp" "$out/orderflow-interop.jar"
    echo "$hash" >"$out/.complete"
  fi
}

# --- Debian packages (postgres, mariadb, wrk) --------------------------------------------------------
APT_MARKER="$TOOLS/.apt-updated"

# Prints the command prefix that runs a command as root: nothing when we are root, `sudo -n` when
# that works; dies otherwise.
as_root_prefix() {
  if [ "$(id -u)" = 0 ]; then return 0; fi
  command -v sudo >/dev/null 2>&1 || die "installing $1 needs root (apt-get) and sudo is not installed; run as root"
  sudo -n true 2>/dev/null || die "installing $1 needs root (apt-get): 'sudo -n' asks for a password; run 'sudo -v' first or run as root"
  echo "sudo -n"
}

# The newest PostgreSQL server bin directory (Debian: /usr/lib/postgresql/<version>/bin), else
# the directory of `postgres` on PATH; prints nothing when there is no server.
pg_bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$d" ] && [ -x "$d/postgres" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  d="$(command -v postgres 2>/dev/null || true)"
  if [ -n "$d" ] && [ -x "$(dirname "$d")/initdb" ]; then dirname "$d"; fi
  return 0
}

have_postgres() { [ -n "$(pg_bindir)" ] && command -v psql >/dev/null 2>&1 && command -v pg_isready >/dev/null 2>&1; }

have_mariadb() {
  { [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1; } \
    && command -v mariadb-install-db >/dev/null 2>&1 && command -v mariadb >/dev/null 2>&1 \
    && command -v mariadb-admin >/dev/null 2>&1
}

# apt_install WHAT PACKAGE...: installs the Debian packages (and nothing they only recommend).
apt_install() {
  local what="$1"; shift
  local root began=$SECONDS
  command -v apt-get >/dev/null 2>&1 || die "$what is not installed and there is no apt-get here; install the packages $* yourself"
  root="$(as_root_prefix "$what")"
  # One apt at a time: parallel scripts/db.sh calls may all find the server missing.
  exec 9>>"$TOOLS/.apt.lock"
  flock 9
  # Another caller may have installed it while this one waited for the lock.
  if "have_$what"; then exec 9>&-; return 0; fi
  say "installing $what from Debian packages: $*"
  local update_needed=0 pkg updated=0 policy_out
  for pkg in "$@"; do
    # (Captured first: `grep -q` closing the pipe early would fail the pipeline under pipefail.)
    policy_out="$(apt-cache policy "$pkg" 2>/dev/null || true)"
    grep -q 'Candidate: [^(]' <<<"$policy_out" || update_needed=1
  done
  # Services are ours to start (scripts/db.sh); Debian's postinst must not start its own. A
  # policy-rc.d exiting 101 tells invoke-rc.d so; one that is there already is left alone.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    $root sh -c "printf '#!/bin/sh\n# scripts/install-tools.sh: no service starts during the install\nexit 101\n' >$policy && chmod 755 $policy" \
      && own_policy=1
  fi
  local status=0
  apt_update_once() {
    [ "$updated" = 1 ] && return 0
    if [ -f "$APT_MARKER" ] && [ -n "$(find "$APT_MARKER" -mmin -60 2>/dev/null)" ]; then
      say "apt-get update ran less than an hour ago ($APT_MARKER); not repeating it"
      updated=1
      return 0
    fi
    say "apt-get update"
    $root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
    touch "$APT_MARKER"
    updated=1
  }
  if [ "$update_needed" = 1 ]; then apt_update_once || status=$?; fi
  if [ "$status" = 0 ]; then
    $root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o DPkg::Lock::Timeout=300 "$@" >&2 || status=$?
    # Stale package lists (a 404 for a superseded version): update once and try again.
    if [ "$status" != 0 ] && [ "$updated" = 0 ]; then
      say "apt-get install failed; updating the package lists and trying once more"
      status=0
      apt_update_once || status=$?
      [ "$status" = 0 ] && { $root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "$@" >&2 || status=$?; }
    fi
  fi
  if [ "$own_policy" = 1 ]; then $root rm -f "$policy" || true; fi
  stop_packaged_services "$what" "$root"
  exec 9>&-
  [ "$status" = 0 ] || die "apt-get install $* failed (status $status)"
  "have_$what" || die "apt-get installed $* but the $what programs are still missing"
  say "installed $what in $(( SECONDS - began )) s"
}

# Stops the Debian-packaged service of $1 if its postinst started it anyway (an existing
# policy-rc.d that allows starts, or a real init): only the system instance, identified by its
# pid file under /run, never a private server of scripts/db.sh.
stop_packaged_services() {
  local what="$1" root="$2" pid_file pid
  case "$what" in
    mariadb) set -- /run/mysqld/mysqld.pid ;;
    postgres) set -- /run/postgresql/*.pid ;;
    *) return 0 ;;
  esac
  for pid_file in "$@"; do
    [ -f "$pid_file" ] || continue
    pid="$(head -n 1 "$pid_file" | tr -dc '0-9')"
    [ -n "$pid" ] && alive "$pid" || continue
    say "stopping the $what service the package started (pid $pid, $pid_file): scripts/db.sh runs private servers"
    if [ "$what" = postgres ]; then
      $root kill -INT "$pid" 2>/dev/null || true   # fast shutdown
    else
      $root kill -TERM "$pid" 2>/dev/null || true
    fi
    local deadline=$(( SECONDS + 30 ))
    while alive "$pid" && (( SECONDS < deadline )); do sleep 0.2; done
    alive "$pid" && say "warning: the $what service (pid $pid) is still running"
  done
  return 0
}

install_postgres() {
  have_postgres && return 0
  apt_install postgres postgresql
}

install_mariadb() {
  have_mariadb && return 0
  apt_install mariadb mariadb-server
}

have_wrk() { command -v wrk >/dev/null 2>&1; }

install_wrk() {
  have_wrk && return 0
  apt_install wrk wrk
}

[ "$#" -gt 0 ] || set -- kafka tansu just
for tool in "$@"; do
  case "$tool" in
    kafka) install_kafka ;;
    tansu) install_tansu ;;
    just) install_just ;;
    interop) install_interop ;;
    registry) install_registry ;;
    postgres) install_postgres ;;
    mariadb) install_mariadb ;;
    wrk) install_wrk ;;
    *) die "unknown tool '$tool' (kafka, tansu, just, interop, registry, postgres, mariadb or wrk)" ;;
  esac
done
echo "$TOOLS/bin"
