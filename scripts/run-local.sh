#!/usr/bin/env bash
# One command from a fresh Debian machine to a running streamrec: installs and starts Redis and
# tansu (scripts/services.sh), builds the release binaries, then runs the ingest API in the
# background and the dataflow in the foreground. Ctrl-C stops both binaries (the services keep
# running; `scripts/services.sh stop` stops them).
#
#   scripts/run-local.sh            # dataflow with 2 workers
#   scripts/run-local.sh -w 1       # extra arguments go to the dataflow
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The services print the client settings (KAFKA_BROKER=..., REDIS_URL=...) on stdout.
set -a
eval "$(scripts/services.sh start)"
set +a

cargo build --release -p streamrec-ingest-api -p streamrec-dataflow

api_pid=
cleanup() {
    if [[ -n $api_pid ]]; then
        kill -TERM "$api_pid" 2>/dev/null || true
        wait "$api_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

./target/release/ingest-api &
api_pid=$!
echo "run-local: ingest API on ${BIND:-127.0.0.1:8000} (docs at /docs); dataflow follows" >&2

if [[ $# -eq 0 ]]; then
    set -- -w 2
fi
./target/release/dataflow "$@"
