#!/usr/bin/env bash
# End-to-end benchmark of the ingest API on the full data set. Run `scripts/bench-ingest.sh -h`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/bench-ingest.sh

Measures the ingest API end to end on this machine:
  1. starts a dedicated Redis + tansu (in-memory) on the bench ports, unless
     already running there (scripts/services.sh);
  2. generates data/full/ if missing (scripts/gen-full-data.sh);
  3. builds the release binary (unless INGEST_API_BIN is given);
  4. starts the API on the full behaviour CSV, waits for /healthz, and reads
     the CSV load time (metrics) and peak RSS (VmHWM) after the load;
  5. for each route: warms up, then runs wrk with a random real user per
     request, and records req/s, p50/p90/p99, non-200 answers, socket errors
     and the CPU that the API, tansu, wrk and everything else used meanwhile;
  6. prints a table, and stops everything it started (also on error/Ctrl-C).

tansu keeps every message in RAM, so it is restarted before each route when
this script started it. The machine may be shared: before each run the script
waits (at most BENCH_QUIET_WAIT seconds) for the machine to be nearly idle, and
the "others" column shows the CPU that processes other than the API, tansu and
wrk took during the run; a run with others well above ~10% measured a
contended machine.

Environment (defaults in brackets):
  BENCH_DURATION       seconds of each measured wrk run [20]
  BENCH_WARMUP         seconds of the warm-up run before each [3]
  BENCH_CONNECTIONS    wrk connections [64]
  BENCH_THREADS        wrk threads [2]
  BENCH_ROUTES         routes to measure ["push_interest send_kafka"]
  BENCH_USERS          distinct random users the requests pick from [10000]
  BENCH_TIMESTAMP      timestamp in every request [2000000000]
  BENCH_QUIET_WAIT     longest wait for an idle machine before a run [60]
  BENCH_MAX_SECS       hard limit on the whole script's run time [1800]
  BENCH_CSV            behaviour CSV [data/full/behavior.csv]
  BENCH_API_PORT       port of the API [18080]
  REDIS_PORT, KAFKA_PORT  bench Redis / tansu ports [16390, 19190]
  INGEST_API_BIN       benchmark this binary instead of building one
  INGEST_API_ARGS      extra flags for the API, e.g. "--linger-ms 2"

Example:
  BENCH_DURATION=30 scripts/bench-ingest.sh
EOF
}

case ${1:-} in
-h | --help)
    usage
    exit 0
    ;;
"") ;;
*)
    usage >&2
    exit 2
    ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BENCH_DURATION=${BENCH_DURATION:-20}
BENCH_WARMUP=${BENCH_WARMUP:-3}
BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-64}
BENCH_THREADS=${BENCH_THREADS:-2}
BENCH_ROUTES=${BENCH_ROUTES:-push_interest send_kafka}
BENCH_USERS=${BENCH_USERS:-10000}
BENCH_TIMESTAMP=${BENCH_TIMESTAMP:-2000000000}
BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-60}
BENCH_MAX_SECS=${BENCH_MAX_SECS:-1800}
BENCH_CSV=${BENCH_CSV:-data/full/behavior.csv}
BENCH_API_PORT=${BENCH_API_PORT:-18080}
export REDIS_PORT=${REDIS_PORT:-16390}
export KAFKA_PORT=${KAFKA_PORT:-19190}
export TANSU_STORAGE=memory://tansu/
INGEST_API_ARGS=${INGEST_API_ARGS:-}

HOST=127.0.0.1
API_URL=http://$HOST:$BENCH_API_PORT
LUA=$ROOT/scripts/bench-ingest.lua

log() { printf 'bench: %s\n' "$*" >&2; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

for n in BENCH_DURATION BENCH_WARMUP BENCH_CONNECTIONS BENCH_THREADS BENCH_USERS \
    BENCH_TIMESTAMP BENCH_QUIET_WAIT BENCH_MAX_SECS BENCH_API_PORT; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "$n=${!n} is not a number"
done
((BENCH_DURATION >= 5)) || die "BENCH_DURATION must be at least 5 seconds"
command -v wrk >/dev/null 2>&1 || die "wrk is not installed (Debian: apt-get install wrk)"
command -v curl >/dev/null 2>&1 || die "curl is not installed"

# --- cleanup and the time limit ---------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-ingest.XXXXXX")
API_PID=
WRK_PID=
WATCHDOG_PID=
CHILD_PID=
STARTED_SERVICES=0
TANSU_FRESH=0

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $CHILD_PID ]] && kill -0 "$CHILD_PID" 2>/dev/null; then
        kill "$CHILD_PID" 2>/dev/null || true
        wait "$CHILD_PID" 2>/dev/null || true
    fi
    if [[ -n $WRK_PID ]] && kill -0 "$WRK_PID" 2>/dev/null; then
        kill "$WRK_PID" 2>/dev/null || true
        wait "$WRK_PID" 2>/dev/null || true
    fi
    if [[ -n $API_PID ]] && kill -0 "$API_PID" 2>/dev/null; then
        kill -INT "$API_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$API_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$API_PID" 2>/dev/null || true
        wait "$API_PID" 2>/dev/null || true
    fi
    if [[ $STARTED_SERVICES == 1 ]]; then
        log "stopping the bench services"
        scripts/services.sh stop >/dev/null 2>&1 || true
    fi
    if [[ -n $WATCHDOG_PID ]]; then
        kill "$WATCHDOG_PID" 2>/dev/null || true
        wait "$WATCHDOG_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "stopped: SIGTERM, or the time limit of ${BENCH_MAX_SECS}s"; exit 143' TERM

# The whole run is bounded: past BENCH_MAX_SECS the script gets SIGTERM and cleans up. The
# watchdog keeps none of our output open (a pipe reading this script would never see its end)
# and takes its sleep down with it when cleanup stops it.
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$BENCH_MAX_SECS" &
    sleeper=$!
    wait "$sleeper"
    kill -TERM $$
) </dev/null >/dev/null 2>&1 &
WATCHDOG_PID=$!

# --- helpers -----------------------------------------------------------------------------------

# CPU ticks (user+system) of a process, all its threads included.
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Busy and total ticks of the whole machine.
machine_ticks() { awk '/^cpu /{busy = $2 + $3 + $4 + $7 + $8; print busy, busy + $5 + $6}' /proc/stat; }

# Waits until the machine is nearly idle (< 15% of one core over 2 s) or BENCH_QUIET_WAIT passed.
wait_for_quiet() {
    local deadline=$((SECONDS + BENCH_QUIET_WAIT)) b0 t0 b1 t1 pct
    while :; do
        read -r b0 t0 < <(machine_ticks)
        sleep 2
        read -r b1 t1 < <(machine_ticks)
        pct=$(((b1 - b0) * 100 * $(nproc) / (t1 - t0 + 1)))
        if ((pct < 15)); then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            log "warning: machine still ${pct}% busy (of one core) after ${BENCH_QUIET_WAIT}s; measuring anyway"
            return 0
        fi
    done
}

tansu_pid() { cat "$ROOT/.services/tansu-$KAFKA_PORT/tansu.pid" 2>/dev/null || true; }

start_services() {
    if scripts/services.sh status >/dev/null 2>&1; then
        log "bench services already running on $REDIS_PORT/$KAFKA_PORT: using them (not restarted)"
        return 0
    fi
    log "starting Redis ($REDIS_PORT) and tansu ($KAFKA_PORT, in memory)"
    STARTED_SERVICES=1
    scripts/services.sh start >/dev/null 2>"$WORK/services.log" ||
        die "scripts/services.sh start failed: $(tail -n 5 "$WORK/services.log")"
    TANSU_FRESH=1
}

# tansu keeps all messages in RAM: start each route on an empty broker when we own it.
restart_tansu() {
    [[ $STARTED_SERVICES == 1 ]] || return 0
    if [[ $TANSU_FRESH == 1 ]]; then
        TANSU_FRESH=0
        return 0
    fi
    SERVICES=tansu scripts/services.sh stop >/dev/null 2>&1
    SERVICES=tansu scripts/services.sh start >/dev/null 2>"$WORK/services.log" ||
        die "restarting tansu failed: $(tail -n 5 "$WORK/services.log")"
}

start_api() {
    local log_file=$WORK/api.log
    # shellcheck disable=SC2086 # INGEST_API_ARGS is a list of flags
    "$BIN" --behavior-csv "$BENCH_CSV" --brokers "$HOST:$KAFKA_PORT" \
        --redis "redis://$HOST:$REDIS_PORT/0" --bind "$HOST:$BENCH_API_PORT" \
        $INGEST_API_ARGS >"$log_file" 2>&1 &
    API_PID=$!
    local deadline=$((SECONDS + 120))
    until curl -sf -o /dev/null "$API_URL/healthz"; do
        if ! kill -0 "$API_PID" 2>/dev/null; then
            tail -n 20 "$log_file" >&2
            die "the API exited during start-up (log above)"
        fi
        ((SECONDS < deadline)) || die "the API did not answer /healthz within 120s"
        sleep 0.2
    done
}

stop_api() {
    kill -INT "$API_PID" 2>/dev/null || true
    wait "$API_PID" 2>/dev/null || true
    API_PID=
}

# Runs wrk on a route; writes "rps p50 p90 p99 max non200 errors api% tansu% wrk% others%" to
# $WORK/row-ROUTE. (Not a $(...) subshell: the cleanup trap must see WRK_PID.)
measure() {
    local route=$1 out=$WORK/wrk-$1.txt
    local tpid a0 t0 w0 m0 m_total0 a1 t1 w1 m1 m_total1
    wrk -t"$BENCH_THREADS" -c"$BENCH_CONNECTIONS" -d"${BENCH_WARMUP}s" -s "$LUA" \
        "$API_URL/$route/" -- "$WORK/users.txt" >/dev/null &
    WRK_PID=$!
    wait "$WRK_PID" || die "wrk failed on /$route/ (warm-up)"
    WRK_PID=
    wait_for_quiet
    tpid=$(tansu_pid)
    wrk -t"$BENCH_THREADS" -c"$BENCH_CONNECTIONS" -d"${BENCH_DURATION}s" --latency -s "$LUA" \
        "$API_URL/$route/" -- "$WORK/users.txt" >"$out" &
    WRK_PID=$!
    # CPU over the middle of the run (skipping the first and last 2 s).
    sleep 2
    a0=$(proc_ticks "$API_PID") t0=$(proc_ticks "$tpid") w0=$(proc_ticks "$WRK_PID")
    read -r m0 m_total0 < <(machine_ticks)
    sleep $((BENCH_DURATION - 4))
    a1=$(proc_ticks "$API_PID") t1=$(proc_ticks "$tpid") w1=$(proc_ticks "$WRK_PID")
    read -r m1 m_total1 < <(machine_ticks)
    wait "$WRK_PID" || die "wrk failed on /$route/ (output: $(cat "$out"))"
    WRK_PID=
    grep -q '^summary ' "$out" || die "no summary from wrk on /$route/: $(cat "$out")"
    awk -v a=$((a1 - a0)) -v t=$((t1 - t0)) -v w=$((w1 - w0)) -v m=$((m1 - m0)) \
        -v mt=$((m_total1 - m_total0)) -v secs=$((BENCH_DURATION - 4)) \
        -v hz="$(getconf CLK_TCK)" -v cores="$(nproc)" '
        /^summary / { for (i = 2; i <= NF; i++) { split($i, kv, "="); s[kv[1]] = kv[2] } }
        /^non200 / { non200 = $2 }
        /^errors / { errors = $2 }
        END {
            api = 100 * a / hz / secs; tansu = 100 * t / hz / secs; wrk = 100 * w / hz / secs
            machine = 100 * cores * m / mt
            others = machine - api - tansu - wrk; if (others < 0) others = 0
            printf "%s %s %s %s %s %s %s %.0f %.0f %.0f %.0f\n", s["rps"], s["p50_ms"], s["p90_ms"],
                s["p99_ms"], s["max_ms"], non200, errors, api, tansu, wrk, others
        }' "$out" >"$WORK/row-$route"
}

# Runs a long command in the background and waits for it, so that a signal (the time limit,
# Ctrl-C) is handled at once rather than after the command ends.
run_bounded() {
    "$@" &
    CHILD_PID=$!
    wait "$CHILD_PID"
    CHILD_PID=
}

# --- the run -----------------------------------------------------------------------------------

start_services

if [[ ! -s $BENCH_CSV ]]; then
    [[ $BENCH_CSV == data/full/behavior.csv ]] || die "$BENCH_CSV does not exist"
    log "generating the full data set (scripts/gen-full-data.sh)"
    run_bounded timeout 1200 scripts/gen-full-data.sh >&2
fi

if [[ -n ${INGEST_API_BIN:-} ]]; then
    BIN=$INGEST_API_BIN
    [[ -x $BIN ]] || die "INGEST_API_BIN=$BIN is not an executable"
else
    log "building the release binary"
    run_bounded timeout 1200 cargo build --release -q -p streamrec-ingest-api >&2
    BIN=$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/ingest-api
    [[ -x $BIN ]] || die "built binary not found at $BIN"
fi

log "picking $BENCH_USERS random users from $BENCH_CSV"
# Distinct user ids (first column) in a fixed pseudo-random order, so runs are comparable.
tail -n +2 "$BENCH_CSV" | cut -d, -f1 | awk '!seen[$0]++' |
    shuf -n "$BENCH_USERS" --random-source=<(yes) >"$WORK/users.txt"
[[ -s $WORK/users.txt ]] || die "no user ids found in $BENCH_CSV"
# The Lua script writes the body; it must see the configured timestamp.
sed "s/2000000000/$BENCH_TIMESTAMP/" "$LUA" >"$WORK/bench.lua"
LUA=$WORK/bench.lua

results=()
load_seconds=
load_rss_mb=
peak_rss_mb=
for route in $BENCH_ROUTES; do
    restart_tansu
    start_api
    if [[ -z $load_seconds ]]; then
        load_seconds=$(curl -sf "$API_URL/metrics" |
            awk '/^streamrec_ingest_behavior_load_seconds /{printf "%.2f", $2}')
        load_rss_mb=$(awk '/^VmHWM:/{printf "%.0f", $2 / 1024}' "/proc/$API_PID/status")
        log "CSV loaded in ${load_seconds}s, peak RSS ${load_rss_mb} MB"
    fi
    # A sanity check: a benchmark of 404s would be worthless.
    first_user=$(head -n 1 "$WORK/users.txt")
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
        -d "{\"user_id\": \"$first_user\", \"timestamp\": $BENCH_TIMESTAMP}" "$API_URL/$route/")
    [[ $code == 200 ]] || die "POST /$route/ for $first_user answered $code, not 200"
    log "measuring /$route/ for ${BENCH_DURATION}s at $BENCH_CONNECTIONS connections"
    measure "$route"
    results+=("$route $(cat "$WORK/row-$route")")
    peak=$(awk '/^VmHWM:/{printf "%.0f", $2 / 1024}' "/proc/$API_PID/status")
    if [[ -z $peak_rss_mb ]] || ((peak > peak_rss_mb)); then peak_rss_mb=$peak; fi
    stop_api
done

printf '\ningest API benchmark: %s, %s cores, wrk -t%s -c%s -d%ss, commit %s%s\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(nproc)" "$BENCH_THREADS" "$BENCH_CONNECTIONS" \
    "$BENCH_DURATION" "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(git diff --quiet HEAD -- ingest-api 2>/dev/null || echo ' (ingest-api modified)')"
printf 'CSV load: %s s   RSS after load: %s MB   peak RSS: %s MB\n\n' \
    "$load_seconds" "$load_rss_mb" "$peak_rss_mb"
printf '%-14s %9s %8s %8s %8s %8s %7s %6s %6s %6s %5s %7s\n' route req/s p50_ms p90_ms \
    p99_ms max_ms non200 errors api% tansu% wrk% others%
for row in "${results[@]}"; do
    # shellcheck disable=SC2086 # one row of space-separated fields
    printf '%-14s %9s %8s %8s %8s %8s %7s %6s %6s %6s %5s %7s\n' $row
done
