#!/bin/sh
# SPDX-License-Identifier: MIT
#
# check_remote.sh TOOL SUITE... -- runs test suites with
# KAFKA_BOOTSTRAP_SERVERS pointing at a Kafka cluster in another process:
# the librdkafka mock started by `TOOL mock-cluster`.  Every test that also
# runs against a real cluster then runs its real-cluster variant here,
# over sockets the test process does not own.  The mock has no
# controller, so topics are left to be created on first use
# (KAFKA_TEST_AUTOCREATE_TOPICS=1).  Only the real-cluster variants run
# (KAFKA_TEST_REAL_ONLY=1, and the mock-only fault cases are excluded by
# their tag): `make check` runs the others.  See docs/TESTING.md.
set -eu

tool=$1
shift
dir=$(mktemp -d)
mock=
cleanup() {
    exec 3>&- 2>/dev/null || true
    [ -n "$mock" ] && wait "$mock" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

mkfifo "$dir/stdin"
# The mock runs until its stdin ends: when this script exits, however.
"$tool" mock-cluster --brokers 3 --until-stdin-eof <"$dir/stdin" \
    >"$dir/out" 2>"$dir/err" &
mock=$!
exec 3>"$dir/stdin"

bootstrap=
for _ in $(seq 1 100); do
    bootstrap=$(sed -n 's/^bootstrap.servers=//p' "$dir/out")
    [ -n "$bootstrap" ] && break
    kill -0 "$mock" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$bootstrap" ]; then
    echo "check-remote: the mock cluster did not start:" >&2
    cat "$dir/err" >&2
    exit 1
fi
echo "check-remote: cluster in process $mock at $bootstrap"

# The suites' test cases share the one cluster, as they would a real one.
fail=0
KAFKA_BOOTSTRAP_SERVERS=$bootstrap KAFKA_TEST_AUTOCREATE_TOPICS=1 \
    KAFKA_TEST_REAL_ONLY=1 CK_EXCLUDE_TAGS=mock-only \
    sh "$(dirname "$0")/run_suites.sh" "${CHECK_JOBS:-4}" "$dir/logs" "$@" ||
    fail=1
exit $fail
