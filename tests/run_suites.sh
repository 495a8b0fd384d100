#!/bin/sh
# SPDX-License-Identifier: MIT
#
# run_suites.sh JOBS LOGDIR SUITE...
#
# Runs the Check suites given, JOBS test cases at a time, and exits
# non-zero when any of them failed.  Most of the suites' time is spent
# waiting (a consumer group joining the mock cluster, a relay's retry
# back-off, a SIGKILLed process being noticed), not computing: run one
# after the other they took about ten minutes on two cores for about one
# minute of CPU.  So each test case (tcase_create("name") in the suite's
# source, tests/<suite>.c) runs as its own job, with CK_RUN_CASE; a suite
# whose source names a test case other than by a string literal runs
# whole, as one job, so that no case can be left out.
#
# Each job's output goes to LOGDIR/<suite>.<case>.log and is printed whole
# when the job ends (never interleaved); the end shows each job's time and
# result, slowest first, and the failed ones again.
#
# The environment is passed through (LD_LIBRARY_PATH, DE_TOOL, ...).
# Check's per-test timeouts guard against hangs; with jobs sharing the
# cores they are doubled (CK_TIMEOUT_MULTIPLIER, unless already set).

set -u
jobs=$1
logdir=$2
shift 2
if [ "$jobs" -gt 1 ]; then
    CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-2}
    export CK_TIMEOUT_MULTIPLIER
fi
mkdir -p "$logdir"
rm -f "$logdir"/*.log "$logdir"/*.result

list=$logdir/jobs
: >"$list"
for bin in "$@"; do
    src=tests/$(basename "$bin").c
    all=$(grep -c 'tcase_create(' "$src" 2>/dev/null || echo 0)
    names=$(grep -o 'tcase_create("[^"]*")' "$src" 2>/dev/null |
        sed 's/^tcase_create("\(.*\)")$/\1/')
    n=$(printf '%s\n' "$names" | grep -c .)
    if [ "$all" -gt 0 ] && [ "$n" = "$all" ]; then
        for c in $names; do printf '%s %s\n' "$bin" "$c" >>"$list"; done
    else
        printf '%s %s\n' "$bin" - >>"$list"
    fi
done

# One job: run it, keep its log, print it under a lock.
run_one() {
    bin=$1
    case=$2
    name=$(basename "$bin").$case
    log=$logdir/$name.log
    start=$(date +%s)
    if [ "$case" = - ]; then
        "$bin" >"$log" 2>&1
    else
        CK_RUN_CASE=$case "$bin" >"$log" 2>&1
    fi
    rc=$?
    secs=$(($(date +%s) - start))
    if [ $rc = 0 ]; then r=ok; else r="FAILED (exit $rc)"; fi
    printf '%6ss  %s  %s\n' "$secs" "$name" "$r" >"$logdir/$name.result"
    (
        flock 9
        printf '== %s (%s s, %s)\n' "$name" "$secs" "$r"
        cat "$log"
    ) 9>"$logdir/.print-lock"
    return $rc
}
export logdir

# xargs runs each job in a fresh shell: the function travels as text.
fn=$(sed -n '/^run_one() {$/,/^}$/p' "$0")
xargs -P "$jobs" -L 1 sh -c "$fn"'
run_one "$@"' sh <"$list"
status=$?

echo "== times (slowest first)"
cat "$logdir"/*.result | sort -rn
if grep -l FAILED "$logdir"/*.result >/dev/null 2>&1; then
    echo "== failed:"
    grep -h FAILED "$logdir"/*.result
    exit 1
fi
[ $status = 0 ] || { echo "run_suites.sh: xargs exited $status" >&2; exit 1; }
echo "== all $(wc -l <"$list") jobs passed"
