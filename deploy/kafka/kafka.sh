#!/usr/bin/env bash
# Run a real single-node Apache Kafka broker for trialwatch development and tests,
# without Docker: the broker jars come from Maven Central (see pom.xml next to this
# script) and run as a plain JVM process in KRaft mode (no ZooKeeper).
#
# Usage: deploy/kafka/kafka.sh {fetch|start|stop|status|bootstrap}
#
#   fetch      download the broker jars into the user cache (once; later runs are instant)
#   start      fetch, then start a fresh broker (empty data every start) and wait until ready
#   stop       stop the broker started by `start` (SIGTERM, then SIGKILL after 30 s)
#   status     exit 0 if the broker is running, 1 otherwise
#   bootstrap  print the bootstrap servers string clients should use
#
# Environment:
#   KAFKA_BOOTSTRAP_SERVERS  use this existing broker instead: start/stop do nothing
#   KAFKA_PORT               broker (PLAINTEXT) port, default 9092
#   KAFKA_CONTROLLER_PORT    KRaft controller port, default 9093
#   KAFKA_STATE_DIR          config, pid file, logs and data; default <repo>/.kafka
#   KAFKA_START_TIMEOUT      seconds `start` waits for the broker to be ready, default 90
#   TRIALWATCH_CACHE         jar cache root, default ~/.cache/trialwatch
#   JAVA_HOME                if set, $JAVA_HOME/bin/java is used instead of `java`
#
# Why Kafka 3.9.1 (the last 3.x release) and not 4.x: 3.9.1 still accepts every protocol
# version that aiokafka 0.14 and faust-streaming 0.15 use, whereas Kafka 4.0 removed old
# protocol versions (KIP-896), which those clients can still send.
set -euo pipefail

KAFKA_VERSION=3.9.1 # keep in sync with kafka.version in pom.xml

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

# Jars live outside the repository so that a fresh checkout / `git clean` does not
# re-download 46 MB, and several checkouts share one copy.
CACHE_ROOT=${TRIALWATCH_CACHE:-$HOME/.cache/trialwatch}
KAFKA_CACHE=$CACHE_ROOT/kafka-$KAFKA_VERSION
LIBS_DIR=$KAFKA_CACHE/libs
# The marker is written inside the temp dir *before* it is renamed to libs/, so libs/
# only ever exists together with its marker; a libs/ without it is a leftover.
MARKER=$LIBS_DIR/.fetch-complete

STATE_DIR=${KAFKA_STATE_DIR:-$REPO_ROOT/.kafka}
PORT=${KAFKA_PORT:-9092}
CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
HOST=127.0.0.1 # loopback only: this is a dev/test broker, not meant to be reachable from outside
PID_FILE=$STATE_DIR/kafka.pid
SERVER_OUT=$STATE_DIR/server.out # JVM stdout/stderr (crashes, OOMs, format output)
SERVER_LOG=$STATE_DIR/logs/server.log # log4j output

START_TIMEOUT=${KAFKA_START_TIMEOUT:-90} # seconds to wait for "ready" after launching the JVM
STOP_TIMEOUT=30 # seconds to wait after SIGTERM before SIGKILL

JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java

log() { printf 'kafka.sh: %s\n' "$*"; }
die() { printf 'kafka.sh: error: %s\n' "$*" >&2; exit 1; }

external_broker() { [[ -n ${KAFKA_BOOTSTRAP_SERVERS:-} ]]; }

# --- prerequisites -----------------------------------------------------------------

require_java() {
    command -v "$JAVA" >/dev/null 2>&1 ||
        die "missing prerequisite: java (Java 17 recommended, 11+ required): '$JAVA' not found${JAVA_HOME:+ (from JAVA_HOME)}"
    # Capture the whole output first: piping into `head` could SIGPIPE java under pipefail.
    local out major minor
    out=$("$JAVA" -version 2>&1) || die "'$JAVA -version' failed: $out"
    major=$(sed -nE '1s/.*version "([0-9]+)(\.([0-9]+))?.*/\1 \3/p' <<<"$out")
    read -r major minor <<<"$major"
    [[ $major == 1 ]] && major=${minor:-0} # "1.8.0_x" style means Java 8
    if [[ $major =~ ^[0-9]+$ ]] && ((major < 11)); then
        die "Kafka $KAFKA_VERSION needs Java 11 or newer (17 recommended); found: ${out%%$'\n'*}"
    fi
}

require_mvn() {
    command -v mvn >/dev/null 2>&1 ||
        die "missing prerequisite: mvn (Apache Maven) is not on PATH; it is needed once to download the Kafka jars into $LIBS_DIR"
}

# --- helpers -----------------------------------------------------------------------

# True if something accepts TCP connections on $1:$2 (bash's /dev/tcp, no nc needed).
port_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# True if $1 is a live process that is a Kafka broker (guards against PID reuse
# after a reboot or a crash leaving a stale pid file).
is_broker_pid() {
    [[ $1 =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null &&
        ps -o args= -p "$1" 2>/dev/null | grep -q 'kafka\.Kafka'
}

# Prints the PID from the pid file if that broker is alive; removes a stale pid file.
running_pid() {
    [[ -f $PID_FILE ]] || return 1
    local pid
    pid=$(<"$PID_FILE") || return 1
    if is_broker_pid "$pid"; then
        printf '%s\n' "$pid"
        return 0
    fi
    rm -f "$PID_FILE"
    return 1
}

show_log_tail() {
    local f
    for f in "$SERVER_LOG" "$SERVER_OUT"; do
        if [[ -s $f ]]; then
            printf '\n----- last 40 lines of %s -----\n' "$f" >&2
            tail -n 40 "$f" >&2
        fi
    done
}

# SIGTERM, wait up to $STOP_TIMEOUT s, then SIGKILL; returns once the process is gone.
terminate() {
    local pid=$1 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    # Kafka does a controlled shutdown on SIGTERM (flushes logs, leaves the quorum).
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= STOP_TIMEOUT * 10)); then
            log "pid $pid still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
            return 0
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# --- commands ----------------------------------------------------------------------

cmd_fetch() {
    if [[ -f $MARKER ]]; then
        log "Kafka $KAFKA_VERSION jars already in $LIBS_DIR"
        return 0
    fi
    require_java
    require_mvn
    mkdir -p "$KAFKA_CACHE"

    # Serialise concurrent fetches (e.g. two test runs starting at once). fd 9 is closed
    # again below so the broker JVM does not inherit the lock.
    exec 9>"$KAFKA_CACHE/.lock"
    if command -v flock >/dev/null 2>&1; then flock 9; fi
    if [[ -f $MARKER ]]; then # another process finished while we waited
        exec 9>&-
        log "Kafka $KAFKA_VERSION jars already in $LIBS_DIR"
        return 0
    fi
    # Holding the lock, anything not marked complete is debris of an interrupted run.
    rm -rf "$LIBS_DIR" "$KAFKA_CACHE"/libs.tmp.*

    log "downloading Kafka $KAFKA_VERSION jars from Maven Central into $LIBS_DIR ..."
    local tmp start=$SECONDS
    tmp=$(mktemp -d "$KAFKA_CACHE/libs.tmp.XXXXXX")
    # shellcheck disable=SC2064 # expand $tmp now: it is local
    trap "rm -rf '$tmp'" EXIT
    # Output is only shown on failure (Maven 3.8 prints stray ANSI resets even with -q -B).
    local mvn_out
    if ! mvn_out=$(mvn -B -q -f "$SCRIPT_DIR/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" 2>&1); then
        printf '%s\n' "$mvn_out" >&2
        die "mvn could not download the Kafka jars (offline? proxy? see the Maven output above)"
    fi
    [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] ||
        die "mvn finished but kafka_2.13-$KAFKA_VERSION.jar is missing from the download"
    local count
    count=$(find "$tmp" -maxdepth 1 -name '*.jar' | wc -l)
    printf 'kafka %s: %s jars, fetched %s\n' "$KAFKA_VERSION" "$count" "$(date -u +%FT%TZ)" >"$tmp/.fetch-complete"
    chmod 755 "$tmp" # mktemp -d creates it 0700
    # The rename is the commit point: libs/ appears complete, with its marker, or not at all.
    mv -T "$tmp" "$LIBS_DIR"
    trap - EXIT
    exec 9>&-
    log "fetched $count jars ($(du -sh "$LIBS_DIR" | cut -f1)) in $((SECONDS - start))s"
}

write_config() {
    # No trailing comments on value lines: in .properties files they become part of the value.
    cat >"$STATE_DIR/server.properties" <<EOF
# Generated by deploy/kafka/kafka.sh on every start; edits are overwritten.
# Single node in KRaft combined mode: this one process is broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$STATE_DIR/data

# One node, so every internal topic must use replication factor 1.
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# The defaults (50 partitions each) make the first consumer group / first
# transaction wait until 50 partitions are created and loaded.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
# Do not hold back the first rebalance for 3 s waiting for more members.
group.initial.rebalance.delay.ms=0

auto.create.topics.enable=true
# Faust changelog topics are compacted, which needs the cleaner; its dedupe buffer
# (default 128 MB, allocated on the heap up front) is shrunk to fit the small heap.
log.cleaner.enable=true
log.cleaner.dedupe.buffer.size=33554432
EOF

    # Only warnings go to the log, plus the one INFO line that says the server is up
    # (logged by kafka.server.KafkaRaftServer), which `start` waits for.
    cat >"$STATE_DIR/log4j.properties" <<EOF
# Generated by deploy/kafka/kafka.sh on every start; edits are overwritten.
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$SERVER_LOG
log4j.appender.file.MaxFileSize=10MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
EOF
}

cmd_start() {
    if external_broker; then
        log "KAFKA_BOOTSTRAP_SERVERS is set: using the existing broker at $KAFKA_BOOTSTRAP_SERVERS, not starting one"
        return 0
    fi
    local pid
    if pid=$(running_pid); then
        log "Kafka is already running (pid $pid) on $HOST:$PORT; state in $STATE_DIR"
        return 0
    fi
    # Checked before anything else so a broker started elsewhere (another checkout, a
    # container) is reported clearly instead of as a bind error deep in the JVM log.
    if port_open "$HOST" "$PORT"; then
        die "port $HOST:$PORT is already in use by another process (another Kafka?).
  To use that broker:   export KAFKA_BOOTSTRAP_SERVERS=$HOST:$PORT
  To run one elsewhere: set KAFKA_PORT, KAFKA_CONTROLLER_PORT and KAFKA_STATE_DIR"
    fi
    if port_open "$HOST" "$CONTROLLER_PORT"; then
        die "controller port $HOST:$CONTROLLER_PORT is already in use by another process.
  Set KAFKA_CONTROLLER_PORT (and KAFKA_PORT / KAFKA_STATE_DIR) to run a broker elsewhere"
    fi

    require_java
    cmd_fetch

    local t0=$SECONDS
    mkdir -p "$STATE_DIR"
    STATE_DIR=$(cd "$STATE_DIR" && pwd) # log4j wants an absolute file: URL
    PID_FILE=$STATE_DIR/kafka.pid
    SERVER_OUT=$STATE_DIR/server.out
    SERVER_LOG=$STATE_DIR/logs/server.log
    # Fresh broker every start: tests get no topics/offsets left over from earlier runs,
    # and the old log cannot fool the readiness check below.
    rm -rf "$STATE_DIR/data" "$STATE_DIR/logs"
    mkdir -p "$STATE_DIR/logs"
    : >"$SERVER_OUT"
    write_config

    local log4j="-Dlog4j.configuration=file:$STATE_DIR/log4j.properties"
    local cluster_id
    cluster_id=$("$JAVA" "$log4j" -cp "$LIBS_DIR/*" kafka.tools.StorageTool random-uuid 2>>"$SERVER_OUT") ||
        { show_log_tail; die "could not generate a cluster id"; }
    if ! "$JAVA" "$log4j" -cp "$LIBS_DIR/*" kafka.tools.StorageTool format \
        -t "$cluster_id" -c "$STATE_DIR/server.properties" >>"$SERVER_OUT" 2>&1; then
        show_log_tail
        die "formatting the KRaft storage in $STATE_DIR/data failed"
    fi

    log "starting Kafka $KAFKA_VERSION on $HOST:$PORT (controller $HOST:$CONTROLLER_PORT, state in $STATE_DIR)"
    rm -f "$PID_FILE"
    # Detach completely (own session, no stdin, output to a file) so the broker outlives
    # this script and the caller's terminal, and callers capturing our stdout do not hang.
    # The inner shell writes its own PID and then execs java, so the pid file holds the
    # JVM's PID whether or not setsid had to fork.
    local detach=()
    if command -v setsid >/dev/null 2>&1; then detach=(setsid); fi
    # shellcheck disable=SC2016 # expanded by the inner bash
    ${detach[@]+"${detach[@]}"} nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
        "$JAVA" -Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true "$log4j" \
        -cp "$LIBS_DIR/*" kafka.Kafka "$STATE_DIR/server.properties" \
        </dev/null >>"$SERVER_OUT" 2>&1 &
    disown # not our job to reap; also silences bash's "Killed" job report

    # Ready = the server logged that it started AND the port accepts connections.
    local deadline=$((SECONDS + START_TIMEOUT))
    pid=""
    while ((SECONDS < deadline)); do
        [[ -z $pid && -s $PID_FILE ]] && pid=$(<"$PID_FILE")
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail
            rm -f "$PID_FILE"
            die "Kafka exited during startup (see $SERVER_OUT and $SERVER_LOG)"
        fi
        if [[ -n $pid ]] && grep -q 'Kafka Server started' "$SERVER_LOG" 2>/dev/null &&
            port_open "$HOST" "$PORT"; then
            log "Kafka $KAFKA_VERSION ready on $HOST:$PORT (pid $pid) after $((SECONDS - t0))s"
            return 0
        fi
        sleep 0.25
    done
    show_log_tail
    # Do not leave a half-started broker behind holding the ports.
    if [[ -n $pid ]]; then terminate "$pid"; fi
    rm -f "$PID_FILE"
    die "Kafka was not ready on $HOST:$PORT within ${START_TIMEOUT}s; stopped it (logs above)"
}

cmd_stop() {
    if external_broker; then
        log "KAFKA_BOOTSTRAP_SERVERS is set: the broker at $KAFKA_BOOTSTRAP_SERVERS is not managed here, nothing to stop"
        return 0
    fi
    if [[ ! -f $PID_FILE ]]; then
        log "Kafka is not running (no pid file $PID_FILE)"
        return 0
    fi
    local pid t0=$SECONDS
    if ! pid=$(running_pid); then # running_pid removed the stale file
        log "Kafka is not running (removed stale pid file)"
        return 0
    fi
    log "stopping Kafka (pid $pid) ..."
    terminate "$pid"
    rm -f "$PID_FILE"
    log "Kafka stopped after $((SECONDS - t0))s"
}

cmd_status() {
    if external_broker; then
        # Probe the first host:port of the list.
        local first=${KAFKA_BOOTSTRAP_SERVERS%%,*}
        first=${first#*://}
        if port_open "${first%:*}" "${first##*:}"; then
            log "using external broker $KAFKA_BOOTSTRAP_SERVERS (reachable)"
            return 0
        fi
        log "using external broker $KAFKA_BOOTSTRAP_SERVERS (NOT reachable)"
        return 1
    fi
    local pid
    if pid=$(running_pid); then
        if port_open "$HOST" "$PORT"; then
            log "Kafka $KAFKA_VERSION running (pid $pid) on $HOST:$PORT"
        else
            log "Kafka $KAFKA_VERSION running (pid $pid) but $HOST:$PORT is not accepting connections yet"
        fi
        return 0
    fi
    log "Kafka is not running"
    return 1
}

cmd_bootstrap() {
    printf '%s\n' "${KAFKA_BOOTSTRAP_SERVERS:-$HOST:$PORT}"
}

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

case ${1:-} in
fetch) cmd_fetch ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
bootstrap) cmd_bootstrap ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
