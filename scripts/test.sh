#!/usr/bin/env bash
# The project's test command: starts (or reuses) the test Redis + tansu
# instance on its own ports with in-memory storage, then runs the workspace
# tests against it. Extra arguments go to `cargo test`, e.g.
#   scripts/test.sh -p streamrec-profile -- --nocapture
# Set STREAMREC_TEST_REDIS / STREAMREC_TEST_BROKERS to use a Redis / broker
# of your own instead; the ports can be moved with STREAMREC_TEST_REDIS_PORT
# and STREAMREC_TEST_KAFKA_PORT.
# The test services are left running (they are cheap); stop them with
#   REDIS_PORT=16379 KAFKA_PORT=19092 scripts/services.sh stop
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

redis_port=${STREAMREC_TEST_REDIS_PORT:-16379}
kafka_port=${STREAMREC_TEST_KAFKA_PORT:-19092}

# A STREAMREC_TEST_REDIS or STREAMREC_TEST_BROKERS already set by the caller
# means "use that one": the script then leaves that service alone.
services=
[[ -n ${STREAMREC_TEST_REDIS:-} ]] || services+=" redis"
[[ -n ${STREAMREC_TEST_BROKERS:-} ]] || services+=" tansu"
if [[ -n $services ]]; then
    SERVICES=$services REDIS_PORT=$redis_port KAFKA_PORT=$kafka_port \
        TANSU_STORAGE=memory://tansu/ scripts/services.sh start >/dev/null
fi

export STREAMREC_TEST_BROKERS=${STREAMREC_TEST_BROKERS:-127.0.0.1:$kafka_port}
export STREAMREC_TEST_REDIS=${STREAMREC_TEST_REDIS:-redis://127.0.0.1:$redis_port/0}
# The binaries the tests start write their checkpoints under target/, not into the source tree
# (a test that cares passes --checkpoint-dir).
export CHECKPOINT_DIR=${CHECKPOINT_DIR:-$ROOT/target/test-checkpoints}
echo "test.sh: STREAMREC_TEST_BROKERS=$STREAMREC_TEST_BROKERS STREAMREC_TEST_REDIS=$STREAMREC_TEST_REDIS" >&2

rc=0
log=$(mktemp)
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || rc=$?
# One line for the whole workspace: cargo prints a result per test binary, and the last few are
# doc tests with nothing in them.
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
rm -f "$log"

if [[ -n $services ]]; then
    echo "test.sh: test services (${services# }) left running on 127.0.0.1:$redis_port" \
        "(redis) / 127.0.0.1:$kafka_port (tansu); stop them with:" \
        "REDIS_PORT=$redis_port KAFKA_PORT=$kafka_port scripts/services.sh stop" >&2
fi
exit "$rc"
