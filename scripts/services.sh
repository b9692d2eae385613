#!/usr/bin/env bash
# Local Redis + tansu (Kafka-API broker) for development and tests.
# Run `scripts/services.sh -h` for usage. tansu's quirks, and what this script
# and the code do about them, are listed in docs/tansu.md (numbered; the
# comments below cite them as "tansu 1" etc.).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/services.sh start|stop|status

Runs Redis and tansu (a Kafka-API-compatible broker) on 127.0.0.1 for
development and tests. Each instance keeps its pid file and log in a
per-port directory under .services/ at the repo root, so a dev instance on
the default ports and a test instance on other ports can run side by side.

Commands:
  start    install what is missing (Debian redis-server, tansu via cargo),
           start both services unless already running, wait until they
           answer, create the topics if absent, and print the client env
           lines (KAFKA_BROKER=..., REDIS_URL=...) on stdout.
  stop     stop the instances this script started on these ports (by pid
           file); stopping something that is not running is not an error.
  status   print each service's state; exit 0 if both are up, 1 otherwise.

Environment (defaults in brackets):
  REDIS_PORT          Redis port [6379]
  KAFKA_PORT          tansu port, also advertised as 127.0.0.1:PORT [9092]
  TANSU_STORAGE       tansu storage engine URL [sqlite://tansu.db, a file in
                      the instance's state dir]; tests use memory://tansu/.
                      sqlite:// paths are relative to the state dir.
  REDIS_PERSIST       set to 1 to let Redis snapshot (RDB) into its state
                      dir; default: no persistence (--save '' --appendonly no)
  REDIS_CLUSTER       set to 1 for a Redis Cluster of 3 masters on REDIS_PORT,
                      REDIS_PORT+1 and REDIS_PORT+2 (no replicas); the env
                      lines then carry the seed list and REDIS_CLUSTER=1.
                      Without persistence the cluster is created anew at
                      each start (stop forgets it).
  KAFKA_TOPIC         [user_behavior], created with KAFKA_PARTITIONS [4]
  DLQ_TOPIC           [user_behavior.dlq], 1 partition
  ITEM_TOPIC          [item_features], 1 partition
  SERVICES_WAIT_SECS  how long to wait for the services to answer [30]
  TANSU_RUST_LOG      RUST_LOG given to tansu [warn]
  TANSU_VERSION       version installed when tansu is missing [0.6.0]
  SERVICES            which services to manage ["redis tansu"]; e.g.
                      SERVICES=tansu to use a Redis you run yourself

Examples:
  scripts/services.sh start
  REDIS_PORT=16379 KAFKA_PORT=19092 TANSU_STORAGE=memory://tansu/ \
      scripts/services.sh start
  eval "$(scripts/services.sh start)"   # sets KAFKA_BROKER and REDIS_URL
  REDIS_CLUSTER=1 REDIS_PORT=17000 SERVICES=redis scripts/services.sh start
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

REDIS_PORT=${REDIS_PORT:-6379}
KAFKA_PORT=${KAFKA_PORT:-9092}
TANSU_STORAGE=${TANSU_STORAGE:-sqlite://tansu.db}
REDIS_PERSIST=${REDIS_PERSIST:-0}
REDIS_CLUSTER=${REDIS_CLUSTER:-0}
KAFKA_TOPIC=${KAFKA_TOPIC:-user_behavior}
KAFKA_PARTITIONS=${KAFKA_PARTITIONS:-4}
DLQ_TOPIC=${DLQ_TOPIC:-user_behavior.dlq}
ITEM_TOPIC=${ITEM_TOPIC:-item_features}
SERVICES_WAIT_SECS=${SERVICES_WAIT_SECS:-30}
TANSU_RUST_LOG=${TANSU_RUST_LOG:-warn}
TANSU_VERSION=${TANSU_VERSION:-0.6.0}
SERVICES=${SERVICES:-redis tansu}

HOST=127.0.0.1
SERVICES_DIR=$ROOT/.services
TANSU_DIR=$SERVICES_DIR/tansu-$KAFKA_PORT
# The Redis ports: one, or the cluster's three masters.
REDIS_PORTS=("$REDIS_PORT")
if [[ $REDIS_CLUSTER == 1 ]]; then
    REDIS_PORTS=("$REDIS_PORT" "$((REDIS_PORT + 1))" "$((REDIS_PORT + 2))")
fi
# The Redis instance the redis_* functions act on; select_redis switches them to another port.
select_redis() {
    REDIS_NODE_PORT=$1
    REDIS_DIR=$SERVICES_DIR/redis-$REDIS_NODE_PORT
    REDIS_PIDFILE=$REDIS_DIR/redis.pid
}
select_redis "$REDIS_PORT"
TANSU_PIDFILE=$TANSU_DIR/tansu.pid
TANSU_BROKER_URL=tcp://$HOST:$KAFKA_PORT

TANSU_BIN=
APT_UPDATED=0

log() { printf 'services: %s\n' "$*" >&2; }
die() {
    printf 'services: error: %s\n' "$*" >&2
    exit 1
}

check_port_number() {
    local name=$1 value=$2
    if ! [[ $value =~ ^[1-9][0-9]{0,4}$ ]] || ((value > 65535)); then
        die "$name=$value is not a valid port number"
    fi
}

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install these packages by hand: $*"
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >&2
}

ensure_redis_installed() {
    if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
        return 0
    fi
    apt_install redis-server
}

# tansu on PATH, else where `cargo install` puts it.
find_tansu() { PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin" command -v tansu; }

ensure_tansu_installed() {
    if TANSU_BIN=$(find_tansu); then
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || die "tansu is not installed and cargo is not on PATH"
    mkdir -p "$SERVICES_DIR"
    local install_log=$SERVICES_DIR/tansu-install.log
    log "installing tansu $TANSU_VERSION with cargo (takes 10-15 minutes; log: $install_log)"
    # From / with CARGO_TARGET_DIR unset: the repo's cargo config, toolchain
    # file and target dir must not leak into this unrelated build.
    if ! (cd / && env -u CARGO_TARGET_DIR cargo install tansu --version "$TANSU_VERSION" \
        --locked --features dynostore,libsql) >"$install_log" 2>&1; then
        tail -n 40 "$install_log" >&2
        die "cargo install tansu failed (full log: $install_log)"
    fi
    TANSU_BIN=$(find_tansu) || die "tansu was installed but is neither on PATH nor in ${CARGO_HOME:-$HOME/.cargo}/bin"
    log "installed $("$TANSU_BIN" --version)"
}

# Prints the pid from a pid file if that process is alive and its command
# line contains the expected program name; fails otherwise.
our_pid() {
    local pidfile=$1 pattern=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -Eq -- "$pattern" || return 1
    printf '%s\n' "$pid"
}

redis_pid() { our_pid "$REDIS_PIDFILE" "redis-server [^ ]*:$REDIS_NODE_PORT( |\$)"; }
tansu_pid() { our_pid "$TANSU_PIDFILE" "tansu broker .*--listener-url tcp://$HOST:$KAFKA_PORT( |\$)"; }

port_accepts() {
    local port=$1
    (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null
}

# Who listens on a port, as ss tells: users:(("python3",pid=123,fd=3)).
port_owner() {
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:.*' | head -n 1 || true
}

port_taken() {
    local port=$1
    if command -v ss >/dev/null 2>&1 && [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then
        return 0
    fi
    port_accepts "$port"
}

fail_port_taken() {
    local port=$1 var=$2 owner
    owner=$(port_owner "$port")
    die "port $port is in use by another process${owner:+: $owner}; stop it or set $var to a free port"
}

redis_ping() {
    [[ $(redis-cli -h "$HOST" -p "$REDIS_NODE_PORT" ping 2>/dev/null) == PONG ]]
}

# Whether the selected instance runs in cluster mode, as REDIS_CLUSTER asks.
redis_mode_matches() {
    local enabled
    enabled=$(redis-cli -h "$HOST" -p "$REDIS_NODE_PORT" info cluster 2>/dev/null |
        tr -d '\r' | sed -n 's/^cluster_enabled://p')
    [[ $enabled == "$REDIS_CLUSTER" ]]
}

cluster_state_ok() {
    redis-cli -h "$HOST" -p "$REDIS_PORT" cluster info 2>/dev/null | tr -d '\r' |
        grep -qx 'cluster_state:ok'
}

tansu_cli() {
    # cd: tansu reads a .env file from its working directory (tansu 1).
    (cd "$TANSU_DIR" && RUST_LOG=$TANSU_RUST_LOG "$TANSU_BIN" "$@")
}

tansu_topics_json() {
    tansu_cli topic list --broker "$TANSU_BROKER_URL" 2>/dev/null
}

tansu_answers() {
    port_accepts "$KAFKA_PORT" && tansu_topics_json >/dev/null
}

# Waits until $check_fn answers. For its first 5 s a service without a pid ($pid_fn) is still
# starting, not dead: Redis writes its pid file after forking, and tansu's command line is
# bash's until the subshell has exec'd it, and empty for an instant in between (tansu 7).
wait_for() {
    local what=$1 pid_fn=$2 check_fn=$3 logfile=$4 started=$SECONDS
    until "$check_fn"; do
        if ! "$pid_fn" >/dev/null && ((SECONDS - started >= 5)); then
            tail -n 20 "$logfile" >&2 2>/dev/null || true
            die "$what exited during startup (log: $logfile)"
        fi
        if ((SECONDS - started >= SERVICES_WAIT_SECS)); then
            tail -n 20 "$logfile" >&2 2>/dev/null || true
            die "$what did not answer within ${SERVICES_WAIT_SECS}s (log: $logfile)"
        fi
        sleep 0.2
    done
}

start_redis() {
    local port
    for port in "${REDIS_PORTS[@]}"; do
        select_redis "$port"
        start_redis_instance
    done
    select_redis "$REDIS_PORT"
    if [[ $REDIS_CLUSTER == 1 ]]; then create_cluster; fi
}

start_redis_instance() {
    local pid
    if pid=$(redis_pid); then
        wait_for redis redis_pid redis_ping "$REDIS_DIR/redis.log"
        redis_mode_matches ||
            die "redis on $HOST:$REDIS_NODE_PORT runs with cluster_enabled other than REDIS_CLUSTER=$REDIS_CLUSTER; stop it first"
        log "redis: already running on $HOST:$REDIS_NODE_PORT (pid $pid)"
        return 0
    fi
    ensure_redis_installed
    mkdir -p "$REDIS_DIR"
    rm -f "$REDIS_PIDFILE"
    local persistence=(--save '' --appendonly no) cluster=()
    if [[ $REDIS_PERSIST == 1 ]]; then
        persistence=(--save '300 1' --appendonly no)
    fi
    if [[ $REDIS_CLUSTER == 1 ]]; then
        cluster=(--cluster-enabled yes --cluster-config-file nodes.conf)
    fi
    log "redis: starting on $HOST:$REDIS_NODE_PORT (state: ${REDIS_DIR#"$ROOT"/})"
    redis-server --bind "$HOST" --port "$REDIS_NODE_PORT" --protected-mode yes \
        --daemonize yes --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_DIR/redis.log" \
        --dir "$REDIS_DIR" "${persistence[@]}" "${cluster[@]}" </dev/null >&2 9>&- ||
        die "redis-server failed to start (log: $REDIS_DIR/redis.log)"
    wait_for redis redis_pid redis_ping "$REDIS_DIR/redis.log"
    log "redis: up on $HOST:$REDIS_NODE_PORT (pid $(redis_pid))"
}

# Joins the three instances into one cluster, each master of a third of the slots, unless they
# already are one; then waits until every node agrees the cluster is ok.
create_cluster() {
    if cluster_state_ok; then
        log "redis cluster: already formed on ports ${REDIS_PORTS[*]}"
        return 0
    fi
    local nodes=() port started=$SECONDS
    for port in "${REDIS_PORTS[@]}"; do nodes+=("$HOST:$port"); done
    log "redis cluster: creating with masters ${nodes[*]}"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
        >"$SERVICES_DIR/redis-$REDIS_PORT/cluster-create.log" 2>&1 ||
        die "redis-cli --cluster create failed (log: .services/redis-$REDIS_PORT/cluster-create.log); stop the services and start again"
    until cluster_state_ok && all_nodes_agree; do
        ((SECONDS - started < SERVICES_WAIT_SECS)) ||
            die "redis cluster: not ok within ${SERVICES_WAIT_SECS}s"
        sleep 0.2
    done
    log "redis cluster: ok"
}

all_nodes_agree() {
    local port
    for port in "${REDIS_PORTS[@]}"; do
        redis-cli -h "$HOST" -p "$port" cluster info 2>/dev/null | tr -d '\r' |
            grep -qx 'cluster_state:ok' || return 1
    done
}

start_tansu() {
    local pid
    ensure_tansu_installed
    if pid=$(tansu_pid); then
        wait_for tansu tansu_pid tansu_answers "$TANSU_DIR/tansu.log"
        log "tansu: already running on $HOST:$KAFKA_PORT (pid $pid)"
        local running_storage
        running_storage=$(cat "$TANSU_DIR/storage" 2>/dev/null) || true
        if [[ -n $running_storage && $running_storage != "$TANSU_STORAGE" ]]; then
            log "tansu: warning: it uses storage $running_storage, not $TANSU_STORAGE; run stop first to switch"
        fi
        return 0
    fi
    mkdir -p "$TANSU_DIR"
    rm -f "$TANSU_PIDFILE"
    log "tansu: starting on $HOST:$KAFKA_PORT, storage $TANSU_STORAGE (state: ${TANSU_DIR#"$ROOT"/})"
    local detach=()
    if command -v setsid >/dev/null 2>&1; then
        detach=(setsid)
    fi
    (
        cd "$TANSU_DIR" # tansu 1
        RUST_LOG=$TANSU_RUST_LOG exec "${detach[@]}" "$TANSU_BIN" broker \
            --cluster-id streamrec \
            --listener-url "tcp://$HOST:$KAFKA_PORT" \
            --advertised-listener-url "tcp://$HOST:$KAFKA_PORT" \
            --storage-engine "$TANSU_STORAGE" \
            </dev/null >>tansu.log 2>&1 9>&-
    ) &
    echo "$!" >"$TANSU_PIDFILE"
    printf '%s\n' "$TANSU_STORAGE" >"$TANSU_DIR/storage"
    wait_for tansu tansu_pid tansu_answers "$TANSU_DIR/tansu.log"
    log "tansu: up on $HOST:$KAFKA_PORT (pid $(tansu_pid))"
}

topic_exists() {
    local json=$1 name=$2
    grep -qF "\"name\":\"$name\"" <<<"$json"
}

# Partition count of a topic in `tansu topic list` output (JSON); empty if
# python3 is missing.
topic_partitions() {
    local json=$1 name=$2
    command -v python3 >/dev/null 2>&1 || return 0
    python3 -c '
import json, sys
for topic in json.loads(sys.argv[1]):
    if topic.get("name") == sys.argv[2]:
        print(len(topic.get("partitions") or []))
' "$json" "$name" 2>/dev/null || true
}

ensure_topics() {
    local json spec name partitions
    json=$(tansu_topics_json) || die "tansu: listing topics failed"
    for spec in "$KAFKA_TOPIC:$KAFKA_PARTITIONS" "$DLQ_TOPIC:1" "$ITEM_TOPIC:1"; do
        name=${spec%:*}
        partitions=${spec##*:}
        if topic_exists "$json" "$name"; then
            local have
            have=$(topic_partitions "$json" "$name")
            if [[ -n $have && $have != "$partitions" ]]; then
                log "topic $name: exists with $have partition(s), not $partitions (left as is)"
            else
                log "topic $name: exists"
            fi
            continue
        fi
        if tansu_cli topic create --broker "$TANSU_BROKER_URL" \
            --partitions "$partitions" "$name" >>"$TANSU_DIR/topics.log" 2>&1; then
            log "topic $name: created with $partitions partition(s)"
        else
            # Lost a race with another client creating it: fine if it exists now.
            json=$(tansu_topics_json) || true
            topic_exists "$json" "$name" ||
                die "tansu: creating topic $name failed (log: $TANSU_DIR/topics.log)"
            log "topic $name: exists"
        fi
    done
}

print_env() {
    printf 'KAFKA_BROKER=%s:%s\n' "$HOST" "$KAFKA_PORT"
    if [[ $REDIS_CLUSTER == 1 ]]; then
        local seeds=() port
        for port in "${REDIS_PORTS[@]}"; do seeds+=("redis://$HOST:$port"); done
        printf 'REDIS_URL=%s\n' "$(
            IFS=,
            echo "${seeds[*]}"
        )"
        printf 'REDIS_CLUSTER=1\n'
    else
        printf 'REDIS_URL=redis://%s:%s/0\n' "$HOST" "$REDIS_PORT"
    fi
    printf 'KAFKA_TOPIC=%s\n' "$KAFKA_TOPIC"
    printf 'DLQ_TOPIC=%s\n' "$DLQ_TOPIC"
    printf 'ITEM_TOPIC=%s\n' "$ITEM_TOPIC"
}

lock() {
    mkdir -p "$SERVICES_DIR"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$SERVICES_DIR/.lock"
        if ! flock -n 9; then
            log "waiting for another scripts/services.sh to finish"
            flock 9
        fi
    fi
}

wants() { [[ " $SERVICES " == *" $1 "* ]]; }

cmd_start() {
    lock
    # Check both ports before starting anything.
    if wants redis; then
        local port
        for port in "${REDIS_PORTS[@]}"; do
            select_redis "$port"
            if ! redis_pid >/dev/null && port_taken "$port"; then
                fail_port_taken "$port" REDIS_PORT
            fi
        done
    fi
    if wants tansu && ! tansu_pid >/dev/null && port_taken "$KAFKA_PORT"; then
        fail_port_taken "$KAFKA_PORT" KAFKA_PORT
    fi
    if wants redis; then start_redis; fi
    if wants tansu; then
        start_tansu
        ensure_topics
    fi
    print_env
}

stop_one() {
    local what=$1 pid_fn=$2 pidfile=$3 pid i
    if ! pid=$("$pid_fn"); then
        rm -f "$pidfile"
        log "$what: not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$what: still running after 10s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    log "$what: stopped (pid $pid)"
}

cmd_stop() {
    lock
    if wants tansu; then stop_one "tansu ($HOST:$KAFKA_PORT)" tansu_pid "$TANSU_PIDFILE"; fi
    if wants redis; then
        local port
        for port in "${REDIS_PORTS[@]}"; do
            select_redis "$port"
            stop_one "redis ($HOST:$port)" redis_pid "$REDIS_PIDFILE"
            # Without persistence the data is gone; so is the cluster, created anew at start.
            if [[ $REDIS_PERSIST != 1 ]]; then rm -f "$REDIS_DIR/nodes.conf"; fi
        done
    fi
}

# One service's state: what, its port, its pid function, its health check and what that
# check proves.
status_one() {
    local what=$1 port=$2 pid_fn=$3 check_fn=$4 answers=$5 pid owner
    if pid=$("$pid_fn"); then
        if "$check_fn"; then
            echo "$what: running on $HOST:$port (pid $pid), $answers"
            return 0
        fi
        echo "$what: process running (pid $pid) but not answering on $HOST:$port"
    elif port_taken "$port"; then
        owner=$(port_owner "$port")
        echo "$what: not running (ours); port $port is in use by another process${owner:+: $owner}"
    else
        echo "$what: not running"
    fi
    return 1
}

tansu_status_check() { TANSU_BIN=$(find_tansu) && tansu_answers; }

cmd_status() {
    local ok=0
    if wants redis; then
        local port
        for port in "${REDIS_PORTS[@]}"; do
            select_redis "$port"
            status_one redis "$port" redis_pid redis_ping "answers PING" || ok=1
        done
        if [[ $REDIS_CLUSTER == 1 ]]; then
            if cluster_state_ok; then echo "redis cluster: ok"; else
                echo "redis cluster: not ok"
                ok=1
            fi
        fi
    fi
    if wants tansu; then
        status_one tansu "$KAFKA_PORT" tansu_pid tansu_status_check \
            "storage $(cat "$TANSU_DIR/storage" 2>/dev/null || echo '?'), answers metadata requests" || ok=1
    fi
    return "$ok"
}

main() {
    if [[ $# -ne 1 ]]; then
        usage >&2
        exit 2
    fi
    case $1 in
    -h | --help | help)
        usage
        exit 0
        ;;
    start | stop | status) ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
    check_port_number REDIS_PORT "$REDIS_PORT"
    check_port_number KAFKA_PORT "$KAFKA_PORT"
    [[ $REDIS_CLUSTER == 0 || $REDIS_CLUSTER == 1 ]] || die "REDIS_CLUSTER=$REDIS_CLUSTER: 0 or 1"
    local redis_port
    for redis_port in "${REDIS_PORTS[@]}"; do
        check_port_number REDIS_PORT "$redis_port"
        [[ $redis_port != "$KAFKA_PORT" ]] || die "the Redis ports (${REDIS_PORTS[*]}) and KAFKA_PORT must differ"
    done
    local service
    for service in $SERVICES; do
        [[ $service == redis || $service == tansu ]] ||
            die "SERVICES=\"$SERVICES\": unknown service $service (known: redis tansu)"
    done
    [[ $KAFKA_PARTITIONS =~ ^[1-9][0-9]*$ ]] || die "KAFKA_PARTITIONS=$KAFKA_PARTITIONS is not a positive number"
    "cmd_$1"
}

main "$@"
