#!/usr/bin/env bash
# Local stack for development, `make demo` and the test suite: real Apache Kafka (KRaft,
# single node), Apicurio Registry (Confluent-compatible API) and, optionally, the goccy
# BigQuery emulator, all as plain background processes on 127.0.0.1 (no Docker).
# Run `deploy/local/stack.sh --help` for the interface; deploy/local/README.md explains more.
set -euo pipefail

readonly KAFKA_VERSION=4.1.1
readonly APICURIO_VERSION=3.3.3
# "kafka" is the single node; a --brokers 3 cluster runs kafka-1, kafka-2 and kafka-3
readonly COMPONENTS=(kafka kafka-1 kafka-2 kafka-3 registry bigquery)
readonly MAX_BROKERS=3
BROKERS=1 # Kafka nodes of the stack: 1, or 3 with `up --brokers 3`

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
PROG=stack.sh

usage() {
  cat <<EOF
Usage: deploy/local/stack.sh COMMAND [OPTIONS]

Commands:
  up [--brokers 1|3] [--with-bigquery] [--with-sasl]
              download what is missing (cached), start Kafka ${KAFKA_VERSION} (KRaft) and
              Apicurio Registry ${APICURIO_VERSION} on 127.0.0.1 (and the BigQuery emulator with
              --with-bigquery; a SASL_SSL/PLAIN listener with --with-sasl), wait until they
              answer, then print 'export NAME=value' lines on stdout (progress goes to stderr):
                export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<port>
                export SCHEMA_REGISTRY_URL=http://127.0.0.1:<port>/apis/ccompat/v7
                export TOPIC_REPLICATION_FACTOR=1
              with --with-bigquery:
                export PRODUCER_BIGQUERY_API_ENDPOINT=http://127.0.0.1:<port>
                export PRODUCER_WAREHOUSE=bigquery://<project>
                export STACK_BIGQUERY_DATASET=<dataset>
              with --with-sasl:
                export STACK_KAFKA_SASL_BOOTSTRAP=127.0.0.1:<port>
                export STACK_KAFKA_SSL_CA_LOCATION=<STACK_DIR>/tls/ca.pem
              with --brokers 3 (a three-node KRaft cluster, each node broker and controller;
              replication factor 3 and min.insync.replicas=2 for every topic it creates):
                export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>
                export TOPIC_REPLICATION_FACTOR=3
                export STACK_KAFKA_BROKERS=3
              Typical use: eval "\$(deploy/local/stack.sh up)"
  stop-broker N [--kill]
              stop Kafka node N (1..3; 1 is the single node) of the running stack, gracefully
              (SIGTERM, SIGKILL after ~20 s) or at once with --kill; the rest keeps running
  start-broker N
              start a stopped node again on its ports and data, and wait until it is ready
  env         print the export lines of the running stack again
  down [--purge]
              stop what 'up' started (by recorded pid: SIGTERM, then SIGKILL after ~20 s);
              keeps data and logs unless --purge, which deletes STACK_DIR
  status      one line per component: running/stopped, pid, port
              (exit 0 when every started component runs, 3 otherwise)
  paths       print STACK_DIR=... and STACK_CACHE_DIR=... as resolved (creates nothing)
  -h, --help  this text

Environment (all optional; a port of 0 means "pick a free port"):
  STACK_DIR                      state: config, data, logs, pids, tls, env
                                 (default deploy/local/.state)
  STACK_CACHE_DIR                downloads and builds, shared by every clone and stack of
                                 the user (default \${XDG_CACHE_HOME:-\$HOME/.cache}/field-alerts);
                                 the first --with-bigquery builds the emulator there once
                                 (about 15 minutes on 2 cores)
  STACK_KAFKA_PORT               Kafka PLAINTEXT listener (default 9092; of node 1 with
                                 --brokers 3, the other nodes take free ports)
  STACK_KAFKA_CONTROLLER_PORT    KRaft controller listener (default 9093; node 1)
  STACK_KAFKA_SASL_PORT          SASL_SSL listener, with --with-sasl (default 9094)
  STACK_REGISTRY_PORT            Apicurio Registry HTTP port (default 8081)
  STACK_REGISTRY_MANAGEMENT_PORT registry's Quarkus management interface (default 0)
  STACK_BIGQUERY_PORT            BigQuery emulator REST port (default 9050)
  STACK_BIGQUERY_GRPC_PORT       BigQuery emulator gRPC port (default 9060)
  STACK_BIGQUERY_PROJECT         emulator project id (default local-project)
  STACK_BIGQUERY_DATASET         dataset created in the emulator at start (default alerts)
  STACK_SASL_USERNAME            SASL/PLAIN user, with --with-sasl (default alerts)
  STACK_SASL_PASSWORD            its password (default alerts-secret)
  STACK_START_TIMEOUT_S          seconds to wait for each component (default 120)
  STACK_JAVA21_HOME              JDK 21+ for the registry (else JAVA_HOME, PATH, /usr/lib/jvm/*)
  STACK_KAFKA_HEAP               Kafka's -Xmx per node (default 768m; 512m with --brokers 3)
  STACK_REGISTRY_HEAP            registry's -Xmx (default 512m)
  STACK_KAFKA_AUTO_CREATE_TOPICS auto.create.topics.enable of the broker (default true)
  STACK_REGISTRY_COMPATIBILITY   global compatibility rule of the registry, like Confluent
                                 Schema Registry's default (default BACKWARD; NONE disables)
  STACK_CDS                      1 (default): keep JVM class data archives in the cache dir
                                 for faster starts; 0 disables
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# ---------------------------------------------------------------- settings and paths

abs_dir() { # abs_dir DIR [create]: absolute path of DIR
  local d=$1
  if [[ ${2:-} == create ]]; then mkdir -p -- "$d"; fi
  if [[ -d $d ]]; then (cd -- "$d" && pwd -P); else
    case $d in /*) printf '%s\n' "$d" ;; *) printf '%s/%s\n' "$PWD" "$d" ;; esac
  fi
}

load_settings() {
  STACK_DIR=$(abs_dir "${STACK_DIR:-$SCRIPT_DIR/.state}")
  PIDS_DIR=$STACK_DIR/pids
  LOGS_DIR=$STACK_DIR/logs
  ENV_FILE=$STACK_DIR/env
}

# Downloads and builds live in the user's cache directory (XDG base directory spec: an unset,
# empty or relative XDG_CACHE_HOME means ~/.cache), so a second clone reuses the ~230 MB of
# downloads and the 15-minute emulator build instead of redoing them.
default_cache_dir() {
  local base=${XDG_CACHE_HOME:-}
  if [[ $base != /* ]]; then
    [[ -n ${HOME:-} ]] || die "neither XDG_CACHE_HOME nor HOME is set; set STACK_CACHE_DIR"
    base=$HOME/.cache
  fi
  printf '%s/field-alerts\n' "${base%/}"
}

cache_dir() { # the cache dir as configured, absolute; CREATE as 'create' makes it
  local d
  if [[ -n ${STACK_CACHE_DIR:-} ]]; then d=$STACK_CACHE_DIR; else d=$(default_cache_dir); fi
  abs_dir "$d" "${1:-}"
}

load_up_settings() {
  STACK_CACHE_DIR=$(cache_dir create)
  KAFKA_PORT=${STACK_KAFKA_PORT:-9092}
  KAFKA_CONTROLLER_PORT=${STACK_KAFKA_CONTROLLER_PORT:-9093}
  KAFKA_SASL_PORT=${STACK_KAFKA_SASL_PORT:-9094}
  REGISTRY_PORT=${STACK_REGISTRY_PORT:-8081}
  REGISTRY_MGMT_PORT=${STACK_REGISTRY_MANAGEMENT_PORT:-0}
  BIGQUERY_PORT=${STACK_BIGQUERY_PORT:-9050}
  BIGQUERY_GRPC_PORT=${STACK_BIGQUERY_GRPC_PORT:-9060}
  BIGQUERY_PROJECT=${STACK_BIGQUERY_PROJECT:-local-project}
  BIGQUERY_DATASET=${STACK_BIGQUERY_DATASET:-alerts}
  SASL_USERNAME=${STACK_SASL_USERNAME:-alerts}
  SASL_PASSWORD=${STACK_SASL_PASSWORD:-alerts-secret}
  START_TIMEOUT_S=${STACK_START_TIMEOUT_S:-120}
  if ((BROKERS > 1)); then KAFKA_HEAP=${STACK_KAFKA_HEAP:-512m}; else KAFKA_HEAP=${STACK_KAFKA_HEAP:-768m}; fi
  REGISTRY_HEAP=${STACK_REGISTRY_HEAP:-512m}
  KAFKA_AUTO_CREATE_TOPICS=${STACK_KAFKA_AUTO_CREATE_TOPICS:-true}
  REGISTRY_COMPATIBILITY=${STACK_REGISTRY_COMPATIBILITY:-BACKWARD}

  local name value
  for name in STACK_KAFKA_PORT STACK_KAFKA_CONTROLLER_PORT STACK_KAFKA_SASL_PORT \
    STACK_REGISTRY_PORT STACK_REGISTRY_MANAGEMENT_PORT STACK_BIGQUERY_PORT \
    STACK_BIGQUERY_GRPC_PORT; do
    value=${!name:-0}
    if ! [[ $value =~ ^[0-9]+$ ]] || ((value > 65535)); then
      die "$name must be a port number (0 picks a free one), got '$value'"
    fi
  done
  if ! [[ $START_TIMEOUT_S =~ ^[0-9]+$ ]] || ((START_TIMEOUT_S == 0)); then
    die "STACK_START_TIMEOUT_S must be a positive number of seconds, got '$START_TIMEOUT_S'"
  fi
  [[ $KAFKA_HEAP =~ ^[0-9]+[kKmMgG]?$ ]] || die "STACK_KAFKA_HEAP must look like 768m, got '$KAFKA_HEAP'"
  [[ $REGISTRY_HEAP =~ ^[0-9]+[kKmMgG]?$ ]] || die "STACK_REGISTRY_HEAP must look like 512m, got '$REGISTRY_HEAP'"
  [[ $KAFKA_AUTO_CREATE_TOPICS =~ ^(true|false)$ ]] ||
    die "STACK_KAFKA_AUTO_CREATE_TOPICS must be true or false, got '$KAFKA_AUTO_CREATE_TOPICS'"
  REGISTRY_COMPATIBILITY=${REGISTRY_COMPATIBILITY^^}
  [[ $REGISTRY_COMPATIBILITY =~ ^(NONE|BACKWARD|BACKWARD_TRANSITIVE|FORWARD|FORWARD_TRANSITIVE|FULL|FULL_TRANSITIVE)$ ]] ||
    die "STACK_REGISTRY_COMPATIBILITY must be NONE, BACKWARD, FORWARD, FULL or one of their _TRANSITIVE forms, got '$REGISTRY_COMPATIBILITY'"
  [[ $BIGQUERY_PROJECT =~ ^[a-z][a-z0-9-]*$ ]] ||
    die "STACK_BIGQUERY_PROJECT must be a project id (lower-case letters, digits, '-'), got '$BIGQUERY_PROJECT'"
  [[ $BIGQUERY_DATASET =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
    die "STACK_BIGQUERY_DATASET must be a dataset id (letters, digits, '_'), got '$BIGQUERY_DATASET'"
  [[ $SASL_USERNAME =~ ^[A-Za-z0-9._@-]+$ ]] ||
    die "STACK_SASL_USERNAME may only contain letters, digits and . _ @ -"
  [[ -n $SASL_PASSWORD && $SASL_PASSWORD != *[\"\\]* && $SASL_PASSWORD != *$'\n'* ]] ||
    die "STACK_SASL_PASSWORD must be non-empty and contain no double quote, backslash or newline"
}

# ---------------------------------------------------------------- small helpers

now_s() { date +%s; }

# Export line, quoted for a shell only when the value needs it.
export_line() {
  local name=$1 value=$2
  if [[ $value =~ ^[A-Za-z0-9_./:@%+=,-]*$ ]]; then
    printf 'export %s=%s\n' "$name" "$value"
  else
    printf 'export %s=%q\n' "$name" "$value"
  fi
}

port_in_use() { # something accepts connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Ports picked for "0" are claimed in a per-user directory until `up` ends, so parallel
# `up`s (pytest sessions) do not pick the same port before their servers have bound it.
PORT_CLAIMS_DIR=${TMPDIR:-/tmp}/stack-sh-ports-$(id -u)
CLAIMED_PORTS=()

claim_port() {
  mkdir -p "$PORT_CLAIMS_DIR"
  # Claims left behind by a killed `up` expire after 15 minutes.
  find "$PORT_CLAIMS_DIR" -mindepth 1 -maxdepth 1 -type d -mmin +15 -exec rmdir {} + 2>/dev/null || true
  mkdir "$PORT_CLAIMS_DIR/$1" 2>/dev/null || return 1
  CLAIMED_PORTS+=("$1")
}

release_ports() {
  local p
  for p in "${CLAIMED_PORTS[@]}"; do rmdir "$PORT_CLAIMS_DIR/$p" 2>/dev/null || true; done
  CLAIMED_PORTS=()
}

pick_free_port() { # below the Linux ephemeral range (32768+) so outgoing connections never hold it
  local p i
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 12000))
    if ! port_in_use "$p" && claim_port "$p"; then
      printf '%s\n' "$p"
      return 0
    fi
  done
  die "could not find a free port on 127.0.0.1"
}

resolve_port() { # resolve_port VAR KNOB: 0 -> a free port; else check it is free
  local var=$1 knob=$2 p
  p=${!var}
  if [[ $p == 0 ]]; then
    p=$(pick_free_port)
    CLAIMED_PORTS+=("$p") # pick_free_port ran in a subshell
  else
    port_in_use "$p" && die "port $p ($knob) is already in use on 127.0.0.1; set $knob to another port, or to 0 to pick a free one"
  fi
  printf -v "$var" '%s' "$p"
}

java_major() { # major version of the java binary $1, empty if it does not run
  local line ver
  line=$("$1" -version 2>&1 | grep -m1 -E 'version "' || true)
  ver=${line#*version \"}
  ver=${ver%%\"*}
  [[ -n $ver && $ver != "$line" ]] || return 0
  if [[ $ver == 1.* ]]; then ver=${ver#1.}; fi
  printf '%s\n' "${ver%%[.+-]*}"
}

find_java() { # find_java MIN: path of a java binary of at least version MIN
  local min=$1 cand major
  local -a cands=()
  [[ -n ${JAVA_HOME:-} ]] && cands+=("$JAVA_HOME/bin/java")
  command -v java >/dev/null 2>&1 && cands+=("$(command -v java)")
  for cand in /usr/lib/jvm/*/bin/java /Library/Java/JavaVirtualMachines/*/Contents/Home/bin/java; do
    [[ -x $cand ]] && cands+=("$cand")
  done
  for cand in "${cands[@]}"; do
    [[ -x $cand ]] || continue
    major=$(java_major "$cand")
    if [[ -n $major ]] && ((major >= min)); then
      printf '%s\n' "$cand"
      return 0
    fi
  done
  return 1
}

# ---------------------------------------------------------------- process bookkeeping

pid_file() { printf '%s/%s.pid\n' "$PIDS_DIR" "$1"; }

proc_start_time() { ps -o lstart= -p "$1" 2>/dev/null | sed 's/^ *//;s/ *$//'; }

# Pid of a running component (pid file: "<pid>\n<start time>"), nothing when it is stopped.
# The start time guards against a recycled pid.
component_pid() {
  local f pid started
  f=$(pid_file "$1")
  [[ -f $f ]] || return 1
  { read -r pid && read -r started; } <"$f" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  [[ $(proc_start_time "$pid") == "$started" ]] || return 1
  printf '%s\n' "$pid"
}

STARTED=() # components this `up` started

# start_bg NAME WORKDIR CMD...: start CMD in its own session, stdin from /dev/null and
# stdout/stderr appended to the component's log; the pid is recorded in pids/NAME.pid.
start_bg() {
  local name=$1 workdir=$2
  shift 2
  local log=$LOGS_DIR/$name.log pf tmp pid i
  pf=$(pid_file "$name")
  tmp=$pf.starting
  rm -f -- "$tmp"
  local -a launcher=()
  command -v setsid >/dev/null 2>&1 && launcher=(setsid)
  (
    cd -- "$workdir"
    # shellcheck disable=SC2016 # expanded by the inner bash
    exec "${launcher[@]}" bash -c 'echo "$$" >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$tmp" "$@"
  ) </dev/null >>"$log" 2>&1 8>&- 9>&- &
  for ((i = 0; i < 100; i++)); do
    [[ -s $tmp ]] && break
    sleep 0.05
  done
  [[ -s $tmp ]] || die "$name did not start (see $log)"
  pid=$(<"$tmp")
  printf '%s\n%s\n' "$pid" "$(proc_start_time "$pid")" >"$pf"
  rm -f -- "$tmp"
  STARTED+=("$name")
}

# stop_components NAME...: SIGTERM to each process group, wait up to ~20 s, then SIGKILL.
stop_components() {
  local name pid f
  local -a pids=() names=() groups=()
  for name in "$@"; do
    if pid=$(component_pid "$name"); then
      say "stopping $name (pid $pid)"
      # our launcher makes each component the leader of its own process group: signal the
      # group, so that anything it started goes too
      if [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') == "$pid" ]]; then
        groups+=(1)
        kill -s TERM -- "-$pid" 2>/dev/null || true
      else
        groups+=(0)
        kill -s TERM "$pid" 2>/dev/null || true
      fi
      pids+=("$pid")
      names+=("$name")
    fi
  done
  local i j alive
  for ((i = 0; i < 200; i++)); do
    alive=0
    for j in "${!pids[@]}"; do
      if tree_alive "${pids[$j]}" "${groups[$j]}"; then alive=1; fi
    done
    ((alive)) || break
    sleep 0.1
  done
  for j in "${!pids[@]}"; do
    if tree_alive "${pids[$j]}" "${groups[$j]}"; then
      say "${names[$j]} (pid ${pids[$j]}) did not stop within 20 s: SIGKILL"
      if ((groups[j])); then
        kill -s KILL -- "-${pids[$j]}" 2>/dev/null || true
      else
        kill -s KILL "${pids[$j]}" 2>/dev/null || true
      fi
      rm -f -- "$PIDS_DIR/${names[$j]}.ready" # a killed JVM leaves no usable class archive
      for ((i = 0; i < 50; i++)); do
        tree_alive "${pids[$j]}" "${groups[$j]}" || break
        sleep 0.1
      done
    fi
  done
  for name in "$@"; do
    if [[ -f $PIDS_DIR/$name.ready ]]; then cds_install "$name"; fi
    if [[ -f $PIDS_DIR/$name.cds ]]; then
      { read -r f && rm -f -- "$f"; } <"$PIDS_DIR/$name.cds" || true
    fi
    rm -f -- "$(pid_file "$name")" "$PIDS_DIR/$name.port" "$PIDS_DIR/$name.ready" "$PIDS_DIR/$name.cds"
  done
}

tree_alive() { # tree_alive PID IS_GROUP: the process, or anything left in its process group
  kill -0 "$1" 2>/dev/null && return 0
  (($2)) && kill -0 -- "-$1" 2>/dev/null
}

# ---------------------------------------------------------------- downloads (cached)

CACHE_LOCK_FD=8

# with_cache_lock NAME CMD...: serialise one download or build among the stacks sharing
# STACK_CACHE_DIR; one lock per artifact, so a plain `up` does not wait ~15 minutes behind
# another stack's first emulator build.
with_cache_lock() {
  local lock=$STACK_CACHE_DIR/.lock-$1
  shift
  if command -v flock >/dev/null 2>&1; then
    eval "exec $CACHE_LOCK_FD>\"\$lock\""
    if ! flock -n "$CACHE_LOCK_FD"; then
      say "waiting for another stack.sh to finish downloading into $STACK_CACHE_DIR"
      flock "$CACHE_LOCK_FD"
    fi
  fi
  "$@"
  if command -v flock >/dev/null 2>&1; then eval "exec $CACHE_LOCK_FD>&-"; fi
}

PROGRESS_PID= # the long download or build running in the background, if any

# run_long VERB WORKDIR LOG CMD...: run CMD in WORKDIR with its output in LOG and say
# 'still VERB (N min elapsed)' every 60 s (STACK_PROGRESS_INTERVAL_S) until it ends, so a
# first run never sits silent for minutes; returns CMD's exit status. CMD gets its own
# process group so that an interrupted `up` stops it (see on_up_exit).
run_long() {
  local verb=$1 workdir=$2 log=$3
  shift 3
  local interval=${STACK_PROGRESS_INTERVAL_S:-60} start next elapsed rc=0
  [[ $interval =~ ^[1-9][0-9]*$ ]] || interval=60
  local -a launcher=()
  command -v setsid >/dev/null 2>&1 && launcher=(setsid)
  (cd -- "$workdir" && exec "${launcher[@]}" "$@") </dev/null >"$log" 2>&1 8>&- 9>&- &
  PROGRESS_PID=$!
  start=$(now_s)
  next=$interval
  while kill -0 "$PROGRESS_PID" 2>/dev/null; do
    sleep 1
    elapsed=$(($(now_s) - start))
    if ((elapsed >= next)); then
      say "still $verb ($((elapsed / 60)) min elapsed)"
      next=$((next + interval))
    fi
  done
  wait "$PROGRESS_PID" || rc=$?
  PROGRESS_PID=
  return "$rc"
}

stop_long() { # on an interrupted `up`: stop the download or build run_long started
  [[ -n $PROGRESS_PID ]] || return 0
  kill -s TERM -- "-$PROGRESS_PID" 2>/dev/null || kill -s TERM "$PROGRESS_PID" 2>/dev/null || true
  PROGRESS_PID=
}

KAFKA_HOME=
REGISTRY_HOME=
BIGQUERY_BIN=

fetch_kafka() {
  KAFKA_HOME=$STACK_CACHE_DIR/kafka-$KAFKA_VERSION
  [[ -f $KAFKA_HOME/.complete ]] && return 0
  say "downloading Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_HOME"
  local tmp=$KAFKA_HOME.partial
  rm -rf -- "$tmp" "$KAFKA_HOME"
  mkdir -p -- "$tmp/lib"
  if ! run_long "downloading Kafka" "$PWD" "$tmp/mvn.log" \
    mvn -q -B -f "$SCRIPT_DIR/kafka-pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$tmp/lib" -DincludeScope=runtime; then
    tail -n 30 "$tmp/mvn.log" >&2
    die "downloading Kafka with Maven failed (full log: $tmp/mvn.log)"
  fi
  [[ -f "$tmp/lib/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "Kafka jars missing after download in $tmp/lib"
  rm -f -- "$tmp/mvn.log"
  touch "$tmp/.complete"
  mv -- "$tmp" "$KAFKA_HOME"
}

fetch_registry() {
  REGISTRY_HOME=$STACK_CACHE_DIR/apicurio-registry-$APICURIO_VERSION
  [[ -f $REGISTRY_HOME/.complete ]] && return 0
  say "downloading Apicurio Registry $APICURIO_VERSION (~160 MB) from Maven Central into $REGISTRY_HOME"
  local tmp=$REGISTRY_HOME.partial tgz
  rm -rf -- "$tmp" "$REGISTRY_HOME"
  mkdir -p -- "$tmp/download"
  if ! run_long "downloading Apicurio Registry" "$PWD" "$tmp/mvn.log" \
    mvn -q -B dependency:copy \
    -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
    -DoutputDirectory="$tmp/download"; then
    tail -n 30 "$tmp/mvn.log" >&2
    die "downloading Apicurio Registry with Maven failed (full log: $tmp/mvn.log)"
  fi
  tgz=$tmp/download/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz
  [[ -f $tgz ]] || die "Apicurio Registry archive missing after download: $tgz"
  tar -xzf "$tgz" -C "$tmp" || die "could not extract $tgz"
  [[ -f $tmp/quarkus-run.jar ]] || die "quarkus-run.jar missing in $tgz"
  rm -rf -- "$tmp/download" "$tmp/mvn.log"
  touch "$tmp/.complete"
  mv -- "$tmp" "$REGISTRY_HOME"
}

bigquery_emulator_version() {
  awk '$1 == "require" && $2 == "github.com/goccy/bigquery-emulator" { print $3 }
       $1 == "github.com/goccy/bigquery-emulator" { print $2 }' \
    "$SCRIPT_DIR/bigquery-emulator/go.mod" | head -n1
}

fetch_bigquery() {
  local version
  version=$(bigquery_emulator_version)
  [[ -n $version ]] || die "cannot read the emulator version from $SCRIPT_DIR/bigquery-emulator/go.mod"
  # bin/bigquery-emulator is complete when bin/bigquery-emulator.version names the wanted version
  BIGQUERY_BIN=$STACK_CACHE_DIR/bin/bigquery-emulator
  local marker=$BIGQUERY_BIN.version
  if [[ -x $BIGQUERY_BIN && -f $marker && $(<"$marker") == "$version" ]]; then return 0; fi
  say "building the BigQuery emulator $version with Go into $BIGQUERY_BIN: a one-time build," \
    "about 15 minutes on 2 cores; later runs and other clones reuse it"
  local src=$STACK_CACHE_DIR/build/bigquery-emulator
  rm -rf -- "$src" "$marker"
  mkdir -p -- "$src" "$STACK_CACHE_DIR/bin"
  # Built from a copy: `-mod=mod` may rewrite go.mod/go.sum, which must not touch the repository.
  cp -- "$SCRIPT_DIR/bigquery-emulator/go.mod" "$SCRIPT_DIR/bigquery-emulator/go.sum" \
    "$SCRIPT_DIR/bigquery-emulator/tools.go" "$src/"
  if ! run_long "building the BigQuery emulator" "$src" "$src/build.log" \
    env CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath \
    -o "$BIGQUERY_BIN.partial" github.com/goccy/bigquery-emulator/cmd/bigquery-emulator; then
    tail -n 30 "$src/build.log" >&2
    die "building the BigQuery emulator failed (full log: $src/build.log)"
  fi
  mv -f -- "$BIGQUERY_BIN.partial" "$BIGQUERY_BIN"
  printf '%s\n' "$version" >"$marker"
  rm -rf -- "$src"
  rmdir -- "$STACK_CACHE_DIR/build" 2>/dev/null || true
}

# ---------------------------------------------------------------- class data sharing
# The first run of each JVM program records the classes it loaded (-XX:ArchiveClassesAtExit,
# written when it exits normally); the archive is then installed next to the jars it describes
# (<cache>/<component>/cds/, so a new download drops it) and later runs map it
# (-XX:SharedArchiveFile), which starts the JVMs 15-25 % faster. An archive that does not fit
# (other JDK, changed class path) is ignored by the JVM. STACK_CDS=0 turns this off.

cds_archive_path() { # NAME JAVA HOME: where the archive of NAME run by JAVA is kept
  local key
  key=$({ readlink -f -- "$2" 2>/dev/null || printf '%s\n' "$2"; "$2" -version 2>&1; } | cksum)
  printf '%s/cds/%s-%s.jsa\n' "$3" "$1" "${key%% *}"
}

# cds_opts NAME JAVA HOME [ARCHIVE]: sets CDS_OPTS; when no archive exists yet, the run dumps
# one into data/NAME.jsa and pids/NAME.cds remembers where to install it. ARCHIVE (default
# NAME) names the cached archive, so the nodes of a cluster share one.
cds_opts() {
  CDS_OPTS=()
  [[ ${STACK_CDS:-1} != 0 ]] || return 0
  local archive dump=$STACK_DIR/data/$1.jsa
  archive=$(cds_archive_path "${4:-$1}" "$2" "$3")
  if [[ -s $archive ]]; then
    CDS_OPTS=(-Xshare:auto "-XX:SharedArchiveFile=$archive")
  else
    rm -f -- "$dump"
    CDS_OPTS=("-XX:ArchiveClassesAtExit=$dump")
    printf '%s\n%s\n' "$dump" "$archive" >"$PIDS_DIR/$1.cds"
  fi
}

cds_install() { # NAME: install the archive dumped by NAME's run, if any
  local f=$PIDS_DIR/$1.cds dump archive tmp
  [[ -f $f ]] || return 0
  { read -r dump && read -r archive; } <"$f" || return 0
  if [[ -s $dump && ! -s $archive ]]; then
    mkdir -p -- "${archive%/*}"
    tmp=$archive.tmp.$$
    if cp -- "$dump" "$tmp" && mv -f -- "$tmp" "$archive"; then
      say "saved the class data archive of $1 for faster starts: $archive"
    else
      rm -f -- "$tmp"
    fi
  fi
  rm -f -- "$dump" "$f"
}

# ---------------------------------------------------------------- component setup

KAFKA_JAVA=
REGISTRY_JAVA=

write_tls() { # self-signed CA + server certificate for 127.0.0.1/localhost, PEM
  local dir=$STACK_DIR/tls
  if [[ -f $dir/ca.pem && -f $dir/server-keystore.pem ]]; then return 0; fi
  say "generating a local CA and a server certificate in $dir"
  mkdir -p -- "$dir"
  chmod 755 "$dir"
  (
    cd -- "$dir"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
      -subj "/CN=stack.sh local CA" -keyout ca.key -out ca.pem \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
      -keyout server.key -out server.csr
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >server.ext
    openssl x509 -req -sha256 -days 825 -in server.csr -CA ca.pem -CAkey ca.key \
      -set_serial "0x$(openssl rand -hex 16)" -extfile server.ext -out server.pem
    # Kafka's PEM key store: the (PKCS#8, unencrypted) key followed by the certificate chain.
    openssl pkcs8 -topk8 -nocrypt -in server.key -out server-key.pk8.pem
    cat server-key.pk8.pem server.pem ca.pem >server-keystore.pem.tmp
    mv server-keystore.pem.tmp server-keystore.pem
    rm -f server.csr server.ext server-key.pk8.pem
    chmod 644 ca.pem
  ) >"$LOGS_DIR/openssl.log" 2>&1 || {
    tail -n 30 "$LOGS_DIR/openssl.log" >&2
    die "generating the TLS certificates with openssl failed"
  }
}

# Kafka nodes: node N is component kafka_component N, with its own ports, config, data dir
# and log; the layout (node count and ports) is kept in $STACK_DIR/kafka-nodes so that
# stop-broker/start-broker work on a running stack.
declare -A NODE_PORT=() NODE_CTRL_PORT=()

kafka_component() { # kafka_component N: the component name of node N
  if ((BROKERS == 1)); then printf 'kafka\n'; else printf 'kafka-%s\n' "$1"; fi
}

node_of() { # node_of COMPONENT: N of kafka-N (1 for the single node "kafka")
  case $1 in kafka) printf '1\n' ;; kafka-*) printf '%s\n' "${1#kafka-}" ;; esac
}

save_layout() {
  local n
  {
    printf 'BROKERS=%s\nWITH_SASL=%s\nKAFKA_SASL_PORT=%s\n' "$BROKERS" "$WITH_SASL" "$KAFKA_SASL_PORT"
    printf 'KAFKA_HOME=%q\nKAFKA_JAVA=%q\nKAFKA_HEAP=%s\n' "$KAFKA_HOME" "$KAFKA_JAVA" "$KAFKA_HEAP"
    for ((n = 1; n <= BROKERS; n++)); do
      printf 'NODE_PORT[%s]=%s\nNODE_CTRL_PORT[%s]=%s\n' "$n" "${NODE_PORT[$n]}" "$n" "${NODE_CTRL_PORT[$n]}"
    done
  } >"$STACK_DIR/kafka-nodes.tmp"
  mv -- "$STACK_DIR/kafka-nodes.tmp" "$STACK_DIR/kafka-nodes"
}

load_layout() { # the layout of the stack in STACK_DIR; false when none was started there
  BROKERS=1
  [[ -f $STACK_DIR/kafka-nodes ]] || return 1
  # shellcheck disable=SC1091 # written by save_layout
  source "$STACK_DIR/kafka-nodes"
}

bootstrap_servers() {
  local n out=
  for ((n = 1; n <= BROKERS; n++)); do out+=${out:+,}127.0.0.1:${NODE_PORT[$n]}; done
  printf '%s\n' "$out"
}

kafka_config_file() { # N
  if ((BROKERS == 1)); then
    printf '%s/config/server.properties\n' "$STACK_DIR"
  else
    printf '%s/config/server-%s.properties\n' "$STACK_DIR" "$1"
  fi
}

kafka_data_dir() { # N
  if ((BROKERS == 1)); then printf '%s/data/kafka\n' "$STACK_DIR"; else printf '%s/data/kafka-%s\n' "$STACK_DIR" "$1"; fi
}

write_kafka_config() { # N
  local n=$1 cfg listeners advertised protomap quorum rf min_isr voters= m
  cfg=$(kafka_config_file "$n")
  listeners="PLAINTEXT://127.0.0.1:${NODE_PORT[$n]},CONTROLLER://127.0.0.1:${NODE_CTRL_PORT[$n]}"
  advertised="PLAINTEXT://127.0.0.1:${NODE_PORT[$n]}"
  protomap="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if ((WITH_SASL)); then
    listeners+=",SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT"
    advertised+=",SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT"
    protomap+=",SASL_SSL:SASL_SSL"
  fi
  if ((BROKERS == 1)); then
    # a dynamic quorum of one, formatted with --standalone
    quorum="controller.quorum.bootstrap.servers=127.0.0.1:${NODE_CTRL_PORT[1]}"
    rf=1 min_isr=1
  else
    # a static quorum of every node: no node can form it alone, two of three keep it
    for ((m = 1; m <= BROKERS; m++)); do voters+=${voters:+,}$m@127.0.0.1:${NODE_CTRL_PORT[$m]}; done
    quorum="controller.quorum.voters=$voters"
    rf=$BROKERS min_isr=2
  fi
  (
    umask 077 # may hold the SASL password
    cat >"$cfg.tmp" <<EOF
# Generated by deploy/local/stack.sh on every 'up'; edits are overwritten.
process.roles=broker,controller
node.id=$n
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protomap
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
$quorum
log.dirs=$(kafka_data_dir "$n")

# internal topics replicated on every node ($rf); writes need $min_isr in sync
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$min_isr
default.replication.factor=$rf
min.insync.replicas=$min_isr
num.partitions=1
auto.create.topics.enable=$KAFKA_AUTO_CREATE_TOPICS
group.initial.rebalance.delay.ms=0

# the log cleaner stays on and reacts quickly, so compaction can be tested
# (per topic: cleanup.policy=compact, small segment.ms and min.cleanable.dirty.ratio)
log.cleaner.enable=true
log.cleaner.backoff.ms=1000
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=33554432
log.initial.task.delay.ms=1000
log.retention.check.interval.ms=10000
log.segment.delete.delay.ms=1000

# a small machine
num.network.threads=2
num.io.threads=$((BROKERS == 1 ? 4 : 2))
num.recovery.threads.per.data.dir=1
EOF
    if ((WITH_SASL)); then
      cat >>"$cfg.tmp" <<EOF

# SASL_SSL listener: SASL/PLAIN over TLS (certificate from $STACK_DIR/tls)
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="$SASL_USERNAME" password="$SASL_PASSWORD" user_$SASL_USERNAME="$SASL_PASSWORD";
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$STACK_DIR/tls/server-keystore.pem
listener.name.sasl_ssl.ssl.client.auth=none
EOF
    fi
    mv -- "$cfg.tmp" "$cfg"
  )
}

random_cluster_id() { # a Kafka Uuid: 16 random bytes, base64url without padding
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [[ ${#id} == 22 && $id != -* ]] && break
  done
  printf '%s\n' "$id"
}

kafka_jvm_opts() { # COMPONENT: common to the broker and the storage tool
  KAFKA_JVM_OPTS=(
    "-Xmx$KAFKA_HEAP" -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$SCRIPT_DIR/kafka-log4j2.properties"
    "-Dstack.kafka.log.file=$LOGS_DIR/$1.log"
    "-Dstack.dir=$STACK_DIR"
    -cp "$KAFKA_HOME/lib/*"
  )
}

format_kafka() { # N CLUSTER_ID
  local n=$1 data name
  data=$(kafka_data_dir "$n")
  name=$(kafka_component "$n")
  [[ -f $data/meta.properties ]] && return 0
  say "formatting the Kafka log directory $data"
  rm -rf -- "$data"
  mkdir -p -- "$data"
  local -a KAFKA_JVM_OPTS CDS_OPTS quorum=()
  # one node: a dynamic quorum it forms alone; several: the static voters of the config
  ((BROKERS == 1)) && quorum=(--standalone)
  kafka_jvm_opts "$name"
  cds_opts "$name-format" "$KAFKA_JAVA" "$KAFKA_HOME" kafka-format
  # a short-lived tool: the quick compiler only
  if ! "$KAFKA_JAVA" "${CDS_OPTS[@]}" "${KAFKA_JVM_OPTS[@]}" -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    -Dstack.kafka.log.file="$LOGS_DIR/$name-format.log" \
    kafka.tools.StorageTool format "${quorum[@]}" -t "$2" \
    -c "$(kafka_config_file "$n")" >"$LOGS_DIR/$name-format.log" 2>&1; then
    tail -n 30 "$LOGS_DIR/$name-format.log" >&2
    die "formatting the Kafka log directory failed (see $LOGS_DIR/$name-format.log)"
  fi
  cds_install "$name-format"
}

start_kafka() { # N
  local n=$1 name
  name=$(kafka_component "$n")
  local -a KAFKA_JVM_OPTS CDS_OPTS
  kafka_jvm_opts "$name"
  cds_opts "$name" "$KAFKA_JAVA" "$KAFKA_HOME" kafka
  start_bg "$name" "$STACK_DIR/data" "$KAFKA_JAVA" "${CDS_OPTS[@]}" "${KAFKA_JVM_OPTS[@]}" \
    -Xms128m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent \
    kafka.Kafka "$(kafka_config_file "$n")"
  local ports="${NODE_PORT[$n]} (controller ${NODE_CTRL_PORT[$n]}"
  if ((WITH_SASL)); then ports+=", sasl_ssl $KAFKA_SASL_PORT"; fi
  printf '%s)\n' "$ports" >"$PIDS_DIR/$name.port"
}

start_registry() {
  local work=$STACK_DIR/data/registry
  mkdir -p -- "$work/tmp"
  local -a opts=(
    "-Xmx$REGISTRY_HEAP" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true
    "-Djava.io.tmpdir=$work/tmp" "-Dstack.dir=$STACK_DIR"
    -Dquarkus.http.host=127.0.0.1 "-Dquarkus.http.port=$REGISTRY_PORT"
    -Dquarkus.management.host=127.0.0.1 "-Dquarkus.management.port=$REGISTRY_MGMT_PORT"
    # in-memory H2: a small pool starts faster than the default 20 connections
    -Dapicurio.datasource.jdbc.initial-size=2 -Dapicurio.datasource.jdbc.min-size=2
    # like Confluent Schema Registry: subjects and versions can be deleted
    -Dapicurio.rest.deletion.group.enabled=true -Dapicurio.rest.deletion.artifact.enabled=true
    -Dapicurio.rest.deletion.artifact-version.enabled=true
    "-Dapicurio.storage.snapshot.location=$work/tmp" "-Dapicurio.import.work-dir=$work/tmp"
  )
  if [[ $REGISTRY_COMPATIBILITY != NONE ]]; then
    opts+=("-Dapicurio.rules.global.compatibility=$REGISTRY_COMPATIBILITY")
  fi
  local -a CDS_OPTS
  cds_opts registry "$REGISTRY_JAVA" "$REGISTRY_HOME"
  start_bg registry "$work" "$REGISTRY_JAVA" "${CDS_OPTS[@]}" "${opts[@]}" -jar "$REGISTRY_HOME/quarkus-run.jar"
  printf '%s (management %s)\n' "$REGISTRY_PORT" "$REGISTRY_MGMT_PORT" >"$PIDS_DIR/registry.port"
}

start_bigquery() {
  local work=$STACK_DIR/data/bigquery
  mkdir -p -- "$work"
  start_bg bigquery "$work" "$BIGQUERY_BIN" --host=127.0.0.1 --port="$BIGQUERY_PORT" \
    --grpc-port="$BIGQUERY_GRPC_PORT" --project="$BIGQUERY_PROJECT" \
    --dataset="$BIGQUERY_DATASET" --log-level=info
  printf '%s (grpc %s)\n' "$BIGQUERY_PORT" "$BIGQUERY_GRPC_PORT" >"$PIDS_DIR/bigquery.port"
}

# ---------------------------------------------------------------- readiness checks

# Kafka node COMPONENT: it logged the end of its start-up (it is unfenced by then) and answers
# an ApiVersions request (v0, correlation id 7) on its PLAINTEXT listener with error code 0.
kafka_ready() {
  local name=${1:-kafka} port
  port=${NODE_PORT[$(node_of "$name")]}
  grep -q 'Kafka Server started' "$LOGS_DIR/$name.log" 2>/dev/null || return 1
  local resp
  resp=$(
    exec 2>/dev/null
    exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    printf '\x00\x00\x00\x0f\x00\x12\x00\x00\x00\x00\x00\x07\x00\x05probe' >&3
    timeout 5 head -c 10 <&3 | od -An -tx1 | tr -d ' \n'
  ) || return 1
  [[ $resp =~ ^[0-9a-f]{8}000000070000$ ]] || return 1
  if ((WITH_SASL)); then
    # the TLS side of the SASL_SSL listener presents a certificate our CA verifies
    timeout 10 openssl s_client -connect "127.0.0.1:$KAFKA_SASL_PORT" \
      -CAfile "$STACK_DIR/tls/ca.pem" -verify_return_error -verify_ip 127.0.0.1 \
      </dev/null >/dev/null 2>&1 || return 1
  fi
}

registry_ready() {
  curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7/subjects" 2>/dev/null
}

bigquery_ready() {
  curl -fsS -o /dev/null --max-time 5 \
    "http://127.0.0.1:$BIGQUERY_PORT/bigquery/v2/projects/$BIGQUERY_PROJECT/datasets/$BIGQUERY_DATASET" 2>/dev/null
}

# wait_ready NAME...: poll all of them together until ready; on timeout or death of a process,
# show the end of its log and fail (the EXIT trap stops what was started).
wait_ready() {
  local -A done_=()
  local start name pid pending ready
  start=$(now_s)
  while :; do
    pending=0
    for name in "$@"; do
      [[ -n ${done_[$name]:-} ]] && continue
      ready=${name}_ready
      [[ $name == kafka* ]] && ready="kafka_ready $name"
      if $ready; then
        done_[$name]=1
        : >"$PIDS_DIR/$name.ready"
        say "$name is ready ($(($(now_s) - T0)) s)"
        continue
      fi
      pending=1
      if ! pid=$(component_pid "$name"); then
        say "$name exited during start-up; last lines of $LOGS_DIR/$name.log:"
        tail -n 30 "$LOGS_DIR/$name.log" >&2 || true
        exit 1
      fi
      if (($(now_s) - start >= START_TIMEOUT_S)); then
        say "$name (pid $pid) did not answer within ${START_TIMEOUT_S} s (STACK_START_TIMEOUT_S); last lines of $LOGS_DIR/$name.log:"
        tail -n 30 "$LOGS_DIR/$name.log" >&2 || true
        exit 1
      fi
    done
    ((pending)) || return 0
    sleep 0.25
  done
}

# ---------------------------------------------------------------- commands

STATE_LOCK_FD=9

lock_state() { # one up/down at a time per STACK_DIR
  mkdir -p -- "$STACK_DIR"
  if command -v flock >/dev/null 2>&1; then
    eval "exec $STATE_LOCK_FD>\"\$STACK_DIR/.lock\""
    flock -w 60 "$STATE_LOCK_FD" || die "another stack.sh up/down holds $STACK_DIR/.lock"
  fi
}

running_components() {
  local name pid
  for name in "${COMPONENTS[@]}"; do
    if pid=$(component_pid "$name"); then printf '%s (pid %s)\n' "$name" "$pid"; fi
  done
}

UP_DONE=0

on_up_exit() {
  local rc=$?
  stop_long
  release_ports
  if ((!UP_DONE)) && ((${#STARTED[@]})); then
    say "start-up failed: stopping what was started"
    stop_components "${STARTED[@]}" || true
    rm -f -- "$ENV_FILE"
  fi
  exit "$rc"
}

cmd_up() {
  WITH_BIGQUERY=0
  WITH_SASL=0
  BROKERS=1
  while (($#)); do
    case $1 in
      --with-bigquery) WITH_BIGQUERY=1 ;;
      --with-sasl) WITH_SASL=1 ;;
      --brokers)
        (($# > 1)) || { say "--brokers needs a number: 1 or 3"; exit 2; }
        BROKERS=$2
        shift
        ;;
      --brokers=*) BROKERS=${1#--brokers=} ;;
      -h | --help) usage; exit 0 ;;
      *) say "unknown option for up: $1 (see --help)"; exit 2 ;;
    esac
    shift
  done
  if [[ $BROKERS != 1 && $BROKERS != "$MAX_BROKERS" ]]; then
    say "--brokers must be 1 or $MAX_BROKERS, got '$BROKERS'"
    exit 2
  fi
  if ((BROKERS > 1 && WITH_SASL)); then
    say "--with-sasl runs on the single node only; drop --brokers $BROKERS or --with-sasl"
    exit 2
  fi
  T0=$(now_s)

  # tools first: one line naming everything that is missing
  local -a missing=()
  command -v java >/dev/null 2>&1 || [[ -x ${JAVA_HOME:-/nonexistent}/bin/java ]] ||
    missing+=("java (a JDK 17+, e.g. apt-get install openjdk-17-jdk-headless)")
  command -v mvn >/dev/null 2>&1 || missing+=("mvn (Apache Maven, e.g. apt-get install maven)")
  command -v curl >/dev/null 2>&1 || missing+=("curl")
  if ((WITH_BIGQUERY)); then
    command -v go >/dev/null 2>&1 || missing+=("go (Go 1.25+, https://go.dev/dl/)")
  fi
  if ((WITH_SASL)); then
    command -v openssl >/dev/null 2>&1 || missing+=("openssl")
  fi
  if ((${#missing[@]})); then
    local joined
    joined=$(printf '%s; ' "${missing[@]}")
    say "missing required tools, install them and retry: ${joined%; }"
    exit 1
  fi
  KAFKA_JAVA=$(find_java 17) || die "Kafka needs Java 17 or newer; install a JDK 17+ (e.g. apt-get install openjdk-17-jdk-headless) or set JAVA_HOME"
  if [[ -n ${STACK_JAVA21_HOME:-} ]]; then
    REGISTRY_JAVA=$STACK_JAVA21_HOME/bin/java
    local major
    major=$(java_major "$REGISTRY_JAVA")
    if [[ -z $major ]] || ((major < 21)); then
      die "STACK_JAVA21_HOME=$STACK_JAVA21_HOME is not a JDK 21+ (its bin/java is ${major:+version }${major:-missing}); Apicurio Registry $APICURIO_VERSION needs Java 21 or newer"
    fi
  else
    REGISTRY_JAVA=$(find_java 21) ||
      die "Apicurio Registry $APICURIO_VERSION needs Java 21 or newer and none was found (looked at STACK_JAVA21_HOME, JAVA_HOME, PATH, /usr/lib/jvm/*); install a JDK 21+ (e.g. apt-get install openjdk-21-jdk-headless or temurin-21-jdk) or point STACK_JAVA21_HOME at one"
  fi

  load_up_settings
  lock_state
  local running
  running=$(running_components)
  [[ -z $running ]] || die "a stack is already running in $STACK_DIR: ${running//$'\n'/, }; use 'stack.sh env' to see it or 'stack.sh down' to stop it"
  rm -f -- "$PIDS_DIR"/* "$ENV_FILE"
  mkdir -p -- "$PIDS_DIR" "$LOGS_DIR" "$STACK_DIR/config" "$STACK_DIR/data"
  trap on_up_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM HUP

  fetch_all

  resolve_port KAFKA_PORT STACK_KAFKA_PORT
  resolve_port KAFKA_CONTROLLER_PORT STACK_KAFKA_CONTROLLER_PORT
  ((WITH_SASL)) && resolve_port KAFKA_SASL_PORT STACK_KAFKA_SASL_PORT
  resolve_port REGISTRY_PORT STACK_REGISTRY_PORT
  resolve_port REGISTRY_MGMT_PORT STACK_REGISTRY_MANAGEMENT_PORT
  if ((WITH_BIGQUERY)); then
    resolve_port BIGQUERY_PORT STACK_BIGQUERY_PORT
    resolve_port BIGQUERY_GRPC_PORT STACK_BIGQUERY_GRPC_PORT
  fi
  NODE_PORT[1]=$KAFKA_PORT
  NODE_CTRL_PORT[1]=$KAFKA_CONTROLLER_PORT
  local n
  for ((n = 2; n <= BROKERS; n++)); do
    NODE_PORT[$n]=$(pick_free_port)
    NODE_CTRL_PORT[$n]=$(pick_free_port)
    CLAIMED_PORTS+=("${NODE_PORT[$n]}" "${NODE_CTRL_PORT[$n]}") # picked in subshells
  done
  local -a ports=("${NODE_PORT[@]}" "${NODE_CTRL_PORT[@]}" "$REGISTRY_PORT" "$REGISTRY_MGMT_PORT")
  ((WITH_SASL)) && ports+=("$KAFKA_SASL_PORT")
  ((WITH_BIGQUERY)) && ports+=("$BIGQUERY_PORT" "$BIGQUERY_GRPC_PORT")
  [[ $(printf '%s\n' "${ports[@]}" | sort | uniq -d) == "" ]] ||
    die "the same port is configured twice: ${ports[*]}"

  local name
  for name in "${COMPONENTS[@]}"; do # fresh logs for this run, the previous one kept
    if [[ -s $LOGS_DIR/$name.log ]]; then mv -f -- "$LOGS_DIR/$name.log" "$LOGS_DIR/$name.log.1"; fi
  done

  # the slowest first; Kafka's format runs while the registry boots
  say "starting Apicurio Registry $APICURIO_VERSION on 127.0.0.1:$REGISTRY_PORT"
  start_registry
  if ((WITH_BIGQUERY)); then
    say "starting the BigQuery emulator on 127.0.0.1:$BIGQUERY_PORT (project $BIGQUERY_PROJECT, dataset $BIGQUERY_DATASET)"
    start_bigquery
  fi
  ((WITH_SASL)) && write_tls
  save_layout
  local cluster_id
  cluster_id=$(random_cluster_id)
  local -a wait_for=()
  for ((n = 1; n <= BROKERS; n++)); do
    write_kafka_config "$n"
    format_kafka "$n" "$cluster_id"
  done
  for ((n = 1; n <= BROKERS; n++)); do
    say "starting Kafka $KAFKA_VERSION node $n of $BROKERS on 127.0.0.1:${NODE_PORT[$n]}"
    start_kafka "$n"
    wait_for+=("$(kafka_component "$n")")
  done

  wait_for+=(registry)
  ((WITH_BIGQUERY)) && wait_for+=(bigquery)
  wait_ready "${wait_for[@]}"

  {
    export_line KAFKA_BOOTSTRAP_SERVERS "$(bootstrap_servers)"
    export_line SCHEMA_REGISTRY_URL "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7"
    export_line TOPIC_REPLICATION_FACTOR "$BROKERS"
    ((BROKERS > 1)) && export_line STACK_KAFKA_BROKERS "$BROKERS"
    if ((WITH_BIGQUERY)); then
      export_line PRODUCER_BIGQUERY_API_ENDPOINT "http://127.0.0.1:$BIGQUERY_PORT"
      export_line PRODUCER_WAREHOUSE "bigquery://$BIGQUERY_PROJECT"
      export_line STACK_BIGQUERY_DATASET "$BIGQUERY_DATASET"
    fi
    if ((WITH_SASL)); then
      export_line STACK_KAFKA_SASL_BOOTSTRAP "127.0.0.1:$KAFKA_SASL_PORT"
      export_line STACK_KAFKA_SSL_CA_LOCATION "$STACK_DIR/tls/ca.pem"
    fi
  } >"$ENV_FILE.tmp"
  mv -- "$ENV_FILE.tmp" "$ENV_FILE"
  UP_DONE=1
  say "stack is up in $(($(now_s) - T0)) s (state: $STACK_DIR; stop it with: deploy/local/stack.sh down)"
  cat -- "$ENV_FILE"
}

fetch_all() {
  with_cache_lock kafka fetch_kafka
  with_cache_lock registry fetch_registry
  if ((WITH_BIGQUERY)); then with_cache_lock bigquery fetch_bigquery; fi
}

recorded_components() {
  local name
  for name in "${COMPONENTS[@]}"; do
    if [[ -f $(pid_file "$name") ]]; then printf '%s\n' "$name"; fi
  done
}

cmd_env() {
  [[ $# == 0 ]] || { say "env takes no arguments"; exit 2; }
  local name recorded=0 stopped=()
  while read -r name; do
    [[ -n $name ]] || continue
    recorded=1
    component_pid "$name" >/dev/null || stopped+=("$name")
  done < <(recorded_components)
  if ((!recorded)) || [[ ! -f $ENV_FILE ]]; then die "no stack is running in $STACK_DIR (start one with: deploy/local/stack.sh up)"; fi
  ((${#stopped[@]} == 0)) || die "the stack in $STACK_DIR is not fully running (stopped: ${stopped[*]}); restart it with: deploy/local/stack.sh down && deploy/local/stack.sh up"
  cat -- "$ENV_FILE"
}

cmd_down() {
  local purge=0 arg
  for arg in "$@"; do
    case $arg in
      --purge) purge=1 ;;
      *) say "unknown option for down: $arg (see --help)"; exit 2 ;;
    esac
  done
  if [[ -d $STACK_DIR ]]; then
    lock_state
    local -a names=()
    mapfile -t names < <(recorded_components)
    if ((${#names[@]})); then
      stop_components "${names[@]}"
    else
      say "nothing is running in $STACK_DIR"
    fi
    rm -f -- "$ENV_FILE" "$PIDS_DIR"/*.starting "$STACK_DIR/kafka-nodes"
  else
    say "nothing is running in $STACK_DIR"
  fi
  if ((purge)) && [[ -d $STACK_DIR ]]; then
    # only a directory that looks like a stack state dir
    if [[ -d $STACK_DIR/pids || -d $STACK_DIR/logs || -d $STACK_DIR/data ]] && [[ $STACK_DIR != / && $STACK_DIR != "$HOME" ]]; then
      say "deleting $STACK_DIR"
      rm -rf -- "$STACK_DIR"
    else
      die "$STACK_DIR does not look like a stack state directory; not deleting it"
    fi
  fi
}

cmd_status() {
  [[ $# == 0 ]] || { say "status takes no arguments"; exit 2; }
  local name pid port state rc=0 any=0 n
  local -a names=()
  load_layout || true
  for ((n = 1; n <= BROKERS; n++)); do names+=("$(kafka_component "$n")"); done
  names+=(registry bigquery)
  for name in "${names[@]}"; do
    port=-
    [[ -f $PIDS_DIR/$name.port ]] && port=$(<"$PIDS_DIR/$name.port")
    if pid=$(component_pid "$name"); then
      state=running
      any=1
    else
      state=stopped
      # a started component that is not running; a stopped node of the cluster too
      if [[ -f $(pid_file "$name") || ($name == kafka* && -f $STACK_DIR/kafka-nodes) ]]; then rc=3; fi
      pid=-
    fi
    printf '%-9s %-8s pid %-8s port %s\n' "$name" "$state" "$pid" "$port"
  done
  ((any)) || rc=3
  return "$rc"
}

broker_arg() { # broker_arg N: check N against the running stack's layout
  load_layout || die "no stack was started in $STACK_DIR (start one with: deploy/local/stack.sh up)"
  [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= BROKERS)) ||
    die "no Kafka node '$1' in $STACK_DIR: its nodes are 1..$BROKERS"
}

cmd_stop_broker() {
  local node= kill=0 arg
  for arg in "$@"; do
    case $arg in
      --kill) kill=1 ;;
      -*) say "unknown option for stop-broker: $arg (see --help)"; exit 2 ;;
      *) [[ -z $node ]] || { say "stop-broker takes one node number"; exit 2; }; node=$arg ;;
    esac
  done
  [[ -n $node ]] || { say "usage: stack.sh stop-broker N [--kill]"; exit 2; }
  lock_state
  broker_arg "$node"
  local name pid
  name=$(kafka_component "$node")
  pid=$(component_pid "$name") || die "Kafka node $node ($name) is not running"
  if ((kill)); then
    say "killing Kafka node $node (pid $pid) with SIGKILL"
    kill -s KILL -- "-$pid" 2>/dev/null || kill -s KILL "$pid" 2>/dev/null || true
    rm -f -- "$PIDS_DIR/$name.ready" # a killed JVM leaves no usable class archive
    local i
    for ((i = 0; i < 100; i++)); do
      tree_alive "$pid" 1 || break
      sleep 0.05
    done
  fi
  stop_components "$name"
  say "Kafka node $node is stopped; start it again with: deploy/local/stack.sh start-broker $node"
}

cmd_start_broker() {
  [[ $# == 1 ]] || { say "usage: stack.sh start-broker N"; exit 2; }
  lock_state
  broker_arg "$1"
  local n=$1 name pid
  name=$(kafka_component "$n")
  if pid=$(component_pid "$name"); then die "Kafka node $n ($name) is already running (pid $pid)"; fi
  START_TIMEOUT_S=${STACK_START_TIMEOUT_S:-120}
  KAFKA_AUTO_CREATE_TOPICS=${STACK_KAFKA_AUTO_CREATE_TOPICS:-true}
  port_in_use "${NODE_PORT[$n]}" && die "port ${NODE_PORT[$n]} of Kafka node $n is taken by another process"
  T0=$(now_s)
  if [[ -s $LOGS_DIR/$name.log ]]; then mv -f -- "$LOGS_DIR/$name.log" "$LOGS_DIR/$name.log.1"; fi
  say "starting Kafka node $n on 127.0.0.1:${NODE_PORT[$n]}"
  start_kafka "$n"
  wait_ready "$name"
}

cmd_paths() {
  [[ $# == 0 ]] || { say "paths takes no arguments"; exit 2; }
  printf 'STACK_DIR=%s\nSTACK_CACHE_DIR=%s\n' "$STACK_DIR" "$(cache_dir)"
}

main() {
  local cmd=${1:-}
  [[ $# -gt 0 ]] && shift
  case $cmd in
    up) load_settings; cmd_up "$@" ;;
    env) load_settings; cmd_env "$@" ;;
    down) load_settings; cmd_down "$@" ;;
    status) load_settings; cmd_status "$@" ;;
    paths) load_settings; cmd_paths "$@" ;;
    stop-broker) load_settings; cmd_stop_broker "$@" ;;
    start-broker) load_settings; cmd_start_broker "$@" ;;
    -h | --help | help) usage ;;
    "") usage; exit 2 ;;
    *) say "unknown command: $cmd"; usage >&2; exit 2 ;;
  esac
}

# sourced (tests/unit/test_stack_sh.py checks helpers that way): define functions only
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
