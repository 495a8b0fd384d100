#!/bin/sh
# SPDX-License-Identifier: MIT
# The demo behind `make demo`, on an embedded Kafka (librdkafka's mock
# cluster, started by `deliveryevents mock-cluster`; no broker to install):
#
#   delivery_service --(its own transactions: state + event)--> SQLite
#        relay (a thread in the service, woken by each commit) --> Kafka
#   query_model, notifier, live_stats  <-- consume, each into its own SQLite
#
# then `deliveryevents tail` reads the topic back and checks every
# delivery's events are there, in order, and finally `deliveryevents
# archive` writes the events to gzip'd NDJSON files partitioned by event
# hour, and sqlite3 (when installed) answers one question from them alone.
# Usage: demo.sh BUILD_DIR
set -eu
. "$(dirname "$0")/mock_cluster.sh"
build=${1:?usage: demo.sh BUILD_DIR}
tool="$build/deliveryevents"
ex="$build/examples"
work=$(mktemp -d "${TMPDIR:-/tmp}/de-demo-XXXXXX")
mock_pid=
pids=
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    exec 3>&- 2>/dev/null || true
    [ -n "$mock_pid" ] && wait "$mock_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
start=$(date +%s)

echo "== embedded Kafka: librdkafka's mock cluster, 3 brokers, topic delivery.events (6 partitions)"
start_mock_cluster "$tool" "$work"
echo "   bootstrap.servers=$bootstrap"

echo
echo "== consumers: query_model, notifier, live_stats join their groups (each with its own database)"
for c in query_model notifier live_stats; do
    "$ex/$c" --bootstrap "$bootstrap" --db "$work/$c.db" --until-idle 3000 \
        > "$work/$c.out" 2>&1 &
    pids="$pids $!"
done

echo
echo "== delivery service: 200 deliveries; every state change and its event in one transaction,"
echo "   published by the relay inside the service as each transaction commits; every event"
echo "   checked against its contract (outbox.strict=true), and one payload that strays refused"
"$ex/delivery_service" --db "$work/delivery.db" --deliveries 200 \
    --bootstrap "$bootstrap" --latency

echo
echo "== the event catalog: deliveryevents contracts (and asyncapi for an AsyncAPI 3.0 document)"
"$tool" contracts --db "$work/delivery.db"

status=0
for p in $pids; do wait "$p" || status=1; done
pids=
for c in query_model notifier live_stats; do
    echo
    echo "== $c"
    cat "$work/$c.out"
done
[ $status -eq 0 ] || { echo "a consumer failed" >&2; exit 1; }

echo
echo "== reading delivery.events back from Kafka (first 6 records, then the order check)"
"$tool" tail --bootstrap "$bootstrap" --topic delivery.events --from-beginning \
    --exit-at-end --print 6
echo
echo "== the analytics history: deliveryevents archive writes every event once, by event hour"
"$tool" archive --bootstrap "$bootstrap" --topic delivery.events \
    --dir "$work/archive" --until-idle 2000 2> "$work/archive.err" ||
    { cat "$work/archive.err" >&2; exit 1; }
tail -n 1 "$work/archive.err"
(cd "$work/archive" && find delivery.events -name '*.ndjson.gz' | sort | head -4)
echo "   ... $(find "$work/archive" -name '*.ndjson.gz' | wc -l) files"
if command -v sqlite3 >/dev/null 2>&1; then
    echo
    echo "== one query over the archive alone (sqlite3 with its JSON functions):"
    echo "   deliveries reaching each status, per minute of event time"
    # One JSON array of every event line, read with readfile().
    find "$work/archive/delivery.events" -path '*/dt=*' -name '*.ndjson.gz' \
        -exec gzip -dc {} + | sed -e '1s/^/[/' -e '$!s/$/,/' -e '$s/$/]/' \
        > "$work/archive.json"
    sqlite3 -header -column :memory: <<SQL
SELECT substr(json_extract(e.value, '\$.time'), 1, 16) AS minute,
       json_extract(e.value, '\$.action') AS status, count(*) AS deliveries
  FROM json_each(CAST(readfile('$work/archive.json') AS TEXT)) AS e
 WHERE json_extract(e.value, '\$.subjecttype') = 'delivery'
 GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 12;
SQL
else
    echo "(install sqlite3 to see a query over the archive: apt-get install sqlite3)"
fi
echo
echo "demo finished in $(( $(date +%s) - start )) s"
