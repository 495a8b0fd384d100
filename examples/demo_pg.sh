#!/bin/sh
# SPDX-License-Identifier: MIT
# The demo behind `make demo-pg`: the delivery service on PostgreSQL, on
# a throwaway PostgreSQL server and an embedded Kafka (librdkafka's mock
# cluster, started by `deliveryevents mock-cluster`), nothing to set up:
#
#   delivery_service_pg --(its own transactions: row + event)--> PostgreSQL
#        relay (a thread in the service, woken by each commit) --> Kafka
#   query_model_pg  <-- consumes into its own PostgreSQL database
#
# The server is a cluster of its own: initdb into a temporary directory,
# pg_ctl with TCP off and the unix socket in that directory (so no port
# can clash with another server); as root it runs as the `postgres` OS
# user.  Then `deliveryevents tail` reads the topic back and checks every
# delivery's events are there, in order, and the read model is compared
# with the service's table.  The server and the directory are removed at
# the end, whatever happens.
# Usage: demo_pg.sh BUILD_DIR [PG_BINDIR]   (PG_BINDIR: pg_config --bindir)
set -eu
. "$(dirname "$0")/mock_cluster.sh"
build=${1:?usage: demo_pg.sh BUILD_DIR [PG_BINDIR]}
pgbin=${2:-$(pg_config --bindir)}
tool="$build/deliveryevents"
ex="$build/examples"
work=$(mktemp -d "${TMPDIR:-/tmp}/de-demo-pg-XXXXXX")
as=
mock_pid=
pids=
server=
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    exec 3>&- 2>/dev/null || true
    [ -n "$mock_pid" ] && wait "$mock_pid" 2>/dev/null || true
    [ -z "$server" ] ||
        $as "$pgbin/pg_ctl" -D "$work/data" -m immediate -w stop \
            >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
start=$(date +%s)

echo "== PostgreSQL: a throwaway cluster in $work ($("$pgbin/postgres" --version))"
if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root.
    id postgres >/dev/null 2>&1 ||
        { echo "as root the server needs the OS user 'postgres'" >&2; exit 1; }
    chown postgres "$work"
    as="runuser -u postgres --"
fi
$as "$pgbin/initdb" -D "$work/data" -A trust -U postgres -E UTF8 \
    --locale=C --no-sync > "$work/initdb.log" 2>&1 ||
    { cat "$work/initdb.log" >&2; exit 1; }
# -w waits until the server accepts connections.
server=1
$as "$pgbin/pg_ctl" -D "$work/data" -w -t 120 -l "$work/server.log" \
    -o "-c listen_addresses='' -k $work -p 5432" start > /dev/null ||
    { cat "$work/server.log" >&2; exit 1; }
pg="host=$work port=5432 user=postgres"
psql() { "$pgbin/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
for d in delivery query_model; do
    psql "$pg dbname=postgres" -c "CREATE DATABASE $d"
done
echo "   databases: delivery (the service's), query_model (the read model's)"

echo
echo "== embedded Kafka: librdkafka's mock cluster, 3 brokers, topic delivery.events (6 partitions)"
start_mock_cluster "$tool" "$work"
echo "   bootstrap.servers=$bootstrap"

echo
echo "== consumer: query_model_pg joins its group (its view and inbox in the query_model database)"
"$ex/query_model_pg" --bootstrap "$bootstrap" --db "$pg dbname=query_model" \
    --until-idle 3000 > "$work/query_model_pg.out" 2>&1 &
pids="$pids $!"

echo
echo "== delivery service on PostgreSQL: 200 deliveries; every change of a delivery's row and"
echo "   its event in one transaction, published by the relay inside the service as each"
echo "   transaction commits; every event checked against its contract (outbox.strict=true)"
"$ex/delivery_service_pg" --db "$pg dbname=delivery" --deliveries 200 \
    --bootstrap "$bootstrap" --latency

status=0
for p in $pids; do wait "$p" || status=1; done
pids=
echo
echo "== query_model_pg"
cat "$work/query_model_pg.out"
[ $status -eq 0 ] || { echo "the consumer failed" >&2; exit 1; }

echo
echo "== reading delivery.events back from Kafka (first 6 records, then the order check)"
"$tool" tail --bootstrap "$bootstrap" --topic delivery.events --from-beginning \
    --exit-at-end --print 6 > "$work/tail.out" ||
    { cat "$work/tail.out"; echo "events missing or out of order" >&2; exit 1; }
cat "$work/tail.out"
events=$(psql "$pg dbname=delivery" -At -c \
    "SELECT count(created_at) + count(assigned_at) + count(picked_up_at) +
            count(delivered_at) + count(canceled_at) FROM deliveries")
grep -q "tail: [0-9]* records on delivery.events: $events events of 200 subjects in order, 0 duplicates, 0 out of order" \
    "$work/tail.out" ||
    { echo "the topic does not hold the $events events of the service's table" >&2; exit 1; }

echo
echo "== the read model against the service's table (status, rider, times of every delivery)"
psql "$pg dbname=delivery" -At -c \
    "SELECT id, status, rider_id, created_at, delivered_at, canceled_at
       FROM deliveries ORDER BY id" > "$work/service.rows"
psql "$pg dbname=query_model" -At -c \
    "SELECT delivery_id, status, rider_id,
            (extract(epoch FROM created_at) * 1000)::bigint,
            (extract(epoch FROM delivered_at) * 1000)::bigint,
            (extract(epoch FROM canceled_at) * 1000)::bigint
       FROM delivery_status ORDER BY delivery_id" > "$work/view.rows"
if cmp -s "$work/service.rows" "$work/view.rows"; then
    echo "   all $(wc -l < "$work/service.rows") deliveries agree"
else
    diff "$work/service.rows" "$work/view.rows" | head -10
    echo "the read model differs from the service's table" >&2
    exit 1
fi

echo
echo "demo-pg finished in $(( $(date +%s) - start )) s: $events events, each" \
    "delivery's in order on Kafka and in the read model"
